//! Exceptions: remote transactions that cannot be applied yet. Two kinds, both kept in
//! `rbucardo.exceptions` and never dropped:
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

use crate::encoding::{Batch, Position, Txn};
use crate::error::raise;

/// Seconds between automatic retries of a transaction that stopped its stream.
pub const DDL_RETRY_EVERY: i32 = 5;

/// A replicated schema change that cannot run here; it stops its stream.
#[derive(Debug, Clone)]
pub struct Stop {
    /// Ordinal of the DDL change in its transaction (what `exception_skip` leaves out).
    pub ordinal: u32,
    pub command: String,
    pub message: String,
}

/// Why a remote transaction was not applied.
pub enum Failure {
    /// It broke a constraint here: park it, go on.
    Park(String),
    /// A schema change failed: stop the stream before it.
    Stop(Stop),
}

/// Runs `f` in a subtransaction that is rolled back if `f` raises an error, which is returned.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, CaughtError> {
    unsafe {
        let cx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f()))).catch_others(Err).execute();
        if result.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cx);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// Applies one remote transaction with `f` in a subtransaction. An integrity-constraint
/// violation or a failed schema change rolls it back and comes back as a [`Failure`]; any
/// other error is raised again.
pub fn attempt<R>(f: impl FnOnce() -> Result<R, Stop>) -> Result<R, Failure> {
    let mut stopped = None;
    let result = subtransaction(|| match f() {
        Ok(v) => Some(v),
        Err(stop) => {
            stopped = Some(stop);
            // Undo what the transaction did before its failing command.
            raise(PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST, "replicated DDL failed", "Handled by the caller.")
        }
    });
    if let Some(stop) = stopped {
        return Err(Failure::Stop(stop));
    }
    match result {
        Ok(v) => Ok(v.expect("a value unless stopped")),
        Err(e) => match parkable(&e) {
            Some(message) => Err(Failure::Park(message)),
            None => e.rethrow(),
        },
    }
}

/// The chunks of a kept transaction, as stored by [`insert`]; a damaged value is an error, not
/// an empty transaction that would "apply".
fn stored_chunks(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let chunks: Vec<Vec<u8>> = postcard::from_bytes(bytes).map_err(|e| format!("the stored transaction cannot be decoded: {e}"))?;
    match chunks.iter().find_map(|c| crate::encoding::decode_chunk(c).err()) {
        Some(e) => Err(format!("the stored transaction cannot be decoded: {e}")),
        None if chunks.is_empty() => Err("the stored transaction has no changes".into()),
        None => Ok(chunks),
    }
}

/// The message of a caught error, for a status or a record.
pub fn error_message(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
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
    .then(|| match report.detail() {
        Some(d) if !d.trim().is_empty() && !d.contains("   0: ") => format!("{} ({})", report.message(), d.trim()),
        _ => report.message().to_string(),
    })
}

/// Parks a remote transaction that broke a constraint here.
pub fn park(txn: &Txn, via: i32, reason: &str) {
    insert("constraint", txn, via, reason, None);
    log!("rbucardo: parked a transaction from node {} (position {}, {}): {reason}", txn.origin, txn.origin_pos.tick, txn.origin_pos.seq);
}

/// Keeps a remote transaction that could not be applied, with the failed command of a stop.
fn insert(kind: &str, txn: &Txn, via: i32, reason: &str, stop: Option<&Stop>) {
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

/// Tries parked transactions again, oldest first; returns how many now applied. One that
/// applies is forwarded as a change of this node (its peers are past its original position).
pub fn retry_open(me: i32, only: Option<i64>) -> i64 {
    retry(me, only, None)
}

/// At most this many parked transactions are retried after each batch; the periodic retry
/// takes all of them. Keeps a backlog of stuck transactions from slowing every batch down.
const RETRY_AFTER_BATCH: i64 = 100;

/// Called after a batch applied something, in its transaction: what it brought (a parent row,
/// a renamed login) may be what a parked transaction was waiting for.
pub fn retry_after_batch(me: i32) -> i64 {
    let any = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.exceptions WHERE resolved_at IS NULL AND kind = 'constraint')").ok().flatten();
    if any == Some(true) { retry(me, None, Some(RETRY_AFTER_BATCH)) } else { 0 }
}

