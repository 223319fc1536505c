//! The conflict decision: what to do with one incoming row change, given the local row.
//!
//! A pure function of the table's [`Policy`] (loaded once per batch) and the row images; no
//! SPI. What it cannot know by itself (the clock of the local version, the answer of a custom
//! resolver function) it asks through [`Env`], which the apply paths implement and the unit
//! tests below fake. Every node runs the same decision on the same inputs, so every node keeps
//! the same version; the losing version goes to the conflict log (through the [`Logged`] it
//! returns), never away silently.
//!
//! Delta columns (stock counts) always add up, whoever wins the rest of the row: a sale made on
//! a branch is never lost because the same product's price changed on main meanwhile.

use std::collections::HashMap;

use crate::base::wire::{Op, RelDesc, Value};

/// Which way a conflict went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    InsertExists,
    UpdateDiffers,
    UpdateMissing,
    DeleteDiffers,
    DeleteMissing,
    /// Two rows hold one value of a unique index that is not the replica key.
    UniqueCollision,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InsertExists => "insert_exists",
            Kind::UpdateDiffers => "update_differs",
            Kind::UpdateMissing => "update_missing",
            Kind::DeleteDiffers => "delete_differs",
            Kind::DeleteMissing => "delete_missing",
            Kind::UniqueCollision => "unique_collision",
        }
    }
}

/// Named strategies accepted by add_sync and set_conflict_strategy; their meaning is in
/// docs/sql-reference.md. Besides these: a priority list of node names, or `custom:function`.
pub const STRATEGIES: &[&str] = &["latest", "source", "target", "skip", "abort"];

/// A conflict rule, parsed from its stored text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// The version with the larger hybrid clock wins, ties broken by node id.
    Latest,
    /// The incoming version wins.
    Source,
    /// The local version wins.
    Target,
    /// The local version wins (the incoming change is skipped).
    Skip,
    /// The batch stops with an error until the operator acts.
    Abort,
    /// The version made by the node named first wins; then `latest`.
    Priority(Vec<String>),
    /// A resolver function, schema-qualified.
    Custom(String),
}

impl Strategy {
    /// Parses a stored strategy (checked when it was set).
    pub fn parse(text: &str) -> Strategy {
        match text {
            "latest" => Strategy::Latest,
            "source" => Strategy::Source,
            "target" => Strategy::Target,
            "skip" => Strategy::Skip,
            "abort" => Strategy::Abort,
            other => match other.strip_prefix("custom:") {
                Some(func) => Strategy::Custom(func.to_string()),
                None => Strategy::Priority(other.split(',').map(|n| n.trim().to_string()).collect()),
            },
        }
    }
}

/// How one table's conflicts are resolved: everything the decision needs, loaded once.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Schema-qualified, quoted name, as the conflict log shows it.
    pub table: String,
    /// The rule as stored (for the conflict log) and parsed.
    pub rule_name: String,
    pub strategy: Strategy,
    /// The sync the rule comes from, for the conflict log.
    pub sync: Option<String>,
    /// Column-level merge of non-overlapping changes (on unless turned off for the table).
    pub merge: bool,
    /// Delta columns, in the remote column order.
    pub delta: Vec<bool>,
    /// Node names by node id, for priority lists.
    pub node_names: HashMap<i32, String>,
    /// Whether outcomes that discard nothing (clean merges, identical arrivals) are logged
    /// too, not only counted.
    pub log_merges: bool,
    /// Unique indexes (not the replica key) whose collisions rename the later row's value
    /// instead of parking its transaction.
    pub renames: Vec<UniqueRename>,
}

/// A unique index set to `rename` (rbucardo.set_unique_strategy): when an incoming row takes
/// a value another row holds here, the later of the two rows gives it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniqueRename {
    /// The index, schema-qualified, for the conflict log.
    pub index: String,
    /// Its columns, as positions in the remote column order.
    pub columns: Vec<usize>,
    /// The text column whose value the later row gives up.
    pub renamed: usize,
}

/// Which of two rows holding one value of a unique index gives it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Yields {
    Incoming,
    Local,
}

/// Decides which of two rows colliding on a unique index gives its value up: the one whose
/// replica key sorts last (key columns compared in order, as integers when both are, else as
/// text). Only the two keys count, never clocks, arrival order or what else a node holds, so
/// every node that meets the two rows renames the same one; the `tests` check it from both
/// sides. With node-disjoint ids this is usually the row of the node with the higher range.
pub fn unique_yields(incoming_key: &[&str], local_key: &[&str]) -> Yields {
    if key_order(incoming_key, local_key) == std::cmp::Ordering::Greater { Yields::Incoming } else { Yields::Local }
}

