//! Background workers: one launcher per server, and per database that has the extension one
//! worker (replication) and its housekeeper (src/runtime/housekeeper.rs), which the worker
//! starts.
//!
//! The launcher only knows the list of databases (it reads the shared catalog pg_database, so it
//! holds no database connection that would block DROP DATABASE or CREATE DATABASE). Each worker
//! connects to its database, checks that the extension exists there and otherwise exits, leaving
//! a note in shared memory (src/base/signals.rs) so the launcher does not restart it until
//! `CREATE EXTENSION` wakes it.

use std::collections::HashMap;
use std::time::Duration;

use pgrx::bgworkers::*;
use pgrx::prelude::*;

use crate::base::signals;
use crate::base::xact::in_txn;

/// Shortest time between two rounds of a worker. Rounds that follow each other closely carry
/// what committed meanwhile, so under a steady stream a round carries several transactions
/// anyway; a longer gap only adds to every change's lag (10 ms gave a median one-hop lag of
/// 8 ms under pgbench -R 100).
const MIN_ROUND_GAP: Duration = Duration::from_millis(1);
/// Shortest time between two rounds while a stream is busy (over 1,000 transactions per
/// second to one peer, `Replicator::busy`): under such a stream, a round per millisecond pushed
/// three transactions at a time, and each push's fixed cost (a transaction and a dozen
/// statements on each side) was most of what replication cost the application. Spaced out,
/// a round carries several times more, at the price of a few milliseconds of lag while the
/// stream stays busy (pgbench at full speed: live tps 0.57 of plain with 1 ms, 0.75 with 4,
/// 0.83 with 8); a stream that is not busy is pushed at once.
const BUSY_ROUND_GAP: Duration = Duration::from_millis(8);
/// Shortest time between two rounds of a worker that has no active peer.
const IDLE_ROUND_GAP: Duration = Duration::from_millis(10);
/// How often a worker checks that the extension is still installed (DROP EXTENSION).
const EXTENSION_CHECK: Duration = Duration::from_millis(100);
/// The unit of a hub's notification spacing (`notify_gap`).
const NOTIFY_GAP_UNIT: Duration = Duration::from_millis(10);
/// Every notification makes each listening peer fetch once. A hub with many stores holds its
/// notifications back to one per `NOTIFY_GAP_UNIT` per this many listeners, so that under a
/// steady stream each fetch carries several transactions instead of one; an idle hub still
/// notifies at once. (Measured with `bench fanin`: see docs/performance.md. With 20 stores, 8
/// per gap cost main the least CPU per row while a fetch read the log; since a span's rows
/// are kept for its other fetches, 16 costs the same and cuts the two-hop p99 by a quarter;
/// 20 (one gap) costs 1.5x.)
const LISTENERS_PER_GAP: usize = 16;

/// The least time between two change notifications with `listeners` peers.
fn notify_gap(listeners: usize) -> Duration {
    NOTIFY_GAP_UNIT * listeners.div_ceil(LISTENERS_PER_GAP).max(1) as u32
}

/// How often a worker checks that its housekeeper runs (one that finds another running exits
/// at once: this bounds how often it is started for nothing).
const HOUSEKEEPER_CHECK: Duration = Duration::from_secs(5);

/// How often the launcher looks for new databases without being woken.
const LAUNCHER_NAP: Duration = Duration::from_secs(10);

