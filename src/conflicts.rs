//! Conflicts: what happens when an incoming row change finds the local row other than the
//! sender saw it (inserted already, changed since, or gone). The rule comes from the sync the
//! table belongs to; whatever the rule, both versions go to `rbucardo.conflicts`, so no version
//! is ever discarded silently, and `conflict_reapply()` can bring a loser back.
//!
//! Owns the table `conflicts` (sql/conflicts.sql).

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::encoding::{decode_chunk, Op, RelDesc, Value};
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

/// A table's conflict rule (as named in add_sync, set_conflict_strategy or set_table_strategy)
/// and the sync it comes from, for the conflict log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub sync: Option<String>,
}

/// The arguments of a custom resolver function, in order (see `check_strategy`).
pub const CUSTOM_SIGNATURE: &str = "(kind text, tbl regclass, local jsonb, remote jsonb, local_origin text, local_hlc bigint, remote_origin text, remote_hlc bigint) RETURNS jsonb";
const CUSTOM_ARGS: &str = "(text,regclass,jsonb,jsonb,text,bigint,text,bigint)";

impl Rule {
    /// The table's own strategy (set_table_strategy), else that of a sync whose herd holds the
    /// table (the first by name); `source` when the table is in no sync.
    pub fn for_table(relid: pg_sys::Oid) -> Rule {
        let (name, sync) = Spi::get_two_with_args::<String, String>(
            "SELECT coalesce((SELECT strategy FROM rbucardo.table_option WHERE relid = $1), s.conflict_strategy), s.name
               FROM (SELECT NULL) dummy
               LEFT JOIN LATERAL (SELECT s.name, s.conflict_strategy FROM rbucardo.sync s JOIN rbucardo.herd_table t ON t.herd = s.herd
                                   WHERE t.relid = $1 ORDER BY s.name LIMIT 1) s ON true",
            &[relid.into()],
        )
        .unwrap_or((None, None));
        Rule { name: name.unwrap_or_else(|| "source".into()), sync }
    }

    /// The resolver function of a `custom:schema.function` rule.
    fn custom_function(&self) -> Option<&str> {
        self.name.strip_prefix("custom:")
    }

    /// Whether the incoming version wins. `latest` compares hybrid clocks, ties broken by node
    /// id, so every node decides alike; a local version of unknown clock (the row predates
    /// replication) loses.
    fn incoming_wins(&self, incoming: (i64, i32), local: Option<(i64, i32)>) -> bool {
        match self.name.as_str() {
            "target" | "skip" => false,
            "latest" => local.is_none_or(|l| incoming > l),
            "source" | "abort" => true,
            // A priority list of node names: the version made by the node named first wins;
            // a local version of unknown origin loses.
            list => {
                let rank = |node: i32| -> usize {
                    let name = node_name(node);
                    list.split(',').position(|n| Some(n.trim()) == name.as_deref()).unwrap_or(usize::MAX)
                };
                local.is_none_or(|l| rank(incoming.1) < rank(l.1) || (rank(incoming.1) == rank(l.1) && incoming > l))
            }
        }
    }
}

fn node_name(node: i32) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT name FROM rbucardo.db WHERE node_id = $1 UNION ALL SELECT name FROM rbucardo.node WHERE node_id = $1 LIMIT 1",
        &[node.into()],
    )
    .ok()
    .flatten()
}