/// The order of two replica keys, the same on every node, and total: per column, integers in
/// their canonical form (no sign but `-`, no leading zero) by value, before every other text,
/// which goes by its bytes. Two different texts never compare equal.
fn key_order(a: &[&str], b: &[&str]) -> std::cmp::Ordering {
    fn integer(v: &str) -> Option<i128> {
        let digits = v.strip_prefix('-').unwrap_or(v);
        let canonical = !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0')) && v != "-0";
        canonical.then(|| v.parse().ok()).flatten()
    }
    for (x, y) in a.iter().zip(b) {
        let by = match (integer(x), integer(y)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => x.as_bytes().cmp(y.as_bytes()),
        };
        if by != std::cmp::Ordering::Equal {
            return by;
        }
    }
    a.len().cmp(&b.len())
}

/// The value a row that gave up a unique value takes: its old value and its own key label,
/// which no other row has. A function of the row alone, so every node that renames it (and
/// the captured rename that reaches the others) gives it the same value.
pub fn renamed_value(value: &str, key_label: &str) -> String {
    format!("{value}~{key_label}")
}

/// A row's replica key as one label: the key value itself for a one-column key, else the
/// values as a JSON array (a comma inside a value cannot make two keys look alike).
pub fn key_label(key: &[&str]) -> String {
    match key {
        [one] => one.to_string(),
        many => serde_json::Value::Array(many.iter().map(|v| serde_json::Value::String(v.to_string())).collect()).to_string(),
    }
}

/// A row's replica key values, in key order (NULL as empty: keys are NOT NULL).
pub fn key_values<'a>(desc: &RelDesc, row: &'a [Value]) -> Vec<&'a str> {
    desc.key.iter().map(|&k| row[k as usize].as_deref().unwrap_or("")).collect()
}

/// The node and hybrid clock of the remote transaction a row change belongs to.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub node: i32,
    pub hlc: i64,
}

/// One conflict, with both versions as JSON objects of column name to text value.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    pub kind: Kind,
    pub key: serde_json::Value,
    pub local: Option<serde_json::Value>,
    pub remote: Option<serde_json::Value>,
    /// Clock and origin node of the local version, when known.
    pub local_clock: Option<(i64, i32)>,
    pub origin: i32,
    pub hlc: i64,
}

/// What a custom resolver function answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Local,
    Remote,
    Delete,
    /// The row to keep: column name to value; columns it leaves out come from the incoming
    /// version (or the local one for an incoming delete).
    Row(serde_json::Map<String, serde_json::Value>),
}

/// What the decision needs from the node: asked only when there is a conflict.
pub trait Env {
    /// The clock of the local version of the row with this key: of the columns `contested`
    /// (the conflict is about them), or of the whole row.
    fn local_clock(&mut self, desc: &RelDesc, key: &serde_json::Value, contested: Option<&[usize]>) -> Option<(i64, i32)>;
    /// Calls a custom resolver function.
    fn custom(&mut self, func: &str, policy: &Policy, conflict: &Conflict) -> Answer;
}

/// What the apply does with the local row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the local row as it is (or absent).
    Nothing,
    /// Make the row hold these values: update the local row found, else insert it.
    Write(Vec<Value>),
    /// Delete the local row found (nothing when there is none).
    Delete,
    /// The strategy is `abort`: stop the batch with this message.
    Abort(String),
}

/// What this node forwards of the incoming change: what it accepted, so that nodes behind it
/// end with what it kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forward {
    /// The change as it came.
    AsIs,
    /// Nothing: the incoming version lost here entirely.
    LeaveOut,
    /// The change with this new image: columns that lost here carry their old value, so that
    /// only what was accepted (delta columns among it) travels on.
    NewImage(Vec<Value>),
}

/// A conflict log entry: the conflict, the rule applied and which version won.
#[derive(Clone, Debug, PartialEq)]
pub struct Logged {
    pub conflict: Conflict,
    pub rule: String,
    /// local, remote, merged or none.
    pub winner: &'static str,
}

/// The decision on one row change.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub forward: Forward,
    /// The conflict log entry: every outcome that discarded something (a version that lost,
    /// a delete that lost, a custom decision), and clean ones too when the table asks for it.
    pub log: Option<Logged>,
    /// What `rbucardo.conflict_stats` counts: the kind and outcome of every conflict, logged
    /// or not. Outcomes: local, remote (a version lost), merged, none (a custom function's
    /// row or delete), and the clean ones: column_merge, identical, both_deleted.
    pub tally: Option<(Kind, &'static str)>,
}

impl Decision {
    fn plain(action: Action) -> Decision {
        Decision { action, forward: Forward::AsIs, log: None, tally: None }
    }
}

