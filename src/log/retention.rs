//! Retention: how long this node keeps its change log for a peer that does not take it. A store
//! that is closed for good, or whose hardware died, would otherwise hold every node's log for
//! ever. Past `rbucardo.peer_retention` without contact (or, with `rbucardo.peer_retention_mb`,
//! once the log held for a peer away for an hour passes that size) the peer is marked expired:
//! the trim no longer waits for it, and when it comes back it is told it must rejoin instead of
//! receiving a stream with a hole in it. Only this node's stream to it stops: what the peer
//! made while away still comes in (its sales are not lost), as its stream here has no hole.
//! A peer that never made contact counts from when it was added.

use std::ffi::CString;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

/// `rbucardo.peer_retention`: an interval; empty or 0 keeps the log for ever.
pub static PEER_RETENTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"30 days"));
/// `rbucardo.peer_retention_mb`: the most log kept for a peer that is away (0: no limit).
pub static PEER_RETENTION_MB: GucSetting<i32> = GucSetting::<i32>::new(0);

/// A peer counts as away for the size limit once not heard from for this long (a store catching
/// up over a slow link is in contact, but a large batch can take many minutes).
const AWAY: &str = "1 hour";

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
        c"A peer not heard from for an hour whose unconfirmed log passes this is expired and must rejoin.",
        &PEER_RETENTION_MB,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
}

/// The retention in seconds, or None for ever (empty or 0) or for a value that is not a
/// positive number with a unit, which keeps the log (and is complained about): a typo must
/// never expire every peer.
pub fn retention_seconds() -> Option<i64> {
    let setting = PEER_RETENTION.get()?;
    let text = setting.to_str().ok()?.trim().to_lowercase();
    if text.is_empty() || text == "0" {
        return None;
    }
    let parsed = parse_interval(&text);
    if parsed.is_none() && !COMPLAINED.with(|c| c.replace(true)) {
        warning!("rbucardo.peer_retention = '{text}' is not understood (write e.g. '30 days' or '12 hours'): the change log is kept for every peer");
    }
    parsed
}

/// "<positive number> <unit>", with units from seconds to weeks, as seconds.
fn parse_interval(text: &str) -> Option<i64> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number.parse().ok().filter(|&n| n > 0)?;
    let unit = match unit.trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(unit)
}

thread_local! {
    static READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Whether this backend said already that the setting is not understood.
    static COMPLAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the installed schema has retention (a 0.2.0 library can run on a 0.1.0 schema until
/// `ALTER EXTENSION rbucardo UPDATE`: replication must go on meanwhile).
pub fn ready() -> bool {
    if READY.with(|r| r.get()) {
        return true;
    }
    let ready = Spi::get_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                         WHERE attrelid = pg_catalog.to_regclass('rbucardo.peer_state') AND attname = 'expired_at' AND NOT attisdropped)",
    )
    .ok()
    .flatten()
    == Some(true);
    READY.with(|r| r.set(ready));
    ready
}