/// Registers the launcher; called from `_PG_init` at preload time.
pub fn init() {
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

/// The databases that could have a worker: they allow connections and are not templates.
/// Read with a catalog scan because the launcher is connected to no database.
fn list_databases() -> Vec<pg_sys::Oid> {
    // SAFETY: a catalog heap scan inside a transaction, opened and closed in the same block,
    // exactly as PostgreSQL's autovacuum launcher reads pg_database.
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
        // SAFETY: MyProcPid is a plain global of this process.
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
// SAFETY: the name given to set_function in `init`, clashing with no other symbol; the
// signature is the bgworker_main_type the postmaster calls it with.
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rbucardo_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: MyProcPid is a plain global of this process.
    signals::set_launcher_pid(unsafe { pg_sys::MyProcPid });
    log!("rbucardo launcher started");

    let mut workers: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: what PostgreSQL's own workers call on SIGHUP, between transactions.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Forget workers that have exited; they are restarted below if still wanted.
        workers.retain(|_, h| !matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)));

        let rescan_all = signals::take_rescan_request();
        let databases = list_databases();
        for dboid in databases.iter().copied() {
            let key = dboid.to_u32();
            if workers.contains_key(&key) {
                continue;
            }
            let wanted = signals::wants_worker(key, rescan_all);
            if wanted {
                if let Some(handle) = start_worker(dboid) {
                    workers.insert(key, handle);
                }
            }
        }
        // Free the slots of databases that are gone.
        signals::forget_databases_except(&databases.iter().map(|d| d.to_u32()).collect::<Vec<_>>());
        if !BackgroundWorker::wait_latch(Some(LAUNCHER_NAP)) {
            break;
        }
    }
    // Workers get their own SIGTERM from the postmaster at shutdown.
    signals::set_launcher_pid(0);
    log!("rbucardo launcher exiting");
}

fn extension_exists() -> bool {
    // SAFETY: a syscache lookup inside a transaction.
    BackgroundWorker::transaction(|| unsafe {
        pg_sys::get_extension_oid(c"rbucardo".as_ptr(), true) != pg_sys::InvalidOid
    })
}

