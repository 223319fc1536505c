//! Conflict settings and the conflict log's repair function: strategies per sync and per
//! table, column merge, delta columns, and `conflict_reapply`.

use pgrx::prelude::*;

use crate::apply::conflicts::{check_strategy, check_unique_rename};
use crate::base::error::raise;
use crate::base::signals;

fn table_oid_name(tbl: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[tbl.into()]).ok().flatten().unwrap_or_default()
}

/// Overrides the conflict strategy for one table (NULL returns it to its sync's strategy).
#[pg_extern(sql = "CREATE FUNCTION rbucardo.set_table_strategy(tbl regclass, strategy text) RETURNS text
                   VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn set_table_strategy(tbl: pg_sys::Oid, strategy: Option<&str>) -> String {
    let strategy = strategy.map(check_strategy);
    let strategy = strategy.as_deref();
    Spi::run_with_args(
        "INSERT INTO rbucardo.table_option (relid, strategy) VALUES ($1, $2)
         ON CONFLICT (relid) DO UPDATE SET strategy = EXCLUDED.strategy",
        &[tbl.into(), strategy.into()],
    )
    .expect("recording the table strategy");
    // Appliers keep resolved tables per session: they must resolve this one again.
    signals::wake_local_worker_at_commit();
    format!("{} resolves conflicts by {}", table_oid_name(tbl), strategy.unwrap_or("its sync's strategy"))
}

/// Turns column-level merge on (the default) or off for one table.
#[pg_extern(sql = "CREATE FUNCTION rbucardo.set_column_merge(tbl regclass, enabled boolean) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn set_column_merge(tbl: pg_sys::Oid, enabled: bool) -> String {
    Spi::run_with_args(
        "INSERT INTO rbucardo.table_option (relid, merge) VALUES ($1, $2)
         ON CONFLICT (relid) DO UPDATE SET merge = EXCLUDED.merge",
        &[tbl.into(), enabled.into()],
    )
    .expect("recording the merge option");
    // Appliers keep resolved tables per session: they must resolve this one again.
    signals::wake_local_worker_at_commit();
    format!("column-level merge {} for {}", if enabled { "on" } else { "off" }, table_oid_name(tbl))
}

/// Whether a table's conflicts that discard nothing (clean column merges, delta columns adding
/// up, identical arrivals, rows both sides deleted) are logged in `rbucardo.conflicts` too, for
/// an auditor. By default they are only counted (`rbucardo.conflict_stats`).
#[pg_extern(sql = "CREATE FUNCTION rbucardo.set_conflict_logging(tbl regclass, all_outcomes boolean) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn set_conflict_logging(tbl: pg_sys::Oid, all_outcomes: bool) -> String {
    Spi::run_with_args(
        "INSERT INTO rbucardo.table_option (relid, log_merges) VALUES ($1, $2)
         ON CONFLICT (relid) DO UPDATE SET log_merges = EXCLUDED.log_merges",
        &[tbl.into(), all_outcomes.into()],
    )
    .expect("recording the logging option");
    // Appliers keep resolved tables per session: they must resolve this one again.
    signals::wake_local_worker_at_commit();
    format!(
        "{} logs {}",
        table_oid_name(tbl),
        if all_outcomes { "every conflict, clean merges included" } else { "conflicts that discarded something; clean merges are counted" }
    )
}

