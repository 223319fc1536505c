//! Compare and repair: `rbucardo.diff(sync, tbl)` finds the rows that differ between this node
//! and each peer of a sync it connects to, without shipping whole tables (src/schema/digest.rs),
//! and `rbucardo.repair(sync, peer, ...)` makes a peer's rows match this node's with changes
//! that travel through the normal stream, addressed to that peer alone.
//!
//! Writes go on meanwhile: a difference found is checked again after this node and its peers
//! have exchanged what was committed before (`monitor::synced`), and only one that stays, with
//! the same rows, is reported.

use std::time::Duration;

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::node::me_or_raise;
use crate::base::pq::{Param, PeerConn};
use crate::base::wire::{Op, RelDesc, Value};
use crate::base::xact::LocalSetting;
use crate::base::sqltext::text_array_literal;
use crate::schema::digest::{self, Target};

const CALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a check waits for in-flight changes to land, and how often it looks again.
const SETTLE: Duration = Duration::from_secs(30);
const CHECKS: usize = 3;
/// At most this many rows, and about this many bytes of row images, are repaired in one call
/// (one transaction, one chunk: it must fit a batch on the peer).
const MAX_REPAIR_ROWS: usize = 100_000;
const MAX_REPAIR_BYTES: usize = 64 << 20;

/// One difference: (key, row here, row there) as JSON text.
type Difference = (String, Option<String>, Option<String>);

fn superuser_only(what: &str) {
    // SAFETY: reads the current user's superuser flag from the catalog cache.
    if !unsafe { pg_sys::superuser() } {
        raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("only a superuser may {what}"), "It reads every table of the sync and uses the peers' stored conninfo.");
    }
}

/// The sync's herd tables (or `tbl` alone, which must be one of them).
fn tables_of(sync: &str, tbl: Option<pg_sys::Oid>) -> Vec<pg_sys::Oid> {
    let herd = Spi::get_one_with_args::<String>("SELECT herd FROM rbucardo.sync WHERE name = $1", &[sync.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {sync}"), "See SELECT * FROM rbucardo.syncs."));
    let all: Vec<pg_sys::Oid> = Spi::connect(|c| {
        c.select("SELECT relid FROM rbucardo.herd_table WHERE herd = $1 ORDER BY relid::regclass::text", None, &[herd.as_str().into()])
            .expect("herd tables")
            .filter_map(|r| r.get::<pg_sys::Oid>(1).ok().flatten())
            .collect()
    });
    match tbl {
        Some(t) if all.contains(&t) => vec![t],
        Some(_) => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("the table is not in sync {sync}"), format!("Name a table of herd {herd}.")),
        None => all,
    }
}

/// A session with the peer, as this node's link makes it.
fn connect(peer: &str) -> Option<PeerConn> {
    let conninfo = Spi::get_one_with_args::<String>("SELECT conninfo FROM rbucardo.db WHERE name = $1", &[peer.into()]).ok().flatten()?;
    let me = me_or_raise();
    let mut conn = PeerConn::connect(&conninfo, Duration::from_secs(10)).unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, format!("cannot reach {peer}: {e}"), "Check its conninfo in rbucardo.db."));
    conn.query("SELECT name FROM rbucardo.peer_hello($1, $2)", &[Param::Text(&me.name), Param::Text(&me.id.to_string())], CALL_TIMEOUT)
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, format!("{peer} refused: {e}"), "The peer must list this node in the sync."));
    Some(conn)
}

fn fail(peer: &str, e: impl std::fmt::Display) -> ! {
    raise(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, format!("comparing with {peer} failed: {e}"), "Nothing was recorded for that peer; try again.")
}

