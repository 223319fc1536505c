//! Advisory locks that serialise rbucardo's own work, with their keys named in one place.
//! Transaction-scoped: each is released at the end of the transaction that takes it.

use pgrx::prelude::*;

/// Serialises the making of ticks (src/log/changelog.rs).
const TICK_LOCK: i64 = 0x7262_7563_6b01;
/// First key of the lock on one sender's stream; the second is the sender's node id.
const STREAM_LOCK: i32 = 7262;
/// First key of the lock on one origin's progress; the second is the origin's node id.
const ORIGIN_LOCK: i32 = 7263;

/// Only one transaction makes ticks at a time.
pub fn lock_ticks() {
    acquire(tag_int8(TICK_LOCK), false);
}

/// The tick lock if it is free (see changelog::served_tick).
pub fn try_lock_ticks() -> bool {
    acquire(tag_int8(TICK_LOCK), true)
}

/// One applier per stream at a time (a peer may push while this node pulls from it).
pub fn lock_stream(sender_node: i32) {
    acquire(tag_int4_pair(STREAM_LOCK, sender_node), false);
}

/// One writer of an origin's progress at a time: two peers may deliver the same origin's
/// transactions by two paths at once. A batch takes the locks of all its origins before it
/// applies anything, in ascending order: two batches carrying the same origins by two streams
/// then wait for each other at most one way (in batch order, each could hold one the other
/// waits for). Two batches applied in one transaction (a caller's own transaction block) can
/// still take them out of order; PostgreSQL's deadlock detection then undoes one.
pub fn lock_origins(origins: &[i32]) {
    let mut sorted = origins.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for origin in sorted {
        acquire(tag_int4_pair(ORIGIN_LOCK, origin), false);
    }
}

/// The tag `pg_advisory_xact_lock(bigint)` locks, so that the lock shows and conflicts as
/// that one does.
fn tag_int8(key: i64) -> pg_sys::LOCKTAG {
    advisory((key >> 32) as u32, key as u32, 1)
}

/// The tag `pg_advisory_xact_lock(int, int)` locks.
fn tag_int4_pair(key1: i32, key2: i32) -> pg_sys::LOCKTAG {
    advisory(key1 as u32, key2 as u32, 2)
}

fn advisory(field2: u32, field3: u32, field4: u16) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        locktag_field1: crate::base::signals::my_dboid(),
        locktag_field2: field2,
        locktag_field3: field3,
        locktag_field4: field4,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

/// Takes an advisory lock until the end of the transaction, as the SQL functions do, without
/// a statement: a batch's apply took four of these per round through SPI (docs/
/// performance.md). Returns false only when `nowait` and another transaction holds it.
fn acquire(tag: pg_sys::LOCKTAG, nowait: bool) -> bool {
    // SAFETY: LockAcquire reads the tag during the call; an error (deadlock, cancel) is raised
    // through pgrx's guard as any ereport is.
    let got = unsafe { pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as pg_sys::LOCKMODE, false, nowait) };
    got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}
