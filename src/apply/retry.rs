//! Retrying what could not be applied: parked transactions (after every batch that applied
//! something, every few seconds, and on request) and a transaction that stopped its stream
//! (on request; the stream retries it by itself every few seconds).

use pgrx::prelude::*;

use crate::apply::exceptions::stored_chunks;
use crate::base::error::raise;
use crate::base::wire::{Batch, Position, Txn, WHOLE_TICK};
use crate::base::xact;

/// Tries parked transactions again, oldest first; returns how many now applied. One that
/// applies is not forwarded again: it was forwarded, under its own origin and position, when
/// it was parked (src/apply/mod.rs), so nodes behind this one never wait for it.
pub fn retry_open(me: i32, only: Option<i64>) -> i64 {
    retry(me, only, None)
}

/// At most this many parked transactions are retried after each batch; the periodic retry
/// takes all of them. Keeps a backlog of stuck transactions from slowing every batch down.
const RETRY_AFTER_BATCH: i64 = 100;

/// Called after a batch applied something, in its transaction: what it brought (a parent row,
/// a renamed login) may be what a parked transaction was waiting for.
pub fn retry_after_batch(me: i32) -> i64 {
    let any = crate::base::plans::one::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.exceptions WHERE resolved_at IS NULL AND kind = 'constraint')", &[], &[]);
    if any == Some(true) { retry(me, None, Some(RETRY_AFTER_BATCH)) } else { 0 }
}

fn retry(me: i32, only: Option<i64>, limit: Option<i64>) -> i64 {
    // Locked, and skipped when another transaction holds them: two retriers at once (the
    // worker, a push's retry after its batch, exception_retry) must never apply one twice.
    let open: Vec<(i64, i32, Result<Txn, String>)> = Spi::connect_mut(|c| {
        c.update(
            "SELECT id, origin, origin_tick, origin_seq, via, hlc, chunks FROM rbucardo.exceptions
              WHERE resolved_at IS NULL AND kind = 'constraint' AND ($1::bigint IS NULL OR id = $1)
              ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
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
                part: None,
                to: None,
                decoded: Default::default(),
            });
            (r.get::<i64>(1).unwrap().unwrap(), r.get::<i32>(5).unwrap().unwrap_or(0), txn)
        })
        .collect()
    });
    let mut applied = 0;
    for (id, via, txn) in open {
        // Whatever goes wrong with one (its table is gone since, a resolver raised), it stays
        // parked with that reason: it must not fail the batch or the retry of the others.
        let outcome = txn.and_then(|txn| {
            xact::subtransaction(std::panic::AssertUnwindSafe(|| super::apply_parked(me, via, &txn)))
                .unwrap_or_else(|e| Err(xact::error_message(&e)))
                .map(|()| crate::log::clocks::remember(&txn.chunks, txn.hlc, txn.origin))
        });
        match outcome {
            Ok(()) => {
                Spi::run_with_args("UPDATE rbucardo.exceptions SET resolved_at = pg_catalog.now(), resolution = 'applied', last_retry = pg_catalog.now(), retries = retries + 1 WHERE id = $1 AND resolved_at IS NULL", &[id.into()])
                    .expect("resolving an exception");
                applied += 1;
            }
            Err(reason) => {
                Spi::run_with_args("UPDATE rbucardo.exceptions SET reason = $2, last_retry = pg_catalog.now(), retries = retries + 1 WHERE id = $1", &[id.into(), reason.as_str().into()])
                    .expect("recording a retry");
            }
        }
    }
    applied
}

/// Applies the transaction of an open 'ddl' exception now, as the next one of its stream;
/// true if it applied (the stream then goes on).
pub fn resume_stopped(me: i32, id: i64) -> bool {
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
                part: None,
                to: None,
                decoded: Default::default(),
                stream_pos: Position { tick: r.get::<i64>(7).unwrap().unwrap(), seq: r.get::<i64>(8).unwrap().unwrap() },
            };
            let cursor = Position { tick: r.get::<i64>(10).unwrap().unwrap_or(0), seq: r.get::<i64>(11).unwrap().unwrap_or(WHOLE_TICK) };
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
    let batch = Batch { sender: via, after: cursor, upto, txns: vec![txn], complete: true };
    super::apply_batch(me, &sender_db, via, &batch).stopped.is_none()
}