/// This node's digest of `t` and the peer's, computed at once on both.
fn digests(conn: &mut PeerConn, peer: &str, t: &Target, buckets: i32, me: &str) -> (digest::Digest, digest::Digest) {
    let (cols, key, b) = (text_array_literal(&t.cols), text_array_literal(&t.key), buckets.to_string());
    let params = [Param::Text(me), Param::Text(&t.schema), Param::Text(&t.table), Param::Text(&cols), Param::Text(&key), Param::Text(&b)];
    conn.send("SELECT bucket, rows, hash FROM rbucardo.peer_diff_digest($1, $2, $3, $4, $5, $6)", &params, CALL_TIMEOUT).unwrap_or_else(|e| fail(peer, e));
    let mine = digest::digest(t, buckets);
    let theirs = conn.receive(CALL_TIMEOUT).unwrap_or_else(|e| fail(peer, e));
    (mine, theirs.iter().filter_map(|r| Some((r.i32(0)?, (r.i64(1)?, r.i64(2)?)))).collect())
}

/// The rows of `wanted` buckets here and at the peer, and those that differ (limited to
/// `keys` when given).
fn compare_buckets(conn: &mut PeerConn, peer: &str, t: &Target, buckets: i32, wanted: &[i32], keys: Option<&[String]>, me: &str) -> Vec<Difference> {
    let (cols, key, b) = (text_array_literal(&t.cols), text_array_literal(&t.key), buckets.to_string());
    let list = format!("{{{}}}", wanted.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(","));
    let params = [Param::Text(me), Param::Text(&t.schema), Param::Text(&t.table), Param::Text(&cols), Param::Text(&key), Param::Text(&b), Param::Text(&list)];
    conn.send("SELECT key, row FROM rbucardo.peer_diff_rows($1, $2, $3, $4, $5, $6, $7)", &params, CALL_TIMEOUT).unwrap_or_else(|e| fail(peer, e));
    let here = digest::rows(t, buckets, wanted);
    let there: digest::Rows = conn.receive(CALL_TIMEOUT).unwrap_or_else(|e| fail(peer, e)).iter().filter_map(|r| Some((r.text(0)?, r.text(1)?))).collect();
    let mut d = digest::differing_rows(&here, &there);
    if let Some(keys) = keys {
        d.retain(|(k, _, _)| keys.contains(k));
    }
    d
}

/// The differences of `t` with the peer that stay once in-flight changes have landed.
fn table_differences(conn: &mut PeerConn, peer: &str, sync: &str, t: &Target, relid: pg_sys::Oid, me: &str) -> Vec<Difference> {
    let buckets = buckets_for(relid);
    let (mine, theirs) = digests(conn, peer, t, buckets, me);
    let wanted = digest::differing_buckets(&mine, &theirs);
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut found = compare_buckets(conn, peer, t, buckets, &wanted, None, me);
    for _ in 0..CHECKS {
        if found.is_empty() {
            break;
        }
        // What was committed on either side before the check travels first.
        crate::api::monitor::synced(sync, SETTLE);
        let keys: Vec<String> = found.iter().map(|(k, _, _)| k.clone()).collect();
        let wanted = digest::buckets_of(&keys, buckets);
        let again = compare_buckets(conn, peer, t, buckets, &wanted, Some(&keys), me);
        let stable = again == found;
        found = again;
        if stable {
            break;
        }
    }
    found
}

fn json(text: &Option<String>) -> Option<pgrx::JsonB> {
    text.as_ref().and_then(|t| serde_json::from_str(t).ok()).map(pgrx::JsonB)
}

/// Compares the tables of `sync` (or `tbl` alone) between this node and each peer of the sync
/// it connects to; returns the rows that differ and keeps them in rbucardo.diff_result
/// (replacing what an earlier diff found for those peers and tables). A peer this node does
/// not connect to (a branch seen from a passive main) is skipped with a notice: run diff there.
#[pg_extern(
    sql = "CREATE FUNCTION rbucardo.diff(sync text, tbl regclass DEFAULT NULL)
           RETURNS TABLE (peer text, table_name text, key jsonb, here jsonb, there jsonb)
           VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