/// An outcome that discarded nothing: counted, and logged only when the table's policy says
/// `log_merges` (an auditor's setting); the JSON of the versions is made only then.
#[allow(clippy::too_many_arguments)]
fn clean(p: &Policy, desc: &RelDesc, action: Action, kind: Kind, outcome: &'static str, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin) -> Decision {
    let (rule, winner) = match outcome {
        "column_merge" => ("merge", "merged"),
        "identical" => ("identical", "none"),
        _ => (p.rule_name.as_str(), "none"),
    };
    let log = p.log_merges.then(|| Logged { conflict: conflict(desc, kind, local, remote, key_of, origin, None), rule: rule.to_string(), winner });
    Decision { action, forward: Forward::AsIs, log, tally: Some((kind, outcome)) }
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

/// A row as a JSON object of column name to text value.
pub fn row_json(desc: &RelDesc, row: &[Value]) -> serde_json::Value {
    serde_json::Value::Object(
        desc.columns.iter().zip(row).map(|(c, v)| (c.clone(), v.clone().map_or(serde_json::Value::Null, serde_json::Value::String))).collect(),
    )
}

/// `local + new - old` of one delta column, exactly, in the text form PostgreSQL prints:
/// integers and decimals are added digit-exactly at the larger scale of the three (as numeric
/// addition does); floats as float8. `None` when a value is NULL or not a finite number.
pub fn add_delta(local: &str, new: &str, old: &str) -> Option<String> {
    if let (Some(l), Some(n), Some(o)) = (Decimal::parse(local), Decimal::parse(new), Decimal::parse(old)) {
        let scale = l.scale.max(n.scale).max(o.scale);
        let sum = l.at_scale(scale)?.checked_add(n.at_scale(scale)?)?.checked_sub(o.at_scale(scale)?)?;
        return Some(Decimal { units: sum, scale }.to_string());
    }
    // Floats print large and small values with an exponent; anything else that is not a
    // decimal (too many digits, NaN) is not added.
    if ![local, new, old].iter().any(|v| v.contains(['e', 'E'])) {
        return None;
    }
    let (l, n, o) = (local.parse::<f64>().ok()?, new.parse::<f64>().ok()?, old.parse::<f64>().ok()?);
    let r = l + (n - o);
    r.is_finite().then(|| format!("{r}"))
}

/// A decimal number as an integer count of units of 10^-scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal {
    units: i128,
    scale: u32,
}

impl Decimal {
    /// `-12`, `3.50`, `+7`: an optional sign, digits, an optional point and digits.
    fn parse(s: &str) -> Option<Decimal> {
        let (neg, digits) = match s.as_bytes().first()? {
            b'-' => (true, &s[1..]),
            b'+' => (false, &s[1..]),
            _ => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || int.len() + frac.len() > 36 {
            return None;
        }
        let units: i128 = format!("{int}{frac}").parse().ok()?;
        Some(Decimal { units: if neg { -units } else { units }, scale: frac.len() as u32 })
    }

    fn at_scale(self, scale: u32) -> Option<i128> {
        self.units.checked_mul(10i128.checked_pow(scale - self.scale)?)
    }
}

impl std::fmt::Display for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.units.unsigned_abs().to_string();
        let sign = if self.units < 0 { "-" } else { "" };
        if self.scale == 0 {
            return write!(f, "{sign}{digits}");
        }
        let digits = format!("{digits:0>width$}", width = self.scale as usize + 1);
        let (int, frac) = digits.split_at(digits.len() - self.scale as usize);
        write!(f, "{sign}{int}.{frac}")
    }
}

/// How the columns of an update made on both sides (local `l`, incoming `old` -> `new`) fall.
struct Columns {
    /// The local row with the incoming change's non-conflicting columns and every delta added.
    merged: Vec<Value>,
    /// Columns both sides set to different values (not delta columns): the real conflict.
    conflicting: Vec<usize>,
    /// Whether a delta column could not be added (a NULL or not a number).
    bad_delta: bool,
}

fn columns(l: &[Value], old: &[Value], new: &[Value], delta: &[bool]) -> Columns {
    let mut merged = l.to_vec();
    let mut conflicting = Vec::new();
    let mut bad_delta = false;
    for i in 0..new.len() {
        let theirs = new[i] != old[i];
        let mine = l[i] != old[i];
        match (theirs, mine) {
            (false, _) => {}
            (true, false) => merged[i] = new[i].clone(),
            // Two sales of one item each both leave 99 of 100: a delta column adds them up even
            // when the values happen to be equal.
            (true, true) if delta.get(i) == Some(&true) => match (&l[i], &new[i], &old[i]) {
                (Some(lv), Some(nv), Some(ov)) => match add_delta(lv, nv, ov) {
                    Some(sum) => merged[i] = Some(sum),
                    None => bad_delta = true,
                },
                _ => bad_delta = true,
            },
            (true, true) if l[i] == new[i] => {}
            (true, true) => conflicting.push(i),
        }
    }
    Columns { merged, conflicting, bad_delta }
}

