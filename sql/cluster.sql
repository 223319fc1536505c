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

-- This node's state, as it reports it to its peers.
CREATE FUNCTION rbucardo.local_report() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT jsonb_build_object(
    'node_id', n.node_id,
    'name', n.name,
    'at', now(),
    'version', (SELECT extversion FROM pg_extension WHERE extname = 'rbucardo'),
    'exceptions', (SELECT count(*) FROM rbucardo.exceptions e WHERE e.resolved_at IS NULL),
    'conflicts_hour', (SELECT count(*) FROM rbucardo.conflicts c WHERE c.at > now() - interval '1 hour'),
    'log_rows', (SELECT count(*) FROM rbucardo.change_log),
    'log_bytes', pg_total_relation_size('rbucardo.change_log'),
    'log_oldest', (SELECT to_timestamp(min(l.hlc) / 1e6) FROM rbucardo.change_log l),
    'schema_differences', (SELECT count(*) FROM rbucardo.sync s CROSS JOIN LATERAL rbucardo.validate_schema(s.name) v),
    'retention', nullif(nullif(current_setting('rbucardo.peer_retention', true), ''), '0'),
    'peers', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'name', d.name, 'node_id', d.node_id, 'state', st.state, 'last_contact', p.last_contact,
                   'pending_out', st.pending_out, 'oldest_pending', st.held_since, 'exceptions', st.exceptions,
                   'last_error', st.last_error) ORDER BY d.name)
          FROM rbucardo.db d
          LEFT JOIN rbucardo.peer_state p ON p.db = d.name
          LEFT JOIN LATERAL (SELECT max(s.state) AS state, max(s.pending_out) AS pending_out, max(s.exceptions) AS exceptions,
                                    max(s.last_error) AS last_error, min(s.held_since) AS held_since
                               FROM rbucardo.status s WHERE s.db = d.name) st ON true), '[]'::jsonb))
  FROM rbucardo.node n
$$;

-- The reports this node passes to `peer`: its own, and every other one it holds except the
-- peer's own.
CREATE FUNCTION rbucardo.reports_for(peer text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT jsonb_build_array(jsonb_build_object('hops', 0, 'report', rbucardo.local_report()))
       || coalesce((SELECT jsonb_agg(jsonb_build_object('hops', r.hops, 'report', r.report) ORDER BY r.node_id)
                      FROM rbucardo.node_report r
                     WHERE r.name IS DISTINCT FROM peer), '[]'::jsonb)
$$;

-- Keeps the reports `peer` passed on that are newer than those held. A peer speaks for itself
-- and for nodes this one does not talk to directly: what it says about this node or about
-- another direct peer is ignored (that peer reports for itself).
CREATE FUNCTION rbucardo.store_reports(peer text, reports jsonb) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
INSERT INTO rbucardo.node_report AS r (node_id, name, via, hops, reported_at, report)
SELECT (x.report->>'node_id')::integer, x.report->>'name', peer, (x.hops)::integer + 1, (x.report->>'at')::timestamptz, x.report
  FROM jsonb_to_recordset(CASE WHEN jsonb_typeof(reports) = 'array' THEN reports ELSE '[]' END) AS x(hops integer, report jsonb)
 WHERE jsonb_typeof(x.report) = 'object'
   AND x.report->>'node_id' ~ '^[0-9]{1,4}$'
   AND x.report->>'name' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
   AND x.hops BETWEEN 0 AND 64
   AND (x.report->>'node_id')::integer IS DISTINCT FROM (SELECT node_id FROM rbucardo.node)
   AND (x.report->>'name' = peer
        OR NOT EXISTS (SELECT 1 FROM rbucardo.db d
                        WHERE d.name = x.report->>'name' OR d.node_id = (x.report->>'node_id')::integer))
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
             WHERE n.report->>'retention' IS NOT NULL
               AND (p->>'oldest_pending')::timestamptz < now() - (n.report->>'retention')::interval / 2) AS expiring
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

REVOKE ALL ON FUNCTION rbucardo.store_reports(text, jsonb), rbucardo.reports_for(text), rbucardo.local_report() FROM PUBLIC;
