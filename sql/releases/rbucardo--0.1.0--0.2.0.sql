-- rbucardo 0.1.0 -> 0.2.0 (ALTER EXTENSION rbucardo UPDATE).
--
-- 0.1.0 is the first release: rbucardo--0.1.0.sql beside this file is its install script as
-- cargo pgrx generated it, kept so that a 0.1.0 database can be created and updated in the
-- test (scripts/test-package.sh). Until 0.2.0 is released, every change to the schema (sql/,
-- #[pg_extern] signatures, extension_sql!) must be written here too: the test fails, with a
-- diff, when a 0.1.0 database updated with this script differs from a fresh 0.2.0 install.

\echo Use "ALTER EXTENSION rbucardo UPDATE" to load this file. \quit

-- Retention (src/log/retention.rs): a peer away too long is expired and must rejoin.
ALTER TABLE rbucardo.peer_state ADD COLUMN expired_at timestamptz, ADD COLUMN expired_why text;

-- One row per sync and peer. pending_out counts this node's transactions (its own and those it
-- forwards) that the peer has not confirmed yet, held_since is when the oldest of them was
-- made; applied_in counts the peer's transactions applied here; exceptions counts the peer's
-- transactions parked here and still open.
CREATE OR REPLACE VIEW rbucardo.status AS
SELECT s.name AS sync,
       d.name AS db,
       CASE WHEN p.expired_at IS NOT NULL THEN 'expired'
            WHEN s.paused THEN 'paused'
            -- A schema change from this peer fails here: its stream waits (rbucardo.exceptions).
            WHEN x.reason IS NOT NULL THEN 'stopped'
            -- Its last batch asked for more than this node lets it do (src/apply/admit.rs).
            WHEN p.refused IS NOT NULL THEN 'refused'
            -- A passive peer calls in at least every few seconds while it is up.
            WHEN d.conninfo IS NULL AND (p.last_contact IS NULL OR p.last_contact < now() - interval '30 seconds')
                THEN 'disconnected'
            ELSE coalesce(p.state, 'disconnected') END AS state,
       p.last_contact,
       w.pending AS pending_out,
       p.applied_in,
       coalesce(p.expired_why, x.reason, p.refused, p.last_error) AS last_error,
       -- Transactions from this peer parked here or stopping its stream (rbucardo.exceptions),
       -- not yet resolved.
       (SELECT count(*) FROM rbucardo.exceptions e
         WHERE e.resolved_at IS NULL AND e.via = d.node_id) AS exceptions,
       w.held_since
  FROM rbucardo.sync s
  JOIN rbucardo.db d ON d.name = ANY (s.dbs)
  LEFT JOIN rbucardo.peer_state p ON p.db = d.name
  LEFT JOIN LATERAL (SELECT coalesce((SELECT t.snap FROM rbucardo.tick t
                                         WHERE t.tick_id = rbucardo.complete_tick(p.out_tick, p.out_seq)),
                                       '1:1:'::pg_snapshot) AS snap) c ON true
  -- What the peer has not confirmed: transactions its confirmed tick's snapshot does not see.
  -- Those all have a txid at or past that snapshot's xmin: the txid index finds them without
  -- reading the whole log.
  LEFT JOIN LATERAL (SELECT count(*) AS pending, to_timestamp(min(l.hlc) / 1e6) AS held_since
                       FROM rbucardo.change_log l
                      WHERE l.final
                        AND l.txid >= pg_snapshot_xmin(c.snap)
                        AND l.origin IS DISTINCT FROM d.node_id
                        AND l.via IS DISTINCT FROM d.node_id
                        AND NOT pg_visible_in_snapshot(l.txid, c.snap)) w ON true
  LEFT JOIN LATERAL (SELECT e.reason FROM rbucardo.exceptions e
                      WHERE e.kind = 'ddl' AND e.resolved_at IS NULL AND e.via = d.node_id
                      ORDER BY e.id LIMIT 1) x ON true;

-- rbucardo.peer_retention as the worker reads it (src/api/monitor.rs).
CREATE FUNCTION rbucardo."peer_retention_seconds"() RETURNS bigint
STRICT STABLE
LANGUAGE c
AS 'MODULE_PATHNAME', 'peer_retention_seconds_wrapper';

