//! Online join: a new node copies each table from a provider over its peer link while every
//! node keeps writing, and meets the provider's stream where the copies end, with nothing
//! missed and nothing applied twice.
//!
//! How the copies and the stream meet:
//! - `rbucardo.join()` (src/api/join.rs) asks the provider to cut a tick T0 (`peer_join_begin`)
//!   and sets this node's cursor in the provider's stream to the end of T0. Every copy is made
//!   later, so each sees every transaction of T0 and before.
//! - This node's worker copies each table in its own REPEATABLE READ transaction on the
//!   provider and keeps that transaction's snapshot with the copied rows, committed together.
//!   A cut or a restart loses only the table in progress, which is copied again, in a new
//!   snapshot.
//! - When every table is copied, the provider is given the snapshots (`peer_join_end`) and
//!   cuts a tick T1. A transaction of its stream after T0 that a table's snapshot sees is
//!   already in that table's copy: the provider leaves its changes to that table out of what
//!   it sends this node (src/log/changelog.rs). Only ticks up to T1 can hold such a
//!   transaction: T1's snapshot was taken after every copy's.
//! - The node's sequences are re-based past the copied rows, and the stream goes on from T0.
//!
//! The provider side (`provide_*`) runs in the endpoints of src/runtime/endpoints.rs; the
//! joining side (`step`) runs in the worker, in place of the link's round while a join is on.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::node::{self, JoinFilter, Me, Peer};
use crate::base::pq::{Param, PeerConn};
use crate::base::sqltext::{output_text, quote_ident, text_array_literal};
use crate::base::wire::WHOLE_TICK;
use crate::base::xact::{in_txn, LocalSetting, RunAs};

/// How long a copy may wait for one row, or a statement for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a table copy in progress is reported in the server log.
const LOG_EVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The provider's side.

/// `peer_join_describe`: what the joining peer joins: the syncs this node shares with it, and
/// their tables with the statements that make them (for a node that lacks them) and an
/// estimate of their rows. Changes nothing.
pub fn provide_description(peer: &str) -> String {
    Spi::get_one_with_args::<pgrx::JsonB>(
        "SELECT jsonb_build_object(
            'syncs', coalesce((SELECT jsonb_agg(jsonb_build_object('name', s.name, 'herd', s.herd, 'conflict_strategy', s.conflict_strategy,
                                                                 'sequence_strategy', (SELECT ss.strategy FROM rbucardo.sync_sequence_strategy ss WHERE ss.sync = s.name))
                                                ORDER BY s.name)
                                 FROM rbucardo.sync s WHERE $1 = ANY (s.dbs)), '[]'),
            'tables', coalesce((SELECT jsonb_agg(jsonb_build_object('schema', n.nspname, 'table', k.relname, 'herd', t.herd,
                                                                  'est_rows', greatest(k.reltuples, 0)::bigint,
                                                                  'types', d.types, 'creates', d.creates, 'laters', d.laters)
                                                 ORDER BY n.nspname, k.relname)
                                  FROM (SELECT DISTINCT ON (h.relid) h.relid, h.herd FROM rbucardo.herd_table h
                                         WHERE h.herd IN (SELECT s.herd FROM rbucardo.sync s WHERE $1 = ANY (s.dbs))
                                         ORDER BY h.relid, h.herd) t
                                  JOIN pg_catalog.pg_class k ON k.oid = t.relid
                                  JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
                                  CROSS JOIN LATERAL rbucardo.table_ddl(t.relid) d), '[]'))",
        &[peer.into()],
    )
    .expect("join description")
    .expect("join description")
    .0
    .to_string()
}