#[allow(clippy::type_complexity)]
fn diff(
    sync: &str,
    tbl: Option<pg_sys::Oid>,
) -> TableIterator<'static, (name!(peer, String), name!(table_name, String), name!(key, pgrx::JsonB), name!(here, Option<pgrx::JsonB>), name!(there, Option<pgrx::JsonB>))> {
    superuser_only("compare tables");
    let _path = LocalSetting::pinned_search_path();
    let me = me_or_raise();
    let tables = tables_of(sync, tbl);
    let peers: Vec<String> = Spi::connect(|c| {
        c.select("SELECT d FROM rbucardo.sync s, unnest(s.dbs) d WHERE s.name = $1 AND d <> $2 ORDER BY 1", None, &[sync.into(), me.name.as_str().into()])
            .expect("peers")
            .filter_map(|r| r.get::<String>(1).ok().flatten())
            .collect()
    });
    let mut out = Vec::new();
    for peer in peers {
        let Some(mut conn) = connect(&peer) else {
            notice!("rbucardo.diff: {peer} connects to this node, not the other way: run rbucardo.diff('{sync}') on {peer} to compare it");
            continue;
        };
        for &relid in &tables {
            let t = digest::target(relid);
            let found = table_differences(&mut conn, &peer, sync, &t, relid, &me.name);
            Spi::run_with_args(
                "DELETE FROM rbucardo.diff_result WHERE sync = $1 AND peer = $2 AND schema_name = $3 AND table_name = $4",
                &[sync.into(), peer.as_str().into(), t.schema.as_str().into(), t.table.as_str().into()],
            )
            .expect("diff result");
            for (key, here, there) in found {
                Spi::run_with_args(
                    "INSERT INTO rbucardo.diff_result (sync, peer, schema_name, table_name, key, here, there) VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb)",
                    &[sync.into(), peer.as_str().into(), t.schema.as_str().into(), t.table.as_str().into(), key.as_str().into(), here.clone().into(), there.clone().into()],
                )
                .expect("diff result");
                let key = serde_json::from_str(&key).map(pgrx::JsonB).unwrap_or(pgrx::JsonB(serde_json::Value::Null));
                out.push((peer.clone(), format!("{}.{}", t.schema, t.table), key, json(&here), json(&there)));
            }
        }
    }
    TableIterator::new(out)
}

/// The values of a row (a JSON object of text values) in the order of `cols`.
fn values(row: &serde_json::Value, cols: &[String]) -> Vec<Value> {
    cols.iter().map(|c| row.get(c).and_then(|v| v.as_str()).map(str::to_string)).collect()
}

