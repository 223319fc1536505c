//! Exceptions: remote transactions that cannot be applied yet. Two kinds, both kept in
//! `rbucardo.exceptions` (an open one for ever; a resolved one, discarded included, until
//! `rbucardo.conflict_retention_days`):
//!
//! - **constraint**: the transaction's rows break an integrity constraint here (a unique index
//!   that is not the key, a foreign key whose parent has not arrived, a check). It is parked
//!   whole, its stream goes on, and it is retried automatically when its blocker may be gone.
//!   An operator can retry or discard it; a discard keeps the record.
//! - **ddl**: a replicated schema change fails here. Later changes of that stream may depend on
//!   it, so the stream from that peer stops just before the transaction (everything before it
//!   is applied, nothing after) and it is retried every [`DDL_RETRY_EVERY`] seconds, so fixing
//!   the schema by hand is enough. `exception_retry` retries at once; `exception_skip` applies
//!   the transaction without the failing command.
//!
//! Owns the table `exceptions` (sql/exceptions.sql).

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::base::wire::{Position, Txn};
use crate::base::xact;

/// Seconds between automatic retries of a transaction that stopped its stream.
pub const DDL_RETRY_EVERY: i32 = 5;

/// A replicated schema change that cannot run here; it stops its stream.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Ordinal of the DDL change in its transaction (what `exception_skip` leaves out).
    pub ordinal: u32,
    pub command: String,
    pub message: String,
    /// The transaction asks for more than the sending peer may do here (a table outside the
    /// syncs shared with it): the whole batch is refused, not just this stream stopped.
    pub refused: bool,
}

/// Why a remote transaction was not applied.
pub enum Failure {
    /// It broke a constraint here: park it, go on.
    Park(String),
    /// A schema change failed: stop the stream before it.
    Stop(Stop),
}

/// Applies one remote transaction with `f` in a subtransaction. An integrity-constraint
/// violation or a failed schema change rolls it back and comes back as a [`Failure`]; any
/// other error is raised again.
pub fn attempt<R>(f: impl FnOnce() -> Result<R, Stop>) -> Result<R, Failure> {
    match xact::undoable(f) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(stop)) => Err(Failure::Stop(stop)),
        Err(e) => match parkable(&e) {
            Some(message) => Err(Failure::Park(message)),
            None => e.rethrow(),
        },
    }
}

/// The chunks of a kept transaction, as stored by [`insert`]; a damaged value is an error, not
/// an empty transaction that would "apply".
pub fn stored_chunks(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let chunks: Vec<Vec<u8>> = postcard::from_bytes(bytes).map_err(|e| format!("the stored transaction cannot be decoded: {e}"))?;
    match chunks.iter().find_map(|c| crate::base::wire::decode_chunk(c).err()) {
        Some(e) => Err(format!("the stored transaction cannot be decoded: {e}")),
        None if chunks.is_empty() => Err("the stored transaction has no changes".into()),
        None => Ok(chunks),
    }
}

/// Whether an error is one that parks a remote transaction instead of failing its batch.
pub fn is_parkable(e: &CaughtError) -> bool {
    parkable(e).is_some()
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
    .then(|| xact::error_message_with_detail(e))
}

/// Parks a remote transaction that broke a constraint here.
pub fn park(txn: &Txn, via: i32, reason: &str) {
    insert("constraint", txn, via, reason, None);
    log!("rbucardo: parked a transaction from node {} (position {}, {}): {reason}", txn.origin, txn.origin_pos.tick, txn.origin_pos.seq);
}

/// Keeps a remote transaction that could not be applied, with the failed command of a stop.
pub fn insert(kind: &str, txn: &Txn, via: i32, reason: &str, stop: Option<&Stop>) {
    Spi::run_with_args(
        "INSERT INTO rbucardo.exceptions (kind, origin, origin_tick, origin_seq, via, hlc, chunks, reason,
                                          stream_tick, stream_seq, command, ddl_ordinal, last_retry)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $11 IS NOT NULL THEN pg_catalog.now() END)",
        &[
            kind.into(),
            txn.origin.into(),
            txn.origin_pos.tick.into(),
            txn.origin_pos.seq.into(),
            via.into(),
            txn.hlc.into(),
            postcard::to_allocvec(&txn.chunks).expect("encoding chunks").into(),
            reason.into(),
            stop.map(|_| txn.stream_pos.tick).into(),
            stop.map(|_| txn.stream_pos.seq).into(),
            stop.map(|s| s.command.as_str()).into(),
            stop.map(|s| s.ordinal as i32).into(),
        ],
    )
    .expect("keeping a transaction that could not be applied");
}