/// `peer_join_start`: cuts the tick the joining peer's stream starts after, and records it as
/// the peer's confirmation (and when the join began, in `join_filter` until `peer_join_end`).
/// A peer that expired here is whole from then on: its stream starts there, and the log is
/// kept for it again.
/// Refused while transactions are parked here: one applied later here is not forwarded again,
/// so the joining node, copied before it applied, would never get it.
pub fn provide_start(peer: &str) -> i64 {
    let parked = Spi::get_one::<i64>("SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL").ok().flatten().unwrap_or(0);
    if parked > 0 {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{parked} transactions are parked on the provider"),
            "A joining node copied before one of them applies would never get it. Resolve them first (rbucardo.exceptions: exception_retry, exception_skip), then join.",
        );
    }
    let tick = crate::log::changelog::ensure_tick();
    Spi::run_with_args(
        "UPDATE rbucardo.peer_state SET out_tick = $2, out_seq = $3, join_until = NULL, join_filter = pg_catalog.clock_timestamp()::text,
                expired_at = NULL, expired_why = NULL
          WHERE db = $1",
        &[peer.into(), tick.into(), WHOLE_TICK.into()],
    )
    .expect("join start");
    // The peer's policy holds its join filter: what backends keep of it goes (src/base/kept.rs).
    crate::base::signals::wake_local_worker_at_commit();
    tick
}

/// `peer_copy_view`: a temporary view of the columns `cols` of a table the peer shares, each as
/// its type's output function prints it, for the peer to COPY out of in its snapshot. The view
/// is made by the table's owner: reading through it needs no right on the table, and what it
/// runs (output functions) runs as the peer's own role. Returns its name.
pub fn provide_copy_view(peer: &str, schema: &str, table: &str, cols: &[String]) -> String {
    let policy = node::peer_policy(peer);
    if !policy.tables.contains(&(schema.to_string(), table.to_string())) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("{peer} does not share table {schema}.{table} with this node"),
            "A joining node copies the tables of the syncs it shares with its provider.",
        );
    }
    let Some((relid, owner)) = node::table_by_name(schema, table) else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("table {schema}.{table} is missing on the provider"), "It was dropped or renamed during the join: join again.");
    };
    let known = node::stored_columns(relid);
    // The same columns on both sides: a column only here would be lost to the copy (and a
    // schema change replayed after it would not bring its values back).
    let mut mine = known.clone();
    let mut theirs = cols.to_vec();
    mine.sort();
    theirs.sort();
    if mine != theirs {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("table {schema}.{table} has columns ({}) on the provider, ({}) on {peer}", known.join(", "), cols.join(", ")),
            "Make the joining node's table like the provider's (or create it with join(copy_schema => true)); the copy goes on by itself.",
        );
    }
    let view = format!("rbucardo_copy_{}", u32::from(relid));
    let list: Vec<String> = cols.iter().map(|c| format!("{} AS {}", output_text(c), quote_ident(c))).collect();
    let create = format!("CREATE OR REPLACE TEMP VIEW {} AS SELECT {} FROM {}.{}", quote_ident(&view), list.join(", "), quote_ident(schema), quote_ident(table));
    let grant = format!("GRANT SELECT ON pg_temp.{} TO {}", quote_ident(&view), quote_ident(&peer_login()));
    {
        let _owner = RunAs::role(owner);
        Spi::run(&create).expect("copy view");
        Spi::run(&grant).expect("copy view grant");
    }
    format!("pg_temp.{}", quote_ident(&view))
}

/// The role the calling peer logged in as.
fn peer_login() -> String {
    Spi::get_one::<String>("SELECT session_user::text").ok().flatten().unwrap_or_default()
}

