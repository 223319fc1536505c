//! Shared memory that the launcher, the workers and ordinary backends use to find and wake each
//! other: one registry slot per database (its worker's pid, rounds done, configuration
//! generation) and a counter of change-log commits per database.
//!
//! Workers and the launcher are found by pid, so any backend can wake them by setting their
//! latch (a worker cannot hear NOTIFY of its own database).

use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};

/// Databases per server that can have a worker; more is refused with a log line.
pub const MAX_DATABASES: usize = 64;

/// What the launcher and the workers share about one database.
#[derive(Copy, Clone, Default)]
struct Slot {
    dboid: u32,
    /// pid of the running worker, 0 when none.
    pid: i32,
    /// The worker found no extension here and exited; do not restart before a rescan.
    no_extension: bool,
    /// Replication rounds the worker has completed; wait_for_sync waits for a fresh one.
    rounds: u64,
    /// Bumped when the replication configuration (nodes, dbs, syncs) changes, so the worker
    /// reads it again instead of querying it every round.
    config_gen: u64,
    /// Bumped to make the worker pull from every peer in its next round, notified or not
    /// (wait_for_sync).
    pulls_asked: u64,
    /// The newest tick known to hold every change-log write counted so far, for peers'
    /// fetches (`served_tick`).
    served: Served,
}

/// A tick committed in the database's rbucardo.tick (`rel`: a re-created extension numbers
/// its ticks again) that holds every change-log write of the first `writes` counted.
#[derive(Copy, Clone, Default)]
struct Served {
    rel: u32,
    tick: i64,
    writes: u64,
}

/// The shared registry of background processes.
#[derive(Copy, Clone)]
pub struct Registry {
    launcher_pid: i32,
    /// Set by `CREATE EXTENSION` (after commit): start workers even where none was wanted.
    rescan_all: bool,
    slots: [Slot; MAX_DATABASES],
}

impl Default for Registry {
    fn default() -> Self {
        Registry { launcher_pid: 0, rescan_all: false, slots: [Slot::default(); MAX_DATABASES] }
    }
}

// SAFETY: plain old data (integers and booleans), no pointers: valid in any process.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: no other shared-memory object uses the name "rbucardo_registry" (PgLwLock::new's
// requirement); pgrx initialises it in shared memory at preload (pg_shmem_init! in `init`).
static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"rbucardo_registry") };

/// Commits that wrote to the change log, per registry slot (database). `waking`: those that
/// peers may want, of which the worker tells peers listening on this node (NOTIFY) only when
/// its counter moved, without a query per round. `all`: every one, applied transactions that
/// only their sender and origin could want included: a peer's fetch cuts no tick while the
/// newest one holds them all (`served_tick`).
pub struct LogCommits {
    waking: [AtomicU64; MAX_DATABASES],
    all: [AtomicU64; MAX_DATABASES],
}

