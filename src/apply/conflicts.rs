//! Conflicts on this node: loading a table's [`Policy`] for the pure decision
//! (src/apply/decide.rs), answering what the decision asks ([`NodeEnv`]: row clocks, custom
//! resolver functions), and writing the conflict log.
//!
//! Owns the table `conflicts` (sql/conflicts.sql) and reads `table_option`, `column_option`,
//! `index_option`.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::apply::decide::{Answer, Conflict, Env, Kind, Logged, Policy, Strategy, UniqueRename, STRATEGIES};
use crate::base::error::raise;
use crate::base::plans;
use crate::base::wire::RelDesc;
use crate::log::clocks::Clocks;

/// The arguments of a custom resolver function, in order (see `check_strategy`).
pub const CUSTOM_SIGNATURE: &str = "(kind text, tbl regclass, local jsonb, remote jsonb, local_origin text, local_hlc bigint, remote_origin text, remote_hlc bigint) RETURNS jsonb";
const CUSTOM_ARGS: &str = "(text,regclass,jsonb,jsonb,text,bigint,text,bigint)";

/// Loads how a table's conflicts are resolved: its own strategy (set_table_strategy), else that
/// of a sync whose herd holds the table (the first by name), `source` when it is in no sync;
/// column merge and delta columns; the names of the nodes, for priority lists.
pub fn policy_for(relid: pg_sys::Oid, desc: &RelDesc) -> Policy {
    let (name, sync) = plans::two::<String, String>(
        "SELECT coalesce((SELECT strategy FROM rbucardo.table_option WHERE relid = $1), s.conflict_strategy), s.name
           FROM (SELECT NULL) dummy
           LEFT JOIN LATERAL (SELECT s.name, s.conflict_strategy FROM rbucardo.sync s JOIN rbucardo.herd_table t ON t.herd = s.herd
                               WHERE t.relid = $1 ORDER BY s.name LIMIT 1) s ON true",
        &[pg_sys::OIDOID],
        &[relid.into()],
    );
    let rule_name = name.unwrap_or_else(|| "source".into());
    let (merge, delta) = column_rules(relid, desc);
    let log_merges = plans::one::<bool>("SELECT log_merges FROM rbucardo.table_option WHERE relid = $1", &[pg_sys::OIDOID], &[relid.into()]).unwrap_or(false);
    let table = format!("{}.{}", pgrx::spi::quote_identifier(&desc.schema), pgrx::spi::quote_identifier(&desc.name));
    let renames = unique_renames(relid, desc);
    Policy { table, strategy: Strategy::parse(&rule_name), rule_name, sync, merge, delta, node_names: node_names(), log_merges, renames }
}

/// The table's unique indexes set to `rename`, with their columns in the remote column order;
/// an index with a column the peer does not send is left to park.
fn unique_renames(relid: pg_sys::Oid, desc: &RelDesc) -> Vec<UniqueRename> {
    let rows: Vec<(String, Vec<String>, String)> = plans::run(
            "SELECT o.indexrelid::pg_catalog.regclass::text,
                    ARRAY(SELECT a.attname::text FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) k
                            JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k),
                    o.col::text
               FROM rbucardo.index_option o JOIN pg_catalog.pg_index i ON i.indexrelid = o.indexrelid
              WHERE o.relid = $1 AND o.strategy = 'rename' AND i.indisunique AND i.indisvalid AND i.indimmediate
              ORDER BY 1",
        &[pg_sys::OIDOID],
        &[relid.into()],
        |t| t.filter_map(|r| Some((r.get::<String>(1).ok()??, r.get::<Vec<String>>(2).ok()??, r.get::<String>(3).ok()??))).collect(),
    );
    let at = |name: &str| desc.columns.iter().position(|c| c == name);
    rows.into_iter()
        .filter_map(|(index, cols, col)| Some(UniqueRename { index, columns: cols.iter().map(|c| at(c)).collect::<Option<_>>()?, renamed: at(&col)? }))
        .collect()
}

