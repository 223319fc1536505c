-- Online join (src/runtime/join.rs, src/api/join.rs): a new node copies each table from a
-- provider over its peer link while every node keeps writing, and meets the provider's stream
-- where the copies end. These tables live on the joining node; the provider keeps only the
-- filter in rbucardo.peer_state (join_until, join_filter).

-- A join in progress or done, one per provider.
CREATE TABLE rbucardo.join_run (
    provider    text PRIMARY KEY REFERENCES rbucardo.db ON DELETE CASCADE ON UPDATE CASCADE,
    start_tick  bigint NOT NULL,                -- the provider's tick before every copy
    state       text NOT NULL DEFAULT 'copying' CHECK (state IN ('copying', 'done')),
    pid         integer,                        -- the worker copying, for pg_stat_progress_copy
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    last_error  text
);

-- Each table of a join: copied whole in one snapshot of the provider (kept, to filter the
-- provider's stream), and copied again from the start after a cut or a restart.
CREATE TABLE rbucardo.join_table (
    provider    text NOT NULL REFERENCES rbucardo.join_run ON DELETE CASCADE ON UPDATE CASCADE,
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    state       text NOT NULL DEFAULT 'waiting' CHECK (state IN ('waiting', 'copying', 'copied')),
    est_rows    bigint,                         -- the provider's estimate when the join began
    rows        bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    attempts    integer NOT NULL DEFAULT 0,
    snapshot    text,                           -- the provider's snapshot of the copy
    started_at  timestamptz,
    finished_at timestamptz,
    last_error  text,
    PRIMARY KEY (provider, schema_name, table_name)
);

-- What a join is doing: rows and bytes copied (live from pg_stat_progress_copy while a table
-- is being copied), the rate, and an estimate of the time left for the table.
CREATE VIEW rbucardo.join_progress AS
SELECT r.provider, r.state AS join_state, t.schema_name, t.table_name, t.state,
       c.rows, c.bytes, t.est_rows, t.attempts,
       round(c.bytes / nullif(c.secs, 0))::bigint AS bytes_per_second,
       round(c.rows / nullif(c.secs, 0))::bigint AS rows_per_second,
       CASE WHEN t.state = 'copying' AND c.rows > 0 AND t.est_rows > c.rows
            THEN make_interval(secs => (t.est_rows - c.rows) * c.secs / c.rows) END AS time_left,
       t.started_at, t.finished_at, coalesce(t.last_error, r.last_error) AS last_error
  FROM rbucardo.join_run r
  JOIN rbucardo.join_table t ON t.provider = r.provider
  LEFT JOIN pg_catalog.pg_stat_progress_copy p
         ON t.state = 'copying' AND p.pid = r.pid
        AND p.relid = (SELECT k.oid FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
                        WHERE n.nspname = t.schema_name AND k.relname = t.table_name)
  CROSS JOIN LATERAL (SELECT coalesce(p.tuples_processed, t.rows) AS rows,
                             coalesce(p.bytes_processed, t.bytes) AS bytes,
                             extract(epoch FROM coalesce(t.finished_at, now()) - t.started_at) AS secs) c;

-- The statements that make a table as it is here, for a joining node that lacks it:
-- `types` (enum types its columns use), `creates` (schema, sequences of serial columns, the
-- table, its owner: that role must exist on the joining node) and `laters` (constraints,
-- foreign keys last, other indexes, sequence ownership), run after every table is created.
CREATE FUNCTION rbucardo.table_ddl(tbl regclass, OUT types text[], OUT creates text[], OUT laters text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT
    ARRAY(SELECT format('CREATE TYPE %s AS ENUM (%s)', t.oid::regtype,
                        (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                           FROM pg_enum e WHERE e.enumtypid = t.oid))
            FROM pg_attribute a
            JOIN pg_type t ON t.oid = a.atttypid OR t.typarray = a.atttypid
           WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype = 'e'
           GROUP BY t.oid ORDER BY t.oid),
    ARRAY[format('CREATE SCHEMA IF NOT EXISTS %I', n.nspname)]
    || ARRAY(SELECT format('CREATE SEQUENCE IF NOT EXISTS %s AS %s', s.oid::regclass, format_type(q.seqtypid, NULL))
               FROM pg_depend d
               JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_sequence q ON q.seqrelid = s.oid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.refobjid = tbl AND d.deptype = 'a'
              ORDER BY 1)
    || format('CREATE TABLE %s (%s)', tbl,
              (SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod))
                                 || CASE WHEN a.attcollation <> t.typcollation THEN ' COLLATE ' || a.attcollation::regcollation ELSE '' END
                                 || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY'
                                                       WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END
                                 || CASE WHEN a.attgenerated = 's' THEN format(' GENERATED ALWAYS AS (%s) STORED', pg_get_expr(ad.adbin, ad.adrelid))
                                         WHEN ad.adbin IS NOT NULL THEN ' DEFAULT ' || pg_get_expr(ad.adbin, ad.adrelid) ELSE '' END
                                 || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END,
                                 ', ' ORDER BY a.attnum)
                 FROM pg_attribute a
                 JOIN pg_type t ON t.oid = a.atttypid
                 LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped))
    || format('ALTER TABLE %s OWNER TO %s', tbl, k.relowner::regrole),
    ARRAY(SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s', tbl, c.conname, pg_get_constraintdef(c.oid))
            FROM pg_constraint c
           WHERE c.conrelid = tbl AND c.contype IN ('p', 'u', 'c', 'x', 'f')
           ORDER BY c.contype = 'f', c.conname)
    || ARRAY(SELECT pg_get_indexdef(i.indexrelid)
               FROM pg_index i
              WHERE i.indrelid = tbl
                AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = tbl)
              ORDER BY i.indexrelid::regclass::text)
    || ARRAY(SELECT format('ALTER SEQUENCE %s OWNER TO %s', s.oid::regclass, k.relowner::regrole)
               FROM pg_depend d
               JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.refobjid = tbl AND d.deptype = 'a'
              ORDER BY 1)
    || ARRAY(SELECT format('ALTER SEQUENCE %s OWNED BY %s.%I', s.oid::regclass, tbl, a.attname)
               FROM pg_depend d
               JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
               JOIN pg_attribute a ON a.attrelid = tbl AND a.attnum = d.refobjsubid
              WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                AND d.refobjid = tbl AND d.deptype = 'a'
              ORDER BY 1)
  FROM pg_class k JOIN pg_namespace n ON n.oid = k.relnamespace
 WHERE k.oid = tbl
$$;

REVOKE ALL ON FUNCTION rbucardo.table_ddl(regclass) FROM PUBLIC;
