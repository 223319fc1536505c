-- The conflict log: every time an incoming row change met a local row that was not what the
-- sender had seen, both versions are kept here with the rule applied and the winner, so that
-- no version is ever discarded silently. conflict_reapply(id) writes the loser back.
CREATE TABLE rbucardo.conflicts (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    sync           text,                     -- the sync whose herd holds the table (NULL: none)
    tbl            text NOT NULL,            -- schema-qualified table name
    key            jsonb NOT NULL,           -- replica key of the row
    kind           text NOT NULL CHECK (kind IN ('insert_exists', 'update_differs', 'update_missing',
                                                  'delete_differs', 'delete_missing')),
    local_version  jsonb,                    -- the row here before the change (NULL: missing)
    remote_version jsonb,                    -- the incoming row (NULL for a delete)
    local_origin   integer,                  -- node that made the local version (NULL: unknown)
    local_hlc      bigint,                   -- its clock value (NULL: unknown)
    remote_origin  integer NOT NULL,         -- node that made the incoming change
    remote_hlc     bigint NOT NULL,          -- its clock value
    rule           text NOT NULL,            -- the strategy applied ('merge' for a column merge)
    winner         text NOT NULL CHECK (winner IN ('local', 'remote', 'merged', 'none')),
    reapplied_at   timestamptz               -- set by conflict_reapply
);
CREATE INDEX conflicts_at ON rbucardo.conflicts (at);

-- The clock of the last change to every replicated row whose change has left the change log
-- (trimmed once every peer had it): the `latest` rule compares an incoming change with the
-- local version's clock, found in the change log while the change is there, here afterwards.
CREATE TABLE rbucardo.row_clock (
    relid   oid NOT NULL,
    key     text NOT NULL,      -- the replica key as a JSON object of column to text value
    hlc     bigint NOT NULL,
    origin  integer NOT NULL,
    PRIMARY KEY (relid, key)
);

-- Per-table and per-column overrides of how conflicts are resolved.
CREATE TABLE rbucardo.table_option (
    relid     oid PRIMARY KEY,
    strategy  text,                        -- overrides the sync's conflict strategy
    merge     boolean NOT NULL DEFAULT true -- column-level merge of non-overlapping changes
);
CREATE TABLE rbucardo.column_option (
    relid     oid NOT NULL,
    col       name NOT NULL,
    strategy  text NOT NULL CHECK (strategy IN ('delta')),
    PRIMARY KEY (relid, col)
);
