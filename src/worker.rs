//! Background workers: one launcher per server and one worker per database that has the
//! extension.
//!
//! The launcher only knows the list of databases (it reads the shared catalog pg_database, so it
//! holds no database connection that would block DROP DATABASE or CREATE DATABASE). Each worker
//! connects to its database, checks that the extension exists there and otherwise exits, leaving
//! a note in shared memory so the launcher does not restart it until `CREATE EXTENSION` wakes it.
//! Workers and the launcher are found through shared memory by pid, so any backend can wake them
//! by setting their latch (a worker cannot hear NOTIFY of its own database).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgrx::bgworkers::*;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};

/// Databases per server that can have a worker; more is refused with a log line.
const MAX_DATABASES: usize = 64;

/// Shortest time between two rounds of a worker.
const MIN_ROUND_GAP: Duration = Duration::from_millis(10);

/// How often the launcher looks for new databases without being woken.
const LAUNCHER_NAP: Duration = Duration::from_secs(10);

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

unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"rbucardo_registry") };

/// Commits that wrote to the change log, per registry slot (database): the worker tells peers
/// listening on this node (NOTIFY) only when its counter moved, without a query per round.
pub struct LogCommits([AtomicU64; MAX_DATABASES]);

impl Default for LogCommits {
    fn default() -> Self {
        LogCommits(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

unsafe impl PGRXSharedMemory for LogCommits {}

static LOG_COMMITS: PgAtomic<LogCommits> = unsafe { PgAtomic::new(c"rbucardo_log_commits") };

/// Reserves shared memory and registers the launcher; called from `_PG_init` at preload time.
pub fn init() {
    pg_shmem_init!(REGISTRY);
    pg_shmem_init!(LOG_COMMITS);
    BackgroundWorkerBuilder::new("rbucardo launcher")
        .set_type("rbucardo launcher")
        .set_library("rbucardo")
        .set_function("rbucardo_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Sets the latch of a process of this server, if it is still there.
fn set_latch_of(pid: i32) {
    if pid == 0 {
        return;
    }
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
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let reg = REGISTRY.share();
    reg.slots.iter().position(|s| s.dboid == dboid).map(|i| (i, reg.slots[i].pid))
}

/// Wakes the worker of the current database now.
pub fn wake_local_worker() {
    if let Some((_, pid)) = local_slot() {
        set_latch_of(pid);
    }
}

/// Runs after every commit that wrote to the change log: counts it and wakes the worker, which
/// sends it and tells listening peers. Takes the registry lock shared only.
pub fn note_log_commit() {
    if let Some((i, pid)) = local_slot() {
        LOG_COMMITS.get().0[i].fetch_add(1, Ordering::AcqRel);
        set_latch_of(pid);
    }
}

/// The current database's replication configuration generation (see [`Slot::config_gen`]).
pub fn config_generation() -> u64 {
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    REGISTRY.share().slots.iter().find(|s| s.dboid == dboid).map_or(0, |s| s.config_gen)
}

/// Rounds completed by the current database's worker, and whether a worker is running.
pub fn rounds_of_local_worker() -> (u64, bool) {
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    REGISTRY.share().slots.iter().find(|s| s.dboid == dboid).map_or((0, false), |s| (s.rounds, s.pid != 0))
}

fn count_round(dboid: u32) {
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.dboid == dboid) {
        slot.rounds = slot.rounds.wrapping_add(1);
    }
}

/// Tells this database's worker, once the calling transaction commits, that the replication
/// configuration changed: it reads it again and starts a round.
pub fn wake_local_worker_at_commit() {
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || {
        let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
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

/// Called by `CREATE EXTENSION` so the new database gets its worker without waiting.
#[pg_extern(volatile, parallel_unsafe)]
fn wake_launcher() {
    wake_launcher_at_commit();
}

/// The databases that could have a worker: they allow connections and are not templates.
/// Read with a catalog scan because the launcher is connected to no database.
fn list_databases() -> Vec<pg_sys::Oid> {
    BackgroundWorker::transaction(|| unsafe {
        let mut out = Vec::new();
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let db = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
            if db.datallowconn && !db.datistemplate {
                out.push(db.oid);
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
        out
    })
}

fn start_worker(dboid: pg_sys::Oid) -> Option<DynamicBackgroundWorker> {
    let started = BackgroundWorkerBuilder::new(&format!("rbucardo worker {}", dboid.to_u32()))
        .set_type("rbucardo worker")
        .set_library("rbucardo")
        .set_function("rbucardo_worker_main")
        .set_argument(Some(pg_sys::Datum::from(dboid.to_u32())))
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic();
    match started {
        Ok(handle) => Some(handle),
        Err(_) => {
            log!("rbucardo launcher: could not start a worker for database {}; no free background worker slot (raise max_worker_processes)", dboid.to_u32());
            None
        }
    }
}

/// Entry point of the launcher: keeps one worker running per database that has the extension.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rbucardo_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    REGISTRY.exclusive().launcher_pid = unsafe { pg_sys::MyProcPid };
    log!("rbucardo launcher started");

    let mut workers: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Forget workers that have exited; they are restarted below if still wanted.
        workers.retain(|_, h| !matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)));

        let rescan_all = std::mem::take(&mut REGISTRY.exclusive().rescan_all);
        let databases = list_databases();
        for dboid in databases.iter().copied() {
            let key = dboid.to_u32();
            if workers.contains_key(&key) {
                continue;
            }
            let wanted = {
                let mut reg = REGISTRY.exclusive();
                match reg.slots.iter_mut().find(|s| s.dboid == key) {
                    Some(slot) => {
                        if rescan_all {
                            slot.no_extension = false;
                        }
                        !slot.no_extension
                    }
                    None => match reg.slots.iter_mut().find(|s| s.dboid == 0) {
                        Some(free) => {
                            *free = Slot { dboid: key, ..Slot::default() };
                            true
                        }
                        None => {
                            log!("rbucardo launcher: more than {MAX_DATABASES} databases; database {key} gets no worker");
                            false
                        }
                    },
                }
            };
            if wanted {
                if let Some(handle) = start_worker(dboid) {
                    workers.insert(key, handle);
                }
            }
        }
        // Free the slots of databases that are gone.
        {
            let mut reg = REGISTRY.exclusive();
            for slot in reg.slots.iter_mut() {
                if slot.dboid != 0 && !databases.iter().any(|d| d.to_u32() == slot.dboid) {
                    *slot = Slot::default();
                }
            }
        }
        if !BackgroundWorker::wait_latch(Some(LAUNCHER_NAP)) {
            break;
        }
    }
    // Workers get their own SIGTERM from the postmaster at shutdown.
    REGISTRY.exclusive().launcher_pid = 0;
    log!("rbucardo launcher exiting");
}

fn extension_exists() -> bool {
    BackgroundWorker::transaction(|| unsafe {
        pg_sys::get_extension_oid(c"rbucardo".as_ptr(), true) != pg_sys::InvalidOid
    })
}

fn set_own_slot(dboid: u32, pid: i32, no_extension: bool) {
    let mut reg = REGISTRY.exclusive();
    if let Some(slot) = reg.slots.iter_mut().find(|s| s.dboid == dboid) {
        slot.pid = pid;
        slot.no_extension = no_extension;
    }
}

/// Entry point of a database's worker. It runs until SIGTERM, postmaster death or
/// `DROP EXTENSION`.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rbucardo_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from_u32(dboid)), None);
    set_own_slot(dboid, unsafe { pg_sys::MyProcPid }, false);
    // The clock is kept in shared memory only: after a restart, move it past every value this
    // database has written, in case the wall clock went backwards meanwhile.
    if extension_exists() {
        if let Ok(Some(h)) = crate::transport::in_txn(|| Spi::get_one::<i64>("SELECT max(hlc) FROM rbucardo.change_log").ok().flatten()) {
            crate::clock::observe(h);
        }
    }
    let mut replicator = crate::replicator::Replicator::default();
    let slot = REGISTRY.share().slots.iter().position(|s| s.dboid == dboid).expect("the launcher gave this database a slot");
    let mut told = u64::MAX;
    let mut last_round = std::time::Instant::now() - MIN_ROUND_GAP;
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !extension_exists() {
            set_own_slot(dboid, 0, true);
            log!("rbucardo worker: extension not installed in this database, exiting");
            return;
        }
        // Under a steady stream of commits, each waking us, one round per few milliseconds
        // carries them all: a round per commit would only burn the CPU the application needs.
        let since = last_round.elapsed();
        if since < MIN_ROUND_GAP {
            unsafe { pg_sys::pg_usleep((MIN_ROUND_GAP - since).as_micros() as std::ffi::c_long) };
        }
        last_round = std::time::Instant::now();
        // Tell peers listening on this node that the change log has grown. The notification
        // needs no durable commit of its own.
        let commits = LOG_COMMITS.get().0[slot].load(Ordering::Acquire);
        if commits != told
            && replicator.has_peers()
            && crate::transport::in_txn(|| Spi::run("SET LOCAL synchronous_commit = off; NOTIFY rbucardo_changes").expect("notify")).is_ok()
        {
            told = commits;
        }
        let nap = replicator.round();
        count_round(dboid);
        if unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        if replicator.wait(nap).is_err() {
            break;
        }
    }
    set_own_slot(dboid, 0, false);
}
