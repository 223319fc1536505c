-- DDL replication (src/ddl.rs, docs/architecture.md "DDL"): the event triggers that record
-- schema changes in replicated schemas into the transaction's change stream, make new tables
-- join their herd, and forget dropped tables. ENABLE ALWAYS: in replica mode (apply sessions)
-- they act only while a replicated DDL command runs, to let new tables join the herd there too.
CREATE FUNCTION rbucardo.ddl_trigger() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'rbucardo_ddl_trigger';
COMMENT ON FUNCTION rbucardo.ddl_trigger() IS 'rbucardo DDL capture; event triggers rbucardo_ddl and rbucardo_ddl_drop';

CREATE EVENT TRIGGER rbucardo_ddl ON ddl_command_end EXECUTE FUNCTION rbucardo.ddl_trigger();
ALTER EVENT TRIGGER rbucardo_ddl ENABLE ALWAYS;
CREATE EVENT TRIGGER rbucardo_ddl_drop ON sql_drop EXECUTE FUNCTION rbucardo.ddl_trigger();
ALTER EVENT TRIGGER rbucardo_ddl_drop ENABLE ALWAYS;

REVOKE ALL ON FUNCTION rbucardo.ddl_trigger() FROM PUBLIC;

-- The columns and types of some tables, as {"schema.table": {"column": "type", ...}}: what a
-- replicated schema change carries to let a peer check it ended the same, and what
-- validate_schema compares between nodes.
CREATE FUNCTION rbucardo.table_shape(tables oid[]) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT coalesce(jsonb_object_agg(tbl, cols), '{}')
      FROM (SELECT format('%I.%I', n.nspname, c.relname) AS tbl,
                   jsonb_object_agg(a.attname, format_type(a.atttypid, a.atttypmod)) AS cols
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE c.oid = ANY (tables) AND c.relkind IN ('r', 'p')
             GROUP BY 1) s
$$;

-- Every column that is missing on one side or has another type, of the tables in either shape.
CREATE FUNCTION rbucardo.shape_differences(here jsonb, there jsonb)
RETURNS TABLE (table_name text, column_name text, here text, there text)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog AS $$
    WITH h AS (SELECT t.key AS tbl, c.key AS col, c.value #>> '{}' AS typ
                 FROM jsonb_each($1) t, jsonb_each(t.value) c),
         o AS (SELECT t.key AS tbl, c.key AS col, c.value #>> '{}' AS typ
                 FROM jsonb_each($2) t, jsonb_each(t.value) c)
    SELECT coalesce(h.tbl, o.tbl), coalesce(h.col, o.col), h.typ, o.typ
      FROM h FULL JOIN o ON o.tbl = h.tbl AND o.col = h.col
     WHERE h.typ IS DISTINCT FROM o.typ
     ORDER BY 1, 2
$$;

-- Differences in the columns and types of a sync's tables between this node and each of its
-- peers, as the peers last reported them (they report every few seconds while connected). No
-- row: the same everywhere.
CREATE FUNCTION rbucardo.validate_schema(sync text)
RETURNS TABLE (db text, table_name text, column_name text, here text, there text, reported_at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $$
DECLARE
    s rbucardo.sync;
    mine jsonb;
BEGIN
    SELECT * INTO s FROM rbucardo.sync y WHERE y.name = validate_schema.sync;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'sync "%" does not exist', validate_schema.sync
            USING ERRCODE = 'undefined_object', HINT = 'See SELECT name FROM rbucardo.syncs.';
    END IF;
    mine := rbucardo.table_shape(ARRAY(SELECT relid FROM rbucardo.herd_table t WHERE t.herd = s.herd));
    RETURN QUERY
    SELECT p.db, d.table_name, d.column_name, d.here, d.there, p.schema_at
      FROM rbucardo.peer_state p
      JOIN rbucardo.db n ON n.name = p.db
     CROSS JOIN LATERAL rbucardo.shape_differences(
               mine,
               (SELECT coalesce(jsonb_object_agg(k, v), '{}') FROM jsonb_each(p.schema_shape) e(k, v) WHERE mine ? k)) d
     WHERE p.db = ANY (s.dbs) AND p.schema_shape IS NOT NULL AND n.node_id IS DISTINCT FROM (SELECT node_id FROM rbucardo.node)
    UNION ALL
    SELECT p.db, NULL, NULL, NULL, 'not reported yet', NULL
      FROM rbucardo.peer_state p
      JOIN rbucardo.db n ON n.name = p.db
     WHERE p.db = ANY (s.dbs) AND p.schema_shape IS NULL AND n.node_id IS DISTINCT FROM (SELECT node_id FROM rbucardo.node)
     ORDER BY 1, 2, 3;
END
$$;
