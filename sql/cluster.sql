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
