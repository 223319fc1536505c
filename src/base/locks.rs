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
    crate::base::plans::run("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[pg_sys::INT4OID], &[TICK_LOCK.into()], |_| ());
}

/// The tick lock if it is free (see changelog::served_tick).
pub fn try_lock_ticks() -> bool {
    crate::base::plans::one::<bool>("SELECT pg_catalog.pg_try_advisory_xact_lock($1)", &[pg_sys::INT4OID], &[TICK_LOCK.into()]) == Some(true)
}

/// One applier per stream at a time (a peer may push while this node pulls from it).
pub fn lock_stream(sender_node: i32) {
    crate::base::plans::run("SELECT pg_catalog.pg_advisory_xact_lock($1, $2)", &[pg_sys::INT4OID, pg_sys::INT4OID], &[STREAM_LOCK.into(), sender_node.into()], |_| ());
}

/// One writer of an origin's progress at a time: two peers may deliver the same origin's
/// transactions by two paths at once.
pub fn lock_origin(origin: i32) {
    crate::base::plans::run("SELECT pg_catalog.pg_advisory_xact_lock($1, $2)", &[pg_sys::INT4OID, pg_sys::INT4OID], &[ORIGIN_LOCK.into(), origin.into()], |_| ());
}