/// Entry point of a database's worker. It runs until SIGTERM, postmaster death or
/// `DROP EXTENSION`.
#[pg_guard]
// SAFETY: the name given to set_function in `start_worker`, clashing with no other symbol;
// the signature is the bgworker_main_type the postmaster calls it with.
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rbucardo_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from_u32(dboid)), None);
    // SAFETY: MyProcPid is a plain global of this process.
    let Some(slot) = signals::set_worker(dboid, unsafe { pg_sys::MyProcPid }, false) else {
        log!("rbucardo worker: database {dboid} has no registry slot, exiting");
        return;
    };
    // The worker runs as a superuser: nothing a database owner puts in search_path (through
    // ALTER DATABASE or ALTER ROLE settings) may stand in for what its queries call.
    let _ = in_txn(|| Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)").expect("pinning search_path"));
    // Apply judges a row by the clocks it reads once the row is locked: that needs each
    // statement's own snapshot (src/log/clocks.rs), whatever the server's default says.
    let _ = in_txn(|| Spi::run("SELECT pg_catalog.set_config('default_transaction_isolation', 'read committed', false)").expect("isolation"));
    // No JIT: the planner's estimates for the change log are high enough to make PostgreSQL
    // compile queries to machine code, which costs 100-200 ms per execution (measured on the
    // state report) for queries that run in a few milliseconds.
    let _ = in_txn(|| Spi::run("SELECT pg_catalog.set_config('jit', 'off', false)").expect("jit"));
    // The worker only replicates: replica mode for good, so applying a batch does not drop
    // the session's cached plans (xact::replica_session).
    let _ = in_txn(crate::base::xact::replica_session);
    // The clock is kept in shared memory only: after a restart, move it past every value this
    // database has written, in case the wall clock went backwards meanwhile: the change log
    // holds the clocks of what is not trimmed yet, row_clock those of trimmed changes.
    if extension_exists() {
        if let Ok(Some(h)) = in_txn(crate::log::clocks::highest_known) {
            crate::base::clock::observe(h);
        }
    }
    let mut replicator = crate::runtime::replicator::Replicator::default();
    // The housekeeper runs beside this worker (src/runtime/housekeeper.rs).
    let mut housekeeper: Option<DynamicBackgroundWorker> = None;
    let mut housekeeper_checked = std::time::Instant::now() - HOUSEKEEPER_CHECK;
    let mut housekeeper_missing = false;
    let mut told = u64::MAX;
    let mut last_notify = std::time::Instant::now() - NOTIFY_GAP_UNIT;
    let mut last_round = std::time::Instant::now() - MIN_ROUND_GAP;
    let mut extension_checked = std::time::Instant::now() - EXTENSION_CHECK;
    let mut pulls_seen = 0;
    let mut forced_pulls = 0u8;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: what PostgreSQL's own workers call on SIGHUP, between transactions.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // A transaction of its own: at most every EXTENSION_CHECK, not at every wake-up.
        if extension_checked.elapsed() >= EXTENSION_CHECK {
            extension_checked = std::time::Instant::now();
            if !extension_exists() {
                signals::set_worker(dboid, 0, true);
                log!("rbucardo worker: extension not installed in this database, exiting");
                return;
            }
        }
        if housekeeper_checked.elapsed() >= HOUSEKEEPER_CHECK {
            housekeeper_checked = std::time::Instant::now();
            let gone = housekeeper.as_ref().is_none_or(|h| matches!(h.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)));
            if gone {
                housekeeper = crate::runtime::housekeeper::start(dboid);
                if housekeeper.is_none() && !housekeeper_missing {
                    log!("rbucardo worker: could not start the housekeeper: no free background worker slot (raise max_worker_processes); the change log is not trimmed meanwhile");
                }
                housekeeper_missing = housekeeper.is_none();
            }
        }
        // Under a steady stream of commits, each waking us, one round per millisecond carries
        // them all: a round per commit would only burn the CPU the application needs. With
        // no peer to send them to (a paused sync), a commit has nothing for a round to do.
        let gap = if !replicator.has_peers() {
            IDLE_ROUND_GAP
        } else if replicator.busy() {
            BUSY_ROUND_GAP
        } else {
            MIN_ROUND_GAP
        };
        let since = last_round.elapsed();
        if since < gap {
            // SAFETY: a plain sleep; SIGTERM still sets the flag checked below.
            unsafe { pg_sys::pg_usleep((gap - since).as_micros() as std::ffi::c_long) };
        }
        last_round = std::time::Instant::now();
        // Tell peers listening on this node that the change log has grown, with a tick that
        // holds the new transactions already made: their fetches then read without cutting
        // one (changelog::served_tick). The tick's commit is durable (ensure_tick asks for it);
        // a notification alone needs no durable commit.
        let commits = signals::log_commits(slot);
        let notify_gap = notify_gap(replicator.listeners());
        let notify_due = last_notify.elapsed() >= notify_gap;
        if commits != told
            && replicator.listeners() > 0
            && notify_due
            && in_txn(|| {
                crate::base::xact::set_local(c"synchronous_commit", c"off");
                // A peer's fetch holding the tick lock cuts the tick itself: try again next round.
                let ticked = crate::log::changelog::ensure_tick_nowait().is_some();
                if ticked {
                    Spi::run("NOTIFY rbucardo_changes").expect("notify");
                }
                ticked
            }) == Ok(true)
        {
            told = commits;
            last_notify = std::time::Instant::now();
        } else if replicator.listeners() == 0 {
            // Nobody to tell: do not keep waking up for it.
            told = commits;
        }
        // Pulls asked for (wait_for_sync, kick): the next two rounds pull from every peer,
        // so that one of them starts after the asking transaction's snapshot was taken.
        let asked = signals::pulls_asked(slot);
        if asked != pulls_seen {
            pulls_seen = asked;
            forced_pulls = 2;
        }
        let mut nap = replicator.round(forced_pulls > 0);
        forced_pulls = forced_pulls.saturating_sub(1);
        if commits != told {
            // A notification held back by the gap goes out when it is due.
            nap = nap.min(notify_gap.saturating_sub(last_notify.elapsed()));
        }
        signals::count_round(dboid);
        // SAFETY: a flag set by the SIGTERM handler, read on the main thread.
        if unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        if replicator.wait(nap).is_err() {
            break;
        }
    }
    signals::set_worker(dboid, 0, false);
}