/// Compares an incoming row change with the local row (`local`, as found by the change's key,
/// in the sender's canonical text form) and decides what to do, what to forward and what to
/// log. The same for both apply paths.
#[allow(clippy::too_many_arguments)]
pub fn decide(p: &Policy, desc: &RelDesc, op: Op, local: Option<&[Value]>, old: Option<&[Value]>, new: Option<&[Value]>, origin: Origin, env: &mut dyn Env) -> Decision {
    match op {
        Op::Insert => {
            let new = new.expect("insert has a new image");
            match local {
                None => Decision::plain(Action::Write(new.to_vec())),
                Some(l) if l == new => clean(p, desc, Action::Nothing, Kind::InsertExists, "identical", Some(l), Some(new), new, origin),
                Some(l) => resolve(p, desc, Kind::InsertExists, Some(l), Some(new), new, origin, None, env),
            }
        }
        Op::Update => {
            let (old, new) = (old.expect("update has an old image"), new.expect("update has a new image"));
            match local {
                None => resolve(p, desc, Kind::UpdateMissing, None, Some(new), old, origin, None, env),
                Some(l) if l == old => Decision::plain(Action::Write(new.to_vec())),
                // Identical, unless a delta column changed: two sales that leave the same count
                // still both count.
                Some(l) if l == new && !(0..new.len()).any(|i| p.delta.get(i) == Some(&true) && new[i] != old[i]) => clean(p, desc, Action::Nothing, Kind::UpdateDiffers, "identical", Some(l), Some(new), old, origin),
                Some(l) => both_changed(p, desc, l, old, new, origin, env),
            }
        }
        Op::Delete => {
            let old = old.expect("delete has an old image");
            match local {
                None => resolve(p, desc, Kind::DeleteMissing, None, None, old, origin, None, env),
                Some(l) if l == old => Decision::plain(Action::Delete),
                Some(l) => resolve(p, desc, Kind::DeleteDiffers, Some(l), None, old, origin, None, env),
            }
        }
        Op::Truncate | Op::Ddl => unreachable!("not a row change"),
    }
}

/// An update of a row that changed here too. Columns changed on one side only merge (when
/// column merge is on); delta columns add up; columns both sides set differently go to the
/// version the rule picks.
fn both_changed(p: &Policy, desc: &RelDesc, l: &[Value], old: &[Value], new: &[Value], origin: Origin, env: &mut dyn Env) -> Decision {
    let cols = columns(l, old, new, &p.delta);
    if cols.bad_delta {
        // A delta that cannot be added (NULL, not a number): the row goes by the rule.
        return resolve(p, desc, Kind::UpdateDiffers, Some(l), Some(new), old, origin, None, env);
    }
    if p.merge && cols.conflicting.is_empty() {
        let action = if cols.merged != l { Action::Write(cols.merged.clone()) } else { Action::Nothing };
        return clean(p, desc, action, Kind::UpdateDiffers, "column_merge", Some(l), Some(new), old, origin);
    }
    // Without column merge every column changed on both sides is in conflict.
    let contested: Vec<usize> = if p.merge {
        cols.conflicting.clone()
    } else {
        (0..new.len()).filter(|&i| new[i] != old[i] && l[i] != old[i] && p.delta.get(i) != Some(&true)).collect()
    };
    // With merge off the version is the whole row: its clock is the row's.
    let mut d = resolve(p, desc, Kind::UpdateDiffers, Some(l), Some(new), old, origin, if p.merge { Some(&contested) } else { None }, env);
    // Every delta column takes the sum, whichever side changed it: what a side sold counts even
    // when the rest of its version loses.
    let delta_cols: Vec<usize> = (0..new.len()).filter(|&i| p.delta.get(i) == Some(&true)).collect();
    match (&d.action, d.log.as_ref().map(|g| g.winner)) {
        // The incoming version won: it keeps what it changed; delta columns add up, and
        // (with merge) what only this node changed stays.
        (Action::Write(_), Some("remote")) => {
            let mut row = if p.merge { cols.merged.clone() } else { new.to_vec() };
            for &i in &contested {
                row[i] = new[i].clone();
            }
            for &i in &delta_cols {
                row[i] = cols.merged[i].clone();
            }
            d.action = if row != l { Action::Write(row) } else { Action::Nothing };
        }
        // The local version won: it stays, with the incoming deltas (and, with merge, the
        // incoming columns nobody contested) added. What travels on is only that part.
        (Action::Nothing, Some("local")) => {
            let mut row = if p.merge { cols.merged.clone() } else { l.to_vec() };
            for &i in &contested {
                row[i] = l[i].clone();
            }
            for &i in &delta_cols {
                row[i] = cols.merged[i].clone();
            }
            if row != l {
                let mut forwarded = new.to_vec();
                for &i in &contested {
                    forwarded[i] = old[i].clone();
                }
                if !p.merge {
                    for i in 0..new.len() {
                        if p.delta.get(i) != Some(&true) {
                            forwarded[i] = old[i].clone();
                        }
                    }
                }
                d.action = Action::Write(row);
                d.forward = Forward::NewImage(forwarded);
            }
        }
        _ => {}
    }
    d
}

#[allow(clippy::too_many_arguments)]
fn conflict(desc: &RelDesc, kind: Kind, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin, local_clock: Option<(i64, i32)>) -> Conflict {
    Conflict {
        kind,
        key: key_json(desc, key_of),
        local: local.map(|r| row_json(desc, r)),
        remote: remote.map(|r| row_json(desc, r)),
        local_clock,
        origin: origin.node,
        hlc: origin.hlc,
    }
}

