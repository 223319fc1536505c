//! The housekeeper: one background process per database, beside its worker, for everything
//! that is not replication: trimming the change log, expiring peers past their retention,
//! retrying parked transactions, pruning the conflict log, and making this node's state
//! report for the cluster view. Done between the worker's rounds, each of these held up the
//! streams (a trim step after a burst, or a report that reads the whole change log, took
//! hundreds of milliseconds: see docs/performance.md); here they hold up nothing.
//!
//! The worker starts it (and starts it again should it exit); a session advisory lock makes
//! sure only one runs per database.

use std::time::{Duration, Instant};

use pgrx::bgworkers::*;
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::base::xact::in_txn;
use crate::runtime::replicator::Slow;

/// How often retention, retries, pruning and the state report come round.
const EVERY: Duration = Duration::from_secs(5);
/// About how many change log rows one trim step removes: a step is one transaction.
const TRIM_STEP_ROWS: i64 = 5_000;
/// At most this many rows of each are pruned per period.
const PRUNE_BATCH: i64 = 1000;
/// The longest gap between two state reports: a link makes its own when the last is a minute
/// old (`rbucardo.cached_report`), in its own round, which is what the housekeeper is for.
const REPORT_AT_MOST_EVERY: Duration = Duration::from_secs(20);
/// A report may take this share of the time between reports (its inverse, as a factor).
const REPORT_SHARE: u32 = 50;
/// The advisory lock (one per database) held by the running housekeeper.
const LOCK_KEY: i64 = 0x7262_7563_6b68_6b70; // "rbuckhkp"

/// `rbucardo.conflict_retention_days`: conflict log entries and resolved exceptions older than
/// this are pruned (0 keeps them for ever). Open exceptions are never pruned.
pub static CONFLICT_RETENTION_DAYS: GucSetting<i32> = GucSetting::<i32>::new(90);

/// Registers the housekeeper's settings; called from `_PG_init`.
pub fn init() {
    GucRegistry::define_int_guc(
        c"rbucardo.conflict_retention_days",
        c"Days the conflict log and resolved exceptions are kept (0: for ever).",
        c"The housekeeper prunes older entries in small batches; open exceptions are never pruned.",
        &CONFLICT_RETENTION_DAYS,
        0,
        36_500,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// Starts the housekeeper of the database `dboid`; the caller (its worker) is told when it
/// exits.
pub fn start(dboid: u32) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("rbucardo housekeeper {dboid}"))
        .set_type("rbucardo housekeeper")
        .set_library("rbucardo")
        .set_function("rbucardo_housekeeper_main")
        .set_argument(Some(pg_sys::Datum::from(dboid)))
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        // SAFETY: MyProcPid is a plain global of this process.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

fn extension_exists() -> bool {
    // SAFETY: a syscache lookup inside a transaction.
    BackgroundWorker::transaction(|| unsafe { pg_sys::get_extension_oid(c"rbucardo".as_ptr(), true) != pg_sys::InvalidOid })
}

/// Entry point of a database's housekeeper. It runs until SIGTERM, postmaster death or
/// `DROP EXTENSION`, or exits at once if another holds the database's housekeeping lock.
#[pg_guard]
// SAFETY: the name given to set_function in `start`, clashing with no other symbol; the
// signature is the bgworker_main_type the postmaster calls it with.
#[unsafe(no_mangle)]
pub extern "C-unwind" fn rbucardo_housekeeper_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let dboid = arg.value() as u32;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from_u32(dboid)), None);
    let _ = in_txn(|| Spi::run("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)").expect("pinning search_path"));
    // A parked transaction retried here is applied as the worker applies: READ COMMITTED.
    let _ = in_txn(|| Spi::run("SELECT pg_catalog.set_config('default_transaction_isolation', 'read committed', false)").expect("isolation"));
    // No JIT, as in the worker (src/runtime/worker.rs). A step that waits on a lock (a row
    // held by an idle transaction) gives up and comes back, with a line in the log, rather than
    // stopping every other step for good.
    let _ = in_txn(|| {
        Spi::run("SELECT pg_catalog.set_config('jit', 'off', false), pg_catalog.set_config('lock_timeout', '30s', false), pg_catalog.set_config('statement_timeout', '10min', false)")
            .expect("settings")
    });
    if in_txn(|| Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_try_advisory_lock($1)", &[LOCK_KEY.into()]).ok().flatten() == Some(true)) != Ok(true) {
        return; // another housekeeper runs here
    }
    let mut last = None::<Instant>;
    let mut report_due = None::<Instant>;
    let mut trim_more = true;
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: what PostgreSQL's own workers call on SIGHUP, between transactions.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if !extension_exists() {
            return;
        }
        let me = match in_txn(crate::base::node::me) {
            Ok(Ok(me)) => Some(me),
            _ => None,
        };
        if let Some(me) = me.as_ref().filter(|_| last.is_none_or(|t: Instant| t.elapsed() >= EVERY)) {
            last = Some(Instant::now());
            periodic(me.id, &mut report_due);
            trim_more = true;
        }
        if trim_more {
            if let Some(me) = me.as_ref() {
                let me_id = me.id;
                let mut slow = Slow::default();
                let trimmed = slow.time("trim", || in_txn(move || crate::log::changelog::trim(me_id, Some(TRIM_STEP_ROWS))));
                slow.report("rbucardo housekeeper: slow step");
                trim_more = match trimmed {
                    Ok((_, more)) => more,
                    Err(e) => {
                        log!("rbucardo housekeeper: trimming the change log failed: {e}");
                        false
                    }
                };
            }
        }
        // SAFETY: a flag set by the SIGTERM handler, read on the main thread.
        if unsafe { pg_sys::ShutdownRequestPending } != 0 {
            return;
        }
        // Another trim step at once while the log holds more; else sleep until the next period.
        let nap = if trim_more { Duration::from_millis(1) } else { EVERY.saturating_sub(last.map_or(Duration::ZERO, |t| t.elapsed())).max(Duration::from_millis(100)) };
        if !BackgroundWorker::wait_latch(Some(nap)) {
            return;
        }
    }
}