/// A conflict strategy is one of the named rules, a priority list of node names, or
/// `custom:function` naming a resolver function with the signature `CUSTOM_SIGNATURE`.
/// Returns the strategy as it is stored: a custom function's name schema-qualified, so that
/// the apply (which runs with its own search_path) finds the same function.
pub fn check_strategy(strategy: &str) -> String {
    if crate::catalog::STRATEGIES.contains(&strategy) {
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
                crate::catalog::STRATEGIES.join(", "),
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

/// Merges two changes of one row that touched different columns: the sender's changed
/// columns on top of the local row. Columns changed on both sides merge only when they are
/// delta columns (local + new - old); otherwise there is no merge.
pub fn merge(local: &[Value], old: &[Value], new: &[Value], delta: &[bool]) -> Option<Vec<Value>> {
    let mut merged = local.to_vec();
    for i in 0..new.len() {
        let theirs = new[i] != old[i];
        let mine = local[i] != old[i];
        match (theirs, mine) {
            (false, _) => {}
            (true, false) => merged[i] = new[i].clone(),
            // Two sales of one item each both leave 99 of 100: a delta column adds them up even
            // when the values happen to be equal.
            (true, true) if delta[i] => {
                let (Some(l), Some(n), Some(o)) = (&local[i], &new[i], &old[i]) else { return None };
                merged[i] = Spi::get_one_with_args::<String>(
                    "SELECT ($1::numeric + $2::numeric - $3::numeric)::text",
                    &[l.as_str().into(), n.as_str().into(), o.as_str().into()],
                )
                .ok()
                .flatten();
            }
            (true, true) if local[i] == new[i] => {}
            (true, true) => return None,
        }
    }
    Some(merged)
}

/// Writes one row of the conflict log.
fn record(c: &Conflict, rule: &str, winner: &str) {
    Spi::run_with_args(
        "INSERT INTO rbucardo.conflicts (sync, tbl, key, kind, local_version, remote_version, local_origin, local_hlc,
                                         remote_origin, remote_hlc, rule, winner)
         VALUES ($1, $2, $3::jsonb, $4, $5::jsonb, $6::jsonb, $7, $8, $9, $10, $11, $12)",
        &[
            c.sync.into(),
            c.table.into(),
            c.key.to_string().into(),
            c.kind.as_str().into(),
            c.local.as_ref().map(|v| v.to_string()).into(),
            c.remote.as_ref().map(|v| v.to_string()).into(),
            c.local_clock.map(|l| l.1).into(),
            c.local_clock.map(|l| l.0).into(),
            c.origin.into(),
            c.hlc.into(),
            rule.into(),
            winner.into(),
        ],
    )
    .expect("recording a conflict");
}

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
    format!("column-level merge {} for {}", if enabled { "on" } else { "off" }, table_oid_name(tbl))
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
    format!("column {col} of {} is now {strategy}", table_oid_name(tbl))
}

