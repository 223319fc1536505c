-- rbucardo catalog: this node, its peers, herds and syncs, the change log and replication
-- progress. Loaded first by CREATE EXTENSION; the functions written in Rust come after.

COMMENT ON SCHEMA rbucardo IS 'rbucardo multi-master replication';

-- This database's identity in the cluster. One row. The fingerprint tells a physical copy
-- (pg_basebackup) from the node it was copied from: a copy must not replicate as its source.
CREATE TABLE rbucardo.node (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_id     integer NOT NULL CHECK (node_id BETWEEN 1 AND 1023),
    name        text NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    fingerprint text NOT NULL,
    created     timestamptz NOT NULL DEFAULT now()
);

-- Peers this node knows. With a conninfo this node connects out (and does both directions over
-- that one connection); without one the peer is passive here and connects in.
-- The seq of the position "all of tick t" (WHOLE_TICK in src/base/wire.rs).
CREATE FUNCTION rbucardo.whole_tick() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS 'SELECT 9223372036854775807::bigint';

-- The last tick a position (tick, seq) covers completely.
CREATE FUNCTION rbucardo.complete_tick(tick bigint, seq bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS 'SELECT CASE WHEN seq = rbucardo.whole_tick() THEN tick ELSE tick - 1 END';

CREATE TABLE rbucardo.db (
    name      text PRIMARY KEY CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    conninfo  text,
    node_id   integer UNIQUE,          -- learned on first contact
    created   timestamptz NOT NULL DEFAULT now(),
    -- what this node lets the peer send it (set_peer_policy, docs/security.md): its schema
    -- changes (none; limited: as ddl_role, never a superuser; trusted: as their origin's role),
    -- and whether it may relay other nodes' changes
    ddl       text NOT NULL DEFAULT 'limited' CHECK (ddl IN ('none', 'limited', 'trusted')),
    ddl_role  name,
    relay     boolean NOT NULL DEFAULT false
);

CREATE TABLE rbucardo.herd (
    name text PRIMARY KEY
);

-- Tables of a herd, with the columns that identify a row on every node.
CREATE TABLE rbucardo.herd_table (
    herd      text NOT NULL REFERENCES rbucardo.herd ON DELETE CASCADE,
    relid     oid NOT NULL,
    key_cols  name[] NOT NULL,
    PRIMARY KEY (herd, relid)
);

CREATE TABLE rbucardo.sync (
    name              text PRIMARY KEY,
    herd              text NOT NULL REFERENCES rbucardo.herd,
    dbs               text[] NOT NULL,
    conflict_strategy text NOT NULL DEFAULT 'latest',
    paused            boolean NOT NULL DEFAULT false,
    created           timestamptz NOT NULL DEFAULT now()
);

-- The change log: one row per chunk of a transaction's captured changes (local ones, and remote
-- ones applied here, kept for forwarding). seq is taken when the chunk is written; the chunk
-- written at commit is marked final, and its seq orders the transaction in its batch.
CREATE SEQUENCE rbucardo.change_seq;
CREATE TABLE rbucardo.change_log (
    seq          bigint PRIMARY KEY,
    txid         xid8 NOT NULL,
    chunk_no     integer NOT NULL,  -- 0, 1, ... within its transaction
    final        boolean NOT NULL,
    origin       integer,           -- NULL for changes made on this node
    via          integer,           -- the peer it was received from; never sent back there
    origin_tick  bigint,
    origin_seq   bigint,
    hlc          bigint NOT NULL,
    data         bytea NOT NULL,
    only_for     integer            -- set for a transaction addressed to one node (a repair)
);
CREATE INDEX change_log_txid ON rbucardo.change_log (txid);
-- vacuum_truncate off: after a trim, VACUUM would give the empty pages at the end back to the
-- system under an ACCESS EXCLUSIVE lock, and every commit that writes the log (each captured
-- and each applied transaction) would wait for it: a stall of hundreds of milliseconds in
-- replication lag. The table refills those pages soon anyway.
ALTER TABLE rbucardo.change_log SET (autovacuum_vacuum_scale_factor = 0.01, vacuum_truncate = false);

-- Ticks cut the change log into snapshot-bounded batches (PgQ's technique): a transaction
-- belongs to the first tick whose snapshot sees it committed, so one that commits late is
-- still shipped. last_seq is change_seq's value read just before the snapshot was taken.
CREATE TABLE rbucardo.tick (
    tick_id   bigint PRIMARY KEY,
    snap      pg_snapshot NOT NULL,
    last_seq  bigint NOT NULL,
    created   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rbucardo.tick VALUES (0, pg_current_snapshot(), 0);
ALTER TABLE rbucardo.tick SET (vacuum_truncate = false);  -- as change_log: ticks are cut while it is trimmed

-- Per peer: how far I have applied the peer's stream (in_*), and how far the peer has confirmed
-- mine (out_*), plus what the worker last saw of the link.
CREATE TABLE rbucardo.peer_state (
    db            text PRIMARY KEY REFERENCES rbucardo.db ON DELETE CASCADE ON UPDATE CASCADE,
    -- positions are (tick, seq); (t, rbucardo.whole_tick()) means all of tick t
    in_tick       bigint NOT NULL DEFAULT 0,
    in_seq        bigint NOT NULL DEFAULT rbucardo.whole_tick(),
    out_tick      bigint NOT NULL DEFAULT 0,
    out_seq       bigint NOT NULL DEFAULT rbucardo.whole_tick(),
    applied_in    bigint NOT NULL DEFAULT 0,
    state         text NOT NULL DEFAULT 'disconnected',
    last_contact  timestamptz,
    last_error    text,
    -- the columns and types of the peer's replicated tables, as it last reported them
    -- (rbucardo.table_shape format), for validate_schema
    schema_shape  jsonb,
    schema_at     timestamptz,
    -- why the last batch from the peer was refused (src/apply/admit.rs), until one applies
    refused       text,
    refused_at    timestamptz,
    -- when this node stopped keeping its change log for the peer (src/log/retention.rs), and
    -- why; the peer must rejoin
    expired_at    timestamptz,
    expired_why   text,
    -- while the peer joins from this node's copies (src/runtime/join.rs): the tick cut after
    -- its last copy, and each table's copy snapshot ([[schema, table, snapshot], ...]);
    -- transactions a copy holds are left out of what the peer is sent, up to that tick
    join_until    bigint,
    join_filter   text
);

-- Per origin node: the position in the origin's own stream up to which its changes are applied
-- here. Updated in the same transaction as the rows, so a crash neither loses nor duplicates;
-- a change arriving by a second path is recognised and skipped.
CREATE TABLE rbucardo.origin_progress (
    origin      integer PRIMARY KEY,
    tick        bigint NOT NULL,
    seq         bigint NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- The operator's role for peers: the peer-facing functions are granted to it only.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rbucardo_peer') THEN
        CREATE ROLE rbucardo_peer NOLOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA rbucardo TO rbucardo_peer;