/// Checks that a unique index can settle its collisions by renaming, and returns its table and
/// the column renamed: the first text column of the index. Not the replica key (collisions on
/// it are row conflicts), no expressions, no predicate (the lookup matches plain columns).
pub fn check_unique_rename(index: pg_sys::Oid) -> (pg_sys::Oid, String) {
    let found = Spi::get_three_with_args::<pg_sys::Oid, bool, String>(
        "SELECT i.indrelid, i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL,
                (SELECT a.attname::text FROM unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) WITH ORDINALITY k(attnum, o)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                   JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                  WHERE t.typcategory = 'S' AND t.oid <> 'pg_catalog.bpchar'::pg_catalog.regtype ORDER BY k.o LIMIT 1)
           FROM pg_catalog.pg_index i WHERE i.indexrelid = $1",
        &[index.into()],
    )
    .unwrap_or((None, None, None));
    let name = Spi::get_one_with_args::<String>("SELECT $1::pg_catalog.regclass::text", &[index.into()]).ok().flatten().unwrap_or_default();
    let (Some(relid), Some(plain)) = (found.0, found.1) else {
        raise(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("{name} is not an index"), "Name a unique index, e.g. 'users_login_key'.");
    };
    if !plain {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{name} is not a plain unique index"),
            "Only immediate (not deferrable) unique indexes on plain columns, without a WHERE clause, can rename: a deferred check \
             cannot be looked up before the write. Others park the colliding transaction.",
        );
    }
    let is_key = Spi::get_one_with_args::<bool>(
        "SELECT (i.indkey::int2[])[0:i.indnkeyatts - 1] = ARRAY(SELECT a.attnum FROM unnest($2::text[]) WITH ORDINALITY k(name, o)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attname = k.name ORDER BY k.o)::int2[]
           FROM pg_catalog.pg_index i WHERE i.indexrelid = $1",
        &[index.into(), crate::base::node::replica_key(relid).unwrap_or_default().into()],
    )
    .ok()
    .flatten();
    if is_key == Some(true) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{name} is the table's replica key"),
            "Two versions of one key are a row conflict, resolved by the conflict strategy (rbucardo.set_table_strategy).",
        );
    }
    let Some(col) = found.2 else {
        raise(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("{name} has no text column to rename"),
            "Renaming appends the row's key to a text value (login -> login~id); an index without a text column parks the colliding transaction.",
        );
    };
    (relid, col)
}

/// Every node name this node knows, by node id.
fn node_names() -> HashMap<i32, String> {
    plans::run(
        "SELECT node_id, name FROM rbucardo.db WHERE node_id IS NOT NULL UNION ALL SELECT node_id, name FROM rbucardo.node",
        &[],
        &[],
        |t| t.filter_map(|r| Some((r.get::<i32>(1).ok()??, r.get::<String>(2).ok()??))).collect(),
    )
}

/// Column-level merge setting and delta columns of a table, in the remote column order.
fn column_rules(relid: pg_sys::Oid, desc: &RelDesc) -> (bool, Vec<bool>) {
    let merge = plans::one::<bool>("SELECT merge FROM rbucardo.table_option WHERE relid = $1", &[pg_sys::OIDOID], &[relid.into()]).unwrap_or(true);
    let deltas: Vec<String> = plans::run(
        "SELECT col::text FROM rbucardo.column_option WHERE relid = $1 AND strategy = 'delta'",
        &[pg_sys::OIDOID],
        &[relid.into()],
        |t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect(),
    );
    (merge, desc.columns.iter().map(|c| deltas.contains(c)).collect())
}


/// Conflicts of one batch, counted by table, kind and outcome: written to `conflict_counts`
/// once per batch, so a catch-up full of merges pays a few upserts, not one per row.
#[derive(Default)]
pub struct Tally(HashMap<(String, &'static str, &'static str), i64>);

impl Tally {
    pub fn count(&mut self, table: &str, kind: Kind, outcome: &'static str) {
        *self.0.entry((table.to_string(), kind.as_str(), outcome)).or_insert(0) += 1;
    }