/// Makes `peer`'s rows match this node's: those rbucardo.diff found different for the sync
/// (or for `tbl` alone), or only those with the keys in `keys` (a JSON array of key arrays,
/// as diff shows them: then both nodes are read again for them). Each repaired row is a change
/// of this node, addressed to `peer` alone: it is logged and travels through the normal
/// stream, with the peer's row as its old image, so conflict rules and delta columns apply as
/// to any change, and no other node applies it. With `dry_run` (the default) it only shows
/// what it would do.
#[pg_extern(
    sql = "CREATE FUNCTION rbucardo.repair(sync text, peer text, tbl regclass DEFAULT NULL, keys jsonb DEFAULT NULL, dry_run boolean DEFAULT true)
           RETURNS TABLE (table_name text, key jsonb, action text, here jsonb, there jsonb)
           VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';"
)]
#[allow(clippy::type_complexity)]
fn repair(
    sync: &str,
    peer: &str,
    tbl: Option<pg_sys::Oid>,
    keys: Option<pgrx::JsonB>,
    dry_run: Option<bool>,
) -> TableIterator<'static, (name!(table_name, String), name!(key, pgrx::JsonB), name!(action, String), name!(here, Option<pgrx::JsonB>), name!(there, Option<pgrx::JsonB>))> {
    superuser_only("repair tables");
    let _path = LocalSetting::pinned_search_path();
    let me = me_or_raise();
    let dry_run = dry_run.unwrap_or(true);
    let in_sync = Spi::get_one_with_args::<bool>("SELECT $2 = ANY (dbs) FROM rbucardo.sync WHERE name = $1", &[sync.into(), peer.into()]).ok().flatten();
    if in_sync != Some(true) || peer == me.name {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{peer} is not a peer of sync {sync}"), "Name a peer listed in the sync.");
    }
    let peer_id = Spi::get_one_with_args::<i32>("SELECT node_id FROM rbucardo.db WHERE name = $1", &[peer.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("{peer} has not said hello to this node yet"), "Wait until rbucardo.status shows it connected."));
    let tables = tables_of(sync, tbl);
    // The differences to repair, per table: the last diff's, or those of the keys given.
    let mut work: Vec<(Target, pg_sys::Oid, Vec<Difference>)> = Vec::new();
    let wanted_keys: Option<Vec<String>> = keys.map(|k| match k.0 {
        serde_json::Value::Array(items) if !items.is_empty() => digest::normalize_keys(&items),
        _ => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "keys must be a non-empty JSON array of keys", "For example '[[\"42\"], [\"43\"]]', as rbucardo.diff shows keys."),
    });
    // A repair earlier sent to the peer must have landed first: this one's old images are
    // the peer's rows as they are before it, and a delta column would count the difference twice.
    let pending = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM rbucardo.change_log l, rbucardo.peer_state p
                         LEFT JOIN rbucardo.tick t ON t.tick_id = rbucardo.complete_tick(p.out_tick, p.out_seq)
                        WHERE p.db = $2 AND l.only_for = $1 AND l.origin IS NULL
                          AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, coalesce(t.snap, '1:1:'::pg_catalog.pg_snapshot)))",
        &[peer_id.into(), peer.into()],
    )
    .ok()
    .flatten()
        == Some(true);
    if pending && !dry_run {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("an earlier repair has not reached {peer} yet"),
            format!("Wait until {peer} has it (rbucardo.status shows pending_out 0 for it), run diff again, then repair."),
        );
    }
    let mut conn = None;
    for &relid in &tables {
        let t = digest::target(relid);
        let found: Vec<Difference> = match &wanted_keys {
            None => Spi::connect(|c| {
                c.select(
                    "SELECT key::text, here::text, there::text FROM rbucardo.diff_result
                      WHERE sync = $1 AND peer = $2 AND schema_name = $3 AND table_name = $4 ORDER BY key",
                    None,
                    &[sync.into(), peer.into(), t.schema.as_str().into(), t.table.as_str().into()],
                )
                .expect("diff result")
                .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<String>(2).unwrap(), r.get::<String>(3).unwrap()))
                .collect()
            }),
            Some(keys) => {
                if conn.is_none() {
                    conn = Some(connect(peer).unwrap_or_else(|| {
                        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("this node does not connect to {peer}"), "Repair by keys reads the peer's rows: run it where the peer has a conninfo, or run diff there and repair without keys.")
                    }));
                }
                let buckets = buckets_for(relid);
                let wanted = digest::buckets_of(keys, buckets);
                compare_buckets(conn.as_mut().unwrap(), peer, &t, buckets, &wanted, Some(keys), &me.name)
            }
        };
        if !found.is_empty() {
            work.push((t, relid, found));
        }
    }
    // A row changed here since the diff read it is left out (shown as such): its difference
    // with the peer's row as the diff saw it is no longer the difference to send.
    let mut changed = Vec::new();
    for (t, relid, found) in work.iter_mut() {
        let keys: Vec<String> = found.iter().map(|f| f.0.clone()).collect();
        let buckets = buckets_for(*relid);
        let now = digest::rows(t, buckets, &digest::buckets_of(&keys, buckets));
        found.retain(|f| {
            let same = now.get(&f.0) == f.1.as_ref();
            if !same {
                changed.push((format!("{}.{}", t.schema, t.table), f.0.clone(), now.get(&f.0).cloned(), f.2.clone()));
            }
            same
        });
    }
    let total: usize = work.iter().map(|w| w.2.len()).sum();
    if total > MAX_REPAIR_ROWS {
        raise(PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED, format!("{total} rows to repair, more than {MAX_REPAIR_ROWS} in one call"), "Repair a table at a time (tbl), or a list of keys.");
    }
    let mut out = Vec::new();
    let mut changes = Vec::new();
    for (t, relid, found) in &work {
        // The images hold the columns the capture trigger sends: no generated ones.
        let cols = crate::base::node::stored_columns(*relid);
        let key: Vec<u16> = t.key.iter().filter_map(|k| cols.iter().position(|c| c == k)).map(|p| p as u16).collect();
        let desc = RelDesc { schema: t.schema.clone(), name: t.table.clone(), columns: cols.clone(), key };
        for (k, here, there) in found {
            let h: Option<serde_json::Value> = here.as_ref().and_then(|s| serde_json::from_str(s).ok());
            let th: Option<serde_json::Value> = there.as_ref().and_then(|s| serde_json::from_str(s).ok());
            let (action, op) = match (&h, &th) {
                (Some(_), Some(_)) => ("update", Op::Update),
                (Some(_), None) => ("insert", Op::Insert),
                (None, Some(_)) => ("delete", Op::Delete),
                (None, None) => continue,
            };
            changes.push((desc.clone(), op, th.as_ref().map(|r| values(r, &cols)), h.as_ref().map(|r| values(r, &cols))));
            let key = serde_json::from_str(k).map(pgrx::JsonB).unwrap_or(pgrx::JsonB(serde_json::Value::Null));
            out.push((format!("{}.{}", t.schema, t.table), key, action.to_string(), h.map(pgrx::JsonB), th.map(pgrx::JsonB)));
        }
    }
    let bytes: usize = changes.iter().map(|(_, _, o, n)| [o, n].iter().map(|r| r.as_ref().map_or(0, |r| r.iter().map(|v| v.as_ref().map_or(1, String::len)).sum())).sum::<usize>()).sum();
    if bytes > MAX_REPAIR_BYTES {
        raise(PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED, format!("the repair would be one transaction of {} MB", bytes >> 20), "Repair a table at a time (tbl), or a list of keys.");
    }
    if !dry_run && !changes.is_empty() {
        crate::log::capture::log_own_txn(changes, Some(peer_id));
        for (t, _, found) in &work {
            let keys: Vec<String> = found.iter().map(|f| f.0.clone()).collect();
            Spi::run_with_args(
                "DELETE FROM rbucardo.diff_result WHERE sync = $1 AND peer = $2 AND schema_name = $3 AND table_name = $4 AND key::text = ANY ($5)",
                &[sync.into(), peer.into(), t.schema.as_str().into(), t.table.as_str().into(), keys.into()],
            )
            .expect("diff result");
        }
    }
    for (table, key, here, there) in changed {
        let key = serde_json::from_str(&key).map(pgrx::JsonB).unwrap_or(pgrx::JsonB(serde_json::Value::Null));
        out.push((table, key, "skipped: changed here since the diff, run diff again".to_string(), json(&here), json(&there)));
    }
    TableIterator::new(out)
}

/// Buckets for the table `relid`: from the planner's estimate of its rows, or a count when it
/// was never analysed.
fn buckets_for(relid: pg_sys::Oid) -> i32 {
    let est = Spi::get_one_with_args::<f32>("SELECT reltuples FROM pg_catalog.pg_class WHERE oid = $1", &[relid.into()]).ok().flatten().unwrap_or(-1.0);
    let rows = if est >= 0.0 {
        est as i64
    } else {
        Spi::get_one::<i64>(&format!("SELECT count(*) FROM {}", relid_name(relid))).ok().flatten().unwrap_or(0)
    };
    digest::bucket_count(rows)
}

fn relid_name(relid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()]).ok().flatten().unwrap_or_default()
}
