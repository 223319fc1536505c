-- The conflict log: every time an incoming row change met a local row that was not what the
-- sender had seen and one version lost (or a custom function decided), both versions are kept
-- here with the rule applied and the winner, so that no version is ever discarded silently.
-- conflict_reapply(id) writes the loser back. Outcomes that discard nothing (a clean column
-- merge, delta columns adding up, a change arriving identical to the row) are only counted in
-- conflict_counts, unless set_conflict_logging(tbl, true) asks for them here too. Entries
-- older than rbucardo.conflict_retention_days are pruned by the worker.
CREATE TABLE rbucardo.conflicts (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    sync           text,                     -- the sync whose herd holds the table (NULL: none)
    tbl            text NOT NULL,            -- schema-qualified table name
    key            jsonb NOT NULL,           -- replica key of the row
    kind           text NOT NULL CHECK (kind IN ('insert_exists', 'update_differs', 'update_missing',
                                                  'delete_differs', 'delete_missing', 'unique_collision')),
    local_version  jsonb,                    -- the row here before the change (NULL: missing)
    remote_version jsonb,                    -- the incoming row (NULL for a delete)
    local_origin   integer,                  -- node that made the local version (NULL: unknown)
    local_hlc      bigint,                   -- its clock value (NULL: unknown)
    remote_origin  integer NOT NULL,         -- node that made the incoming change
    remote_hlc     bigint NOT NULL,          -- its clock value
    rule           text NOT NULL,            -- the strategy applied ('merge' for a column merge)
    winner         text NOT NULL CHECK (winner IN ('local', 'remote', 'merged', 'none')),  -- 'none': nothing kept or nothing to keep
    reapplied_at   timestamptz               -- set by conflict_reapply
);
CREATE INDEX conflicts_at ON rbucardo.conflicts (at);

-- How many conflicts of each kind met each table, by outcome, logged or not: what monitoring
-- reads (rbucardo.conflict_stats). Written once per applied batch, not per row.
CREATE TABLE rbucardo.conflict_counts (
    tbl       text NOT NULL,
    kind      text NOT NULL,
    outcome   text NOT NULL,              -- local, remote, merged, none; column_merge, identical, both_deleted
    n         bigint NOT NULL,
    first_at  timestamptz NOT NULL DEFAULT now(),
    last_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, kind, outcome)
);

-- Conflicts per table, kind and outcome, and whether that outcome reaches the conflict log
-- (one that discarded a version, or a custom decision); the clean ones reach it only for tables
-- with set_conflict_logging(tbl, true).
CREATE VIEW rbucardo.conflict_stats AS
SELECT c.tbl, c.kind, c.outcome, c.n AS conflicts,
       c.outcome IN ('local', 'remote', 'merged', 'none') AS logged,
       c.first_at, c.last_at
  FROM rbucardo.conflict_counts c;

-- The clock of the last change to each column of every replicated row whose change has left
-- the change log (trimmed once every peer had it): the `latest` rule compares an incoming
-- change with the clock of the local version of the columns in conflict, found in the change
-- log while the change is there, here afterwards. col '*': a change that set every column.
-- Keys and columns compare byte by byte ("C"): only equality matters, and a trim writes a row
-- here for most rows it trims (src/log/clocks.rs). A key over 2000 bytes is kept as 'sha256:'
-- and its digest in hex: a btree entry holds at most about 2700 bytes.
CREATE TABLE rbucardo.row_clock (
    relid   oid NOT NULL,
    key     text COLLATE "C" NOT NULL,  -- the replica key as a JSON object of column to text value
    col     text COLLATE "C" NOT NULL,  -- the column this clock set ('*': every column)
    hlc     bigint NOT NULL,
    origin  integer NOT NULL,
    PRIMARY KEY (relid, key, col)
);

-- Per-table and per-column overrides of how conflicts are resolved.
CREATE TABLE rbucardo.table_option (
    relid     oid PRIMARY KEY,
    strategy  text,                        -- overrides the sync's conflict strategy
    merge     boolean NOT NULL DEFAULT true, -- column-level merge of non-overlapping changes
    log_merges boolean NOT NULL DEFAULT false -- log clean outcomes too, not only count them
);
-- Unique indexes other than the replica key whose collisions (one login made at two stores)
-- are settled without an operator: the later row's value is renamed on every node. An index
-- without a row here parks the transaction that collides (the default).
CREATE TABLE rbucardo.index_option (
    indexrelid oid PRIMARY KEY,
    relid      oid NOT NULL,
    strategy   text NOT NULL CHECK (strategy IN ('rename')),
    col        name NOT NULL              -- the text column the later row renames
);
CREATE TABLE rbucardo.column_option (
    relid     oid NOT NULL,
    col       name NOT NULL,
    strategy  text NOT NULL CHECK (strategy IN ('delta')),
    PRIMARY KEY (relid, col)
);