    /// Adds another tally (of a remote transaction that applied) to this one.
    pub fn absorb(&mut self, other: Tally) {
        for (k, n) in other.0 {
            *self.0.entry(k).or_insert(0) += n;
        }
    }

    pub fn write(self) {
        if self.0.is_empty() {
            return;
        }
        let (mut tbls, mut kinds, mut outcomes, mut ns) = (vec![], vec![], vec![], vec![]);
        // In key order: two appliers upserting the same counters lock them in the same order.
        let mut entries: Vec<_> = self.0.into_iter().collect();
        entries.sort();
        for ((t, k, o), n) in entries {
            tbls.push(t);
            kinds.push(k.to_string());
            outcomes.push(o.to_string());
            ns.push(n);
        }
        Spi::run_with_args(
            "INSERT INTO rbucardo.conflict_counts AS c (tbl, kind, outcome, n)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (tbl, kind, outcome) DO UPDATE SET n = c.n + EXCLUDED.n, last_at = pg_catalog.now()",
            &[tbls.into(), kinds.into(), outcomes.into(), ns.into()],
        )
        .expect("counting conflicts");
    }
}

/// Deletes conflict log entries older than `days`, at most `limit` of them; returns how many.
pub fn prune(days: i32, limit: i64) -> i64 {
    Spi::connect_mut(|c| {
        c.update(
            "DELETE FROM rbucardo.conflicts WHERE id IN (
                 SELECT id FROM rbucardo.conflicts WHERE at < pg_catalog.now() - pg_catalog.make_interval(days => $1) ORDER BY at LIMIT $2)",
            None,
            &[days.into(), limit.into()],
        )
        .map(|t| t.len() as i64)
        .unwrap_or(0)
    })
}

/// Writes one row of the conflict log.
pub fn record(policy: &Policy, logged: &Logged) {
    let c = &logged.conflict;
    Spi::run_with_args(
        "INSERT INTO rbucardo.conflicts (sync, tbl, key, kind, local_version, remote_version, local_origin, local_hlc,
                                         remote_origin, remote_hlc, rule, winner)
         VALUES ($1, $2, $3::pg_catalog.jsonb, $4, $5::pg_catalog.jsonb, $6::pg_catalog.jsonb, $7, $8, $9, $10, $11, $12)",
        &[
            policy.sync.as_deref().into(),
            policy.table.as_str().into(),
            c.key.to_string().into(),
            c.kind.as_str().into(),
            c.local.as_ref().map(|v| v.to_string()).into(),
            c.remote.as_ref().map(|v| v.to_string()).into(),
            c.local_clock.map(|l| l.1).into(),
            c.local_clock.map(|l| l.0).into(),
            c.origin.into(),
            c.hlc.into(),
            logged.rule.as_str().into(),
            logged.winner.into(),
        ],
    )
    .expect("recording a conflict");
}

/// What the decision asks of this node: row clocks from the log, custom functions by SPI.
pub struct NodeEnv<'a> {
    pub clocks: &'a mut Clocks,
}

