//! Exceptions: remote transactions that cannot be applied yet. A transaction whose rows break
//! an integrity constraint here (a unique index that is not the replica key, a check) is
//! parked whole in `rbucardo.exceptions` instead of stopping its stream, retried automatically
//! when its blocker may be gone, and never dropped: an operator can retry or discard it, and a
//! discard keeps the record. Other errors (a missing table, a failed schema change) still stop
//! the stream, because later changes may depend on them.
//!
//! Owns the table `exceptions` (sql/exceptions.sql).

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::encoding::{Position, Txn};
use crate::error::raise;

/// Runs `f` in a subtransaction. An integrity-constraint violation rolls the subtransaction
/// back and comes back as `Err(message)`; any other error is raised again.
pub fn attempt<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    unsafe {
        let cx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f()))).catch_others(Err).execute();
        match result {
            Ok(v) => {
                pg_sys::ReleaseCurrentSubTransaction();
                pg_sys::MemoryContextSwitchTo(cx);
                pg_sys::CurrentResourceOwner = owner;
                Ok(v)
            }
            Err(e) => {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                pg_sys::MemoryContextSwitchTo(cx);
                pg_sys::CurrentResourceOwner = owner;
                match parkable(&e) {
                    Some(message) => Err(message),
                    None => e.rethrow(),
                }
            }
        }
    }
}

fn parkable(e: &CaughtError) -> Option<String> {
    use PgSqlErrorCode::*;
    let report = match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
        CaughtError::RustPanic { .. } => return None,
    };
    matches!(
        report.sql_error_code(),
        ERRCODE_UNIQUE_VIOLATION
            | ERRCODE_FOREIGN_KEY_VIOLATION
            | ERRCODE_NOT_NULL_VIOLATION
            | ERRCODE_CHECK_VIOLATION
            | ERRCODE_EXCLUSION_VIOLATION
            | ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION
            | ERRCODE_RESTRICT_VIOLATION
    )
    .then(|| match report.detail() {
        Some(d) if !d.trim().is_empty() && !d.contains("   0: ") => format!("{} ({})", report.message(), d.trim()),
        _ => report.message().to_string(),
    })
}

/// Parks a remote transaction that broke a constraint here.
pub fn park(txn: &Txn, via: i32, reason: &str) {
    Spi::run_with_args(
        "INSERT INTO rbucardo.exceptions (origin, origin_tick, origin_seq, via, hlc, chunks, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            txn.origin.into(),
            txn.origin_pos.tick.into(),
            txn.origin_pos.seq.into(),
            via.into(),
            txn.hlc.into(),
            postcard::to_allocvec(&txn.chunks).expect("encoding chunks").into(),
            reason.into(),
        ],
    )
    .expect("parking a transaction");
    log!("rbucardo: parked a transaction from node {} (position {}, {}): {reason}", txn.origin, txn.origin_pos.tick, txn.origin_pos.seq);
}

/// Tries parked transactions again, oldest first; returns how many now applied. One that
/// applies is forwarded as a change of this node (its peers are past its original position).
pub fn retry_open(me: i32, only: Option<i64>) -> i64 {
    let open: Vec<(i64, Txn)> = Spi::connect(|c| {
        c.select(
            "SELECT id, origin, origin_tick, origin_seq, via, hlc, chunks FROM rbucardo.exceptions
              WHERE resolved_at IS NULL AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
            None,
            &[only.into()],
        )
        .expect("reading exceptions")
        .map(|r| {
            let pos = Position { tick: r.get::<i64>(3).unwrap().unwrap(), seq: r.get::<i64>(4).unwrap().unwrap() };
            let txn = Txn {
                origin: r.get::<i32>(2).unwrap().unwrap(),
                origin_pos: pos,
                hlc: r.get::<i64>(6).unwrap().unwrap(),
                stream_pos: pos,
                chunks: postcard::from_bytes(&r.get::<Vec<u8>>(7).unwrap().unwrap_or_default()).unwrap_or_default(),
            };
            (r.get::<i64>(1).unwrap().unwrap(), txn)
        })
        .collect()
    });
    let mut applied = 0;
    for (id, txn) in open {
        match crate::apply::apply_parked(me, &txn) {
            Ok(()) => {
                Spi::run_with_args("UPDATE rbucardo.exceptions SET resolved_at = now(), resolution = 'applied', last_retry = now(), retries = retries + 1 WHERE id = $1", &[id.into()])
                    .expect("resolving an exception");
                applied += 1;
            }
            Err(reason) => {
                Spi::run_with_args("UPDATE rbucardo.exceptions SET reason = $2, last_retry = now(), retries = retries + 1 WHERE id = $1", &[id.into(), reason.as_str().into()])
                    .expect("recording a retry");
            }
        }
    }
    applied
}

/// Retries one parked transaction now; true if it applied.
#[pg_extern(volatile)]
fn exception_retry(id: i64) -> bool {
    let me = crate::catalog::me_or_raise();
    if Spi::get_one_with_args::<bool>("SELECT resolved_at IS NULL FROM rbucardo.exceptions WHERE id = $1", &[id.into()]).ok().flatten() != Some(true) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no open exception {id}"), "See SELECT * FROM rbucardo.exceptions WHERE resolved_at IS NULL.");
    }
    retry_open(me.id, Some(id)) == 1
}

/// Gives up on one parked transaction; the record stays, marked discarded.
#[pg_extern(volatile)]
fn exception_discard(id: i64) -> String {
    let n = Spi::connect_mut(|c| {
        c.update(
            "UPDATE rbucardo.exceptions SET resolved_at = now(), resolution = 'discarded' WHERE id = $1 AND resolved_at IS NULL",
            None,
            &[id.into()],
        )
        .map(|t| t.len())
        .unwrap_or(0)
    });
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no open exception {id}"), "See SELECT * FROM rbucardo.exceptions WHERE resolved_at IS NULL.");
    }
    format!("discarded exception {id}; its record stays in rbucardo.exceptions")
}
