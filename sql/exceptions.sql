-- Remote transactions that could not be applied yet (src/exceptions.rs), never dropped:
-- kind 'constraint': its rows break a constraint here (a unique index that is not the key, a
--   parent row that has not arrived); parked whole, retried automatically, the stream goes on.
-- kind 'ddl': a replicated schema change fails here; the stream from `via` stops before it and
--   retries it every few seconds until the schema here lets it run.
-- exception_retry(id) retries one now; exception_skip(id) applies a 'ddl' one without its failing
-- command; exception_discard(id) gives up on a 'constraint' one but keeps the row.
CREATE TABLE rbucardo.exceptions (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    kind         text NOT NULL DEFAULT 'constraint' CHECK (kind IN ('constraint', 'ddl')),
    origin       integer NOT NULL,
    origin_tick  bigint NOT NULL,
    origin_seq   bigint NOT NULL,
    via          integer NOT NULL,          -- the peer it came from
    hlc          bigint NOT NULL,
    chunks       bytea NOT NULL,            -- the transaction's chunks as received (postcard list)
    reason       text NOT NULL,
    stream_tick  bigint,                    -- 'ddl': its place in the stream from `via`
    stream_seq   bigint,
    command      text,                      -- 'ddl': the failing command
    ddl_ordinal  integer,                   -- 'ddl': the failing change within the transaction
    skip_ordinal integer,                   -- set by exception_skip: the change to leave out
    retries      integer NOT NULL DEFAULT 0,
    last_retry   timestamptz,
    resolved_at  timestamptz,
    resolution   text CHECK (resolution IN ('applied', 'discarded', 'skipped', 'parked'))
);
CREATE INDEX exceptions_open ON rbucardo.exceptions (via) WHERE resolved_at IS NULL;

-- Parts of a transaction too large for one batch, kept until its last part arrives and it is
-- applied whole (src/apply/parts.rs); at most one transaction per sender.
CREATE TABLE rbucardo.incoming_part (
    sender       integer NOT NULL,        -- node id of the peer that sends it
    stream_tick  bigint NOT NULL,         -- its position in the sender's stream
    stream_seq   bigint NOT NULL,
    part_start   integer NOT NULL,        -- its log chunks part_start .. part_end - 1
    part_end     integer NOT NULL,
    chunks       bytea NOT NULL,          -- those chunks (postcard)
    PRIMARY KEY (sender, part_start)
);