/// Column-level merge setting and delta columns of a table, in the remote column order.
pub fn column_rules(relid: pg_sys::Oid, desc: &RelDesc) -> (bool, Vec<bool>) {
    let merge = Spi::get_one_with_args::<bool>("SELECT merge FROM rbucardo.table_option WHERE relid = $1", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or(true);
    let deltas: Vec<String> = Spi::connect(|c| {
        c.select("SELECT col::text FROM rbucardo.column_option WHERE relid = $1 AND strategy = 'delta'", None, &[relid.into()])
            .map(|t| t.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
    });
    (merge, desc.columns.iter().map(|c| deltas.contains(c)).collect())
}

/// A row's replica key as a JSON object of column name to text value: the same on every node.
pub fn key_json(desc: &RelDesc, row: &[Value]) -> serde_json::Value {
    serde_json::Value::Object(
        desc.key
            .iter()
            .map(|&k| (desc.columns[k as usize].clone(), row[k as usize].clone().map_or(serde_json::Value::Null, serde_json::Value::String)))
            .collect(),
    )
}

/// The clocks of the local versions of rows, for the `latest` rule: the last change to each row
/// still in the change log (read once per batch, when the first conflict needs it, then kept up
/// to date as the batch applies), else `rbucardo.row_clock`.
pub struct Clocks {
    me: i32,
    pending: Option<HashMap<(String, String, String), (i64, i32)>>,
}

impl Clocks {
    pub fn new(me: i32) -> Clocks {
        Clocks { me, pending: None }
    }

    fn load(&mut self) -> &mut HashMap<(String, String, String), (i64, i32)> {
        let me = self.me;
        self.pending.get_or_insert_with(|| logged_clocks(me, "true", &[]))
    }

    /// The clock of the local version of the row with this key.
    pub fn local(&mut self, relid: pg_sys::Oid, desc: &RelDesc, key: &serde_json::Value) -> Option<(i64, i32)> {
        let k = (desc.schema.clone(), desc.name.clone(), key.to_string());
        if let Some(c) = self.load().get(&k) {
            return Some(*c);
        }
        Spi::get_two_with_args::<i64, i32>(
            "SELECT hlc, origin FROM rbucardo.row_clock WHERE relid = $1 AND key = $2",
            &[relid.into(), k.2.as_str().into()],
        )
        .ok()
        .and_then(|(h, o)| Some((h?, o?)))
    }

    /// Records an applied change's clock for its row. The larger clock stays: under `latest` the
    /// version with the larger clock is the one the row holds.
    pub fn note(&mut self, desc: &RelDesc, row: &[Value], clock: (i64, i32)) {
        if let Some(map) = self.pending.as_mut() {
            let slot = map.entry((desc.schema.clone(), desc.name.clone(), key_json(desc, row).to_string())).or_insert(clock);
            *slot = (*slot).max(clock);
        }
    }
}

/// The latest clock of every row changed by the change log rows that `where_sql` selects.
/// The largest clock per row: the log also keeps changes that lost here, for forwarding, and
/// the row holds the version with the largest clock.
fn logged_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) -> HashMap<(String, String, String), (i64, i32)> {
    let mut latest: HashMap<(String, String, String), (i64, i32)> = HashMap::new();
    Spi::connect(|c| {
        let sql = format!("SELECT data, hlc, origin FROM rbucardo.change_log WHERE {where_sql}");
        for row in c.select(sql.as_str(), None, args).expect("reading the change log") {
            let data = row.get::<Vec<u8>>(1).unwrap().unwrap_or_default();
            let clock = (row.get::<i64>(2).unwrap().unwrap_or(0), row.get::<i32>(3).unwrap().unwrap_or(me));
            if let Ok(chunk) = decode_chunk(&data) {
                for ch in &chunk.changes {
                    let desc = &chunk.relations[ch.rel as usize];
                    if let Some(r) = ch.new.as_ref().or(ch.old.as_ref()) {
                        let slot = latest.entry((desc.schema.clone(), desc.name.clone(), key_json(desc, r).to_string())).or_insert(clock);
                        *slot = (*slot).max(clock);
                    }
                }
            }
        }
    });
    latest
}

/// Keeps the clocks of rows whose changes are about to leave the change log (`where_sql`
/// selects the change log rows being trimmed).
pub fn keep_row_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    let latest = logged_clocks(me, where_sql, args);
    if latest.is_empty() {
        return;
    }
    let (mut schemas, mut names, mut keys, mut hlcs, mut origins) = (vec![], vec![], vec![], vec![], vec![]);
    for ((s, n, k), (h, o)) in latest {
        schemas.push(s);
        names.push(n);
        keys.push(k);
        hlcs.push(h);
        origins.push(o);
    }
    Spi::run_with_args(
        "INSERT INTO rbucardo.row_clock (relid, key, hlc, origin)
         SELECT to_regclass(format('%I.%I', s, n)), k, h, o
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[]) AS u(s, n, k, h, o)
          WHERE to_regclass(format('%I.%I', s, n)) IS NOT NULL
         ON CONFLICT (relid, key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin
          WHERE (EXCLUDED.hlc, EXCLUDED.origin) > (row_clock.hlc, row_clock.origin)",
        &[schemas.into(), names.into(), keys.into(), hlcs.into(), origins.into()],
    )
    .expect("keeping row clocks");
}

/// One conflict, with both versions as JSON objects of column name to text value.
pub struct Conflict<'a> {
    pub sync: Option<&'a str>,
    pub table: &'a str,
    pub key: serde_json::Value,
    pub kind: Kind,
    pub local: Option<serde_json::Value>,
    pub remote: Option<serde_json::Value>,
    /// Clock and origin node of the local version, when known.
    pub local_clock: Option<(i64, i32)>,
    pub origin: i32,
    pub hlc: i64,
}

/// How one table's conflicts are resolved; looked up once per batch for each table the batch
/// touches, on either apply path (executor or SQL).
pub struct Policy {
    pub relid: pg_sys::Oid,
    /// Schema-qualified, quoted name, as the conflict log shows it.
    pub table: String,
    pub rule: Rule,
    /// Column-level merge of non-overlapping changes (on unless turned off for the table).
    pub merge: bool,
    /// Delta columns, in the remote column order.
    pub delta: Vec<bool>,
}

impl Policy {
    pub fn for_table(relid: pg_sys::Oid, desc: &RelDesc) -> Policy {
        let (merge, delta) = column_rules(relid, desc);
        let table = format!("{}.{}", pgrx::spi::quote_identifier(&desc.schema), pgrx::spi::quote_identifier(&desc.name));
        Policy { relid, table, rule: Rule::for_table(relid), merge, delta }
    }
}

