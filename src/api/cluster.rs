//! The chain's view of itself (sql/cluster.sql): every node trades reports of its state with
//! the peers it talks to, over the link it already has. The SQL there builds, keeps and shows
//! them; this is the bound on what a peer may hand over.

use pgrx::prelude::*;

use crate::base::error::raise;

/// The most a peer may pass on in one exchange: reports are small (a few hundred bytes per
/// node), so this is a thousand-odd nodes.
const MAX_REPORTS_BYTES: usize = 4 << 20;

/// Keeps the reports `peer` passed on and returns those this node passes to it.
pub fn exchange(peer: &str, reports: serde_json::Value) -> pgrx::JsonB {
    let size = reports.to_string().len();
    if size > MAX_REPORTS_BYTES {
        raise(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("reports from {peer} are {size} bytes, more than {MAX_REPORTS_BYTES}"),
            "Reports are monitoring data only; nothing was kept. A peer that sends this much is faulty.",
        );
    }
    Spi::run_with_args("SELECT rbucardo.store_reports($1, $2)", &[peer.into(), pgrx::JsonB(reports).into()]).expect("keeping reports");
    Spi::get_one_with_args::<pgrx::JsonB>("SELECT rbucardo.reports_for($1)", &[peer.into()])
        .ok()
        .flatten()
        .unwrap_or(pgrx::JsonB(serde_json::Value::Array(Vec::new())))
}

/// The reports this node passes to `peer` (the calling side of the exchange).
pub fn reports_for(peer: &str) -> String {
    Spi::get_one_with_args::<pgrx::JsonB>("SELECT rbucardo.reports_for($1)", &[peer.into()])
        .ok()
        .flatten()
        .map_or_else(|| "[]".to_string(), |j| j.0.to_string())
}

/// Keeps what `peer` answered (the calling side of the exchange).
pub fn store(peer: &str, reports: &str) -> Result<(), String> {
    if reports.len() > MAX_REPORTS_BYTES {
        return Err(format!("reports from {peer} are {} bytes, more than {MAX_REPORTS_BYTES}", reports.len()));
    }
    let value: serde_json::Value = serde_json::from_str(reports).map_err(|e| format!("peer_report returned bad JSON: {e}"))?;
    Spi::run_with_args("SELECT rbucardo.store_reports($1, $2)", &[peer.into(), pgrx::JsonB(value).into()]).map_err(|e| e.to_string())
}

pgrx::extension_sql_file!(
    "../../sql/cluster.sql",
    name = "cluster",
    requires = ["catalog", "conflicts", "exceptions", "monitoring", "ddl"]
);