/// `peer_join_end`: keeps the peer's table snapshots and cuts the tick after which they no
/// longer matter; returns it. Refused when something ran here during the join that the copies
/// may hold wrongly: a schema change of the shared tables (a copy made before it is changed
/// again when it is replayed, one made after it holds what a replay cannot bring back), or a
/// transaction parked or retried here (the copies may hold it, or miss it for good).
pub fn provide_end(peer: &str, filter: &str) -> i64 {
    if JoinFilter::parse(0, filter).is_none() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "the join filter does not parse", "It is [[schema, table, snapshot], ...] as the joining node sends it.");
    }
    let (start, begun) = Spi::get_two_with_args::<i64, String>("SELECT out_tick, join_filter FROM rbucardo.peer_state WHERE db = $1 AND join_until IS NULL", &[peer.into()])
        .unwrap_or((None, None));
    let (Some(start), Some(begun)) = (start, begun) else {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("{peer} has no join in progress here"), "Start it with rbucardo.join() on the joining node.");
    };
    let again = "Join again: on the joining node delete its row from rbucardo.join_run, empty its tables in replica mode, call join().";
    let churn = Spi::get_one_with_args::<i64>(
        "SELECT count(*) FROM rbucardo.exceptions WHERE at >= $1::timestamptz OR resolved_at >= $1::timestamptz",
        &[begun.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(0);
    if churn > 0 {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("{churn} transactions were parked or retried on the provider during the join"), again);
    }
    let kept = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.tick WHERE tick_id = $1)", &[start.into()]).ok().flatten() == Some(true);
    if !kept {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("the provider no longer keeps its change log from the join's start (tick {start})"), again);
    }
    if let Some(command) = crate::log::changelog::schema_change_since(start, &node::peer_policy(peer)) {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("a schema change ran on the provider during the join: {command}"), again);
    }
    let until = crate::log::changelog::ensure_tick();
    Spi::run_with_args(
        "UPDATE rbucardo.peer_state SET join_until = $2, join_filter = $3 WHERE db = $1",
        &[peer.into(), until.into(), filter.into()],
    )
    .expect("join end");
    // The peer's policy holds its join filter: what backends keep of it goes (src/base/kept.rs).
    crate::base::signals::wake_local_worker_at_commit();
    until
}

// ---------------------------------------------------------------------------------------------
// The joining side.

/// The provider of the join in progress here, if any. While it copies, this node exchanges
/// nothing with its peers: its cursor in the provider's stream waits for the copies.
pub fn joining() -> Option<String> {
    // Every push asks (peer_push): a kept plan.
    crate::base::plans::one::<String>("SELECT provider FROM rbucardo.join_run WHERE state = 'copying' LIMIT 1", &[], &[])
}

/// One step of the join from `link`'s peer, in place of a replication round: copies every
/// table not copied yet, then hands the snapshots to the provider and ends the join. Returns
/// whether the join is done.
pub fn step(me: &Me, peer: &Peer, conn: &mut PeerConn) -> Result<bool, String> {
    let provider = peer.name.clone();
    let p = provider.clone();
    let todo: Vec<(String, String, i64)> = in_txn(move || {
        Spi::connect(|c| {
            c.select(
                "SELECT schema_name, table_name, coalesce(est_rows, 0) FROM rbucardo.join_table
                  WHERE provider = $1 AND state <> 'copied' ORDER BY schema_name, table_name",
                None,
                &[p.as_str().into()],
            )
            .expect("join tables")
            .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<String>(2).unwrap().unwrap(), r.get::<i64>(3).unwrap().unwrap()))
            .collect()
        })
    })?;
    for (schema, table, est) in todo {
        if let Err(e) = copy_table(me, peer, &schema, &table, est) {
            let (p, s, t, m) = (provider.clone(), schema.clone(), table.clone(), e.clone());
            let _ = in_txn(move || {
                Spi::run_with_args(
                    "UPDATE rbucardo.join_table SET state = 'waiting', last_error = $4 WHERE provider = $1 AND schema_name = $2 AND table_name = $3",
                    &[p.as_str().into(), s.as_str().into(), t.as_str().into(), m.as_str().into()],
                )
            });
            log!("rbucardo: joining from {provider}: copying {schema}.{table} failed: {e}; it is copied again");
            return Err(format!("copying {schema}.{table} failed: {e}"));
        }
    }
    finish(me, &provider, conn)?;
    Ok(true)
}

/// A local table's oid and owner, the columns a copy fills (generated ones are computed
/// here), and whether it holds rows.
fn local_table(schema: &str, table: &str) -> (pg_sys::Oid, pg_sys::Oid, Vec<String>, bool) {
    let Some((relid, owner)) = node::table_by_name(schema, table) else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("table {schema}.{table} is missing here"), "It was dropped after join() began; join again.");
    };
    let cols = node::stored_columns(relid);
    let has_rows = Spi::get_one::<bool>(&format!("SELECT EXISTS (SELECT 1 FROM {}.{})", quote_ident(schema), quote_ident(table))).ok().flatten() == Some(true);
    (relid, owner, cols, has_rows)
}

