-- A login role for the Prometheus exporter that is not a superuser: it reads rbucardo's
-- monitoring views and the columns of the catalog that the queries in
-- postgres-exporter-queries.yaml need, and no replicated data (no change-log or exception
-- payloads, no conninfos). Run as a superuser in the replicated database of every node, e.g.
--   psql -d store -v ON_ERROR_STOP=1 -f monitoring/monitor-role.sql
-- then give the role a password or a pg_hba.conf line.
-- rbucardo.sequences reads the replicated sequences' current values: a sequence created later
-- (a new table, a module upgrade) without this grant makes the rbucardo_sequences query fail
-- (alert RbucardoMetricsMissing). Re-run this file after schema upgrades, or let the role that
-- owns the application's objects grant it ahead, on every node:
--   ALTER DEFAULT PRIVILEGES FOR ROLE odoo IN SCHEMA public GRANT SELECT ON SEQUENCES TO prometheus;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'prometheus') THEN
        CREATE ROLE prometheus LOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA rbucardo TO prometheus;
GRANT SELECT ON rbucardo.status, rbucardo.conflict_stats, rbucardo.sequences,
                rbucardo.node, rbucardo.peer_state, rbucardo.tick, rbucardo.change_seq
   TO prometheus;
GRANT SELECT (name, node_id, created) ON rbucardo.db TO prometheus;
GRANT SELECT (txid, final, origin, via, hlc) ON rbucardo.change_log TO prometheus;
GRANT SELECT (via, kind, at, retries, resolved_at) ON rbucardo.exceptions TO prometheus;
GRANT SELECT (sender) ON rbucardo.incoming_part TO prometheus;
GRANT EXECUTE ON FUNCTION rbucardo.sequence_next_value(regclass) TO prometheus;
-- The replicated sequences' values (not the tables' rows): schema public here; add the
-- application's other schemas.
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO prometheus;
