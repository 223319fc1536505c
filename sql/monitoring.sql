-- Monitoring views. They read the catalog and the replication state; nothing here writes.

-- Peers as configured, with what the link last reported. Conninfos are shown without password.
CREATE VIEW rbucardo.dbs AS
SELECT d.name,
       d.node_id,
       CASE WHEN d.conninfo IS NULL THEN NULL ELSE rbucardo.redact_conninfo(d.conninfo) END AS conninfo,
       d.conninfo IS NULL AS passive,
       CASE WHEN d.conninfo IS NULL AND (p.last_contact IS NULL OR p.last_contact < now() - interval '30 seconds')
            THEN 'disconnected' ELSE p.state END AS state,
       p.last_contact,
       coalesce(p.refused, p.last_error) AS last_error,
       d.ddl,
       d.ddl_role,
       d.relay
  FROM rbucardo.db d
  LEFT JOIN rbucardo.peer_state p ON p.db = d.name;

CREATE VIEW rbucardo.syncs AS
SELECT s.name,
       s.herd,
       s.dbs,
       s.conflict_strategy,
       s.paused,
       (SELECT count(*) FROM rbucardo.herd_table t WHERE t.herd = s.herd) AS tables,
       s.created
  FROM rbucardo.sync s;

-- One row per sync and peer. pending_out counts this node's transactions (its own and those it
-- forwards) that the peer has not confirmed yet, held_since is when the oldest of them was
-- made; applied_in counts the peer's transactions applied here; exceptions counts the peer's
-- transactions parked here and still open.
CREATE VIEW rbucardo.status AS
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

-- Every change of every open exception, readable: which table, what operation, the key and the
-- old and new rows as jsonb. What an operator reads before exception_retry, _skip or _discard.
CREATE VIEW rbucardo.exception_rows AS
SELECT e.id, e.kind, e.origin, e.reason, c.ordinal, c.tbl, c.op, c.key, c.old, c.new
  FROM rbucardo.exceptions e
 CROSS JOIN LATERAL rbucardo.exception_changes(e.id) c
 WHERE e.resolved_at IS NULL;
