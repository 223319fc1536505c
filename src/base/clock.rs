//! Hybrid logical clock: one timestamp per transaction that orders events across nodes whose
//! wall clocks drift. A node's clock never goes backwards and always moves past every remote
//! clock value it has applied, so a change made after seeing another change orders after it.

use std::sync::atomic::{AtomicI64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, GucContext, GucFlags, GucRegistry, GucSetting, PgAtomic};

// SAFETY: no other shared-memory object uses the name "rbucardo_hlc" (PgAtomic::new's one
// requirement); pg_shmem_init! in `init` allocates it at preload, before any use.
static LAST: PgAtomic<AtomicI64> = unsafe { PgAtomic::new(c"rbucardo_hlc") };

/// Seconds added to this server's wall clock as rbucardo reads it. Branch servers' clocks
/// drift; this lets tests (and drills) run a node an hour off and see that causality still
/// orders changes. Leave it at 0 in production.
static SKEW: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Reserves the clock's shared memory and its setting; called from `_PG_init`.
pub fn init() {
    pg_shmem_init!(LAST);
    GucRegistry::define_int_guc(
        c"rbucardo.clock_skew",
        c"Seconds added to the wall clock rbucardo reads (for testing clock drift).",
        c"The hybrid logical clock keeps causality whatever the wall clock says; this setting lets a drill run a node with its clock off.",
        &SKEW,
        -86_400 * 365,
        86_400 * 365,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// The wall clock as rbucardo reads it (with `rbucardo.clock_skew`), in microseconds.
pub fn wall_micros() -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    wall + i64::from(SKEW.get()) * 1_000_000
}

/// A new clock value for a local transaction: the wall clock, or one past the last value seen.
pub fn now() -> i64 {
    let wall = wall_micros();
    let last = LAST.get();
    let mut cur = last.load(Ordering::Relaxed);
    loop {
        let next = wall.max(cur.saturating_add(1));
        match last.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => cur = seen,
        }
    }
}

/// Moves the clock past a remote transaction's value once it has been applied here.
pub fn observe(remote: i64) {
    LAST.get().fetch_max(remote, Ordering::AcqRel);
}
