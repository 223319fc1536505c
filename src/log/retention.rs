//! Retention: how long this node keeps its change log for a peer that does not take it. A store
//! that is closed for good, or whose hardware died, would otherwise hold every node's log for
//! ever. Past `rbucardo.peer_retention` without contact (or, with `rbucardo.peer_retention_mb`,
//! once the log held for a peer that is away passes that size) the peer is marked expired: the
//! trim no longer waits for it, and when it comes back it is told it must rejoin, instead of
//! receiving a stream with a hole in it.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

/// `rbucardo.peer_retention`: an interval; empty or 0 keeps the log for ever.
pub static PEER_RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"30 days"));
/// `rbucardo.peer_retention_mb`: the most log kept for a peer that is away (0: no limit).
pub static PEER_RETENTION_MB: GucSetting<i32> = GucSetting::<i32>::new(0);

/// A peer counts as away for the size limit once not heard from for this long.
const AWAY: &str = "10 minutes";

/// Registers the settings; called from `_PG_init`.
pub fn init() {
    GucRegistry::define_string_guc(
        c"rbucardo.peer_retention",
        c"How long the change log is kept for a peer that is not in contact (empty or 0: for ever).",
        c"Past it the peer is expired: the log is trimmed without it and it must rejoin.",
        &PEER_RETENTION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"rbucardo.peer_retention_mb",
        c"Most change log kept for a peer that is away (0: no limit).",
        c"A peer not heard from for 10 minutes whose unconfirmed log passes this is expired and must rejoin.",
        &PEER_RETENTION_MB,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
}

/// The retention interval as set, or None for ever.
fn retention() -> Option<String> {
    let setting = PEER_RETENTION.get()?;
    let text = setting.to_str().ok()?.trim().to_string();
    (!text.is_empty() && text != "0").then_some(text)
}

/// Marks the peers past retention expired; returns each one's name and why.
pub fn expire_peers() -> Vec<(String, String)> {
    let mb = PEER_RETENTION_MB.get();
    let age = retention();
    if age.is_none() && mb == 0 {
        return Vec::new();
    }
    Spi::connect_mut(|c| {
        c.update(
            &format!(
                "WITH held AS (
                    SELECT p.db,
                           (SELECT to_timestamp(min(l.hlc) / 1e6) FROM rbucardo.change_log l
                             WHERE l.origin IS DISTINCT FROM d.node_id AND l.via IS DISTINCT FROM d.node_id
                               AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot))) AS since,
                           CASE WHEN $2 > 0 THEN
                               (SELECT coalesce(sum(pg_catalog.octet_length(l.data)), 0) FROM rbucardo.change_log l
                                 WHERE l.origin IS DISTINCT FROM d.node_id AND l.via IS DISTINCT FROM d.node_id
                                   AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot)))
                           END AS bytes
                      FROM rbucardo.peer_state p
                      JOIN rbucardo.db d ON d.name = p.db
                      LEFT JOIN rbucardo.tick t ON t.tick_id = rbucardo.complete_tick(p.out_tick, p.out_seq)
                     WHERE p.expired_at IS NULL)
                 UPDATE rbucardo.peer_state p
                    SET expired_at = pg_catalog.now(),
                        expired_why = CASE
                          WHEN $1::pg_catalog.interval IS NOT NULL AND h.since < pg_catalog.now() - $1::pg_catalog.interval
                           AND coalesce(p.last_contact, '-infinity') < pg_catalog.now() - $1::pg_catalog.interval
                          THEN pg_catalog.format('not in contact since %s, longer than rbucardo.peer_retention (%s): this node no longer keeps its change log for %s',
                                                 coalesce(p.last_contact::text, 'ever'), $1, p.db)
                          ELSE pg_catalog.format('away since %s with %s MB of change log held for it, more than rbucardo.peer_retention_mb (%s): this node no longer keeps its change log for %s',
                                                 coalesce(p.last_contact::text, 'ever'), h.bytes >> 20, $2, p.db) END
                   FROM held h
                  WHERE h.db = p.db
                    AND (($1::pg_catalog.interval IS NOT NULL AND h.since < pg_catalog.now() - $1::pg_catalog.interval
                          AND coalesce(p.last_contact, '-infinity') < pg_catalog.now() - $1::pg_catalog.interval)
                      OR ($2 > 0 AND h.bytes > ($2::bigint << 20)
                          AND coalesce(p.last_contact, '-infinity') < pg_catalog.now() - interval '{AWAY}'))
                 RETURNING p.db, p.expired_why"
            ),
            None,
            &[age.into(), mb.into()],
        )
        .expect("expiring peers past retention")
        .map(|r| (r.get::<String>(1).unwrap().unwrap_or_default(), r.get::<String>(2).unwrap().unwrap_or_default()))
        .collect()
    })
}

/// Why `peer` may no longer take this node's stream, if it is expired here.
pub fn expired(peer: &str) -> Option<String> {
    Spi::get_one_with_args::<String>("SELECT expired_why FROM rbucardo.peer_state WHERE db = $1 AND expired_at IS NOT NULL", &[peer.into()]).ok().flatten()
}
