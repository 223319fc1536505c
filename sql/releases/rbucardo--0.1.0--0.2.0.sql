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
  LEFT JOIN LATERAL (SELECT count(*) AS pending, to_timestamp(min(l.hlc) / 1e6) AS held_since
                       FROM rbucardo.change_log l
                      WHERE l.final
                        AND l.origin IS DISTINCT FROM d.node_id
                        AND l.via IS DISTINCT FROM d.node_id
                        AND NOT pg_visible_in_snapshot(l.txid, coalesce(
                              (SELECT t.snap FROM rbucardo.tick t
                                WHERE t.tick_id = rbucardo.complete_tick(p.out_tick, p.out_seq)),
                              '1:1:'::pg_snapshot))) w ON true
  LEFT JOIN LATERAL (SELECT e.reason FROM rbucardo.exceptions e
                      WHERE e.kind = 'ddl' AND e.resolved_at IS NULL AND e.via = d.node_id
                      ORDER BY e.id LIMIT 1) x ON true;

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

-- The report exchange a peer calls (src/runtime/endpoints.rs), granted like the other peer_*
-- functions.
CREATE FUNCTION rbucardo."peer_report"(
	"peer_name" TEXT,
	"reports" jsonb
) RETURNS jsonb
STRICT VOLATILE SECURITY DEFINER
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'peer_report_wrapper';
REVOKE ALL ON FUNCTION rbucardo.peer_report(text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION rbucardo.peer_report(text, jsonb) TO rbucardo_peer;

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