/// When the state report after one that began at `began` and took `took` is due (None: in
/// the next period). Counting what each peer has pending reads every transaction it has not
/// confirmed: millions of them on a hub whose store has been offline for days, every 5 s. So a
/// report comes round every period while that is cheap, and otherwise so that making it takes
/// at most a fiftieth of the time, but at least every 20 s.
fn next_report_due(began: Instant, took: Duration) -> Option<Instant> {
    let gap = (took * REPORT_SHARE).min(REPORT_AT_MOST_EVERY);
    // A period later is the next period whatever it took: not one to skip.
    (gap > EVERY).then(|| began + gap)
}

/// Retention, retries, pruning and, when it is due, this node's state report.
/// `report_due`: when the report is next due (None: now).
fn periodic(me_id: i32, report_due: &mut Option<Instant>) {
    let mut slow = Slow::default();
    // Peers away past retention stop holding the log back (before the trim that follows);
    // the worker reads the configuration again and stops sending to them.
    // The same transaction bumps the configuration generation: backends serving a peer's
    // fetches keep whether it is expired by it (src/runtime/endpoints.rs).
    let expire = || {
        let expired = crate::log::retention::expire_peers();
        if !expired.is_empty() {
            crate::base::signals::wake_local_worker_at_commit();
        }
        expired
    };
    match slow.time("retention", || in_txn(expire)) {
        Ok(expired) => {
            for (peer, why) in &expired {
                warning!("rbucardo: {peer} expired: {why}; it must rejoin");
            }
        }
        Err(e) => log!("rbucardo housekeeper: checking peer retention failed: {e}"),
    }
    // The report the worker's links hand to peers (reading it costs them nothing). Before
    // the retries, which may wait on a lock for a while: a report a minute old is one links
    // make again themselves.
    // (Skipped on a catalog not yet updated to this version, which lacks the function.)
    let report = || {
        if Spi::get_one::<bool>("SELECT pg_catalog.to_regproc('rbucardo.refresh_own_report') IS NOT NULL").ok().flatten() == Some(true) {
            Spi::run("SELECT rbucardo.refresh_own_report()").expect("report");
        }
    };
    if report_due.is_none_or(|due| Instant::now() >= due) {
        let began = Instant::now();
        *report_due = match slow.time("report", || in_txn(report)) {
            Ok(()) => next_report_due(began, began.elapsed()),
            // Tried again in the next period.
            Err(e) => {
                log!("rbucardo housekeeper: making the state report failed: {e}");
                None
            }
        };
    }
    // Parked transactions may apply now that later ones have arrived.
    if let Err(e) = slow.time("retries", || in_txn(move || crate::apply::retry::retry_open(me_id, None))) {
        log!("rbucardo housekeeper: retrying parked transactions failed: {e}");
    }
    // Retention of the conflict log and of resolved exceptions, in small batches.
    let days = CONFLICT_RETENTION_DAYS.get();
    if days > 0 {
        if let Err(e) = slow.time("pruning", || in_txn(move || (crate::apply::conflicts::prune(days, PRUNE_BATCH), crate::apply::exceptions::prune(days, PRUNE_BATCH)))) {
            log!("rbucardo housekeeper: pruning the conflict log failed: {e}");
        }
    }
    slow.report("rbucardo housekeeper: slow steps");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_costly_report_comes_round_less_often_but_within_the_bound() {
        let t = Instant::now();
        assert_eq!(next_report_due(t, Duration::ZERO), None, "a cheap report: every period");
        assert_eq!(next_report_due(t, Duration::from_millis(100)), None);
        assert_eq!(next_report_due(t, Duration::from_millis(200)), Some(t + Duration::from_secs(10)), "a fiftieth of the time");
        assert_eq!(next_report_due(t, Duration::from_secs(3)), Some(t + REPORT_AT_MOST_EVERY), "never staler than the bound");
        assert_eq!(next_report_due(t, Duration::from_secs(86_400)), Some(t + REPORT_AT_MOST_EVERY));
        assert!(REPORT_AT_MOST_EVERY + EVERY < Duration::from_secs(60), "links make their own after a minute");
    }
}