-- The cluster view: node reports traded between peers (sql/cluster.sql, as it is there).
-- One view of the whole chain. Every node sums up its own state in a report (local_report) and
-- trades reports with each peer it talks to, over the link it already has, every few seconds
-- (rbucardo.peer_report; src/runtime/link.rs). A node keeps the newest report of every other
-- node it has heard of, so a hub knows the stores behind it and main knows every node, however
-- many hops away. Reports are for monitoring only: nothing in them drives replication.

CREATE TABLE rbucardo.node_report (
    node_id     integer PRIMARY KEY,
    name        text NOT NULL,
    via         text NOT NULL,          -- the peer this report came from
    hops        integer NOT NULL,       -- 1: the node itself sent it
    reported_at timestamptz NOT NULL,   -- when the node made it (its own clock)
    received_at timestamptz NOT NULL DEFAULT now(),
    report      jsonb NOT NULL
);

-- The latest report of this node, made at most every 5 seconds however many peers ask for it
-- (each report reads rbucardo.status, which scans the change log once per peer).
CREATE TABLE rbucardo.own_report (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    made_at   timestamptz NOT NULL,
    report    jsonb NOT NULL
);

-- This node's state, as it reports it to its peers.
CREATE FUNCTION rbucardo.local_report() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET jit = off AS $$
SELECT jsonb_build_object(
    'node_id', n.node_id,
    'name', n.name,
    'at', now(),
    'version', (SELECT extversion FROM pg_extension WHERE extname = 'rbucardo'),
    'exceptions', (SELECT count(*) FROM rbucardo.exceptions e WHERE e.resolved_at IS NULL),
    'conflicts_hour', (SELECT count(*) FROM rbucardo.conflicts c WHERE c.at > now() - interval '1 hour'),
    'log_rows', (SELECT count(*) FROM rbucardo.change_log),
    'log_bytes', pg_total_relation_size('rbucardo.change_log'),
    'log_oldest', (SELECT to_timestamp(l.hlc / 1e6) FROM rbucardo.change_log l ORDER BY l.seq LIMIT 1),  -- the oldest row written
    'schema_differences', (SELECT count(*) FROM rbucardo.sync s CROSS JOIN LATERAL rbucardo.validate_schema(s.name) v),
    'retention_seconds', rbucardo.peer_retention_seconds(),
    'peers', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'name', d.name, 'node_id', d.node_id, 'state', st.state, 'last_contact', p.last_contact,
                   'pending_out', st.pending_out, 'oldest_pending', st.held_since, 'exceptions', st.exceptions) ORDER BY d.name)
          FROM rbucardo.db d
          LEFT JOIN rbucardo.peer_state p ON p.db = d.name
          LEFT JOIN LATERAL (SELECT max(s.state) AS state, max(s.pending_out) AS pending_out, max(s.exceptions) AS exceptions,
                                    min(s.held_since) AS held_since
                               FROM rbucardo.status s WHERE s.db = d.name) st ON true), '[]'::jsonb))
  FROM rbucardo.node n
$$;

-- Makes this node's report again; the housekeeper calls it every 5 seconds
-- (src/runtime/housekeeper.rs).
CREATE FUNCTION rbucardo.refresh_own_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r jsonb := rbucardo.local_report();
BEGIN
    INSERT INTO rbucardo.own_report AS o (made_at, report) VALUES (clock_timestamp(), r)
        ON CONFLICT (singleton) DO UPDATE SET made_at = excluded.made_at, report = excluded.report;
    RETURN r;
END
$$;

-- The report a link hands to a peer: the housekeeper's, made in the last minute. Making one
-- reads the change log once per peer, so a link makes it only when there is none that
-- recent (no housekeeper).
CREATE FUNCTION rbucardo.cached_report() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r jsonb;
BEGIN
    SELECT o.report INTO r FROM rbucardo.own_report o WHERE o.made_at > clock_timestamp() - interval '1 minute';
    RETURN coalesce(r, rbucardo.refresh_own_report());
END
$$;

-- The reports this node passes to `peer`: its own, and every other one it holds except the
-- peer's own.
CREATE FUNCTION rbucardo.reports_for(peer text) RETURNS jsonb
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
SELECT jsonb_build_array(jsonb_build_object('hops', 0, 'report', rbucardo.cached_report()))
       || coalesce((SELECT jsonb_agg(jsonb_build_object('hops', r.hops, 'report', r.report) ORDER BY r.node_id)
                      FROM rbucardo.node_report r
                     WHERE r.name IS DISTINCT FROM peer), '[]'::jsonb)
$$;