impl Env for NodeEnv<'_> {
    fn local_clock(&mut self, desc: &RelDesc, key: &serde_json::Value, contested: Option<&[usize]>) -> Option<(i64, i32)> {
        let names: Option<Vec<&str>> = contested.map(|c| c.iter().map(|&i| desc.columns[i].as_str()).collect());
        self.clocks.local(desc, key, names.as_deref())
    }

    /// Asks a custom resolver function which version to keep. Its answer is a jsonb string
    /// ('local', 'remote', 'delete') or a jsonb object: the row to keep.
    fn custom(&mut self, func: &str, p: &Policy, c: &Conflict) -> Answer {
        let origin_name = |node: Option<i32>| node.and_then(|n| p.node_names.get(&n).cloned());
        let answer = Spi::get_one_with_args::<pgrx::JsonB>(
            &format!("SELECT {func}($1, $2::pg_catalog.text::pg_catalog.regclass, $3::pg_catalog.jsonb, $4::pg_catalog.jsonb, $5, $6, $7, $8)"),
            &[
                c.kind.as_str().into(),
                p.table.as_str().into(),
                c.local.as_ref().map(|v| v.to_string()).into(),
                c.remote.as_ref().map(|v| v.to_string()).into(),
                origin_name(c.local_clock.map(|l| l.1)).into(),
                c.local_clock.map(|l| l.0).into(),
                origin_name(Some(c.origin)).into(),
                c.hlc.into(),
            ],
        )
        .ok()
        .flatten()
        .map(|j| j.0);
        let bad = |why: String| -> ! {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                format!("custom conflict function {func} {why} for a {} conflict on {} key {}", c.kind.as_str(), p.table, c.key),
                "Return the row to keep as a jsonb object, or one of the jsonb strings 'local', 'remote', 'delete' (e.g. to_jsonb('remote'::text)). The stream from this peer waits until the function is fixed.",
            )
        };
        match answer {
            Some(serde_json::Value::String(s)) => match s.as_str() {
                "local" => Answer::Local,
                "remote" => Answer::Remote,
                "delete" => Answer::Delete,
                _ => bad(format!("returned the string {s:?}")),
            },
            Some(serde_json::Value::Object(o)) => {
                if let Some(unknown) = o.keys().find(|k| !c.remote.as_ref().or(c.local.as_ref()).is_some_and(|r| r.get(k.as_str()).is_some())) {
                    bad(format!("returned a row with the unknown column {unknown:?}"));
                }
                Answer::Row(o)
            }
            None => bad("returned NULL".into()),
            Some(other) => bad(format!("returned {other}")),
        }
    }
}

/// A conflict strategy is one of the named rules, a priority list of node names, or
/// `custom:function` naming a resolver function with the signature `CUSTOM_SIGNATURE`.
/// Returns the strategy as it is stored: a custom function's name schema-qualified, so that
/// the apply (which runs with its own search_path) finds the same function.
pub fn check_strategy(strategy: &str) -> String {
    if STRATEGIES.contains(&strategy) {
        return strategy.to_string();
    }
    if let Some(func) = strategy.strip_prefix("custom:") {
        return format!("custom:{}", check_custom_function(func.trim()));
    }
    let unknown: Vec<&str> = strategy
        .split(',')
        .map(str::trim)
        .filter(|n| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1 UNION ALL SELECT 1 FROM rbucardo.node WHERE name = $1)",
                &[(*n).into()],
            )
            .ok()
            .flatten()
                != Some(true)
        })
        .collect();
    if !unknown.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown conflict strategy {strategy:?}"),
            format!(
                "Use one of {}, a priority list of node names such as 'main,branch1' (unknown here: {}), or 'custom:schema.function'.",
                STRATEGIES.join(", "),
                unknown.join(", ")
            ),
        );
    }
    strategy.to_string()
}

/// Finds a custom resolver function and checks its signature; returns its qualified name.
fn check_custom_function(func: &str) -> String {
    let hint = format!("Create it as CREATE FUNCTION {} {CUSTOM_SIGNATURE} (see docs/sql-reference.md, Conflicts).", if func.is_empty() { "my_schema.resolve" } else { func });
    let found = Spi::get_two_with_args::<String, String>(
        "SELECT format('%I.%I', n.nspname, p.proname), format_type(p.prorettype, NULL)
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE p.oid = to_regprocedure($1 || $2)",
        &[func.into(), CUSTOM_ARGS.into()],
    );
    // A malformed name makes PostgreSQL raise its own "invalid name syntax" here.
    let (name, returns) = match found {
        Ok((Some(name), Some(returns))) => (name, returns),
        _ => {
            let exists = !func.is_empty()
                && Spi::get_one_with_args::<bool>(
                    "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = (parse_ident($1))[cardinality(parse_ident($1))])",
                    &[func.into()],
                )
                    .ok()
                    .flatten()
                    == Some(true);
            let what = if exists { "has the wrong arguments" } else { "does not exist" };
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION, format!("custom conflict function {func:?} {what}"), hint);
        }
    };
    if returns != "jsonb" {
        raise(PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION, format!("custom conflict function {name} returns {returns}, not jsonb"), hint);
    }
    name
}

