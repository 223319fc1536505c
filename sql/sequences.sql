-- Collision-free sequences (src/sequences.rs, docs/sequences.md): what rbucardo did to each
-- sequence of a herd, the sequence strategy of each sync, the event trigger that partitions new
-- sequences at once, and the view that checks every sequence is still node-disjoint.

-- The sequence strategy of a sync: interleave (default), range or snowflake.
CREATE TABLE rbucardo.sync_sequence_strategy (
    sync      text PRIMARY KEY REFERENCES rbucardo.sync ON DELETE CASCADE ON UPDATE CASCADE,
    strategy  text NOT NULL CHECK (strategy IN ('interleave', 'range', 'snowflake'))
);

-- One row per sequence of a herd and what was applied to it on this node. strategy NULL: not
-- partitioned (the node was not initialised yet, or a new sequence could not be partitioned).
CREATE TABLE rbucardo.herd_sequence (
    herd       text NOT NULL REFERENCES rbucardo.herd ON DELETE CASCADE,
    seqrelid   oid NOT NULL,
    source     text NOT NULL CHECK (source IN ('table', 'explicit', 'created')),
    strategy   text CHECK (strategy IN ('interleave', 'range', 'snowflake')),
    node_id    integer,          -- the node id it was partitioned for
    increment  bigint,
    min_value  bigint,
    max_value  bigint,
    restart    bigint,           -- the first value it handed out after partitioning
    applied    timestamptz,
    PRIMARY KEY (herd, seqrelid)
);

-- The value a sequence hands out next (numeric: it may be past the end of bigint).
CREATE FUNCTION rbucardo.sequence_next_value(seq regclass) RETURNS numeric
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v bigint;
    called boolean;
BEGIN
    EXECUTE format('SELECT last_value, is_called FROM %s', seq) INTO v, called;
    IF NOT called THEN
        RETURN v;
    END IF;
    RETURN v::numeric + (SELECT seqincrement FROM pg_sequence WHERE seqrelid = seq);
END $$;

-- Every sequence of every herd, checked against what its strategy promises on this node.
-- state: ok; colliding (its settings no longer keep it apart from other nodes: altered by
-- hand, never partitioned, or partitioned for another node id); near exhaustion (less than 10%
-- of this node's ids left).
CREATE VIEW rbucardo.sequences AS
WITH s AS (
    SELECT h.seqrelid::regclass AS sequence,
           h.herd,
           h.strategy,
           p.seqincrement AS increment,
           p.seqmin, p.seqmax, p.seqcycle,
           CASE p.seqtypid WHEN 'int2'::regtype THEN 32767::numeric
                           WHEN 'int4'::regtype THEN 2147483647::numeric
                           ELSE 9223372036854775807::numeric END AS type_max,
           pg_sequence_last_value(h.seqrelid) AS last_value,
           rbucardo.sequence_next_value(h.seqrelid) AS next_value,
           (SELECT n.node_id FROM rbucardo.node n) AS node_id
      FROM rbucardo.herd_sequence h
      JOIN pg_sequence p ON p.seqrelid = h.seqrelid
), c AS (
    SELECT s.*,
           CASE s.strategy
               WHEN 'snowflake' THEN true
               WHEN 'interleave' THEN s.increment = 64 AND NOT s.seqcycle AND s.node_id < 64
                                      AND mod(s.next_value, 64) = s.node_id
               WHEN 'range' THEN s.increment >= 1 AND NOT s.seqcycle AND s.node_id < 64
                                 AND s.seqmin = s.node_id * div(s.type_max, 64)
                                 AND s.seqmax = (s.node_id + 1) * div(s.type_max, 64) - 1
                                 AND s.next_value >= s.seqmin
               ELSE false
           END AS disjoint,
           CASE WHEN s.strategy IN ('interleave', 'range') THEN
               CASE WHEN s.next_value > s.seqmax THEN 0 ELSE div(s.seqmax - s.next_value, s.increment) + 1 END
           END AS ids_left,
           div(s.type_max, 64) AS ids_per_node
      FROM s
)
SELECT sequence,
       herd,
       coalesce(strategy, 'none') AS strategy,
       increment,
       last_value,
       CASE WHEN NOT coalesce(disjoint, false) THEN 'colliding'
            WHEN ids_left * 10 < ids_per_node THEN 'near exhaustion'
            ELSE 'ok' END AS state,
       ids_left::bigint AS ids_left
  FROM c;

-- New sequences in a schema that holds a replicated table are partitioned at the end of the
-- command that created them, before their first value. Runs as the extension's owner (the
-- catalog is not readable by applications), and also while peers' changes are applied
-- (ENABLE ALWAYS), so a sequence created by replicated DDL is partitioned for this node too.
CREATE FUNCTION rbucardo.sequences_event_trigger() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    objs oid[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM rbucardo.herd_table) THEN
        RETURN;
    END IF;
    SELECT array_agg(objid) INTO objs FROM pg_event_trigger_ddl_commands()
     WHERE NOT in_extension AND object_type IN ('sequence', 'table') AND classid = 'pg_class'::regclass;
    IF objs IS NOT NULL THEN
        PERFORM rbucardo.sequences_on_ddl(objs);
    END IF;
END $$;

CREATE EVENT TRIGGER rbucardo_sequences ON ddl_command_end
    WHEN TAG IN ('CREATE SEQUENCE', 'CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION rbucardo.sequences_event_trigger();
ALTER EVENT TRIGGER rbucardo_sequences ENABLE ALWAYS;

REVOKE ALL ON FUNCTION rbucardo.sequences_on_ddl(oid[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION rbucardo.sequences_event_trigger() FROM PUBLIC;
REVOKE ALL ON FUNCTION rbucardo.sequence_next_value(regclass) FROM PUBLIC;