impl Default for LogCommits {
    fn default() -> Self {
        LogCommits { waking: std::array::from_fn(|_| AtomicU64::new(0)), all: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

// SAFETY: atomics only, no pointers.
unsafe impl PGRXSharedMemory for LogCommits {}

// SAFETY: no other shared-memory object uses the name "rbucardo_log_commits" (PgAtomic::new's
// requirement); initialised in shared memory at preload (pg_shmem_init! in `init`).
static LOG_COMMITS: PgAtomic<LogCommits> = unsafe { PgAtomic::new(c"rbucardo_log_commits") };

/// Batches applied, per registry slot (database), each counted inside its stream lock before
/// its commit (`apply::apply_batch`; a refused batch is not counted, and moves no cursor). A
/// link that pulls a stream notes the count its own apply reached: while the count stays
/// there, no other apply (the same stream pushed here in a mesh, an exception_retry) has
/// finished since, so none has moved a stream's cursor past what the link knows
/// (src/runtime/link.rs).
pub struct Applies([AtomicU64; MAX_DATABASES]);

impl Default for Applies {
    fn default() -> Self {
        Applies(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

// SAFETY: atomics only, no pointers.
unsafe impl PGRXSharedMemory for Applies {}

// SAFETY: no other shared-memory object uses the name "rbucardo_applies" (PgAtomic::new's
// requirement); initialised in shared memory at preload (pg_shmem_init! in `init`).
static APPLIES: PgAtomic<Applies> = unsafe { PgAtomic::new(c"rbucardo_applies") };

/// Reserves the shared memory; called from `_PG_init` at preload time.
pub fn init() {
    pg_shmem_init!(REGISTRY);
    pg_shmem_init!(LOG_COMMITS);
    pg_shmem_init!(APPLIES);
}

/// Counts a batch applied in the current database (see `Applies`); returns the count it
/// reached, None without a registry slot.
pub fn note_apply() -> Option<u64> {
    local_slot().map(|(i, _)| APPLIES.get().0[i].fetch_add(1, Ordering::AcqRel) + 1)
}

/// Batches applied in the current database so far (see `Applies`); None without a registry
/// slot.
pub fn applies_here() -> Option<u64> {
    local_slot().map(|(i, _)| APPLIES.get().0[i].load(Ordering::Acquire))
}

/// The current database's oid.
pub fn my_dboid() -> u32 {
    // SAFETY: a plain global of this backend, set once it connects to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Sets the latch of a process of this server, if it is still there.
fn set_latch_of(pid: i32) {
    if pid == 0 {
        return;
    }
    // SAFETY: BackendPidGetProc returns a PGPROC of shared memory or NULL; setting the latch of
    // a process that exited meanwhile is harmless (PostgreSQL's own signalling does the same).
    unsafe {
        let proc_ = pg_sys::BackendPidGetProc(pid);
        if !proc_.is_null() {
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// Asks the launcher to look at every database again once the calling transaction commits
/// (before commit, a new worker would not yet see the extension).
pub fn wake_launcher_at_commit() {
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        let pid = {
            let mut reg = REGISTRY.exclusive();
            reg.rescan_all = true;
            reg.launcher_pid
        };
        set_latch_of(pid);
    });
}

/// The registry slot of the current database and its worker's pid (0: none).
fn local_slot() -> Option<(usize, i32)> {
    let dboid = my_dboid();
    let reg = REGISTRY.share();
    reg.slots.iter().position(|s| s.dboid == dboid).map(|i| (i, reg.slots[i].pid))
}

/// Wakes the worker of the current database now.
pub fn wake_local_worker() {
    if let Some((_, pid)) = local_slot() {
        set_latch_of(pid);
    }
}

/// Asks the current database's worker to pull from every peer it connects to in its next
/// round, whether the peer told it of new changes or not (see `Link::pull_due`).
pub fn ask_for_pulls() {
    let dboid = my_dboid();
    let pid = {
        let mut reg = REGISTRY.exclusive();
        reg.slots.iter_mut().find(|s| s.dboid == dboid).map_or(0, |s| {
            s.pulls_asked = s.pulls_asked.wrapping_add(1);
            s.pid
        })
    };
    set_latch_of(pid);
}

/// How many times pulls were asked for in registry slot `slot`.
pub fn pulls_asked(slot: usize) -> u64 {
    REGISTRY.share().slots[slot].pulls_asked
}

/// Runs after every commit that wrote to the change log: counts it, and, if peers may want it
/// (`wakes`), wakes the worker, which sends it and tells listening peers. Takes the registry
/// lock shared only.
pub fn note_log_commit(wakes: bool) {
    if let Some((i, pid)) = local_slot() {
        let counts = LOG_COMMITS.get();
        // Counted after the commit is visible: whoever reads a count has every commit it
        // counts in its next snapshot.
        counts.all[i].fetch_add(1, Ordering::AcqRel);
        if wakes {
            counts.waking[i].fetch_add(1, Ordering::AcqRel);
            set_latch_of(pid);
        }
    }
}

/// Waking change-log commits counted so far for the current database (0 without a registry
/// slot).
pub fn log_commits_here() -> u64 {
    local_slot().map_or(0, |(i, _)| log_commits(i))
}

/// Waking change-log commits counted so far in registry slot `slot`.
pub fn log_commits(slot: usize) -> u64 {
    LOG_COMMITS.get().waking[slot].load(Ordering::Acquire)
}

/// Every change-log commit counted so far for the current database; None without a registry
/// slot.
pub fn log_writes_here() -> Option<u64> {
    local_slot().map(|(i, _)| LOG_COMMITS.get().all[i].load(Ordering::Acquire))
}

/// Notes, once its transaction has committed, that tick `tick` of the tick table `rel` holds
/// every change-log commit of the first `writes` counted (`log_writes_here`, read before its
/// snapshot was taken). Kept as the newest tick and the highest count: a newer tick holds all
/// an older one does.
pub fn note_served_tick(rel: u32, tick: i64, writes: u64) {
    let dboid = my_dboid();
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.dboid == dboid) {
        slot.served = slot.served.merge(Served { rel, tick, writes });
    }
}

impl Served {
    /// What two notes say together: a newer tick holds all an older one does, so the newest
    /// tick holds the commits either counted. A note of another tick table (the extension
    /// re-created) replaces the old one.
    fn merge(self, new: Served) -> Served {
        if self.rel != new.rel {
            return new;
        }
        Served { rel: self.rel, tick: self.tick.max(new.tick), writes: self.writes.max(new.writes) }
    }
}

/// The newest tick of tick table `rel` noted by `note_served_tick`, and how many change-log
/// commits it holds.
pub fn served_tick(rel: u32) -> Option<(i64, u64)> {
    let dboid = my_dboid();
    let reg = REGISTRY.share();
    reg.slots.iter().find(|s| s.dboid == dboid).map(|s| s.served).filter(|s| s.rel == rel && rel != 0).map(|s| (s.tick, s.writes))
}

/// The current database's replication configuration generation (see `Slot::config_gen`).
pub fn config_generation() -> u64 {
    tracked_config_generation().unwrap_or(0)
}

/// The configuration generation, if this database has a registry slot to count it in (one
/// without a slot never sees it change).
pub fn tracked_config_generation() -> Option<u64> {
    let dboid = my_dboid();
    REGISTRY.share().slots.iter().find(|s| s.dboid == dboid).map(|s| s.config_gen)
}

/// Rounds completed by the current database's worker, and whether a worker is running.
pub fn rounds_of_local_worker() -> (u64, bool) {
    let dboid = my_dboid();
    REGISTRY.share().slots.iter().find(|s| s.dboid == dboid).map_or((0, false), |s| (s.rounds, s.pid != 0))
}

/// Tells this database's worker, once the calling transaction commits, that the replication
/// configuration changed: it reads it again and starts a round.
///
/// It also invalidates every relation cache entry, transactionally: what appliers keep per
/// session (tables with their conflict policy, src/apply/mod.rs) is dropped in this session at
/// the next command (so the rest of this transaction applies with the new setting) and again
/// if it rolls back, and in every session when it commits, also through PREPARE TRANSACTION,
/// which the commit callback below does not see.
pub fn wake_local_worker_at_commit() {
    // SAFETY: queues an invalidation message in the current transaction, as DDL does.
    unsafe { pg_sys::CacheInvalidateRelcacheAll() };
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        let dboid = my_dboid();
        let pid = {
            let mut reg = REGISTRY.exclusive();
            reg.slots.iter_mut().find(|s| s.dboid == dboid).map_or(0, |s| {
                s.config_gen = s.config_gen.wrapping_add(1);
                s.pid
            })
        };
        set_latch_of(pid);
    });
}

// ---------------------------------------------------------------------------------------------
// The launcher's and the workers' side of the registry.

/// Records the launcher's pid (0 when it exits).
pub fn set_launcher_pid(pid: i32) {
    REGISTRY.exclusive().launcher_pid = pid;
}

/// Whether `CREATE EXTENSION` asked for a rescan since the last call; clears the request.
pub fn take_rescan_request() -> bool {
    std::mem::take(&mut REGISTRY.exclusive().rescan_all)
}

/// Whether database `dboid` should get a worker: it has a slot (one is taken for a new
/// database) and its worker did not find the extension missing (forgotten on a rescan).
pub fn wants_worker(dboid: u32, rescan_all: bool) -> bool {
    let mut reg = REGISTRY.exclusive();
    match reg.slots.iter_mut().find(|s| s.dboid == dboid) {
        Some(slot) => {
            if rescan_all {
                slot.no_extension = false;
            }
            !slot.no_extension
        }
        None => match reg.slots.iter_mut().find(|s| s.dboid == 0) {
            Some(free) => {
                *free = Slot { dboid, ..Slot::default() };
                true
            }
            None => {
                log!("rbucardo launcher: more than {MAX_DATABASES} databases; database {dboid} gets no worker");
                false
            }
        },
    }
}

/// Frees the slots of databases that are not in `existing`.
pub fn forget_databases_except(existing: &[u32]) {
    let mut reg = REGISTRY.exclusive();
    for slot in reg.slots.iter_mut() {
        if slot.dboid != 0 && !existing.contains(&slot.dboid) {
            *slot = Slot::default();
        }
    }
}

/// A worker records itself in its database's slot (pid 0 when it exits; `no_extension` when
/// it exits because the extension is not there). Returns the slot's index.
pub fn set_worker(dboid: u32, pid: i32, no_extension: bool) -> Option<usize> {
    let mut reg = REGISTRY.exclusive();
    let i = reg.slots.iter().position(|s| s.dboid == dboid)?;
    reg.slots[i].pid = pid;
    reg.slots[i].no_extension = no_extension;
    Some(i)
}

/// A worker has completed a round.
pub fn count_round(dboid: u32) {
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.dboid == dboid) {
        slot.rounds = slot.rounds.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Served;

    #[test]
    fn served_notes_merge_to_the_newest_tick_and_the_highest_count() {
        let a = Served { rel: 7, tick: 10, writes: 50 };
        // A fetch that found tick 10 still enough after more commits; then the worker's tick
        // 11, cut after reading a lower count: tick 11 holds what tick 10 did.
        let b = a.merge(Served { rel: 7, tick: 10, writes: 53 }).merge(Served { rel: 7, tick: 11, writes: 52 });
        assert_eq!((b.tick, b.writes), (11, 53));
        // Notes arriving out of order change nothing.
        assert_eq!(b.merge(a).tick, 11);
        assert_eq!(b.merge(a).writes, 53);
        // A re-created extension's tick table starts again.
        let c = b.merge(Served { rel: 9, tick: 1, writes: 60 });
        assert_eq!((c.rel, c.tick, c.writes), (9, 1, 60));
    }
}