fn retry(me: i32, only: Option<i64>, limit: Option<i64>) -> i64 {
    let open: Vec<(i64, Result<Txn, String>)> = Spi::connect(|c| {
        c.select(
            "SELECT id, origin, origin_tick, origin_seq, via, hlc, chunks FROM rbucardo.exceptions
              WHERE resolved_at IS NULL AND kind = 'constraint' AND ($1::bigint IS NULL OR id = $1) ORDER BY id LIMIT $2",
            None,
            &[only.into(), limit.into()],
        )
        .expect("reading exceptions")
        .map(|r| {
            let pos = Position { tick: r.get::<i64>(3).unwrap().unwrap(), seq: r.get::<i64>(4).unwrap().unwrap() };
            let txn = stored_chunks(&r.get::<Vec<u8>>(7).unwrap().unwrap_or_default()).map(|chunks| Txn {
                origin: r.get::<i32>(2).unwrap().unwrap(),
                origin_pos: pos,
                hlc: r.get::<i64>(6).unwrap().unwrap(),
                stream_pos: pos,
                chunks,
                decoded: Default::default(),
            });
            (r.get::<i64>(1).unwrap().unwrap(), txn)
        })
        .collect()
    });
    let mut applied = 0;
    for (id, txn) in open {
        // Whatever goes wrong with one (its table is gone since, a resolver raised), it stays
        // parked with that reason: it must not fail the batch or the retry of the others.
        let outcome = txn.and_then(|txn| {
            subtransaction(std::panic::AssertUnwindSafe(|| crate::apply::apply_parked(me, &txn))).unwrap_or_else(|e| Err(error_message(&e)))
        });
        match outcome {
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
    Spi::connect(|c| {
        c.select(
            "SELECT id, origin, origin_tick, origin_seq,
                    skip_ordinal IS NOT NULL OR last_retry IS NULL
                      OR last_retry < pg_catalog.now() - pg_catalog.make_interval(secs => $2),
                    skip_ordinal, reason
               FROM rbucardo.exceptions WHERE kind = 'ddl' AND resolved_at IS NULL AND via = $1",
            None,
            &[via.into(), DDL_RETRY_EVERY.into()],
        )
        .expect("reading stopped streams")
        .map(|r| Stopped {
            id: r.get::<i64>(1).unwrap().unwrap(),
            origin: r.get::<i32>(2).unwrap().unwrap(),
            origin_pos: Position { tick: r.get::<i64>(3).unwrap().unwrap(), seq: r.get::<i64>(4).unwrap().unwrap() },
            due: r.get::<bool>(5).unwrap().unwrap_or(true),
            skip: r.get::<i32>(6).unwrap().map(|o| o as u32),
            reason: r.get::<String>(7).unwrap().unwrap_or_default(),
        })
        .collect()
    })
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

/// Applies the transaction of an open 'ddl' exception now, as the next one of its stream;
/// true if it applied (the stream then goes on).
fn resume_stopped(me: i32, id: i64) -> bool {
    let row = Spi::connect(|c| {
        c.select(
            "SELECT e.origin, e.origin_tick, e.origin_seq, e.via, e.hlc, e.chunks, e.stream_tick, e.stream_seq, d.name,
                    p.in_tick, p.in_seq
               FROM rbucardo.exceptions e
               JOIN rbucardo.db d ON d.node_id = e.via
               JOIN rbucardo.peer_state p ON p.db = d.name
              WHERE e.id = $1",
            None,
            &[id.into()],
        )
        .expect("reading the exception")
        .next()
        .map(|r| {
            let txn = Txn {
                origin: r.get::<i32>(1).unwrap().unwrap(),
                origin_pos: Position { tick: r.get::<i64>(2).unwrap().unwrap(), seq: r.get::<i64>(3).unwrap().unwrap() },
                hlc: r.get::<i64>(5).unwrap().unwrap(),
                chunks: stored_chunks(&r.get::<Vec<u8>>(6).unwrap().unwrap_or_default()).unwrap_or_else(|e| {
                    raise(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("exception {id}: {e}"), "The stored transaction is damaged; it cannot be applied.")
                }),
                decoded: Default::default(),
                stream_pos: Position { tick: r.get::<i64>(7).unwrap().unwrap(), seq: r.get::<i64>(8).unwrap().unwrap() },
            };
            let cursor = Position { tick: r.get::<i64>(10).unwrap().unwrap_or(0), seq: r.get::<i64>(11).unwrap().unwrap_or(crate::changelog::DONE) };
            (r.get::<i32>(4).unwrap().unwrap(), r.get::<String>(9).unwrap().unwrap(), cursor, txn)
        })
    });
    let Some((via, sender_db, cursor, txn)) = row else {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("the peer that sent exception {id} is no longer configured"),
            "Add the peer again with rbucardo.add_db(), or discard the exception.",
        );
    };
    let upto = txn.stream_pos;
    let batch = Batch { sender: via, after: cursor, upto, txns: vec![txn] };
    let applied = crate::apply::apply_batch(me, &sender_db, via, &batch);
    // Apply switched this transaction into replica mode; the caller's later statements must
    // be captured again.
    Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'origin', true)").expect("leaving replica mode");
    applied.stopped.is_none()
}

fn open_kind(id: i64) -> String {
    Spi::get_one_with_args::<String>("SELECT kind FROM rbucardo.exceptions WHERE id = $1 AND resolved_at IS NULL", &[id.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no open exception {id}"), "See SELECT * FROM rbucardo.exceptions WHERE resolved_at IS NULL.")
        })
}

/// Retries one exception now; true if it applied. A transaction that stopped its stream is
/// applied as the next one of that stream, which then goes on.
#[pg_extern(volatile)]
fn exception_retry(id: i64) -> bool {
    let me = crate::catalog::me_or_raise();
    if open_kind(id) == "ddl" {
        Spi::run_with_args("UPDATE rbucardo.exceptions SET last_retry = NULL WHERE id = $1", &[id.into()]).expect("marking a retry");
        return resume_stopped(me.id, id);
    }
    retry_open(me.id, Some(id)) == 1
}

/// Applies the transaction that stopped its stream without its failing schema change, and lets
/// the stream go on. Its row changes are applied; the command is not run here.
#[pg_extern(volatile)]
fn exception_skip(id: i64) -> String {
    let me = crate::catalog::me_or_raise();
    if open_kind(id) != "ddl" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("exception {id} is a parked transaction, not a stopped schema change"),
            "Only a failed replicated DDL command can be skipped; use rbucardo.exception_retry() or rbucardo.exception_discard().",
        );
    }
    Spi::run_with_args("UPDATE rbucardo.exceptions SET skip_ordinal = ddl_ordinal WHERE id = $1", &[id.into()]).expect("marking a skip");
    if !resume_stopped(me.id, id) {
        let reason = Spi::get_one_with_args::<String>("SELECT reason FROM rbucardo.exceptions WHERE id = $1", &[id.into()]).ok().flatten().unwrap_or_default();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("exception {id}: the transaction still fails without the skipped command: {reason}"),
            "Another schema change of the same transaction fails here too; fix the schema by hand and use rbucardo.exception_retry().",
        );
    }
    format!("skipped the failed command of exception {id}; the stream goes on")
}

/// Gives up on one parked transaction; the record stays, marked discarded.
#[pg_extern(volatile)]
fn exception_discard(id: i64) -> String {
    if open_kind(id) == "ddl" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("exception {id} stopped its stream at a schema change and cannot be discarded"),
            "Discarding it would lose the rows of its transaction and of the stream behind it: fix the schema and use \
             rbucardo.exception_retry(), or rbucardo.exception_skip() to leave out only the failing command.",
        );
    }
    Spi::run_with_args(
        "UPDATE rbucardo.exceptions SET resolved_at = pg_catalog.now(), resolution = 'discarded' WHERE id = $1",
        &[id.into()],
    )
    .expect("discarding an exception");
    format!("discarded exception {id}; its record stays in rbucardo.exceptions")
}
