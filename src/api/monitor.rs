//! Monitoring: the functions behind the views in sql/monitoring.sql, and wait_for_sync.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::base::error::raise;

/// `rbucardo.peer_retention` in seconds, as the worker reads it (NULL: the log is kept for ever).
#[pg_extern(stable)]
fn peer_retention_seconds() -> Option<i64> {
    crate::log::retention::retention_seconds()
}

/// A conninfo without its password, for views and logs.
#[pg_extern(immutable, parallel_safe)]
fn redact_conninfo(conninfo: &str) -> String {
    crate::base::pq::redact_conninfo(conninfo)
}

fn sleep_on_latch(d: Duration) {
    // SAFETY: a plain wait on this backend's own latch, as pg_sleep does.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            d.as_millis() as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}

/// True once every change committed here before the call is confirmed by every peer of the
/// sync, and this node's worker has completed a full round with its outbound peers (pulling
/// what they held) and every passive peer has contacted this node since the call; false on
/// timeout. Refused in a REPEATABLE READ or SERIALIZABLE transaction: its snapshot would
/// never see the peers' confirmations, so it could only time out.
#[pg_extern(volatile)]
fn wait_for_sync(name: &str, timeout: default!(pgrx::datum::Interval, "'60s'")) -> bool {
    let micros = {
        let m: i128 = timeout.as_micros();
        m.clamp(0, i64::MAX as i128) as u64
    };
    synced(name, Duration::from_micros(micros))
}

/// `wait_for_sync` with a Rust timeout, for other functions of this layer (diff).
pub fn synced(name: &str, timeout: Duration) -> bool {
    // SAFETY: reads the backend's isolation level.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_READ_COMMITTED as i32 {
        crate::base::error::raise(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "rbucardo.wait_for_sync (and diff, which waits for the sync) needs READ COMMITTED",
            "Its transaction's snapshot would never see the peers' confirmations. Call it outside a REPEATABLE READ or SERIALIZABLE transaction.",
        );
    }
    let deadline = Instant::now() + timeout;
    let peers: Vec<(String, bool)> = Spi::connect(|c| {
        c.select(
            "SELECT d.name, d.conninfo IS NOT NULL FROM rbucardo.sync s JOIN rbucardo.db d ON d.name = ANY (s.dbs)
              WHERE s.name = $1",
            None,
            &[name.into()],
        )
        .unwrap()
        .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<bool>(2).unwrap().unwrap()))
        .collect()
    });
    if Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.sync WHERE name = $1)", &[name.into()]).ok().flatten() != Some(true) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {name}"), "See SELECT * FROM rbucardo.syncs.");
    }
    let target = crate::log::changelog::stream_end();
    let started_at = Spi::get_one::<pgrx::datum::TimestampWithTimeZone>("SELECT clock_timestamp()").unwrap().unwrap();
    // A round pulls from a peer only when the peer said it has something (or now and then):
    // ask for pulls from every peer. The two rounds after the one under way pull from all.
    crate::base::signals::ask_for_pulls();
    let (rounds0, _) = crate::base::signals::rounds_of_local_worker();
    crate::base::signals::wake_local_worker();
    loop {
        let out_done = peers.iter().all(|(p, _)| {
            Spi::get_one_with_args::<bool>(
                "SELECT rbucardo.complete_tick(out_tick, out_seq) >= $2
                   FROM rbucardo.peer_state WHERE db = $1",
                &[p.as_str().into(), target.into()],
            )
            .ok()
            .flatten()
                == Some(true)
        });
        let passive_seen = peers.iter().filter(|(_, outbound)| !outbound).all(|(p, _)| {
            Spi::get_one_with_args::<bool>("SELECT last_contact > $2 FROM rbucardo.peer_state WHERE db = $1", &[p.as_str().into(), started_at.into()])
                .ok()
                .flatten()
                == Some(true)
        });
        let (rounds, running) = crate::base::signals::rounds_of_local_worker();
        let pulled = !peers.iter().any(|(_, outbound)| *outbound) || (running && rounds.wrapping_sub(rounds0) >= 3);
        if out_done && passive_seen && pulled {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep_on_latch(Duration::from_millis(20));
    }
}