/// Makes a numeric column a delta column ('delta': concurrent changes add up, as stock counts
/// must) or an ordinary one again ('default').
#[pg_extern(sql = "CREATE FUNCTION rbucardo.set_column_strategy(tbl regclass, col text, strategy text) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn set_column_strategy(tbl: pg_sys::Oid, col: &str, strategy: &str) -> String {
    let numeric = Spi::get_one_with_args::<bool>(
        "SELECT a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype,
                               'float4'::regtype, 'float8'::regtype)
           FROM pg_attribute a WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
        &[tbl.into(), col.into()],
    )
    .ok()
    .flatten();
    match (strategy, numeric) {
        (_, None) => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN, format!("{} has no column {col}", table_oid_name(tbl)), "Name an existing column."),
        ("delta", Some(false)) => raise(PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH, format!("column {col} is not numeric"), "Delta columns add up changes: use them for integer or numeric counts."),
        ("delta", Some(true)) => {
            Spi::run_with_args(
                "INSERT INTO rbucardo.column_option (relid, col, strategy) VALUES ($1, $2, 'delta') ON CONFLICT DO NOTHING",
                &[tbl.into(), col.into()],
            )
            .expect("recording the column strategy");
        }
        ("default", _) => {
            Spi::run_with_args("DELETE FROM rbucardo.column_option WHERE relid = $1 AND col = $2", &[tbl.into(), col.into()]).expect("clearing the column strategy");
        }
        _ => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown column strategy {strategy:?}"), "Use 'delta' or 'default'."),
    }
    signals::wake_local_worker_at_commit();
    format!("column {col} of {} is now {strategy}", table_oid_name(tbl))
}

/// How collisions on a unique index other than the replica key are settled: 'park' (the
/// default: the colliding transaction waits in rbucardo.exceptions for an operator) or 'rename'
/// (the later of the two rows gives up its value, renamed to value~key, on every node, and
/// rbucardo.conflicts logs it). Set it on every node of the sync.
#[pg_extern(sql = "CREATE FUNCTION rbucardo.set_unique_strategy(idx regclass, strategy text) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn set_unique_strategy(idx: pg_sys::Oid, strategy: &str) -> String {
    let (relid, col) = check_unique_rename(idx);
    match strategy {
        "rename" => Spi::run_with_args(
            "INSERT INTO rbucardo.index_option (indexrelid, relid, strategy, col) VALUES ($1, $2, 'rename', $3)
             ON CONFLICT (indexrelid) DO UPDATE SET strategy = EXCLUDED.strategy, col = EXCLUDED.col",
            &[idx.into(), relid.into(), col.as_str().into()],
        ),
        "park" => Spi::run_with_args("DELETE FROM rbucardo.index_option WHERE indexrelid = $1", &[idx.into()]),
        _ => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown unique strategy {strategy:?}"), "Use 'park' (the default) or 'rename'."),
    }
    .expect("recording the unique strategy");
    signals::wake_local_worker_at_commit();
    match strategy {
        "rename" => format!("a collision on {} renames the later row's {col}", table_oid_name(idx)),
        _ => format!("a collision on {} parks the transaction", table_oid_name(idx)),
    }
}

/// Changes the conflict strategy of a sync.
#[pg_extern(volatile)]
fn set_conflict_strategy(sync: &str, strategy: &str) -> String {
    let strategy = check_strategy(strategy);
    let strategy = strategy.as_str();
    let n = Spi::connect_mut(|c| {
        c.update("UPDATE rbucardo.sync SET conflict_strategy = $2 WHERE name = $1", None, &[sync.into(), strategy.into()]).map(|t| t.len()).unwrap_or(0)
    });
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {sync}"), "See SELECT * FROM rbucardo.syncs.");
    }
    signals::wake_local_worker_at_commit();
    format!("sync {sync} now resolves conflicts by {strategy}")
}

/// Writes the losing version of a conflict back as a new local change, which replicates like
/// any other: the row (as it was in the losing version) is inserted or overwritten here, or
/// deleted when the losing version was a deletion.
#[pg_extern(volatile)]
fn conflict_reapply(id: i64) -> String {
    let row = Spi::get_three_with_args::<String, pgrx::JsonB, String>(
        "SELECT tbl, jsonb_build_object('key', key, 'local', local_version, 'remote', remote_version),
                CASE WHEN kind = 'unique_collision' THEN 'renamed' ELSE winner END
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
        "renamed" => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("conflict {id} is a unique collision, which keeps both rows"),
            "The later row was renamed (value~key) on every node; UPDATE its value if another one suits better.",
        ),
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
