//! Moving off Bucardo: `rbucardo.import_bucardo(conninfo, dry_run, this_db)` reads a Bucardo 5
//! configuration database (the one `bucardo install` created) over libpq and turns it into the
//! rbucardo calls that give this node the same replication: `init_node`, `add_db`, `add_herd`,
//! `add_table`/`add_sequence`, `add_sync`, `set_table_strategy`, `pause_sync`. What has no
//! equivalent comes back as a `skipped` row saying why, or what to do instead.
//!
//! Bucardo's tables read (schema of Bucardo 5.6, `/usr/share/bucardo/bucardo.schema`): `db`,
//! `dbmap` (the dbgroup of a sync, with each db's role `source`, `target` or `fullcopy`), `herd`
//! (a relgroup), `herdmap`, `goat` (tables and sequences), `sync`, and the custom hooks
//! (`customcode`/`customcode_map`, `customname`, `customcols`, `bucardo_custom_trigger`).
//!
//! The planning ([`plan`]) is pure: it works on what was read and on a summary of this node's
//! catalog, so its mapping rules are unit-tested without a server. Every statement is built
//! with [`quote_literal`], never by pasting names in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgrx::prelude::*;

use crate::base::sqltext::quote_literal;

use crate::base::error::raise;
use crate::base::pq::{Param, PeerConn, Row};

/// How long connecting to and reading from Bucardo's database may take.
const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// What is read from Bucardo.

/// A row of `bucardo.db`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BDb {
    pub name: String,
    pub dbtype: String,
    pub dbdsn: String,
    pub host: String,
    pub port: String,
    pub dbname: String,
    pub user: String,
    pub pass: String,
    pub conn: String,
    pub service: String,
    pub status: String,
    pub makedelta: bool,
}

/// A row of `bucardo.goat`: a table or sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BGoat {
    pub id: i64,
    pub db: String,
    pub schema: String,
    pub table: String,
    pub reltype: String,
    pub conflict_strategy: String,
    pub makedelta: String,
    pub ghost: bool,
}

/// A row of `bucardo.sync` (the settings an operator may have changed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BSync {
    pub name: String,
    pub herd: String,
    pub dbgroup: String,
    pub status: String,
    pub conflict_strategy: String,
    pub onetimecopy: i64,
    pub autokick: bool,
    pub stayalive: bool,
    pub kidsalive: bool,
    pub checktime: String,
    pub deletemethod: String,
    pub isolation_level: String,
    pub lifetime: String,
    pub maxkicks: i64,
    pub rebuild_index: i64,
}

/// A row of `bucardo.dbmap`: a db's role in a dbgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BMember {
    pub dbgroup: String,
    pub db: String,
    pub role: String,
}

/// A custom hook (custom code, name, columns or trigger) and what it is attached to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BCustom {
    pub kind: String,
    pub name: String,
    pub sync: String,
    pub goat: Option<i64>,
}

/// Everything read from a Bucardo configuration database.
#[derive(Clone, Debug, Default)]
pub struct BucardoConfig {
    pub version: String,
    pub default_conflict_strategy: String,
    pub dbs: Vec<BDb>,
    pub herds: Vec<String>,
    /// (herd, goat id), in the herd's priority order.
    pub herdmap: Vec<(String, i64)>,
    pub goats: Vec<BGoat>,
    pub syncs: Vec<BSync>,
    pub members: Vec<BMember>,
    pub customs: Vec<BCustom>,
}

/// What this node's catalog already holds.
#[derive(Clone, Debug, Default)]
pub struct Local {
    /// This node's name, if `init_node` has run.
    pub node: Option<String>,
    pub dbs: BTreeSet<String>,
    pub herds: BTreeSet<String>,
    pub syncs: BTreeSet<String>,
    /// Goats (by id) whose table or sequence does not exist here.
    pub missing: BTreeSet<i64>,
}

/// One row of the result: an rbucardo statement to run (`sql`), or a note about something not
/// imported (`sql` NULL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: String,
    /// The statement as shown (a password in it redacted).
    pub sql: Option<String>,
    pub note: String,
    /// The statement as run, with `$1` standing for a secret passed apart (a conninfo), so it
    /// reaches neither the result nor an error's context.
    pub exec: Option<(String, String)>,
}

impl Step {
    fn run(action: &str, sql: String, note: impl Into<String>) -> Step {
        Step { action: action.into(), sql: Some(sql), note: note.into(), exec: None }
    }
    /// A statement with one secret: `template` holds `$1` where it goes.
    fn run_secret(action: &str, template: &str, shown: &str, secret: String, note: impl Into<String>) -> Step {
        Step { action: action.into(), sql: Some(template.replace("$1", &quote_literal(shown))), note: note.into(), exec: Some((template.to_string(), secret)) }
    }
    fn skip(note: impl Into<String>) -> Step {
        Step { action: "skipped".into(), sql: None, note: note.into(), exec: None }
    }
    fn info(action: &str, note: impl Into<String>) -> Step {
        Step { action: action.into(), sql: None, note: note.into(), exec: None }
    }
}

// ---------------------------------------------------------------------------------------------
// Quoting (pure, as PostgreSQL does it).

