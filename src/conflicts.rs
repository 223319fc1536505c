//! Conflicts: what happens when an incoming row change finds the local row other than the
//! sender saw it (inserted already, changed since, or gone). The rule comes from the sync the
//! table belongs to; whatever the rule, both versions go to `rbucardo.conflicts`, so no version
//! is ever discarded silently, and `conflict_reapply()` can bring a loser back.
//!
//! Owns the table `conflicts` (sql/conflicts.sql).

use pgrx::prelude::*;

use crate::error::raise;

/// Which way a conflict went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    InsertExists,
    UpdateDiffers,
    UpdateMissing,
    DeleteDiffers,
    DeleteMissing,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::InsertExists => "insert_exists",
            Kind::UpdateDiffers => "update_differs",
            Kind::UpdateMissing => "update_missing",
            Kind::DeleteDiffers => "delete_differs",
            Kind::DeleteMissing => "delete_missing",
        }
    }
}

/// A table's conflict rule, as named in add_sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule(pub String);

impl Rule {
    /// The strategy of a sync whose herd holds the table (the first by name); `source` when the
    /// table is in no sync.
    pub fn for_table(relid: pg_sys::Oid) -> Rule {
        let name = Spi::get_one_with_args::<String>(
            "SELECT s.conflict_strategy FROM rbucardo.sync s JOIN rbucardo.herd_table t ON t.herd = s.herd
              WHERE t.relid = $1 ORDER BY s.name LIMIT 1",
            &[relid.into()],
        )
        .ok()
        .flatten()
        .unwrap_or_else(|| "source".into());
        Rule(name)
    }

    /// Whether the incoming version wins. `latest` needs the clock of the local version, which
    /// is not recorded yet: until it is, the incoming version wins (and the local one is logged).
    fn incoming_wins(&self) -> bool {
        !matches!(self.0.as_str(), "target" | "skip")
    }
}

/// One conflict, with both versions as JSON objects of column name to text value.
pub struct Conflict<'a> {
    pub table: &'a str,
    pub key: serde_json::Value,
    pub kind: Kind,
    pub local: Option<serde_json::Value>,
    pub remote: Option<serde_json::Value>,
    pub origin: i32,
    pub hlc: i64,
}

/// Decides a conflict by the table's rule and records it; returns whether to apply the incoming
/// change. `abort` stops the whole batch with an error: the stream from that peer halts (its
/// status shows the error) until the operator changes the strategy or the data.
pub fn resolve(rule: &Rule, c: Conflict) -> bool {
    if rule.0 == "abort" {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("conflict ({}) on {} key {} from node {}; the sync's strategy is abort", c.kind.as_str(), c.table, c.key, c.origin),
            "Nothing of this batch was applied. Fix the row or change the strategy (rbucardo.set_conflict_strategy), and the stream resumes.",
        );
    }
    let wins = rule.incoming_wins();
    let winner = match (c.kind, wins) {
        (Kind::DeleteMissing, _) => "none",
        (_, true) => "remote",
        (_, false) => "local",
    };
    Spi::run_with_args(
        "INSERT INTO rbucardo.conflicts (tbl, key, kind, local_version, remote_version, remote_origin, remote_hlc, rule, winner)
         VALUES ($1, $2::jsonb, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9)",
        &[
            c.table.into(),
            c.key.to_string().into(),
            c.kind.as_str().into(),
            c.local.map(|v| v.to_string()).into(),
            c.remote.map(|v| v.to_string()).into(),
            c.origin.into(),
            c.hlc.into(),
            rule.0.as_str().into(),
            winner.into(),
        ],
    )
    .expect("recording a conflict");
    wins
}

/// Changes the conflict strategy of a sync.
#[pg_extern(volatile)]
fn set_conflict_strategy(sync: &str, strategy: &str) -> String {
    if !crate::catalog::STRATEGIES.contains(&strategy) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown conflict strategy {strategy:?}"), format!("Use one of: {}.", crate::catalog::STRATEGIES.join(", ")));
    }
    let n = Spi::connect_mut(|c| {
        c.update("UPDATE rbucardo.sync SET conflict_strategy = $2 WHERE name = $1", None, &[sync.into(), strategy.into()]).map(|t| t.len()).unwrap_or(0)
    });
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {sync}"), "See SELECT * FROM rbucardo.syncs.");
    }
    crate::worker::wake_local_worker_at_commit();
    format!("sync {sync} now resolves conflicts by {strategy}")
}

/// Writes the losing version of a conflict back as a new local change, which replicates like
/// any other: the row (as it was in the losing version) is inserted or overwritten here, or
/// deleted when the losing version was a deletion.
#[pg_extern(volatile)]
fn conflict_reapply(id: i64) -> String {
    let row = Spi::get_three_with_args::<String, pgrx::JsonB, String>(
        "SELECT tbl, jsonb_build_object('key', key, 'local', local_version, 'remote', remote_version), winner
           FROM rbucardo.conflicts WHERE id = $1 AND reapplied_at IS NULL",
        &[id.into()],
    )
    .unwrap_or((None, None, None));
    let (Some(tbl), Some(versions), Some(winner)) = row else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no conflict {id} waiting to be reapplied"), "See SELECT * FROM rbucardo.conflicts WHERE reapplied_at IS NULL.");
    };
    let v = versions.0;
    let loser = match winner.as_str() {
        "remote" => v.get("local").cloned(),
        "local" => v.get("remote").cloned(),
        _ => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("conflict {id} has no losing version"), "A delete of a row that was already gone loses nothing."),
    }
    .filter(|l| !l.is_null());
    let key = v.get("key").cloned().unwrap_or_default();
    let key_cond = |prefix: &str| -> String {
        key.as_object()
            .map(|o| o.keys().map(|k| format!("{prefix}{0} = r.{0}", pgrx::spi::quote_identifier(k))).collect::<Vec<_>>().join(" AND "))
            .unwrap_or_default()
    };
    match loser {
        Some(row) => {
            let cols: Vec<String> = row.as_object().map(|o| o.keys().map(pgrx::spi::quote_identifier).collect()).unwrap_or_default();
            let sets: Vec<String> = cols.iter().map(|c| format!("{c} = r.{c}")).collect();
            Spi::run_with_args(
                &format!(
                    "WITH r AS (SELECT * FROM jsonb_populate_record(NULL::{tbl}, $1::jsonb)),
                          u AS (UPDATE {tbl} t SET {} FROM r WHERE {} RETURNING 1)
                     INSERT INTO {tbl} ({}) SELECT {} FROM r WHERE NOT EXISTS (SELECT 1 FROM u)",
                    sets.join(", "),
                    key_cond("t."),
                    cols.join(", "),
                    cols.iter().map(|c| format!("r.{c}")).collect::<Vec<_>>().join(", ")
                ),
                &[row.to_string().into()],
            )
            .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, format!("could not reapply conflict {id}: {e}"), "Check the table's constraints against the losing version."));
        }
        None => {
            Spi::run_with_args(
                &format!("WITH r AS (SELECT * FROM jsonb_populate_record(NULL::{tbl}, $1::jsonb)) DELETE FROM {tbl} t USING r WHERE {}", key_cond("t.")),
                &[key.to_string().into()],
            )
            .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION, format!("could not reapply conflict {id}: {e}"), "Check the table's constraints."));
        }
    }
    Spi::run_with_args("UPDATE rbucardo.conflicts SET reapplied_at = now() WHERE id = $1", &[id.into()]).expect("marking the conflict");
    format!("reapplied the losing version of conflict {id} on {tbl}")
}