// ---------------------------------------------------------------------------------------------
// Stopped streams (kind 'ddl').

/// An open exception that stops the stream from one peer, as apply_batch needs it.
pub struct Stopped {
    pub id: i64,
    pub origin: i32,
    pub origin_pos: Position,
    /// Whether it should be tried again now (the last try is old enough, or an operator asked).
    pub due: bool,
    /// The DDL change to leave out (set by exception_skip).
    pub skip: Option<u32>,
    pub reason: String,
}

/// The open exceptions stopping the stream from node `via`; normally none.
pub fn stopped_in(via: i32) -> Vec<Stopped> {
    crate::base::plans::run(
        "SELECT id, origin, origin_tick, origin_seq,
                skip_ordinal IS NOT NULL OR last_retry IS NULL
                  OR last_retry < pg_catalog.now() - pg_catalog.make_interval(secs => $2),
                skip_ordinal, reason
           FROM rbucardo.exceptions WHERE kind = 'ddl' AND resolved_at IS NULL AND via = $1",
        &[pg_sys::INT4OID, pg_sys::INT4OID],
        &[via.into(), DDL_RETRY_EVERY.into()],
        |t| {
            t.map(|r| Stopped {
                id: r.get::<i64>(1).unwrap().unwrap(),
                origin: r.get::<i32>(2).unwrap().unwrap(),
                origin_pos: Position { tick: r.get::<i64>(3).unwrap().unwrap(), seq: r.get::<i64>(4).unwrap().unwrap() },
                due: r.get::<bool>(5).unwrap().unwrap_or(true),
                skip: r.get::<i32>(6).unwrap().map(|o| o as u32),
                reason: r.get::<String>(7).unwrap().unwrap_or_default(),
            })
            .collect()
        },
    )
}

/// Why the stream from node `via` is stopped, while it is not yet time to try again.
pub fn stream_stopped(via: i32) -> Option<String> {
    stopped_in(via).into_iter().find(|s| !s.due).map(|s| s.reason)
}

/// Records that `txn` (at `stream_pos` in the stream from `via`) stopped that stream: a new
/// exception, or one more failed try of `existing`.
pub fn record_stop(existing: Option<i64>, txn: &Txn, via: i32, stop: &Stop) {
    let Some(id) = existing else {
        insert("ddl", txn, via, &stop.message, Some(stop));
        log!("rbucardo: the stream from node {via} stopped at a transaction of node {}: {}", txn.origin, stop.message);
        return;
    };
    Spi::run_with_args(
        "UPDATE rbucardo.exceptions SET reason = $2, command = $3, ddl_ordinal = $4, skip_ordinal = NULL,
                last_retry = pg_catalog.now(), retries = retries + 1 WHERE id = $1",
        &[id.into(), stop.message.as_str().into(), stop.command.as_str().into(), (stop.ordinal as i32).into()],
    )
    .expect("recording a stopped stream");
}

/// Closes a stopping transaction's exception without applying it through this stream:
/// `applied` (it arrived by another path and was applied there) or `parked` (it applied its
/// schema change but broke a constraint, and is parked as a `constraint` exception).
pub fn record_superseded(s: &Stopped, resolution: &str) {
    Spi::run_with_args(
        "UPDATE rbucardo.exceptions SET resolved_at = pg_catalog.now(), resolution = $2 WHERE id = $1 AND resolved_at IS NULL",
        &[s.id.into(), resolution.into()],
    )
    .expect("closing a stopped stream's exception");
}

/// Marks a stopping transaction applied (or applied without its failing command).
pub fn record_resumed(s: &Stopped) {
    Spi::run_with_args(
        "UPDATE rbucardo.exceptions SET resolved_at = pg_catalog.now(), last_retry = pg_catalog.now(),
                retries = retries + 1, resolution = CASE WHEN skip_ordinal IS NULL THEN 'applied' ELSE 'skipped' END
          WHERE id = $1",
        &[s.id.into()],
    )
    .expect("resolving a stopped stream");
}

/// Deletes resolved exceptions older than `days` (by when they were resolved), at most `limit`
/// of them; an open one is never deleted. Returns how many.
pub fn prune(days: i32, limit: i64) -> i64 {
    Spi::connect_mut(|c| {
        c.update(
            "DELETE FROM rbucardo.exceptions WHERE id IN (
                 SELECT id FROM rbucardo.exceptions
                  WHERE resolved_at IS NOT NULL AND resolved_at < pg_catalog.now() - pg_catalog.make_interval(days => $1)
                  ORDER BY resolved_at LIMIT $2)",
            None,
            &[days.into(), limit.into()],
        )
        .map(|t| t.len() as i64)
        .unwrap_or(0)
    })
}