/// Which version a rule keeps.
enum Outcome {
    Local,
    Remote,
    /// A row made by a custom function (a merge of both, or anything else it chose).
    Row(Vec<Value>),
    Delete,
}

/// Whether the incoming version wins under a named rule or a priority list. `latest` compares
/// hybrid clocks, ties broken by node id, so every node decides alike; a local version of
/// unknown clock (the row predates replication) loses.
fn incoming_wins(p: &Policy, incoming: (i64, i32), local: Option<(i64, i32)>) -> bool {
    match &p.strategy {
        Strategy::Target | Strategy::Skip => false,
        Strategy::Latest => local.is_none_or(|l| incoming > l),
        Strategy::Source | Strategy::Abort | Strategy::Custom(_) => true,
        Strategy::Priority(list) => {
            let rank = |node: i32| -> usize { p.node_names.get(&node).and_then(|name| list.iter().position(|n| n == name)).unwrap_or(usize::MAX) };
            local.is_none_or(|l| rank(incoming.1) < rank(l.1) || (rank(incoming.1) == rank(l.1) && incoming > l))
        }
    }
}

/// Decides a conflict by the table's rule.
#[allow(clippy::too_many_arguments)]
fn resolve(p: &Policy, desc: &RelDesc, kind: Kind, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin, contested: Option<&[usize]>, env: &mut dyn Env) -> Decision {
    if kind == Kind::DeleteMissing && p.strategy != Strategy::Abort {
        // Both sides deleted the row: nothing is left to choose between.
        return clean(p, desc, Action::Nothing, kind, "both_deleted", None, None, key_of, origin);
    }
    let key = key_json(desc, key_of);
    let local_clock = env.local_clock(desc, &key, contested);
    let c = conflict(desc, kind, local, remote, key_of, origin, local_clock);
    if p.strategy == Strategy::Abort {
        let message = format!("conflict ({}) on {} key {} from node {}; the sync's strategy is abort", kind.as_str(), p.table, c.key, c.origin);
        return Decision { action: Action::Abort(message), forward: Forward::LeaveOut, log: None, tally: None };
    }
    let outcome = match &p.strategy {
        Strategy::Custom(func) => match env.custom(func, p, &c) {
            Answer::Local => Outcome::Local,
            Answer::Remote => Outcome::Remote,
            Answer::Delete => Outcome::Delete,
            Answer::Row(o) => {
                let base = remote.or(local).expect("a conflict has at least one version");
                Outcome::Row(
                    desc.columns
                        .iter()
                        .zip(base)
                        .map(|(col, v)| match o.get(col) {
                            None => v.clone(),
                            Some(serde_json::Value::Null) => None,
                            Some(serde_json::Value::String(s)) => Some(s.clone()),
                            Some(other) => Some(other.to_string()),
                        })
                        .collect(),
                )
            }
        },
        _ if incoming_wins(p, (c.hlc, c.origin), local_clock) => Outcome::Remote,
        _ => Outcome::Local,
    };
    // A row equal to one of the versions is that version winning.
    let outcome = match outcome {
        Outcome::Row(r) if Some(r.as_slice()) == local => Outcome::Local,
        Outcome::Row(r) if Some(r.as_slice()) == remote => Outcome::Remote,
        Outcome::Delete if local.is_none() => Outcome::Local,
        Outcome::Delete if remote.is_none() => Outcome::Remote,
        other => other,
    };
    let (action, forward, winner) = match outcome {
        Outcome::Local => (Action::Nothing, Forward::LeaveOut, "local"),
        Outcome::Remote => (remote.map_or(Action::Delete, |r| Action::Write(r.to_vec())), Forward::AsIs, "remote"),
        Outcome::Row(r) => (Action::Write(r), Forward::AsIs, "merged"),
        // Both versions existed and the custom function deleted the row.
        Outcome::Delete => (Action::Delete, Forward::AsIs, "none"),
    };
    Decision { action, forward, log: Some(Logged { conflict: c, rule: p.rule_name.clone(), winner }), tally: Some((kind, winner)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> RelDesc {
        RelDesc { schema: "public".into(), name: "product".into(), columns: vec!["id".into(), "price".into(), "stock".into(), "name".into()], key: vec![0] }
    }

    fn policy(rule: &str, merge: bool) -> Policy {
        Policy {
            table: "public.product".into(),
            rule_name: rule.into(),
            strategy: Strategy::parse(rule),
            sync: Some("pos".into()),
            merge,
            delta: vec![false, false, true, false],
            node_names: HashMap::from([(1, "main".to_string()), (2, "branch1".to_string()), (3, "branch2".to_string())]),
            log_merges: false,
            renames: Vec::new(),
        }
    }

    fn row(v: &[&str]) -> Vec<Value> {
        v.iter().map(|s| if *s == "NULL" { None } else { Some(s.to_string()) }).collect()
    }

    /// A fake node: the local version's clock, and a custom function's answer.
    struct Fake {
        clock: Option<(i64, i32)>,
        answer: Answer,
        asked: usize,
    }

    impl Env for Fake {
        fn local_clock(&mut self, _: &RelDesc, _: &serde_json::Value, _: Option<&[usize]>) -> Option<(i64, i32)> {
            self.clock
        }
        fn custom(&mut self, _: &str, _: &Policy, _: &Conflict) -> Answer {
            self.asked += 1;
            self.answer.clone()
        }
    }

    fn env(clock: Option<(i64, i32)>) -> Fake {
        Fake { clock, answer: Answer::Remote, asked: 0 }
    }

    const FROM_BRANCH1: Origin = Origin { node: 2, hlc: 200 };

    fn update(p: &Policy, local: &[&str], old: &[&str], new: &[&str], e: &mut Fake) -> Decision {
        decide(p, &desc(), Op::Update, Some(&row(local)), Some(&row(old)), Some(&row(new)), FROM_BRANCH1, e)
    }

    #[test]
    fn delta_arithmetic_is_exact() {
        assert_eq!(add_delta("99", "99", "100").as_deref(), Some("98"));
        assert_eq!(add_delta("10.50", "1.5", "2").as_deref(), Some("10.00"));
        assert_eq!(add_delta("-1", "0.001", "0").as_deref(), Some("-0.999"));
        assert_eq!(add_delta("0.1", "0.2", "0.1").as_deref(), Some("0.2"));
        assert_eq!(add_delta("170141183460469231731687303715884105727", "1", "0"), None, "overflow is refused, not wrapped");
        assert_eq!(add_delta("1.5e3", "1", "0").as_deref(), Some("1501"));
        assert_eq!(add_delta("x", "1", "0"), None);
        assert_eq!(add_delta("NaN", "1", "0"), None);
    }

    #[test]
    fn no_conflict_cases() {
        let p = policy("latest", true);
        let mut e = env(None);
        let d = update(&p, &["1", "5", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e);
        assert_eq!(d, Decision::plain(Action::Write(row(&["1", "6", "10", "a"]))));
        let d = decide(&p, &desc(), Op::Insert, None, None, Some(&row(&["1", "5", "10", "a"])), FROM_BRANCH1, &mut e);
        assert_eq!(d.action, Action::Write(row(&["1", "5", "10", "a"])));
        let d = decide(&p, &desc(), Op::Delete, Some(&row(&["1", "5", "10", "a"])), Some(&row(&["1", "5", "10", "a"])), None, FROM_BRANCH1, &mut e);
        assert_eq!(d.action, Action::Delete);
        assert!(d.log.is_none());
    }

    #[test]
    fn disjoint_columns_and_deltas_merge() {
        let p = policy("latest", true);
        let mut e = env(Some((300, 1)));
        // Here: price 5 -> 7 and a sale (10 -> 9). Incoming: name a -> b and a sale (10 -> 9).
        let d = update(&p, &["1", "7", "9", "a"], &["1", "5", "10", "a"], &["1", "5", "9", "b"], &mut e);
        assert_eq!(d.action, Action::Write(row(&["1", "7", "8", "b"])));
        assert_eq!(d.forward, Forward::AsIs);
        // A clean merge discards nothing: counted, not logged, unless the table asks for it.
        assert_eq!((d.log.is_none(), d.tally), (true, Some((Kind::UpdateDiffers, "column_merge"))));
        let audited = Policy { log_merges: true, ..p.clone() };
        let d = update(&audited, &["1", "7", "9", "a"], &["1", "5", "10", "a"], &["1", "5", "9", "b"], &mut e);
        assert_eq!(d.log.as_ref().map(|l| (l.rule.as_str(), l.winner)), Some(("merge", "merged")));
        // An identical arrival is counted the same way.
        let d = update(&p, &["1", "6", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e);
        assert_eq!((d.action, d.log.is_none(), d.tally), (Action::Nothing, true, Some((Kind::UpdateDiffers, "identical"))));
    }

    #[test]
    fn a_delta_survives_a_lost_price() {
        // Reproduced bug: price changed on both sides and stock sold on both: the price goes to
        // the later version, and both sales count whichever side wins.
        for (clock, winner) in [(Some((300, 1)), "local"), (Some((100, 1)), "remote")] {
            for merge in [true, false] {
                let p = policy("latest", merge);
                let mut e = env(clock);
                let d = update(&p, &["1", "7", "9", "a"], &["1", "5", "10", "a"], &["1", "6", "9", "a"], &mut e);
                let price = if winner == "local" { "7" } else { "6" };
                assert_eq!(d.action, Action::Write(row(&["1", price, "8", "a"])), "winner {winner}, merge {merge}");
                assert_eq!(d.log.as_ref().unwrap().winner, winner);
                if winner == "local" {
                    // Only the sale travels on: nodes behind this one keep its price.
                    assert_eq!(d.forward, Forward::NewImage(row(&["1", "5", "9", "a"])));
                } else {
                    assert_eq!(d.forward, Forward::AsIs);
                }
            }
        }
    }

    #[test]
    fn without_merge_a_lost_row_keeps_only_deltas() {
        let p = policy("latest", false);
        let mut e = env(Some((300, 1)));
        // Disjoint columns, merge off: the whole row goes to the later version (local), except
        // the delta.
        let d = update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "5", "9", "b"], &mut e);
        assert_eq!(d.action, Action::Write(row(&["1", "7", "9", "a"])));
        assert_eq!(d.forward, Forward::NewImage(row(&["1", "5", "9", "a"])));
        // No delta changed: the incoming version is left out entirely.
        let d = update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "5", "10", "b"], &mut e);
        assert_eq!(d.action, Action::Nothing);
        assert_eq!(d.forward, Forward::LeaveOut);
    }

    #[test]
    fn every_named_strategy() {
        let cases = [("latest", Some((300, 1)), "local"), ("latest", Some((100, 1)), "remote"), ("latest", None, "remote"), ("source", Some((300, 1)), "remote"), ("target", None, "local"), ("skip", None, "local")];
        for (rule, clock, winner) in cases {
            let p = policy(rule, true);
            let mut e = env(clock);
            let d = update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e);
            let l = d.log.expect("logged");
            assert_eq!((l.rule.as_str(), l.winner), (rule, winner), "{rule} {clock:?}");
            assert_eq!(l.conflict.kind, Kind::UpdateDiffers);
            assert_eq!(l.conflict.local_clock, clock);
            assert_eq!(d.action, if winner == "remote" { Action::Write(row(&["1", "6", "10", "a"])) } else { Action::Nothing });
            assert_eq!(d.forward, if winner == "remote" { Forward::AsIs } else { Forward::LeaveOut });
        }
    }

    #[test]
    fn latest_breaks_ties_by_node_id() {
        let p = policy("latest", true);
        // Same clock: the higher node id wins, on both nodes.
        let mut e = env(Some((200, 1)));
        assert_eq!(update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e).log.unwrap().winner, "remote");
        let mut e = env(Some((200, 3)));
        assert_eq!(update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e).log.unwrap().winner, "local");
    }

    #[test]
    fn priority_list() {
        let p = policy("branch1, main", true);
        let mut e = env(Some((900, 1)));
        // branch1 is named first: its older version beats main's newer one.
        assert_eq!(update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e).log.unwrap().winner, "remote");
        let p = policy("main,branch1", true);
        let mut e = env(Some((100, 1)));
        assert_eq!(update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e).log.unwrap().winner, "local");
        // An unnamed node ranks last; equal ranks fall back to latest.
        let p = policy("main", true);
        let mut e = env(Some((100, 3)));
        assert_eq!(update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e).log.unwrap().winner, "remote");
    }

    #[test]
    fn custom_answers() {
        let p = policy("custom:public.resolve", true);
        let mut obj = serde_json::Map::new();
        obj.insert("price".into(), serde_json::Value::String("100".into()));
        for (answer, action, winner) in [
            (Answer::Local, Action::Nothing, "local"),
            (Answer::Remote, Action::Write(row(&["1", "6", "10", "a"])), "remote"),
            (Answer::Delete, Action::Delete, "none"),
            (Answer::Row(obj), Action::Write(row(&["1", "100", "10", "a"])), "merged"),
        ] {
            let mut e = Fake { clock: None, answer, asked: 0 };
            let d = update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e);
            assert_eq!(e.asked, 1);
            assert_eq!((d.action, d.log.unwrap().winner), (action, winner));
        }
    }

    #[test]
    fn abort_and_missing_rows() {
        let p = policy("abort", true);
        let mut e = env(None);
        let d = update(&p, &["1", "7", "10", "a"], &["1", "5", "10", "a"], &["1", "6", "10", "a"], &mut e);
        assert!(matches!(d.action, Action::Abort(ref m) if m.contains("update_differs") && m.contains("abort")));
        let p = policy("latest", true);
        // Update of a row deleted here: the update wins under latest when its clock is newer.
        let d = decide(&p, &desc(), Op::Update, None, Some(&row(&["1", "5", "10", "a"])), Some(&row(&["1", "6", "10", "a"])), FROM_BRANCH1, &mut env(Some((100, 1))));
        assert_eq!((d.action, d.log.unwrap().conflict.kind), (Action::Write(row(&["1", "6", "10", "a"])), Kind::UpdateMissing));
        // Delete of a row gone here: logged, nothing to do.
        let d = decide(&p, &desc(), Op::Delete, None, Some(&row(&["1", "5", "10", "a"])), None, FROM_BRANCH1, &mut env(None));
        assert_eq!((d.action, d.log.is_none(), d.tally), (Action::Nothing, true, Some((Kind::DeleteMissing, "both_deleted"))));
        // Delete of a row changed here, local newer: the row stays and the delete does not travel.
        let d = decide(&p, &desc(), Op::Delete, Some(&row(&["1", "7", "10", "a"])), Some(&row(&["1", "5", "10", "a"])), None, FROM_BRANCH1, &mut env(Some((300, 1))));
        assert_eq!((d.action, d.forward), (Action::Nothing, Forward::LeaveOut));
        // Insert of an existing key with other values.
        let d = decide(&p, &desc(), Op::Insert, Some(&row(&["1", "7", "10", "a"])), None, Some(&row(&["1", "6", "10", "a"])), FROM_BRANCH1, &mut env(Some((100, 1))));
        assert_eq!((d.action, d.log.unwrap().conflict.kind), (Action::Write(row(&["1", "6", "10", "a"])), Kind::InsertExists));
    }

    /// Two nodes change one row while apart, and a third had the original: whatever the
    /// changes, merge on or off, every node ends with the same row after it has applied the
    /// other two's changes in either order.
    #[test]
    fn every_node_ends_with_the_same_row() {
        let o = row(&["1", "5", "10", "a"]);
        let mut versions = Vec::new();
        for price in ["5", "6", "7"] {
            for stock in ["10", "9", "8"] {
                for name in ["a", "b"] {
                    let v = row(&["1", price, stock, name]);
                    if v != o {
                        versions.push(v);
                    }
                }
            }
        }
        let (clock_a, clock_b) = ((200, 1), (300, 2));
        let apply = |p: &Policy, local: &[Value], old: &[Value], new: &[Value], origin: (i64, i32), local_clock: (i64, i32)| -> Vec<Value> {
            let mut e = env(Some(local_clock));
            let d = decide(p, &desc(), Op::Update, Some(local), Some(old), Some(new), Origin { node: origin.1, hlc: origin.0 }, &mut e);
            match d.action {
                Action::Write(r) => r,
                Action::Nothing => local.to_vec(),
                other => panic!("unexpected {other:?}"),
            }
        };
        for merge in [true, false] {
            let p = policy("latest", merge);
            for a in &versions {
                for b in &versions {
                    let at_a = apply(&p, a, &o, b, clock_b, clock_a);
                    let at_b = apply(&p, b, &o, a, clock_a, clock_b);
                    let c_then_b = apply(&p, a, &o, b, clock_b, clock_a);
                    let c_a_first = apply(&p, &o, &o, a, clock_a, (0, 0));
                    let c_then_a = apply(&p, b, &o, a, clock_a, clock_b);
                    let c_b_first = apply(&p, &o, &o, b, clock_b, (0, 0));
                    assert_eq!(c_a_first, *a);
                    assert_eq!(c_b_first, *b);
                    assert_eq!(at_a, at_b, "merge {merge}: a {a:?} b {b:?}");
                    assert_eq!(at_a, c_then_b, "merge {merge}: a {a:?} b {b:?}");
                    assert_eq!(at_a, c_then_a, "merge {merge}: a {a:?} b {b:?}");
                    // Both sales count.
                    let sold = |v: &[Value]| 10 - v[2].as_deref().unwrap().parse::<i32>().unwrap();
                    assert_eq!(at_a[2].as_deref().unwrap().parse::<i32>().unwrap(), 10 - sold(a) - sold(b), "merge {merge}: a {a:?} b {b:?}");
                }
            }
        }
    }

    /// Two rows collide on a unique value: whichever of them arrives at a node second, that
    /// node renames the same one, to the same value; keys compare as numbers when they are.
    #[test]
    fn unique_collisions_rename_the_same_row_from_both_sides() {
        let rows: [&[&str]; 10] = [&["7"], &["8"], &["10"], &["-3"], &["b,c"], &["b", "c"], &["07"], &["+7"], &["5.5"], &["9"]];
        for (i, a) in rows.iter().enumerate() {
            for (j, b) in rows.iter().enumerate() {
                if i == j {
                    continue;
                }
                // Here a arrives while b is local; elsewhere b arrives while a is local.
                let here = if unique_yields(a, b) == Yields::Incoming { a } else { b };
                let there = if unique_yields(b, a) == Yields::Incoming { b } else { a };
                assert_eq!(here, there, "{a:?} vs {b:?}");
            }
        }
        // A total order: no two different keys tie, and no three go round in a circle.
        for a in &rows {
            for b in &rows {
                assert_eq!(a == b, key_order(a, b) == std::cmp::Ordering::Equal, "{a:?} {b:?}");
                for c in &rows {
                    if key_order(a, b).is_lt() && key_order(b, c).is_lt() {
                        assert!(key_order(a, c).is_lt(), "{a:?} < {b:?} < {c:?}");
                    }
                }
            }
        }
        assert_eq!(unique_yields(&["10"], &["9"]), Yields::Incoming, "10 sorts after 9 as a number");
        assert_eq!(unique_yields(&["9"], &["10"]), Yields::Local);
        assert_eq!(renamed_value("anna", &key_label(&["3900002"])), "anna~3900002");
        assert_ne!(key_label(&["a,b", "c"]), key_label(&["a", "b,c"]));
        assert_ne!(renamed_value("anna", "7"), renamed_value("anna", "8"));
    }
}