/// Copies one table whole, in one snapshot of the provider, and keeps that snapshot with the
/// rows (one local transaction: a failure leaves the table as it was, empty).
fn copy_table(me: &Me, peer: &Peer, schema: &str, table: &str, est_rows: i64) -> Result<(), String> {
    let (p, s, t) = (peer.name.clone(), schema.to_string(), table.to_string());
    let (relid, owner, cols, has_rows) = in_txn(move || {
        Spi::run_with_args(
            "UPDATE rbucardo.join_table SET state = 'copying', attempts = attempts + 1, started_at = now(), finished_at = NULL, rows = 0, bytes = 0
              WHERE provider = $1 AND schema_name = $2 AND table_name = $3",
            &[p.as_str().into(), s.as_str().into(), t.as_str().into()],
        )
        .expect("join table");
        Spi::run_with_args("UPDATE rbucardo.join_run SET pid = pg_catalog.pg_backend_pid(), last_error = NULL WHERE provider = $1", &[p.as_str().into()]).expect("join run");
        local_table(&s, &t)
    })?;
    if has_rows {
        return Err(format!(
            "{schema}.{table} holds rows here: a join copies into empty tables (empty it without replicating that: \
             SET LOCAL session_replication_role = replica; TRUNCATE ...; the copy goes on)"
        ));
    }
    let conninfo = peer.conninfo.clone().ok_or("the provider has no conninfo here")?;
    let mut conn = PeerConn::connect(&conninfo, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    // The provider makes a temporary view to copy from (in a transaction of its own: the copy's
    // is READ ONLY, so that it takes no transaction id for as long as it runs).
    let names = text_array_literal(&cols);
    let view = conn
        .query(
            "SELECT rbucardo.peer_copy_view($1, $2, $3, $4)",
            &[Param::Text(&me.name), Param::Text(schema), Param::Text(table), Param::Text(&names)],
            CALL_TIMEOUT,
        )
        .map_err(|e| e.to_string())?
        .first()
        .and_then(|r| r.text(0))
        .ok_or("peer_copy_view returned nothing")?;
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", CALL_TIMEOUT).map_err(|e| e.to_string())?;
    // The transaction's snapshot: taken by its first statement, kept to its end.
    let snapshot = conn
        .query("SELECT pg_catalog.pg_current_snapshot()::text", &[], CALL_TIMEOUT)
        .map_err(|e| e.to_string())?
        .first()
        .and_then(|r| r.text(0))
        .ok_or("the provider returned no snapshot")?;
    // Values print as they travel in the stream, whatever the provider's settings; a row
    // security policy that would hide rows from the copy is an error, not a silent hole.
    conn.execute(crate::base::canonical::CANONICAL_SETTINGS_SQL, CALL_TIMEOUT).map_err(|e| e.to_string())?;
    conn.execute("SET LOCAL row_security = off", CALL_TIMEOUT).map_err(|e| e.to_string())?;
    let list: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let sql = format!("COPY (SELECT {} FROM {view}) TO STDOUT", list.join(", "));
    conn.copy_out(&sql, CALL_TIMEOUT).map_err(|e| e.to_string())?;
    log!("rbucardo: joining from {}: copying {schema}.{table} (about {est_rows} rows)", peer.name);
    let started = Instant::now();
    let (provider, s, t, snap) = (peer.name.clone(), schema.to_string(), table.to_string(), snapshot.clone());
    let conn_ref = &mut conn;
    let (rows, bytes) = in_txn(AssertUnwindSafe(move || {
        let _replica = LocalSetting::replica_mode();
        let (mut rows, mut bytes, mut logged) = (0u64, 0u64, Instant::now());
        let mut source = || match conn_ref.copy_row(CALL_TIMEOUT) {
            Ok(Some(row)) => {
                rows += 1;
                bytes += row.len() as u64;
                if logged.elapsed() >= LOG_EVERY {
                    logged = Instant::now();
                    log!("rbucardo: joining from {provider}: {}", progress(&s, &t, rows, bytes, est_rows, started.elapsed()));
                }
                Ok(Some(row))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        {
            // The table's triggers, constraints and index expressions run as its owner,
            // restricted, as when rows are applied (only the copy: the join's own tables are
            // written as the worker).
            let _owner = RunAs::restricted(owner);
            crate::apply::copy::copy_in(relid, &cols, &mut source);
        }
        Spi::run_with_args(
            "UPDATE rbucardo.join_table SET state = 'copied', rows = $4, bytes = $5, snapshot = $6, finished_at = now(), last_error = NULL
              WHERE provider = $1 AND schema_name = $2 AND table_name = $3",
            &[provider.as_str().into(), s.as_str().into(), t.as_str().into(), (rows as i64).into(), (bytes as i64).into(), snap.as_str().into()],
        )
        .expect("join table copied");
        (rows, bytes)
    }))?;
    // The provider's transaction only read; how it ends changes nothing. The view goes now,
    // not at the end of the session: it would hold up a schema change of the table.
    let _ = conn.execute("COMMIT", CALL_TIMEOUT);
    let _ = conn.execute(&format!("DROP VIEW IF EXISTS {view}"), CALL_TIMEOUT);
    log!("rbucardo: joining from {}: copied {}", peer.name, progress(schema, table, rows, bytes, rows as i64, started.elapsed()));
    Ok(())
}

/// "public.t: 120000 rows, 34.1 MB, 11.2 MB/s, about 3 s left" for the server log.
fn progress(schema: &str, table: &str, rows: u64, bytes: u64, est_rows: i64, took: Duration) -> String {
    let secs = took.as_secs_f64().max(0.001);
    let mb = bytes as f64 / 1e6;
    let left = if rows > 0 && est_rows as u64 > rows { format!(", about {:.0} s left", (est_rows as u64 - rows) as f64 * secs / rows as f64) } else { String::new() };
    format!("{schema}.{table}: {rows} rows, {mb:.1} MB, {:.1} MB/s{left}", mb / secs)
}

/// Every table is copied: the sequences go past the copied rows, the provider learns the
/// snapshots, and the join is done (the worker's next round pulls from T0).
fn finish(me: &Me, provider: &str, conn: &mut PeerConn) -> Result<(), String> {
    let p = provider.to_string();
    let filter = in_txn(move || {
        let rows: Vec<(String, String, String)> = Spi::connect(|c| {
            c.select("SELECT schema_name, table_name, snapshot FROM rbucardo.join_table WHERE provider = $1 ORDER BY 1, 2", None, &[p.as_str().into()])
                .expect("join tables")
                .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<String>(2).unwrap().unwrap(), r.get::<String>(3).unwrap().unwrap_or_default()))
                .collect()
        });
        // Sequences past what the copies hold, in this node's part of their values.
        let herds: Vec<String> = Spi::connect(|c| {
            c.select("SELECT DISTINCT herd FROM rbucardo.sync WHERE $1 = ANY (dbs)", None, &[p.as_str().into()])
                .expect("herds")
                .filter_map(|r| r.get::<String>(1).ok().flatten())
                .collect()
        });
        for herd in herds {
            crate::schema::sequences::repartition_herd(&herd);
        }
        serde_json::to_string(&rows).expect("join filter")
    })?;
    let until = conn
        .query("SELECT rbucardo.peer_join_end($1, $2)", &[Param::Text(&me.name), Param::Text(&filter)], CALL_TIMEOUT)
        .map_err(|e| e.to_string())?
        .first()
        .and_then(|r| r.i64(0))
        .ok_or("peer_join_end returned nothing")?;
    let p = provider.to_string();
    in_txn(move || {
        Spi::run_with_args("UPDATE rbucardo.join_run SET state = 'done', finished_at = now(), pid = NULL, last_error = NULL WHERE provider = $1", &[p.as_str().into()])
    })?
    .map_err(|e| e.to_string())?;
    log!("rbucardo: joined from {provider}: every table copied; the provider leaves out what the copies hold up to its tick {until}");
    Ok(())
}