/// Marks the peers past retention expired; returns each one's name and why.
pub fn expire_peers() -> Vec<(String, String)> {
    let mb = PEER_RETENTION_MB.get();
    let age = retention_seconds();
    if (age.is_none() && mb == 0) || !ready() {
        return Vec::new();
    }
    Spi::connect_mut(|c| {
        c.update(
            &format!(
                "WITH held AS (
                    SELECT p.db,
                           (SELECT to_timestamp(min(l.hlc) / 1e6) FROM rbucardo.change_log l
                             WHERE l.origin IS DISTINCT FROM d.node_id AND l.via IS DISTINCT FROM d.node_id
                               AND l.txid >= pg_catalog.pg_snapshot_xmin(coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot))
                               AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot))) AS since,
                           CASE WHEN $2 > 0 THEN
                               (SELECT coalesce(sum(pg_catalog.octet_length(l.data)), 0) FROM rbucardo.change_log l
                                 WHERE l.origin IS DISTINCT FROM d.node_id AND l.via IS DISTINCT FROM d.node_id
                                   AND l.txid >= pg_catalog.pg_snapshot_xmin(coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot))
                                   AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot)))
                           END AS bytes
                      FROM rbucardo.peer_state p
                      JOIN rbucardo.db d ON d.name = p.db
                      LEFT JOIN rbucardo.tick t ON t.tick_id = rbucardo.complete_tick(p.out_tick, p.out_seq)
                     WHERE p.expired_at IS NULL
                       -- Only a peer out of contact long enough for either rule below can
                       -- expire: the log is read for it alone, not every 5 s for every peer
                       -- (a catch-up's backlog, a week of log held for a store).
                       AND ((pg_catalog.make_interval(secs => $1) IS NOT NULL
                             AND coalesce(p.last_contact, d.created) < pg_catalog.now() - pg_catalog.make_interval(secs => $1))
                         OR ($2 > 0 AND coalesce(p.last_contact, d.created) < pg_catalog.now() - interval '{AWAY}')))
                 UPDATE rbucardo.peer_state p
                    SET expired_at = pg_catalog.now(),
                        expired_why = CASE
                          WHEN pg_catalog.make_interval(secs => $1) IS NOT NULL AND h.since < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                           AND coalesce(p.last_contact, d.created) < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                          THEN pg_catalog.format('not in contact since %s, longer than rbucardo.peer_retention (%s): this node no longer keeps its change log for %s',
                                                 coalesce(p.last_contact::text, 'ever'), pg_catalog.make_interval(secs => $1), p.db)
                          ELSE pg_catalog.format('away since %s with %s MB of change log held for it, more than rbucardo.peer_retention_mb (%s): this node no longer keeps its change log for %s',
                                                 coalesce(p.last_contact::text, 'ever'), h.bytes >> 20, $2, p.db) END
                   FROM held h JOIN rbucardo.db d ON d.name = h.db
                  WHERE h.db = p.db
                    AND ((pg_catalog.make_interval(secs => $1) IS NOT NULL AND h.since < pg_catalog.now() - pg_catalog.make_interval(secs => $1)
                          AND coalesce(p.last_contact, d.created) < pg_catalog.now() - pg_catalog.make_interval(secs => $1))
                      OR ($2 > 0 AND h.bytes > ($2::bigint << 20)
                          AND coalesce(p.last_contact, d.created) < pg_catalog.now() - interval '{AWAY}'
                          -- a peer copying its tables from this node (src/runtime/join.rs) holds
                          -- the log while it copies; it is in contact at each table
                          AND NOT (p.join_until IS NULL AND p.join_filter IS NOT NULL)))
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

/// Every expired peer, with why (read with the worker's configuration: expiry is set only by
/// this node's own worker, and cleared only by remove_db, which re-reads the configuration).
pub fn all_expired() -> std::collections::HashMap<String, String> {
    if !ready() {
        return Default::default();
    }
    Spi::connect(|c| {
        c.select("SELECT db, expired_why FROM rbucardo.peer_state WHERE expired_at IS NOT NULL", None, &[])
            .expect("reading expired peers")
            .filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<String>(2).ok()??)))
            .collect()
    })
}

/// Why `peer` may no longer take this node's stream, if it is expired here.
pub fn expired(peer: &str) -> Option<String> {
    if !ready() {
        return None;
    }
    crate::base::plans::one::<String>(
        "SELECT expired_why FROM rbucardo.peer_state WHERE db = $1 AND expired_at IS NOT NULL",
        &[pg_sys::TEXTOID],
        &[peer.into()],
    )
}

#[cfg(test)]
mod tests {
    use super::parse_interval;

    #[test]
    fn retention_values() {
        assert_eq!(parse_interval("30 days"), Some(30 * 86_400));
        assert_eq!(parse_interval("3s"), Some(3));
        assert_eq!(parse_interval("12 hours"), Some(12 * 3600));
        for bad in ["30", "-1", "-1 days", "never", "off", "1.5 days", "days", "0 days"] {
            assert_eq!(parse_interval(bad), None, "{bad}");
        }
    }
}