-- A report's value as a time, or NULL when it is not a finite one (a report is a peer's word).
CREATE FUNCTION rbucardo.report_time(v jsonb) RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR length(v #>> '{}') > 40 THEN
        RETURN NULL;
    END IF;
    RETURN CASE WHEN isfinite((v #>> '{}')::timestamptz) THEN (v #>> '{}')::timestamptz END;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- A report's value as a count, or NULL when it is not a whole number a bigint holds.
-- No SET clause, everything qualified: PostgreSQL inlines it into the calling query (a SET
-- clause made every call plan its body again: a store of 21 reports called it thousands of
-- times).
CREATE FUNCTION rbucardo.report_count(v jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
SELECT CASE WHEN pg_catalog.jsonb_typeof(v) OPERATOR(pg_catalog.=) 'number'
             AND v::pg_catalog.text OPERATOR(pg_catalog.~) '^[0-9]{1,18}$'
            THEN v::pg_catalog.text::pg_catalog.int8 END
$$;

-- A report rebuilt from the fields a report has, each checked: what the view reads is never
-- malformed, whatever a peer sent. Nothing else of it is kept.
CREATE FUNCTION rbucardo.clean_report(r jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT jsonb_build_object(
    'node_id', rbucardo.report_count(r->'node_id'),
    'name', r->>'name',
    'at', rbucardo.report_time(r->'at'),
    'version', left(r->>'version', 32),
    'exceptions', rbucardo.report_count(r->'exceptions'),
    'conflicts_hour', rbucardo.report_count(r->'conflicts_hour'),
    'log_rows', rbucardo.report_count(r->'log_rows'),
    'log_bytes', rbucardo.report_count(r->'log_bytes'),
    'log_oldest', rbucardo.report_time(r->'log_oldest'),
    'schema_differences', rbucardo.report_count(r->'schema_differences'),
    'retention_seconds', rbucardo.report_count(r->'retention_seconds'),
    'peers', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'name', p->>'name', 'node_id', rbucardo.report_count(p->'node_id'), 'state', left(p->>'state', 16),
                   'last_contact', rbucardo.report_time(p->'last_contact'), 'pending_out', rbucardo.report_count(p->'pending_out'),
                   'oldest_pending', rbucardo.report_time(p->'oldest_pending'), 'exceptions', rbucardo.report_count(p->'exceptions')))
          FROM (SELECT p FROM jsonb_array_elements(CASE WHEN jsonb_typeof(r->'peers') = 'array' THEN r->'peers' ELSE '[]' END) p
                 WHERE jsonb_typeof(p) = 'object' AND p->>'name' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
                 LIMIT 256) x), '[]'::jsonb))
$$;

-- Keeps the reports `peer` passed on that are newer than those held, cleaned. A peer speaks
-- for itself and for nodes this one does not talk to directly: a report that names this node,
-- or a direct peer (by name or by node id) other than the sender as itself, is ignored. A
-- report from the future (beyond 5 minutes of clock difference), older than 30 days, or beyond
-- the first 1000 nodes is ignored too. Reports not renewed for 30 days are dropped.
CREATE FUNCTION rbucardo.store_reports(peer text, reports jsonb) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DELETE FROM rbucardo.node_report WHERE reported_at < now() - interval '30 days';
INSERT INTO rbucardo.node_report AS r (node_id, name, via, hops, reported_at, report)
SELECT c.node_id, c.name, peer, x.hops + 1, c.at, c.report
  FROM (SELECT x.hops, x.report FROM jsonb_to_recordset(CASE WHEN jsonb_typeof(reports) = 'array' THEN reports ELSE '[]' END)
                                      AS x(hops integer, report jsonb)
         WHERE jsonb_typeof(x.report) = 'object' AND x.hops BETWEEN 0 AND 64
         LIMIT 1000) x
 CROSS JOIN LATERAL (SELECT k.report, (k.report->>'node_id')::integer AS node_id, k.report->>'name' AS name,
                            (k.report->>'at')::timestamptz AS at
                       -- OFFSET 0: cleaned once per report, not once per use of its fields.
                       FROM (SELECT rbucardo.clean_report(x.report) AS report OFFSET 0) k) c
 WHERE c.node_id BETWEEN 1 AND 1023
   AND c.name ~ '^[A-Za-z_][A-Za-z0-9_]*$'
   AND c.at BETWEEN now() - interval '30 days' AND now() + interval '5 minutes'
   AND c.node_id IS DISTINCT FROM (SELECT node_id FROM rbucardo.node)
   AND c.name IS DISTINCT FROM (SELECT name FROM rbucardo.node)
   AND CASE WHEN c.name = peer THEN c.node_id = (SELECT d.node_id FROM rbucardo.db d WHERE d.name = peer)
            ELSE NOT EXISTS (SELECT 1 FROM rbucardo.db d WHERE d.name = c.name OR d.node_id = c.node_id) END
   AND ((SELECT count(*) FROM rbucardo.node_report) < 1000 OR EXISTS (SELECT 1 FROM rbucardo.node_report o WHERE o.node_id = c.node_id))
ON CONFLICT (node_id) DO UPDATE
   SET name = excluded.name, via = excluded.via, hops = excluded.hops, reported_at = excluded.reported_at,
       received_at = now(), report = excluded.report
 WHERE excluded.reported_at > r.reported_at
$$;

-- One row per node of the chain: this one, its peers and every node beyond them that a report
-- reached. `attention` says which ones need an operator; an operator of a hundred stores asks
-- `SELECT * FROM rbucardo.cluster WHERE attention IS NOT NULL`.
CREATE VIEW rbucardo.cluster AS
WITH here AS (
    SELECT rbucardo.local_report() AS report
), nodes AS (
    SELECT (h.report->>'node_id')::integer AS node_id, h.report->>'name' AS node, 0 AS hops, NULL::text AS via,
           now() AS last_contact, h.report
      FROM here h
     UNION ALL
    SELECT r.node_id, r.name, r.hops, r.via, r.reported_at, r.report
      FROM rbucardo.node_report r
     WHERE r.node_id IS DISTINCT FROM (SELECT (h.report->>'node_id')::integer FROM here h)
), seen_by AS (
    -- What every known node says about each of its peers.
    SELECT (p->>'node_id')::integer AS node_id, p
      FROM nodes n CROSS JOIN LATERAL jsonb_array_elements(n.report->'peers') p
), rows AS (
    SELECT n.node,
           n.node_id,
           n.hops,
           n.via,
           n.report->>'version' AS version,
           n.last_contact,
           CASE WHEN n.hops = 0 THEN interval '0' ELSE greatest(now() - n.last_contact, interval '0') END AS silent_for,
           (SELECT coalesce(sum((p->>'pending_out')::bigint), 0) FROM jsonb_array_elements(n.report->'peers') p) AS waiting_out,
           (SELECT coalesce(sum((s.p->>'pending_out')::bigint), 0) FROM seen_by s WHERE s.node_id = n.node_id) AS waiting_in,
           (SELECT now() - min((s.p->>'oldest_pending')::timestamptz) FROM seen_by s WHERE s.node_id = n.node_id) AS lag,
           (n.report->>'exceptions')::bigint AS exceptions,
           (n.report->>'conflicts_hour')::bigint AS conflicts_last_hour,
           (n.report->>'log_rows')::bigint AS log_rows,
           (n.report->>'log_bytes')::bigint AS log_bytes,
           now() - (n.report->>'log_oldest')::timestamptz AS log_oldest_age,
           (n.report->>'schema_differences')::bigint AS schema_differences,
           (SELECT string_agg((p->>'name') || ' ' || (p->>'state'), ', ' ORDER BY p->>'name')
              FROM jsonb_array_elements(n.report->'peers') p WHERE p->>'state' IS DISTINCT FROM 'connected') AS peers_not_connected,
           -- Peers it keeps its log for longer than half its retention: they expire next.
           (SELECT string_agg((p->>'name') || ' since ' || date_trunc('second', (p->>'oldest_pending')::timestamptz), ', ' ORDER BY p->>'name')
              FROM jsonb_array_elements(n.report->'peers') p
             WHERE (n.report->>'retention_seconds')::bigint > 0
               AND (p->>'oldest_pending')::timestamptz < now() - make_interval(secs => (n.report->>'retention_seconds')::bigint / 2.0)) AS expiring
      FROM nodes n
)
SELECT r.*,
       nullif(concat_ws('; ',
           CASE WHEN r.silent_for > interval '5 minutes' THEN 'not heard from for ' || date_trunc('second', r.silent_for) END,
           CASE WHEN r.exceptions > 0 THEN r.exceptions || ' open exceptions' END,
           CASE WHEN r.lag > interval '5 minutes' THEN 'changes for it wait for ' || date_trunc('second', r.lag) END,
           CASE WHEN r.schema_differences > 0 THEN r.schema_differences || ' schema differences' END,
           CASE WHEN r.expiring IS NOT NULL THEN 'holds its log past half its retention for ' || r.expiring END,
           CASE WHEN r.version IS DISTINCT FROM (SELECT extversion FROM pg_extension WHERE extname = 'rbucardo') THEN 'extension ' || coalesce(r.version, '?') END
       ), '') AS attention
  FROM rows r;

REVOKE ALL ON FUNCTION rbucardo.store_reports(text, jsonb), rbucardo.reports_for(text), rbucardo.local_report(), rbucardo.cached_report(),
                       rbucardo.refresh_own_report(),
                       rbucardo.clean_report(jsonb) FROM PUBLIC;

-- The report exchange a peer calls (src/runtime/endpoints.rs), granted like the other peer_*
-- functions.
CREATE FUNCTION rbucardo."peer_report"(
	"peer_name" TEXT,
	"reports" TEXT
) RETURNS TEXT
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'peer_report_wrapper';
REVOKE ALL ON FUNCTION rbucardo.peer_report(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rbucardo.peer_report(text, text) TO rbucardo_peer;

-- Off Bucardo (src/api/bucardo.rs).
CREATE FUNCTION rbucardo."import_bucardo"(
	"conninfo" TEXT,
	"dry_run" bool DEFAULT true,
	"this_db" TEXT DEFAULT NULL
) RETURNS TABLE (
	"step" INT,
	"action" TEXT,
	"sql" TEXT,
	"note" TEXT
)
VOLATILE
LANGUAGE c
AS 'MODULE_PATHNAME', 'import_bucardo_wrapper';

-- Online join (src/runtime/join.rs, src/api/join.rs, sql/join.sql).
ALTER TABLE rbucardo.peer_state ADD COLUMN join_until bigint, ADD COLUMN join_filter text;
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

CREATE FUNCTION rbucardo."add_sync_db"(
	"sync" TEXT, /* & str */
	"db" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'add_sync_db_wrapper';
CREATE FUNCTION rbucardo."join"(
	"provider" TEXT, /* & str */
	"copy_schema" bool DEFAULT false /* bool */
) RETURNS TEXT /* String */
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'join_wrapper';
CREATE FUNCTION rbucardo."peer_join_describe"(
	"peer_name" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_join_describe_wrapper';
CREATE FUNCTION rbucardo."peer_join_start"(
	"peer_name" TEXT /* & str */
) RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_join_start_wrapper';
CREATE FUNCTION rbucardo."peer_copy_view"(
	"peer_name" TEXT, /* & str */
	"schema_name" TEXT, /* & str */
	"table_name" TEXT, /* & str */
	"cols" TEXT[] /* Vec < String > */
) RETURNS TEXT /* String */
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_copy_view_wrapper';
CREATE FUNCTION rbucardo."peer_join_end"(
	"peer_name" TEXT, /* & str */
	"filter" TEXT /* & str */
) RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_join_end_wrapper';
REVOKE ALL ON FUNCTION rbucardo.peer_join_describe(text), rbucardo.peer_join_start(text),
                       rbucardo.peer_copy_view(text, text, text, text[]), rbucardo.peer_join_end(text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rbucardo.peer_join_describe(text), rbucardo.peer_join_start(text),
                          rbucardo.peer_copy_view(text, text, text, text[]), rbucardo.peer_join_end(text, text) TO rbucardo_peer;


-- Transactions addressed to one node (repairs, src/api/diff.rs).
ALTER TABLE rbucardo.change_log ADD COLUMN only_for integer;


-- Compare and repair (src/api/diff.rs, src/schema/digest.rs, sql/diff.sql).
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

CREATE FUNCTION rbucardo."peer_diff_digest"(
	"peer_name" TEXT, /* & str */
	"schema_name" TEXT, /* & str */
	"table_name" TEXT, /* & str */
	"cols" TEXT[], /* Vec < String > */
	"key" TEXT[], /* Vec < String > */
	"buckets" INT /* i32 */
) RETURNS TABLE (
	"bucket" INT,  /* i32 */
	"rows" bigint,  /* i64 */
	"hash" bigint  /* i64 */
)
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_diff_digest_wrapper';
CREATE FUNCTION rbucardo."peer_diff_rows"(
	"peer_name" TEXT, /* & str */
	"schema_name" TEXT, /* & str */
	"table_name" TEXT, /* & str */
	"cols" TEXT[], /* Vec < String > */
	"key" TEXT[], /* Vec < String > */
	"buckets" INT, /* i32 */
	"wanted" INT[] /* Vec < i32 > */
) RETURNS TABLE (
	"key" TEXT,  /* String */
	"row" TEXT  /* String */
)
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_diff_rows_wrapper';
CREATE FUNCTION rbucardo.diff(sync text, tbl regclass DEFAULT NULL)
           RETURNS TABLE (peer text, table_name text, key jsonb, here jsonb, there jsonb)
           VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'diff_wrapper';
CREATE FUNCTION rbucardo.repair(sync text, peer text, tbl regclass DEFAULT NULL, keys jsonb DEFAULT NULL, dry_run boolean DEFAULT true)
           RETURNS TABLE (table_name text, key jsonb, action text, here jsonb, there jsonb)
           VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', 'repair_wrapper';
REVOKE ALL ON FUNCTION rbucardo.peer_diff_digest(text, text, text, text[], text[], integer),
                       rbucardo.peer_diff_rows(text, text, text, text[], text[], integer, integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rbucardo.peer_diff_digest(text, text, text, text[], text[], integer),
                          rbucardo.peer_diff_rows(text, text, text, text[], text[], integer, integer[]) TO rbucardo_peer;

-- A trim followed by VACUUM must not stall every commit that writes the log (sql/catalog.sql).
ALTER TABLE rbucardo.change_log SET (autovacuum_vacuum_scale_factor = 0.01, vacuum_truncate = false);
ALTER TABLE rbucardo.tick SET (vacuum_truncate = false);

-- A push that commits without waiting for the WAL flush and reports what is on disk
-- (src/base/durable.rs); peer_push keeps its durable commit for senders of 0.1.
CREATE FUNCTION rbucardo."peer_push_flushed"(
	"peer_name" TEXT, /* & str */
	"batch" bytea /* & [u8] */
) RETURNS TABLE (
	"tick" bigint,  /* i64 */
	"seq" bigint,  /* i64 */
	"stopped" TEXT,  /* Option < String > */
	"flushed_tick" bigint,  /* Option < i64 > */
	"flushed_seq" bigint  /* Option < i64 > */
)
STRICT VOLATILE SECURITY DEFINER
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'peer_push_flushed_wrapper';
REVOKE ALL ON FUNCTION rbucardo.peer_push_flushed(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rbucardo.peer_push_flushed(text, bytea) TO rbucardo_peer;
-- The pushes pin search_path in their body instead (src/runtime/endpoints.rs `push`).
ALTER FUNCTION rbucardo.peer_push(text, bytea) RESET search_path;

-- What backends keep of the configuration (src/base/kept.rs) is dropped by every change of
-- these tables, made by hand too.
CREATE FUNCTION rbucardo.config_changed() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'rbucardo_config_changed';
REVOKE ALL ON FUNCTION rbucardo.config_changed() FROM PUBLIC;
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.node FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.db FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.sync FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.herd_table FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.node FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.db FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.sync FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.herd_table FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
ALTER TABLE rbucardo.node ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
ALTER TABLE rbucardo.db ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
ALTER TABLE rbucardo.sync ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
ALTER TABLE rbucardo.herd_table ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;

-- Row clocks compare keys byte by byte (sql/conflicts.sql): a trim writes one for most rows it
-- trims.
ALTER TABLE rbucardo.row_clock ALTER COLUMN key TYPE text COLLATE "C", ALTER COLUMN col TYPE text COLLATE "C";
-- A key over 2000 bytes is kept as its digest (src/log/clocks.rs, `KEY_AT_MOST`): one 0.1.0
-- kept whole (short enough once compressed) is merged into its digest's row, which the new
-- library may have written already, the larger clock staying.
INSERT INTO rbucardo.row_clock AS r (relid, key, col, hlc, origin)
SELECT relid, 'sha256:' || encode(sha256(convert_to(key, getdatabaseencoding())), 'hex'), col, hlc, origin
  FROM rbucardo.row_clock WHERE octet_length(key) > 2000
    ON CONFLICT (relid, key, col) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin
 WHERE (EXCLUDED.hlc, EXCLUDED.origin) > (r.hlc, r.origin);
DELETE FROM rbucardo.row_clock WHERE octet_length(key) > 2000;
