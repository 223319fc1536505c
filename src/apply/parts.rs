//! Transactions too large for one batch (an UPDATE of millions of wide rows) travel in parts:
//! the sender ships their log chunks a batch at a time (changelog::read_batch), and this node
//! keeps each part, in the same transaction that records the stream cursor, until the last one
//! arrives; then it applies the transaction whole, like any other. No batch ever comes near the
//! wire ceiling, and a link cut or a restart between parts loses only the part in flight: the
//! sender is told where the parts held here end ([`resume_point`]) and goes on from there.
//!
//! The whole transaction is still put together in memory to be applied (about twice its size);
//! `rbucardo.max_transaction_mb` bounds what a peer can make this node keep and load. A
//! transaction over it stops the stream from that peer, with the error and a hint in
//! `rbucardo.status`, until the setting is raised: it is never skipped.
//!
//! Owns the table `incoming_part` (sql/exceptions.sql).

use std::borrow::Cow;

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;

use crate::base::wire::{Batch, Position, Txn};

/// `rbucardo.max_transaction_mb`: the largest transaction, in MB of change data, this node
/// keeps parts of and applies.
pub static MAX_TXN_MB: GucSetting<i32> = GucSetting::<i32>::new(1024);

/// What each kept part counts besides its data: a peer cannot keep this node storing parts
/// that hold nothing (every change of a table not shared with it) without end.
const PART_OVERHEAD: i64 = 64 << 10;

/// The most parts of one transaction this node keeps (empty ones count here only).
const MAX_PARTS: i64 = 100_000;

/// Registers `rbucardo.max_transaction_mb`; called from `_PG_init`.
pub fn init() {
    GucRegistry::define_int_guc(
        c"rbucardo.max_transaction_mb",
        c"Largest transaction (MB of change data) this node receives from a peer.",
        c"A larger one stops the stream from that peer, visibly in rbucardo.status, until this is raised. \
          Applying a transaction takes about twice its size in memory.",
        &MAX_TXN_MB,
        16,
        1 << 20,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
    );
}

/// Where the parts this node holds of the sender's next transaction end: that transaction's
/// position in the sender's stream and how many of its chunks are here. None when it holds
/// none, or when they do not chain from its first chunk.
pub fn resume_point(sender: i32) -> Option<(Position, u32)> {
    let parts: Vec<(i64, i64, i32, i32)> = crate::base::plans::run(
        "SELECT stream_tick, stream_seq, part_start, part_end FROM rbucardo.incoming_part WHERE sender = $1 ORDER BY part_start",
        &[pg_sys::INT4OID],
        &[sender.into()],
        |t| t.map(|r| (r.get::<i64>(1).unwrap().unwrap(), r.get::<i64>(2).unwrap().unwrap(), r.get::<i32>(3).unwrap().unwrap(), r.get::<i32>(4).unwrap().unwrap())).collect(),
    );
    let first = parts.first()?;
    let mut end = 0;
    for &(tick, seq, start, e) in &parts {
        if (tick, seq) != (first.0, first.1) || start != end {
            return None;
        }
        end = e;
    }
    Some((Position { tick: first.0, seq: first.1 }, end as u32))
}

/// Why a part was not taken in; nothing of the batch is kept either way.
pub enum Refusal {
    /// The part does not fit what this node holds: the sender goes on from [`resume_point`].
    Malformed(String),
    /// The transaction is over `rbucardo.max_transaction_mb`: the stream waits for the operator.
    TooLarge(String),
}

