-- rbucardo catalog: the tables that describe this node, its peers, herds and syncs.
-- Loaded first by CREATE EXTENSION (bootstrap); functions defined in Rust come after.

COMMENT ON SCHEMA rbucardo IS 'rbucardo multi-master replication';
