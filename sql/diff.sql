-- Compare and repair (src/api/diff.rs): the rows rbucardo.diff found different between this
-- node and a peer, kept until a later diff of the same peer and table, or a repair, replaces
-- them. Keys and rows are JSON of the values' canonical text.
CREATE TABLE rbucardo.diff_result (
    sync        text NOT NULL,
    peer        text NOT NULL,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    key         jsonb NOT NULL,
    here        jsonb,              -- NULL: the row is missing here
    there       jsonb,              -- NULL: the row is missing on the peer
    found_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sync, peer, schema_name, table_name, key)
);