/// Takes in the batch's part, if it holds one: keeps a part that more follow (it leaves the
/// batch, which ends before its transaction), and puts a last part together with the parts
/// kept before it into the whole transaction. Returns the batch to apply: the same one when it
/// holds no part. An error refuses the batch, nothing kept; the sender starts again from
/// [`resume_point`].
pub fn take_in(sender: i32, batch: &Batch, cursor: Position) -> Result<Cow<'_, Batch>, Refusal> {
    let Some(txn) = batch.txns.iter().find(|t| t.part.is_some()) else {
        return Ok(Cow::Borrowed(batch));
    };
    let part = txn.part.unwrap();
    if batch.txns.len() != 1 {
        return Err(Refusal::Malformed("a batch holding a part of a transaction holds other transactions too".into()));
    }
    if part.start >= part.end || (part.more && batch.upto >= txn.stream_pos) || (!part.more && batch.upto < txn.stream_pos) {
        return Err(Refusal::Malformed(format!("a malformed part of a transaction (chunks {}..{}, more {})", part.start, part.end, part.more)));
    }
    let mut out = Batch { sender: batch.sender, after: batch.after, upto: batch.upto, txns: Vec::new(), complete: batch.complete };
    if txn.stream_pos <= cursor {
        return Ok(Cow::Owned(out));
    }
    // Parts of another transaction are stale: the sender moved on, or starts again.
    Spi::run_with_args(
        "DELETE FROM rbucardo.incoming_part WHERE sender = $1 AND (stream_tick, stream_seq) <> ($2, $3)",
        &[sender.into(), txn.stream_pos.tick.into(), txn.stream_pos.seq.into()],
    )
    .expect("dropping stale parts");
    let held = resume_point(sender).map_or(0, |(_, n)| n);
    // A part this node already holds (push and pull both delivered it, or the sender went back
    // to a point before what is kept) changes nothing.
    if part.end <= held {
        // A last part is never kept, so one that claims to be is not from a correct sender:
        // taking it as held would move the cursor past a transaction never applied.
        if !part.more {
            return Err(Refusal::Malformed(format!("a last part ending at chunk {} of a transaction of which this node holds {held} chunks", part.end)));
        }
        return Ok(Cow::Owned(out));
    }
    // Parts join up exactly: the next one starts where those kept end, or the transaction
    // starts again from its first chunk. Anything else (a part sent again with other
    // boundaries) is refused; the sender then goes on from resume_point.
    if part.start != held && part.start != 0 {
        return Err(Refusal::Malformed(format!("a part from chunk {} of a transaction of which this node holds {held} chunks", part.start)));
    }
    if part.start == 0 {
        Spi::run_with_args("DELETE FROM rbucardo.incoming_part WHERE sender = $1", &[sender.into()]).expect("starting a transaction's parts again");
    }
    if part.more {
        // A part that carries something counts its size and a little more; an empty one (every
        // chunk of it of tables not shared with this node) counts nothing, but there can only
        // be so many of them.
        let size = txn.chunks.iter().map(Vec::len).sum::<usize>() as i64;
        let size = if size > 0 { size + PART_OVERHEAD } else { 0 };
        let (kept, count) = Spi::get_two_with_args::<i64, i64>(
            "SELECT coalesce(sum(octet_length(chunks) + CASE WHEN octet_length(chunks) > 8 THEN $2 ELSE 0 END), 0)::bigint, count(*)
               FROM rbucardo.incoming_part WHERE sender = $1",
            &[sender.into(), PART_OVERHEAD.into()],
        )
        .map(|(k, c)| (k.unwrap_or(0), c.unwrap_or(0)))
        .unwrap_or((0, 0));
        if count >= MAX_PARTS {
            return Err(Refusal::TooLarge(format!("a transaction in more than {MAX_PARTS} parts: the stream from this peer waits")));
        }
        let max = i64::from(MAX_TXN_MB.get()) << 20;
        if kept + size > max {
            return Err(Refusal::TooLarge(format!(
                "a transaction larger than rbucardo.max_transaction_mb ({} MB): the stream from this peer waits. \
                 Raise rbucardo.max_transaction_mb (and reload) to take it in; it takes about twice its size in memory to apply",
                MAX_TXN_MB.get()
            )));
        }
        Spi::run_with_args(
            "INSERT INTO rbucardo.incoming_part (sender, stream_tick, stream_seq, part_start, part_end, chunks) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                sender.into(),
                txn.stream_pos.tick.into(),
                txn.stream_pos.seq.into(),
                (part.start as i32).into(),
                (part.end as i32).into(),
                postcard::to_allocvec(&txn.chunks).expect("encoding chunks").into(),
            ],
        )
        .expect("keeping a part of a transaction");
        return Ok(Cow::Owned(out));
    }
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    Spi::connect(|c| {
        for row in c.select("SELECT chunks FROM rbucardo.incoming_part WHERE sender = $1 ORDER BY part_start", None, &[sender.into()]).expect("reading kept parts") {
            let bytes = row.get::<Vec<u8>>(1).unwrap().unwrap_or_default();
            let kept: Vec<Vec<u8>> = postcard::from_bytes(&bytes).map_err(|e| Refusal::Malformed(format!("a kept part cannot be decoded: {e}")))?;
            chunks.extend(kept);
        }
        Ok::<(), Refusal>(())
    })?;
    // The kept parts stay until the batch is applied (apply_batch drops what the cursor
    // passed): a refusal or a stop leaves them for the next try.
    chunks.extend(txn.chunks.iter().cloned());
    // Every chunk of it was of tables not shared with this node: nothing to apply.
    if !chunks.is_empty() {
        out.txns.push(Txn { chunks, part: None, decoded: Default::default(), ..txn.clone() });
    }
    Ok(Cow::Owned(out))
}

/// Drops kept parts of transactions the stream cursor has passed (apply_batch, after a batch
/// that held a part). Parts of a transaction that came whole another way go when the next
/// part of another transaction arrives (`take_in`).
pub fn drop_passed(sender: i32, cursor: Position) {
    crate::base::plans::run(
        "DELETE FROM rbucardo.incoming_part WHERE sender = $1 AND (stream_tick, stream_seq) <= ($2, $3)",
        &[pg_sys::INT4OID, pg_sys::INT8OID, pg_sys::INT8OID],
        &[sender.into(), cursor.tick.into(), cursor.seq.into()],
        |_| (),
    );
}