/// The node and hybrid clock of the remote transaction a row change belongs to.
#[derive(Clone, Copy)]
pub struct Origin {
    pub node: i32,
    pub hlc: i64,
}

/// What the apply does with one incoming row change, once conflicts are settled.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the local row as it is (or absent).
    Nothing,
    /// The incoming version lost to the local one: leave the local row as it is, and do not
    /// forward the change, so that nodes behind this one end with what this node kept.
    Reject,
    /// Make the row hold these values: update the local row found, else insert it.
    Write(Vec<Value>),
    /// Delete the local row found (nothing when there is none).
    Delete,
}

/// Which version a rule keeps.
enum Outcome {
    Local,
    Remote,
    /// A row made by a custom function (a merge of both, or anything else it chose).
    Row(Vec<Value>),
    Delete,
}

/// Compares an incoming row change with the local row (`local`, as found by the change's key,
/// in the sender's canonical text form) and decides what to do. The same for both apply paths,
/// so every table gets the same detection, merge, delta and rules. Conflicts and merges are
/// logged here.
#[allow(clippy::too_many_arguments)]
pub fn decide(p: &Policy, desc: &RelDesc, op: Op, local: Option<&[Value]>, old: Option<&[Value]>, new: Option<&[Value]>, origin: Origin, clocks: &mut Clocks) -> Action {
    let to_action = |outcome: Outcome, incoming: Option<&[Value]>| match outcome {
        Outcome::Local => Action::Reject,
        Outcome::Remote => incoming.map_or(Action::Delete, |r| Action::Write(r.to_vec())),
        Outcome::Row(r) => Action::Write(r),
        Outcome::Delete => Action::Delete,
    };
    match op {
        Op::Insert => {
            let new = new.expect("insert has a new image");
            match local {
                None => Action::Write(new.to_vec()),
                Some(l) if l == new => Action::Nothing,
                Some(l) => to_action(resolve(p, desc, Kind::InsertExists, Some(l), Some(new), new, origin, clocks), Some(new)),
            }
        }
        Op::Update => {
            let (old, new) = (old.expect("update has an old image"), new.expect("update has a new image"));
            match local {
                None => to_action(resolve(p, desc, Kind::UpdateMissing, None, Some(new), old, origin, clocks), Some(new)),
                Some(l) if l == old => Action::Write(new.to_vec()),
                Some(l) if l == new && !p.delta.iter().any(|d| *d) => Action::Nothing,
                Some(l) => {
                    // Both sides changed the row. If they changed different columns (or only
                    // delta columns in common), both changes survive.
                    let merged = if p.merge { merge(l, old, new, &p.delta) } else { None };
                    match merged {
                        Some(row) => {
                            let c = conflict(p, desc, Kind::UpdateDiffers, Some(l), Some(new), old, origin, None);
                            record(&c, "merge", "merged");
                            if row != l { Action::Write(row) } else { Action::Nothing }
                        }
                        None if l == new => Action::Nothing,
                        None => to_action(resolve(p, desc, Kind::UpdateDiffers, Some(l), Some(new), old, origin, clocks), Some(new)),
                    }
                }
            }
        }
        Op::Delete => {
            let old = old.expect("delete has an old image");
            match local {
                None => {
                    resolve(p, desc, Kind::DeleteMissing, None, None, old, origin, clocks);
                    Action::Nothing
                }
                Some(l) if l == old => Action::Delete,
                Some(l) => to_action(resolve(p, desc, Kind::DeleteDiffers, Some(l), None, old, origin, clocks), None),
            }
        }
        Op::Truncate | Op::Ddl => unreachable!("not a row change"),
    }
}

#[allow(clippy::too_many_arguments)]
fn conflict<'a>(p: &'a Policy, desc: &RelDesc, kind: Kind, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin, local_clock: Option<(i64, i32)>) -> Conflict<'a> {
    Conflict {
        sync: p.rule.sync.as_deref(),
        table: &p.table,
        key: key_json(desc, key_of),
        kind,
        local: local.map(|r| row_json(desc, r)),
        remote: remote.map(|r| row_json(desc, r)),
        local_clock,
        origin: origin.node,
        hlc: origin.hlc,
    }
}