/// A name as the input of `regclass` reads it back: plain when lower case letters, digits, `_`
/// and `$` (not starting with a digit or `$`), else in double quotes with quotes doubled.
pub fn regclass_name_part(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// `'schema.table'::regclass`, every part quoted as needed.
pub fn regclass_literal(schema: &str, table: &str) -> String {
    format!("{}::regclass", quote_literal(&format!("{}.{}", regclass_name_part(schema), regclass_name_part(table))))
}

/// A conninfo value, quoted the way libpq parses it back when it has to be.
pub fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    let mut out = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// `key=value` pairs of a DBI DSN's tail or of Bucardo's `dbconn` ("sslmode=require;..."),
/// each as DBD::Pg hands it to libpq. Entries without `=` are returned in the second list.
fn dbi_pairs(s: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut bad = Vec::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                let k = k.trim().to_ascii_lowercase();
                // DBD::Pg's aliases for libpq's keywords.
                let k = match k.as_str() {
                    "database" | "db" => "dbname".to_string(),
                    _ => k,
                };
                pairs.push((k, v.trim().to_string()));
            }
            _ => bad.push(part.to_string()),
        }
    }
    (pairs, bad)
}

/// The libpq conninfo for a Bucardo db, built from its fields as Bucardo's own connection is
/// (`dbname`, `service`, `port`, `host`, then `dbconn`; `dbdsn` instead when set), plus user
/// and password. Err says why it cannot be built.
pub fn conninfo_for(db: &BDb) -> Result<String, String> {
    if db.dbtype != "postgres" {
        return Err(format!("db {} is of type {} (rbucardo replicates between PostgreSQL databases only)", db.name, db.dbtype));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    if !db.dbdsn.is_empty() {
        let lower = db.dbdsn.to_ascii_lowercase();
        let Some(tail) = lower.strip_prefix("dbi:pg:").map(|_| &db.dbdsn["dbi:pg:".len()..]) else {
            return Err(format!("db {} has a DSN that is not dbi:Pg: ({})", db.name, db.dbdsn));
        };
        let (p, bad) = dbi_pairs(tail);
        if !bad.is_empty() {
            return Err(format!("db {}: cannot read the DSN entries {:?}", db.name, bad));
        }
        pairs.extend(p);
    } else {
        for (k, v) in [("host", &db.host), ("port", &db.port), ("dbname", &db.dbname), ("service", &db.service)] {
            if !v.is_empty() {
                pairs.push((k.to_string(), v.clone()));
            }
        }
        let (p, bad) = dbi_pairs(&db.conn);
        if !bad.is_empty() {
            return Err(format!("db {}: cannot read the dbconn entries {:?}", db.name, bad));
        }
        pairs.extend(p);
    }
    if !db.user.is_empty() && !pairs.iter().any(|(k, _)| k == "user") {
        pairs.push(("user".into(), db.user.clone()));
    }
    if !db.pass.is_empty() && !pairs.iter().any(|(k, _)| k == "password") {
        pairs.push(("password".into(), db.pass.clone()));
    }
    if pairs.is_empty() {
        return Err(format!("db {} has no connection fields", db.name));
    }
    Ok(pairs.iter().map(|(k, v)| format!("{k}={}", conninfo_value(v))).collect::<Vec<_>>().join(" "))
}

// ---------------------------------------------------------------------------------------------
// Conflict strategies.

/// rbucardo's strategy for a Bucardo conflict strategy, with a note; `members` are the node
/// names of the rbucardo sync (a priority list keeps only those). None: no strategy given.
pub fn map_strategy(bucardo: &str, members: &[String]) -> (Option<String>, String) {
    let s = bucardo.trim();
    let doc_only = |rb: &str| {
        format!(
            "{s} -> '{rb}'. Bucardo 5.6 documents {s} but its daemon does not implement it (it reads any name other than \
             bucardo_latest, bucardo_latest_all_tables, bucardo_abort and bucardo_custom as a list of databases and pauses \
             the sync). rbucardo's '{rb}' is decided on each node and, set alike everywhere, does not make the nodes agree \
             (docs/sql-reference.md, Conflicts): consider 'latest' or a priority list"
        )
    };
    match s {
        "" => (None, String::new()),
        "bucardo_latest" => (Some("latest".into()), "bucardo_latest -> 'latest': the newer change wins (rbucardo compares the hybrid logical clocks of the transactions, ties broken by node id)".into()),
        "bucardo_latest_all_tables" => (
            Some("latest".into()),
            "bucardo_latest_all_tables -> 'latest': rbucardo decides row by row on the transactions' clocks; Bucardo's one winning database for every table of the sync has no equivalent".into(),
        ),
        "bucardo_abort" => (Some("abort".into()), "bucardo_abort -> 'abort': a conflicting batch is refused and the stream from that peer waits".into()),
        "bucardo_source" => (Some("source".into()), doc_only("source")),
        "bucardo_target" => (Some("target".into()), doc_only("target")),
        "bucardo_skip" => (Some("skip".into()), doc_only("skip")),
        "bucardo_random" => (Some("latest".into()), "bucardo_random -> 'latest': rbucardo has no random rule (the nodes would not agree)".into()),
        "bucardo_custom" => (
            Some("latest".into()),
            "bucardo_custom -> 'latest' for now: Bucardo's Perl conflict code cannot be imported; write a SQL function and set it with \
             rbucardo.set_table_strategy(tbl, 'custom:schema.function') (docs/sql-reference.md, Conflicts)"
                .into(),
        ),
        list => {
            let named: Vec<&str> = list.split(|c: char| c == ',' || c.is_whitespace()).filter(|n| !n.is_empty()).collect();
            let kept: Vec<&str> = named.iter().copied().filter(|n| members.iter().any(|m| m == n)).collect();
            let dropped: Vec<&str> = named.iter().copied().filter(|n| !kept.contains(n)).collect();
            if kept.is_empty() {
                return (
                    Some("latest".into()),
                    format!("the database list '{list}' names no member of the sync here -> 'latest'"),
                );
            }
            let mut note = format!("database list '{list}' -> priority list: the version made by the node named first wins");
            if !dropped.is_empty() {
                note.push_str(&format!(" ({} left out: not a member of the sync here)", dropped.join(", ")));
            }
            (Some(kept.join(",")), note)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The plan.

/// The node id `init_node` gets: the position of the db among all Bucardo dbs in name order,
/// so every node importing the same configuration picks ids that do not collide.
pub fn node_id_for(cfg: &BucardoConfig, db: &str) -> Option<i32> {
    let mut names: Vec<&str> = cfg.dbs.iter().map(|d| d.name.as_str()).collect();
    names.sort();
    names.iter().position(|n| *n == db).map(|i| i as i32 + 1)
}

fn sql_array(items: &[String]) -> String {
    format!("ARRAY[{}]", items.iter().map(|s| quote_literal(s)).collect::<Vec<_>>().join(", "))
}

/// The rbucardo statements that give node `this_db` the replication `cfg` describes, in the
/// order they must run. Err: the configuration cannot be imported on this node at all.
pub fn plan(cfg: &BucardoConfig, this_db: &str, local: &Local) -> Result<Vec<Step>, String> {
    let db_by_name: BTreeMap<&str, &BDb> = cfg.dbs.iter().map(|d| (d.name.as_str(), d)).collect();
    if !db_by_name.contains_key(this_db) {
        let names: Vec<&str> = db_by_name.keys().copied().collect();
        return Err(format!("Bucardo has no db named {this_db:?} (its dbs: {})", names.join(", ")));
    }
    let mut steps = Vec::new();
    steps.push(Step::info(
        "read",
        format!(
            "Bucardo {}: {} dbs, {} relgroups, {} tables and sequences, {} syncs; this node is Bucardo's db {this_db}",
            if cfg.version.is_empty() { "(version unknown)" } else { &cfg.version },
            cfg.dbs.len(),
            cfg.herds.len(),
            cfg.goats.len(),
            cfg.syncs.len()
        ),
    ));

    // Identity.
    match &local.node {
        Some(n) if n == this_db => steps.push(Step::info("exists", format!("this node is already initialised as {n}"))),
        Some(n) => return Err(format!("this node is initialised as {n}, not as Bucardo's db {this_db}")),
        None => {
            let id = node_id_for(cfg, this_db).unwrap_or(1);
            steps.push(Step::run(
                "init_node",
                format!("SELECT rbucardo.init_node({}, {id})", quote_literal(this_db)),
                format!(
                    "node id {id}: the position of {this_db} among Bucardo's dbs in name order, the same on every node that imports this configuration"
                ),
            ));
        }
    }

    // Which syncs this node takes part in, and with whom.
    struct Imported<'a> {
        sync: &'a BSync,
        members: Vec<String>,
    }
    let mut imported: Vec<Imported> = Vec::new();
    let mut later: Vec<Step> = Vec::new();
    let mut syncs: Vec<&BSync> = cfg.syncs.iter().collect();
    syncs.sort_by(|a, b| a.name.cmp(&b.name));
    for s in syncs {
        let group: Vec<&BMember> = cfg.members.iter().filter(|m| m.dbgroup == s.dbgroup).collect();
        if s.herd.is_empty() {
            later.push(Step::skip(format!("sync {}: it has no relgroup, so it replicates nothing", s.name)));
            continue;
        }
        let role_of = |db: &str| group.iter().find(|m| m.db == db).map(|m| m.role.as_str());
        let usable = |db: &str| db_by_name.get(db).is_some_and(|d| d.status == "active" && conninfo_for(d).is_ok());
        let sources: Vec<String> = group.iter().filter(|m| m.role == "source" && usable(&m.db)).map(|m| m.db.clone()).collect();
        let fullcopy_only = group.iter().any(|m| m.role == "fullcopy") && !group.iter().any(|m| m.role == "target") && sources.len() == 1;
        if fullcopy_only {
            later.push(Step::skip(format!(
                "sync {}: a fullcopy sync (copies whole tables from {} on every run); rbucardo replicates changes, not copies: \
                 copy the tables once (pg_dump --data-only, or COPY), or keep running this sync with Bucardo",
                s.name,
                sources.join(", ")
            )));
            continue;
        }
        match role_of(this_db) {
            Some("source") if sources.iter().any(|d| d == this_db) => {}
            Some("source") => {
                later.push(Step::skip(format!("sync {}: this node's db {this_db} is inactive in Bucardo", s.name)));
                continue;
            }
            Some(role) => {
                later.push(Step::skip(format!(
                    "sync {}: this node is a {role} of it (one-way: it only receives); rbucardo has no one-way replication. \
                     Either make this node a full member (its own changes to the relgroup's tables then replicate too: \
                     rbucardo.add_sync on every member with this node listed), or keep this sync with Bucardo",
                    s.name
                )));
                continue;
            }
            None => {
                later.push(Step::skip(format!("sync {}: this node ({this_db}) is not one of its dbs; import it on its members", s.name)));
                continue;
            }
        }
        if sources.len() < 2 {
            later.push(Step::skip(format!(
                "sync {}: this node is its only source (one-way to {}); rbucardo has no one-way replication. \
                 Make the targets full members (add_sync on each with the same dbs), or keep this sync with Bucardo",
                s.name,
                group.iter().filter(|m| m.db != this_db).map(|m| m.db.as_str()).collect::<Vec<_>>().join(", ")
            )));
            continue;
        }
        for m in &group {
            if sources.contains(&m.db) {
                continue;
            }
            let why = match db_by_name.get(m.db.as_str()) {
                None => "it is not in bucardo.db".to_string(),
                Some(d) if d.status != "active" => format!("it is {} in Bucardo", d.status),
                Some(d) => match conninfo_for(d) {
                    Err(e) => e,
                    Ok(_) if m.role == "target" => "it is a target (one-way: it only receives); rbucardo has no one-way replication. \
                        To replicate to it, make it a full member (add_sync with it listed, on every member), or keep a Bucardo sync for it"
                        .to_string(),
                    Ok(_) if m.role == "fullcopy" => "it is a fullcopy target (whole tables copied on every run); rbucardo replicates \
                        changes only: copy once (pg_dump --data-only) or keep a Bucardo fullcopy sync for it"
                        .to_string(),
                    Ok(_) => format!("its role is {}", m.role),
                },
            };
            later.push(Step::skip(format!("sync {}: db {} left out: {why}", s.name, m.db)));
        }
        imported.push(Imported { sync: s, members: sources });
    }

    // Peers: the other members of the imported syncs.
    let peers: BTreeSet<&str> = imported.iter().flat_map(|i| i.members.iter().map(String::as_str)).filter(|d| *d != this_db).collect();
    for d in &cfg.dbs {
        if d.name == this_db {
            if d.makedelta {
                steps.push(Step::skip(format!("db {}: makedelta is not needed: rbucardo forwards every change it applies to its other peers", d.name)));
            }
            continue;
        }
        if !peers.contains(d.name.as_str()) {
            steps.push(Step::skip(format!(
                "db {}: shares no imported sync with this node, so it is not added here (a peer that never connects would hold this node's change log)",
                d.name
            )));
            continue;
        }
        if local.dbs.contains(&d.name) {
            steps.push(Step::info("exists", format!("db {} exists here: kept as it is", d.name)));
        } else {
            let conninfo = conninfo_for(d).expect("members have a conninfo");
            let mut note = format!(
                "this node connects to {} with the fields Bucardo connects with; check that they work from this server (psql \"...\")",
                d.name
            );
            if !d.pass.is_empty() {
                note.push_str("; the conninfo holds Bucardo's stored password (shown redacted here and in rbucardo.dbs)");
            }
            note.push_str(&format!(
                "; Bucardo usually connects as a superuser: give {0} a login role of its own named {0}, member of rbucardo_peer, \
                 and use it in the conninfo (a superuser login may act as any peer there)",
                d.name
            ));
            let template = format!("SELECT rbucardo.add_db({}, $1)", quote_literal(&d.name));
            let shown = if conninfo.contains("password") { crate::base::pq::redact_conninfo(&conninfo) } else { conninfo.clone() };
            steps.push(Step::run_secret("add_db", &template, &shown, conninfo, note));
            // Bucardo replicated no schema change: a peer's DDL runs here only at the limited
            // level (never as a superuser), rather than the trusted level add_db gives a peer
            // this node connects to.
            steps.push(Step::run(
                "set_peer_policy",
                format!("SELECT rbucardo.set_peer_policy({}, ddl => 'limited')", quote_literal(&d.name)),
                format!("Bucardo replicated no DDL: {}'s schema changes apply here at the limited level; set 'trusted' if it administers the schema (docs/security.md)", d.name),
            ));
        }
        if d.makedelta {
            steps.push(Step::skip(format!("db {}: makedelta is not needed: rbucardo forwards every change it applies to its other peers", d.name)));
        }
    }

    // Relgroups -> herds, with their tables and sequences.
    let used_herds: BTreeSet<&str> = imported.iter().map(|i| i.sync.herd.as_str()).collect();
    let goat_by_id: BTreeMap<i64, &BGoat> = cfg.goats.iter().map(|g| (g.id, g)).collect();
    let mut herds: Vec<&String> = cfg.herds.iter().collect();
    herds.sort();
    let mut strategies = Vec::new();
    let all_members: Vec<String> = {
        let mut m: BTreeSet<String> = peers.iter().map(|s| s.to_string()).collect();
        m.insert(this_db.to_string());
        m.into_iter().collect()
    };
    for h in herds {
        if !used_herds.contains(h.as_str()) {
            steps.push(Step::skip(format!(
                "relgroup {h}: no imported sync uses it, so it is not added (rbucardo captures a table as soon as it is in a herd)"
            )));
            continue;
        }
        if local.herds.contains(h) {
            steps.push(Step::info("exists", format!("herd {h} exists here: its tables are added to it")));
        } else {
            steps.push(Step::run("add_herd", format!("SELECT rbucardo.add_herd({})", quote_literal(h)), format!("Bucardo relgroup {h}")));
        }
        for (_, id) in cfg.herdmap.iter().filter(|(hh, _)| hh == h) {
            let Some(g) = goat_by_id.get(id) else { continue };
            let name = format!("{}.{}", g.schema, g.table);
            let missing = if local.missing.contains(id) {
                format!("; {name} does not exist on this node: create it first (same definition as on {}), the import fails without it", g.db)
            } else {
                String::new()
            };
            if g.ghost {
                steps.push(Step::skip(format!("{} {name}: a ghost in Bucardo (triggers dropped, not replicated): not added", g.reltype)));
                continue;
            }
            if g.reltype == "sequence" {
                steps.push(Step::run(
                    "add_sequence",
                    format!("SELECT rbucardo.add_sequence({}, {})", quote_literal(h), regclass_literal(&g.schema, &g.table)),
                    format!(
                        "Bucardo copies a sequence's value to the other dbs; rbucardo instead gives every node disjoint values \
                         (the sync's sequence strategy, re-based above every value in use: docs/sequences.md){missing}"
                    ),
                ));
                continue;
            }
            steps.push(Step::run(
                "add_table",
                format!("SELECT rbucardo.add_table({}, {})", quote_literal(h), regclass_literal(&g.schema, &g.table)),
                format!("capture starts at once: the table replicates with every peer once its sync is added{missing}"),
            ));
            if !g.conflict_strategy.is_empty() {
                let (rb, note) = map_strategy(&g.conflict_strategy, &all_members);
                if let Some(rb) = rb {
                    strategies.push(Step::run(
                        "set_table_strategy",
                        format!("SELECT rbucardo.set_table_strategy({}, {})", regclass_literal(&g.schema, &g.table), quote_literal(&rb)),
                        format!(
                            "{name}: {note}. Note: Bucardo 5.6's daemon applies the sync's strategy to every table and ignores this per-table \
                             setting; rbucardo honours it"
                        ),
                    ));
                }
            }
            if !g.makedelta.is_empty() {
                steps.push(Step::skip(format!("table {name}: makedelta is not needed: rbucardo forwards every change it applies to its other peers")));
            }
        }
    }

    // Syncs.
    for i in &imported {
        let s = i.sync;
        let mut dbs = i.members.clone();
        dbs.sort();
        if local.syncs.contains(&s.name) {
            steps.push(Step::info("exists", format!("sync {} exists here: kept as it is", s.name)));
        } else {
            let strategy = if s.conflict_strategy.is_empty() { &cfg.default_conflict_strategy } else { &s.conflict_strategy };
            let (rb, note) = map_strategy(strategy, &dbs);
            let rb = rb.unwrap_or_else(|| "latest".into());
            let note = if note.is_empty() { "no strategy in Bucardo: 'latest'".to_string() } else { note };
            steps.push(Step::run(
                "add_sync",
                format!(
                    "SELECT rbucardo.add_sync({}, {}, {}, {})",
                    quote_literal(&s.name),
                    quote_literal(&s.herd),
                    sql_array(&dbs),
                    quote_literal(&rb)
                ),
                format!("Bucardo dbgroup {} (sources {}); conflicts: {note}", s.dbgroup, dbs.join(", ")),
            ));
            if s.status != "active" {
                steps.push(Step::run(
                    "pause_sync",
                    format!("SELECT rbucardo.pause_sync({})", quote_literal(&s.name)),
                    format!("the sync is {} in Bucardo; rbucardo.resume_sync() starts it", s.status),
                ));
            }
        }
        if s.onetimecopy != 0 {
            steps.push(Step::skip(format!(
                "sync {}: onetimecopy={} is not imported: rbucardo copies no table contents; the tables must already be equal (docs/from-bucardo.md, cutover)",
                s.name, s.onetimecopy
            )));
        }
        let mut settings = Vec::new();
        if !s.autokick {
            settings.push("autokick=false (rbucardo wakes its worker at every commit; rbucardo.kick() wakes it by hand)".to_string());
        }
        if !s.checktime.is_empty() {
            settings.push(format!("checktime={} (the rbucardo worker never sleeps longer than a few seconds)", s.checktime));
        }
        if !s.stayalive || !s.kidsalive {
            settings.push("stayalive/kidsalive (rbucardo runs one background worker per database, always)".to_string());
        }
        if !s.lifetime.is_empty() || s.maxkicks != 0 {
            settings.push("lifetime/maxkicks (no processes to recycle)".to_string());
        }
        if s.deletemethod != "delete" {
            settings.push(format!("deletemethod={} (only used for full copies)", s.deletemethod));
        }
        if !s.isolation_level.is_empty() {
            settings.push(format!("isolation_level={} (rbucardo applies each remote transaction whole, in its own transaction)", s.isolation_level));
        }
        if s.rebuild_index != 0 {
            settings.push("rebuild_index (only used for full copies)".to_string());
        }
        if !settings.is_empty() {
            steps.push(Step::skip(format!("sync {}: settings with no equivalent, not needed: {}", s.name, settings.join("; "))));
        }
    }
    steps.extend(strategies);

    // Custom hooks of what was imported.
    let imported_syncs: BTreeSet<&str> = imported.iter().map(|i| i.sync.name.as_str()).collect();
    let imported_goats: BTreeSet<i64> = cfg.herdmap.iter().filter(|(h, _)| used_herds.contains(h.as_str())).map(|(_, g)| *g).collect();
    for c in &cfg.customs {
        let concerns = imported_syncs.contains(c.sync.as_str()) || c.goat.is_some_and(|g| imported_goats.contains(&g)) || (c.sync.is_empty() && c.goat.is_none());
        if !concerns {
            continue;
        }
        let on = match c.goat.and_then(|g| goat_by_id.get(&g)) {
            Some(g) => format!(" on {}.{}", g.schema, g.table),
            None if !c.sync.is_empty() => format!(" on sync {}", c.sync),
            None => String::new(),
        };
        let what = match c.kind.as_str() {
            "customcode conflict" => "Perl conflict code is not run: write a SQL function and set it with rbucardo.set_table_strategy(tbl, 'custom:schema.function')",
            "customcode" => "Perl hooks are not run; triggers on the tables (which rbucardo does not fire while applying: session_replication_role = replica) or the change log can replace them",
            "customname" => "rbucardo finds a table by the same schema and name on every node: rename the table on the nodes instead",
            "customcols" => "rbucardo replicates whole rows, matching columns by name; columns only one node has keep their values (or defaults) there",
            _ => "rbucardo captures changes with its own triggers (rbucardo_capture)",
        };
        steps.push(Step::skip(format!("{} {}{on}: {what}", c.kind, c.name)));
    }
    steps.extend(later);
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// Reading Bucardo over libpq.

fn text(r: &Row, i: usize) -> String {
    r.text(i).unwrap_or_default()
}

fn int(r: &Row, i: usize) -> i64 {
    text(r, i).parse().unwrap_or(0)
}

fn read(conninfo: &str) -> BucardoConfig {
    let mut c = PeerConn::connect(conninfo, TIMEOUT).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            format!("cannot reach the Bucardo database: {e}"),
            "Pass the conninfo of Bucardo's own database (the one `bucardo install` created, usually dbname=bucardo user=bucardo), as psql would take it. The Bucardo daemon need not run.",
        )
    });
    let mut q = |sql: &str| -> Vec<Row> {
        c.query(sql, &[] as &[Param], TIMEOUT).unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("cannot read the Bucardo configuration: {e}"),
                "import_bucardo reads the schema of Bucardo 5 (5.6); upgrade an older Bucardo with `bucardo upgrade` first.",
            )
        })
    };
    let is_bucardo = q("SELECT (to_regclass('bucardo.db') IS NOT NULL AND to_regclass('bucardo.goat') IS NOT NULL
                          AND to_regclass('bucardo.herdmap') IS NOT NULL AND to_regclass('bucardo.sync') IS NOT NULL
                          AND to_regclass('bucardo.dbmap') IS NOT NULL)::text, current_database()::text");
    if is_bucardo.first().map(|r| text(r, 0)).as_deref() != Some("true") {
        let db = is_bucardo.first().map(|r| text(r, 1)).unwrap_or_default();
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("database {db} is not a Bucardo configuration database (no bucardo.db, goat, herdmap, sync and dbmap tables)"),
            "Connect to the database `bucardo install` created (usually dbname=bucardo); the replicated databases hold only Bucardo's triggers and delta tables.",
        );
    }
    let mut cfg = BucardoConfig::default();
    let setting = |rows: Vec<Row>| rows.first().map(|r| text(r, 0)).unwrap_or_default();
    cfg.version = setting(q("SELECT setting FROM bucardo.bucardo_config WHERE name = 'bucardo_version'"));
    cfg.default_conflict_strategy = setting(q("SELECT setting FROM bucardo.bucardo_config WHERE name = 'default_conflict_strategy'"));
    cfg.dbs = q("SELECT name, dbtype, dbdsn, coalesce(dbhost, ''), coalesce(dbport, ''), coalesce(dbname, ''), coalesce(dbuser, ''),
                        coalesce(dbpass, ''), dbconn, coalesce(dbservice, ''), status, makedelta::text
                   FROM bucardo.db ORDER BY name")
    .iter()
    .map(|r| BDb {
        name: text(r, 0),
        dbtype: text(r, 1),
        dbdsn: text(r, 2),
        host: text(r, 3),
        port: text(r, 4),
        dbname: text(r, 5),
        user: text(r, 6),
        pass: text(r, 7),
        conn: text(r, 8),
        service: text(r, 9),
        status: text(r, 10),
        makedelta: text(r, 11) == "true",
    })
    .collect();
    cfg.herds = q("SELECT name FROM bucardo.herd ORDER BY name").iter().map(|r| text(r, 0)).collect();
    cfg.herdmap = q("SELECT h.herd, h.goat::text FROM bucardo.herdmap h JOIN bucardo.goat g ON g.id = h.goat
                      ORDER BY h.herd, h.priority DESC, g.reltype = 'sequence', g.schemaname, g.tablename")
        .iter()
        .map(|r| (text(r, 0), int(r, 1)))
        .collect();
    cfg.goats = q("SELECT id::text, db, schemaname, tablename, reltype, coalesce(conflict_strategy, ''), coalesce(makedelta, ''), ghost::text
                     FROM bucardo.goat ORDER BY id")
        .iter()
        .map(|r| BGoat {
            id: int(r, 0),
            db: text(r, 1),
            schema: text(r, 2),
            table: text(r, 3),
            reltype: text(r, 4),
            conflict_strategy: text(r, 5),
            makedelta: text(r, 6),
            ghost: text(r, 7) == "true",
        })
        .collect();
    cfg.syncs = q("SELECT name, coalesce(herd, ''), coalesce(dbs, ''), status, conflict_strategy, onetimecopy::text, autokick::text,
                          stayalive::text, kidsalive::text, coalesce(checktime::text, ''), deletemethod, coalesce(isolation_level, ''),
                          coalesce(lifetime::text, ''), maxkicks::text, rebuild_index::text
                     FROM bucardo.sync ORDER BY name")
        .iter()
        .map(|r| BSync {
            name: text(r, 0),
            herd: text(r, 1),
            dbgroup: text(r, 2),
            status: text(r, 3),
            conflict_strategy: text(r, 4),
            onetimecopy: int(r, 5),
            autokick: text(r, 6) == "true",
            stayalive: text(r, 7) == "true",
            kidsalive: text(r, 8) == "true",
            checktime: text(r, 9),
            deletemethod: text(r, 10),
            isolation_level: text(r, 11),
            lifetime: text(r, 12),
            maxkicks: int(r, 13),
            rebuild_index: int(r, 14),
        })
        .collect();
    cfg.members = q("SELECT dbgroup, db, role FROM bucardo.dbmap ORDER BY dbgroup, priority DESC, db")
        .iter()
        .map(|r| BMember { dbgroup: text(r, 0), db: text(r, 1), role: text(r, 2) })
        .collect();
    cfg.customs = q("SELECT CASE WHEN c.whenrun = 'conflict' THEN 'customcode conflict' ELSE 'customcode' END, c.name,
                            coalesce(m.sync, ''), m.goat::text
                       FROM bucardo.customcode c JOIN bucardo.customcode_map m ON m.code = c.id
                      WHERE m.active AND c.status = 'active'
                     UNION ALL
                     SELECT 'customname', coalesce(newname, ''), coalesce(sync, ''), goat::text FROM bucardo.customname
                     UNION ALL
                     SELECT 'customcols', coalesce(clause, ''), coalesce(sync, ''), goat::text FROM bucardo.customcols
                     UNION ALL
                     SELECT 'custom trigger', trigger_name, '', goat::text FROM bucardo.bucardo_custom_trigger WHERE status = 'active'
                     ORDER BY 1, 2")
        .iter()
        .map(|r| BCustom { kind: text(r, 0), name: text(r, 1), sync: text(r, 2), goat: r.text(3).and_then(|g| g.parse().ok()) })
        .collect();
    cfg
}

/// This node's catalog, as far as the plan needs it.
fn local_state(cfg: &BucardoConfig) -> Local {
    let names = |sql: &str| -> BTreeSet<String> {
        Spi::connect(|c| c.select(sql, None, &[]).unwrap().filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
    };
    let mut local = Local {
        node: Spi::get_one::<String>("SELECT name FROM rbucardo.node").ok().flatten(),
        dbs: names("SELECT name FROM rbucardo.db"),
        herds: names("SELECT name FROM rbucardo.herd"),
        syncs: names("SELECT name FROM rbucardo.sync"),
        missing: BTreeSet::new(),
    };
    for g in &cfg.goats {
        let rel = format!("{}.{}", regclass_name_part(&g.schema), regclass_name_part(&g.table));
        let exists = Spi::get_one_with_args::<bool>("SELECT to_regclass($1) IS NOT NULL", &[rel.as_str().into()]).ok().flatten() == Some(true);
        if !exists {
            local.missing.insert(g.id);
        }
    }
    local
}

/// Reads a Bucardo 5 configuration database and returns the rbucardo statements that give this
/// node (Bucardo's db `this_db`; by default this node's name) the same replication. With
/// `dry_run` false it also runs them, in the caller's transaction: all or nothing.
#[pg_extern(volatile)]
fn import_bucardo(
    conninfo: Option<&str>,
    dry_run: default!(Option<bool>, "true"),
    this_db: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(step, i32), name!(action, String), name!(sql, Option<String>), name!(note, String))> {
    // SAFETY: reads the current user's superuser flag from the catalog cache, on the backend's thread.
    if !unsafe { pg_sys::superuser() } {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only a superuser may import a Bucardo configuration",
            "Run rbucardo.import_bucardo() as a superuser: it reads Bucardo's stored passwords and writes rbucardo's catalog.",
        );
    }
    let Some(conninfo) = conninfo else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "conninfo is NULL", "Pass the conninfo of Bucardo's database, e.g. 'host=bucardo.example dbname=bucardo user=bucardo'.");
    };
    let cfg = read(conninfo);
    let local = local_state(&cfg);
    let this_db = match (this_db, &local.node) {
        (Some(d), _) => d.to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "which of Bucardo's dbs is this node?",
            format!(
                "Name it: rbucardo.import_bucardo(conninfo, dry_run, this_db => '...'); Bucardo's dbs: {}.",
                cfg.dbs.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    let steps = plan(&cfg, &this_db, &local).unwrap_or_else(|why| {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("cannot import the Bucardo configuration on this node: {why}"),
            "this_db names the Bucardo db this node is; a node already initialised must have that name (rbucardo.node).",
        )
    });
    if dry_run == Some(false) {
        for s in &steps {
            let Some(shown) = &s.sql else { continue };
            let done = match &s.exec {
                Some((template, secret)) => Spi::run_with_args(template, &[secret.as_str().into()]),
                None => Spi::run(shown),
            };
            done.unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("import step failed: {e}"), format!("The statement was: {shown}")));
        }
    }
    TableIterator::new(steps.into_iter().enumerate().map(|(i, s)| (i as i32 + 1, s.action, s.sql, s.note)).collect::<Vec<_>>())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn db(name: &str) -> BDb {
        BDb {
            name: name.into(),
            dbtype: "postgres".into(),
            host: "10.0.0.1".into(),
            port: "5432".into(),
            dbname: "shop".into(),
            user: "bucardo".into(),
            status: "active".into(),
            ..Default::default()
        }
    }

    fn config() -> BucardoConfig {
        BucardoConfig {
            version: "5.6.0".into(),
            dbs: vec![db("a"), db("b"), db("c")],
            herds: vec!["shop".into(), "unused".into()],
            herdmap: vec![("shop".into(), 1), ("shop".into(), 2), ("unused".into(), 3)],
            goats: vec![
                BGoat { id: 1, db: "a".into(), schema: "public".into(), table: "Items".into(), reltype: "table".into(), conflict_strategy: "bucardo_abort".into(), ..Default::default() },
                BGoat { id: 2, db: "a".into(), schema: "public".into(), table: "docno".into(), reltype: "sequence".into(), ..Default::default() },
                BGoat { id: 3, db: "a".into(), schema: "public".into(), table: "other".into(), reltype: "table".into(), ..Default::default() },
            ],
            syncs: vec![BSync {
                name: "s".into(),
                herd: "shop".into(),
                dbgroup: "g".into(),
                status: "active".into(),
                conflict_strategy: "b a".into(),
                autokick: true,
                stayalive: true,
                kidsalive: true,
                deletemethod: "delete".into(),
                ..Default::default()
            }],
            members: vec![
                BMember { dbgroup: "g".into(), db: "a".into(), role: "source".into() },
                BMember { dbgroup: "g".into(), db: "b".into(), role: "source".into() },
                BMember { dbgroup: "g".into(), db: "c".into(), role: "target".into() },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r"a\b"), r"E'a\\b'");
        assert_eq!(regclass_literal("public", "Items"), r#"'public."Items"'::regclass"#);
        assert_eq!(regclass_literal("my schema", "t'x"), r#"'"my schema"."t''x"'::regclass"#);
        assert_eq!(conninfo_value("se cret'"), r"'se cret\''");
    }

    #[test]
    fn conninfo_from_bucardo_fields() {
        let mut d = db("a");
        d.conn = "sslmode=require;connect_timeout=5".into();
        d.pass = "p w".into();
        assert_eq!(conninfo_for(&d).unwrap(), "host=10.0.0.1 port=5432 dbname=shop sslmode=require connect_timeout=5 user=bucardo password='p w'");
        d.dbdsn = "dbi:Pg:dbname=x;host=h".into();
        assert_eq!(conninfo_for(&d).unwrap(), "dbname=x host=h user=bucardo password='p w'");
        d.dbtype = "mysql".into();
        assert!(conninfo_for(&d).is_err());
    }

    #[test]
    fn strategies() {
        let m = vec!["a".to_string(), "b".to_string()];
        assert_eq!(map_strategy("bucardo_latest", &m).0.as_deref(), Some("latest"));
        assert_eq!(map_strategy("bucardo_abort", &m).0.as_deref(), Some("abort"));
        assert_eq!(map_strategy("bucardo_source", &m).0.as_deref(), Some("source"));
        assert_eq!(map_strategy("b a c", &m).0.as_deref(), Some("b,a"));
        assert_eq!(map_strategy("", &m).0, None);
    }

    /// A stored password is run, never shown.
    #[test]
    fn a_password_is_passed_apart() {
        let mut cfg = config();
        cfg.dbs[1].pass = "s3cret".into();
        let steps = plan(&cfg, "a", &Local::default()).unwrap();
        let add = steps.iter().find(|s| s.action == "add_db").unwrap();
        assert!(!add.sql.as_deref().unwrap().contains("s3cret"), "{:?}", add.sql);
        assert!(!add.note.contains("s3cret"));
        let (template, secret) = add.exec.as_ref().unwrap();
        assert_eq!(template, "SELECT rbucardo.add_db('b', $1)");
        assert!(secret.contains("s3cret"));
    }

    #[test]
    fn plan_of_a_two_source_sync_with_a_target() {
        let steps = plan(&config(), "a", &Local::default()).unwrap();
        let sql: Vec<&str> = steps.iter().filter_map(|s| s.sql.as_deref()).collect();
        assert_eq!(
            sql,
            vec![
                "SELECT rbucardo.init_node('a', 1)",
                "SELECT rbucardo.add_db('b', 'host=10.0.0.1 port=5432 dbname=shop user=bucardo')",
                "SELECT rbucardo.set_peer_policy('b', ddl => 'limited')",
                "SELECT rbucardo.add_herd('shop')",
                r#"SELECT rbucardo.add_table('shop', 'public."Items"'::regclass)"#,
                "SELECT rbucardo.add_sequence('shop', 'public.docno'::regclass)",
                "SELECT rbucardo.add_sync('s', 'shop', ARRAY['a', 'b'], 'b,a')",
                r#"SELECT rbucardo.set_table_strategy('public."Items"'::regclass, 'abort')"#,
            ]
        );
        let skipped: Vec<&str> = steps.iter().filter(|s| s.action == "skipped").map(|s| s.note.as_str()).collect();
        assert!(skipped.iter().any(|n| n.starts_with("db c:")), "{skipped:?}");
        assert!(skipped.iter().any(|n| n.starts_with("relgroup unused:")), "{skipped:?}");
        assert!(skipped.iter().any(|n| n.starts_with("sync s: db c left out: it is a target")), "{skipped:?}");
        // The target itself imports nothing but its identity.
        let steps = plan(&config(), "c", &Local::default()).unwrap();
        assert_eq!(steps.iter().filter(|s| s.sql.is_some()).count(), 1);
        assert!(plan(&config(), "zz", &Local::default()).is_err());
    }
}
