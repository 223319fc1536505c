//! Which applied positions are on disk here.
//!
//! A sender trims its change log up to what its peer confirmed, so a receiver may confirm only
//! what a crash cannot take back. Waiting for the WAL flush at every pushed batch's commit was
//! about half of a receiving backend's time under a steady stream of small pushes (the flush
//! is a system call per batch). So a push session whose sender reads flushed positions commits
//! without waiting, as PostgreSQL's own apply worker does, and answers with the newest
//! position of the stream it knows to be on disk: each push notes the position the stream had
//! committed when it began, with the WAL insert position read after it; once the flush passes
//! that, the position is durable (WAL is written in order, and a transaction's commit record
//! is in the WAL before anyone can see the transaction).

use std::cell::RefCell;
use std::collections::VecDeque;

use pgrx::pg_sys;

use crate::base::wire::Position;

/// Positions noted per stream and not yet known flushed; past this the oldest is dropped (a
/// later one confirms more, a moment later).
const MAX_NOTED: usize = 64;

thread_local! {
    /// Per stream (the sender's node id): positions committed here, each with the WAL
    /// position a flush must pass before it is durable, oldest first.
    static NOTED: RefCell<Vec<(i32, VecDeque<(Position, u64)>)>> = const { RefCell::new(Vec::new()) };
}

/// Notes that `committed` of `stream` is committed here (read in a snapshot of this
/// transaction, or under a lock its writer released at commit), and returns the newest noted
/// position of that stream whose commit is now on disk, if any was noted since the last call.
pub fn note_committed(stream: i32, committed: Position) -> Option<Position> {
    let insert = inserted();
    // SAFETY: reads the shared flush position under its spinlock; the caller is in a
    // transaction on a primary (apply refuses to run elsewhere).
    let flushed = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
    NOTED.with_borrow_mut(|noted| {
        let queue = match noted.iter().position(|(s, _)| *s == stream) {
            Some(i) => &mut noted[i].1,
            None => {
                noted.push((stream, VecDeque::new()));
                &mut noted.last_mut().unwrap().1
            }
        };
        // A cursor that went back (the peer was removed and added again) makes what was
        // noted before meaningless.
        if queue.back().is_some_and(|(p, _)| *p > committed) {
            queue.clear();
        }
        if queue.back().is_none_or(|(p, _)| *p < committed) {
            queue.push_back((committed, insert));
        }
        if queue.len() > MAX_NOTED {
            queue.pop_front();
        }
        let mut durable = None;
        while let Some(&(pos, lsn)) = queue.front() {
            if lsn > flushed {
                break;
            }
            durable = Some(pos);
            queue.pop_front();
        }
        durable
    })
}

/// Makes every transaction committed so far on disk, waiting for the flush if need be: for an
/// answer that tells a peer what this node has, read in a snapshot taken before the call.
/// Costs nothing when the WAL is flushed already.
pub fn flush_committed() {
    // SAFETY: XLogFlush up to WAL already inserted, the flush a synchronous commit does.
    unsafe {
        if !pg_sys::RecoveryInProgress() {
            pg_sys::XLogFlush(inserted());
        }
    }
}

/// The end of the WAL inserted so far, as a position a flush can reach. The insert position
/// points past the header of the page that the next record starts on; when nothing is on
/// that page yet, a flush up to it asks for WAL not generated, which XLogFlush refuses with
/// an ERROR. Such a position is moved back to the page's start.
fn inserted() -> u64 {
    // SAFETY: reads the shared insert position under its spinlock, and plain globals.
    let (lsn, segment) = unsafe { (pg_sys::GetXLogInsertRecPtr(), pg_sys::wal_segment_size as u64) };
    let block = pg_sys::XLOG_BLCKSZ as u64;
    let maxalign = |n: usize| (n as u64).div_ceil(8) * 8;
    let short = maxalign(std::mem::size_of::<pg_sys::XLogPageHeaderData>());
    let long = maxalign(std::mem::size_of::<pg_sys::XLogLongPageHeaderData>());
    if segment > 0 && lsn % segment == long {
        lsn - long
    } else if lsn % block == short {
        lsn - short
    } else {
        lsn
    }
}