/// A row as a JSON object of column name to text value.
pub fn row_json(desc: &RelDesc, row: &[Value]) -> serde_json::Value {
    serde_json::Value::Object(
        desc.columns.iter().zip(row).map(|(c, v)| (c.clone(), v.clone().map_or(serde_json::Value::Null, serde_json::Value::String))).collect(),
    )
}

/// Decides a conflict by the table's rule and records it. `abort` stops the whole batch with
/// an error: the stream from that peer halts (its status shows the error) until the operator
/// changes the strategy or the data.
#[allow(clippy::too_many_arguments)]
fn resolve(p: &Policy, desc: &RelDesc, kind: Kind, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin, clocks: &mut Clocks) -> Outcome {
    let key = key_json(desc, key_of);
    let local_clock = clocks.local(p.relid, desc, &key);
    let c = conflict(p, desc, kind, local, remote, key_of, origin, local_clock);
    let rule = &p.rule;
    if rule.name == "abort" {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("conflict ({}) on {} key {} from node {}; the sync's strategy is abort", kind.as_str(), c.table, c.key, c.origin),
            "Nothing of this batch was applied. Fix the row or change the strategy (rbucardo.set_conflict_strategy), and the stream resumes.",
        );
    }
    if kind == Kind::DeleteMissing {
        // Both sides deleted the row: nothing is left to choose between.
        record(&c, &rule.name, "none");
        return Outcome::Local;
    }
    let outcome = match rule.custom_function() {
        Some(func) => call_custom(func, &c, desc, local, remote),
        None if rule.incoming_wins((c.hlc, c.origin), local_clock) => Outcome::Remote,
        None => Outcome::Local,
    };
    // A row equal to one of the versions is that version winning.
    let outcome = match outcome {
        Outcome::Row(r) if Some(r.as_slice()) == local => Outcome::Local,
        Outcome::Row(r) if Some(r.as_slice()) == remote => Outcome::Remote,
        Outcome::Delete if local.is_none() => Outcome::Local,
        Outcome::Delete if remote.is_none() => Outcome::Remote,
        other => other,
    };
    let winner = match outcome {
        Outcome::Local => "local",
        Outcome::Remote => "remote",
        Outcome::Row(_) => "merged",
        // Both versions existed and the custom function deleted the row.
        Outcome::Delete => "none",
    };
    record(&c, &rule.name, winner);
    outcome
}

/// Asks a custom resolver function which version to keep. Its answer is a jsonb string
/// ('local', 'remote', 'delete') or a jsonb object: the row to keep, columns it leaves out
/// taken from the incoming version (or the local one for an incoming delete).
fn call_custom(func: &str, c: &Conflict, desc: &RelDesc, local: Option<&[Value]>, remote: Option<&[Value]>) -> Outcome {
    let origin_name = |node: Option<i32>| node.and_then(node_name);
    let answer = Spi::get_one_with_args::<pgrx::JsonB>(
        &format!("SELECT {func}($1, $2::text::regclass, $3::jsonb, $4::jsonb, $5, $6, $7, $8)"),
        &[
            c.kind.as_str().into(),
            c.table.into(),
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
            format!("custom conflict function {func} {why} for a {} conflict on {} key {}", c.kind.as_str(), c.table, c.key),
            "Return the row to keep as a jsonb object, or one of the jsonb strings 'local', 'remote', 'delete' (e.g. to_jsonb('remote'::text)). The stream from this peer waits until the function is fixed.",
        )
    };
    match answer {
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "local" => Outcome::Local,
            "remote" => Outcome::Remote,
            "delete" => Outcome::Delete,
            _ => bad(format!("returned the string {s:?}")),
        },
        Some(serde_json::Value::Object(o)) => {
            if let Some(unknown) = o.keys().find(|k| !desc.columns.contains(k)) {
                bad(format!("returned a row with the unknown column {unknown:?}"));
            }
            let base = remote.or(local).expect("a conflict has at least one version");
            let row = desc
                .columns
                .iter()
                .zip(base)
                .map(|(col, v)| match o.get(col) {
                    None => v.clone(),
                    Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect();
            Outcome::Row(row)
        }
        None => bad("returned NULL".into()),
        Some(other) => bad(format!("returned {other}")),
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
