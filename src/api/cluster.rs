//! The chain's view of itself (sql/cluster.sql): every node trades reports of its state with
//! the peers it talks to, over the link it already has. The SQL there (wired in lib.rs) builds, checks, keeps and
//! shows them; this bounds what a peer may hand over before any of it is parsed.

use pgrx::prelude::*;

use crate::base::error::raise;

/// The most a peer may pass on in one exchange: a report is a few hundred bytes per node.
const MAX_REPORTS_BYTES: usize = 4 << 20;

fn check_size(peer: &str, reports: &str) -> Result<(), String> {
    if reports.len() > MAX_REPORTS_BYTES {
        return Err(format!("reports from {peer} are {} bytes, more than {MAX_REPORTS_BYTES}", reports.len()));
    }
    Ok(())
}

/// Keeps the reports `peer` passed on (JSON text) and returns those this node passes to it.
pub fn exchange(peer: &str, reports: &str) -> String {
    if let Err(why) = check_size(peer, reports) {
        raise(PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED, why, "Reports are monitoring data only; nothing was kept. A peer that sends this much is faulty.");
    }
    Spi::run_with_args("SELECT rbucardo.store_reports($1, $2::pg_catalog.jsonb)", &[peer.into(), reports.into()]).expect("keeping reports");
    reports_for(peer)
}

/// The reports this node passes to `peer`, as JSON text.
pub fn reports_for(peer: &str) -> String {
    Spi::get_one_with_args::<String>("SELECT rbucardo.reports_for($1)::text", &[peer.into()]).ok().flatten().unwrap_or_else(|| "[]".to_string())
}

/// Keeps what `peer` answered (the calling side of the exchange).
pub fn store(peer: &str, reports: &str) -> Result<(), String> {
    check_size(peer, reports)?;
    Spi::run_with_args("SELECT rbucardo.store_reports($1, $2::pg_catalog.jsonb)", &[peer.into(), reports.into()]).map_err(|e| e.to_string())
}
