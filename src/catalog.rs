//! Catalog and user API: this node's identity, its peers, herds of tables and syncs.
//!
//! These functions are how an operator builds a topology; the same calls run on every node
//! (a star: branches list only the main server; or a full mesh). They own the tables `node`,
//! `db`, `herd`, `herd_table` and `sync`.

use pgrx::prelude::*;

use crate::error::raise;

/// Strategies accepted by add_sync; their meaning is in docs/sql-reference.md.
pub const STRATEGIES: &[&str] = &["latest", "source", "target", "skip", "abort"];

/// This node as it is configured: id and name.
#[derive(Clone, Debug)]
pub struct Me {
    pub id: i32,
    pub name: String,
}

/// What tells this server apart from a physical copy of it: host name, system identifier,
/// data directory and port. A copy keeps the system identifier, so one of the others must
/// differ; moving a node (new host, directory or port) asks for init_node again, which keeps
/// its identity if given the same name and id.
fn fingerprint() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let server = Spi::get_one::<String>(
        "SELECT (SELECT system_identifier FROM pg_control_system())::text || ':' ||
                current_setting('data_directory') || ':' || current_setting('port')",
    )
    .expect("reading the server fingerprint")
    .unwrap_or_default();
    format!("{}:{server}", host.trim())
}

/// This node's identity, or why it may not replicate: not initialised, or a physical copy of
/// another node (its fingerprint differs from the one recorded by init_node).
pub fn me() -> Result<Me, String> {
    let row = Spi::get_three::<i32, String, String>("SELECT node_id, name, fingerprint FROM rbucardo.node")
        .unwrap_or((None, None, None));
    match row {
        (Some(id), Some(name), Some(fp)) => {
            if fp != fingerprint() {
                Err(format!(
                    "this database is a copy of node {name} (id {id}) made on another server or data directory; \
                     it must not replicate as that node. Give it its own identity with rbucardo.init_node(name, node_id)"
                ))
            } else {
                Ok(Me { id, name })
            }
        }
        _ => Err("this node is not initialised: call rbucardo.init_node(name, node_id)".into()),
    }
}

/// Like [`me`], but raises the reason as an error for SQL callers.
pub fn me_or_raise() -> Me {
    me().unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, e, "See docs/operations.md, section Nodes."))
}

/// Gives this database its identity in the cluster. Node ids are unique in the cluster; a
/// physical copy of a node must be given a new identity before it replicates.
#[pg_extern(volatile)]
fn init_node(name: &str, node_id: i32) -> String {
    if !(1..=1023).contains(&node_id) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("node id {node_id} is out of range"), "Use a node id between 1 and 1023, unique in the cluster.");
    }
    if !valid_name(name) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_NAME, format!("invalid node name {name:?}"), "Use letters, digits and underscores, starting with a letter.");
    }
    if Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1 OR node_id = $2)", &[name.into(), node_id.into()])
        .unwrap_or(Some(false))
        .unwrap_or(false)
    {
        raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("a peer of this node already uses the name {name} or node id {node_id}"), "Every node needs a name and id of its own.");
    }
    // A new identity (a copy becoming a node of its own): what was queued here belongs to the
    // node it was copied from, which still ships it; peers must be learned again. Progress per
    // origin stays, because it describes the data this database holds.
    let renamed = Spi::get_one_with_args::<bool>(
        "SELECT node_id <> $1 OR name <> $2 FROM rbucardo.node",
        &[node_id.into(), name.into()],
    )
    .unwrap_or(None)
    .unwrap_or(false);
    if renamed {
        Spi::run(
            "DELETE FROM rbucardo.change_log;
             UPDATE rbucardo.db SET node_id = NULL;
             UPDATE rbucardo.peer_state SET in_tick = 0, in_seq = 9223372036854775807,
                    out_tick = 0, out_seq = 9223372036854775807, state = 'disconnected', last_error = NULL;",
        )
        .expect("resetting replication state");
    }
    Spi::run_with_args(
        "INSERT INTO rbucardo.node (node_id, name, fingerprint) VALUES ($1, $2, $3)
         ON CONFLICT (singleton) DO UPDATE SET node_id = EXCLUDED.node_id, name = EXCLUDED.name,
                                                fingerprint = EXCLUDED.fingerprint, created = now()",
        &[node_id.into(), name.into(), fingerprint().into()],
    )
    .expect("recording the node");
    crate::sequences::on_init_node();
    crate::worker::wake_local_worker_at_commit();
    format!("node {name} is node id {node_id}")
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Adds a peer. With a conninfo this node connects to it and does both directions over that
/// connection; without one the peer is passive here and connects in (a branch behind NAT).
#[pg_extern(volatile)]
fn add_db(name: &str, conninfo: default!(Option<&str>, "NULL")) -> String {
    if !valid_name(name) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_NAME, format!("invalid db name {name:?}"), "Use the peer's node name (letters, digits, underscores).");
    }
    if let Some(c) = conninfo {
        if crate::peer::redact_conninfo(c) == "<invalid conninfo>" {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid conninfo for {name}"), "Use libpq key=value pairs or a postgresql:// URI.");
        }
    }
    if me().is_ok_and(|m| m.name == name) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{name} is this node"), "add_db() names the other nodes; this node's name is set by init_node().");
    }
    Spi::run_with_args("INSERT INTO rbucardo.db (name, conninfo) VALUES ($1, $2)", &[name.into(), conninfo.into()])
        .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("db {name} already exists"), "Remove it first with rbucardo.remove_db(), or pick another name."));
    Spi::run_with_args("INSERT INTO rbucardo.peer_state (db) VALUES ($1)", &[name.into()]).expect("peer state");
    crate::worker::wake_local_worker_at_commit();
    format!("added db {name}{}", if conninfo.is_some() { "" } else { " (passive: it connects to this node)" })
}

/// Removes a peer; refuses while a sync still lists it.
#[pg_extern(volatile)]
fn remove_db(name: &str) -> String {
    if Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.sync WHERE $1 = ANY (dbs))", &[name.into()]).ok().flatten() == Some(true) {
        raise(PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST, format!("db {name} is part of a sync"), "Remove it from its syncs first (rbucardo.remove_sync).");
    }
    let n = Spi::connect_mut(|c| c.update("DELETE FROM rbucardo.db WHERE name = $1", None, &[name.into()]).map(|t| t.len()).unwrap_or(0));
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no db named {name}"), "See SELECT * FROM rbucardo.dbs.");
    }
    crate::worker::wake_local_worker_at_commit();
    format!("removed db {name}")
}

/// Creates a named set of tables.
#[pg_extern(volatile)]
fn add_herd(name: &str) -> String {
    Spi::run_with_args("INSERT INTO rbucardo.herd (name) VALUES ($1)", &[name.into()])
        .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("herd {name} already exists"), "Pick another name, or add tables to the existing herd."));
    format!("added herd {name}")
}

fn require_herd(herd: &str) {
    if Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd WHERE name = $1)", &[herd.into()]).ok().flatten() != Some(true) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no herd named {herd}"), "Create it first with rbucardo.add_herd(name).");
    }
}

/// Adds a table to a herd and starts capturing its changes. The table needs a primary key or a
/// unique index on NOT NULL columns (Odoo's many2many tables have only the latter).
#[pg_extern(sql = "CREATE FUNCTION rbucardo.add_table(herd text, tbl regclass) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn add_table(herd: &str, tbl: pg_sys::Oid) -> String {
    require_herd(herd);
    let (name, kind, persistence) = Spi::get_three_with_args::<String, String, String>(
        "SELECT c.oid::regclass::text, c.relkind::text, c.relpersistence::text FROM pg_class c WHERE c.oid = $1",
        &[tbl.into()],
    )
    .unwrap_or((None, None, None));
    let name = name.unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("no table with oid {}", tbl.to_u32()), "Pass a table name, e.g. 'public.orders'."));
    if kind.as_deref() != Some("r") || persistence.as_deref() != Some("p") {
        raise(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("{name} is not an ordinary permanent table"), "Only ordinary, permanent tables (not views, partitioned parents, temporary or unlogged tables) can be replicated.");
    }
    if name.starts_with("rbucardo.") {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{name} belongs to rbucardo itself"), "Replicate your application's tables.");
    }
    let Some(key) = crate::capture::replica_key(tbl) else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {name} has no primary key and no unique index on NOT NULL columns"),
            "Add a primary key, or a unique index on NOT NULL columns, so that rows can be identified on every node.",
        );
    };
    Spi::run_with_args(
        "INSERT INTO rbucardo.herd_table (herd, relid, key_cols) VALUES ($1, $2, $3::name[]) ON CONFLICT DO NOTHING",
        &[herd.into(), tbl.into(), key.clone().into()],
    )
    .expect("recording the table");
    let has_trigger = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = 'rbucardo_capture')",
        &[tbl.into()],
    )
    .ok()
    .flatten()
        == Some(true);
    if !has_trigger {
        Spi::run(&format!(
            "CREATE TRIGGER rbucardo_capture AFTER INSERT OR UPDATE OR DELETE ON {name}
                 FOR EACH ROW EXECUTE FUNCTION rbucardo.capture();
             CREATE TRIGGER rbucardo_capture_truncate AFTER TRUNCATE ON {name}
                 FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.capture();"
        ))
        .expect("creating the capture triggers");
    }
    crate::sequences::on_add_table(herd, tbl);
    format!("added {name} to herd {herd} (key: {})", key.join(", "))
}

/// Adds every ordinary table of a schema to a herd; stops at the first table that cannot be
/// replicated, naming it.
#[pg_extern(volatile)]
fn add_all_tables(herd: &str, schema: default!(&str, "'public'")) -> i64 {
    require_herd(herd);
    let tables: Vec<pg_sys::Oid> = Spi::connect(|c| {
        c.select(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relpersistence = 'p' ORDER BY c.relname",
            None,
            &[schema.into()],
        )
        .unwrap()
        .map(|r| r.get::<pg_sys::Oid>(1).unwrap().unwrap())
        .collect()
    });
    for t in &tables {
        add_table(herd, *t);
    }
    tables.len() as i64
}

/// Replicates a herd among the named dbs. The same call can run on every node: the list may
/// include this node's own name, which is ignored here.
#[pg_extern(volatile)]
fn add_sync(
    name: &str,
    herd: &str,
    dbs: Vec<String>,
    conflict_strategy: default!(&str, "'latest'"),
    sequence_strategy: default!(&str, "'interleave'"),
) -> String {
    require_herd(herd);
    // A named rule, a priority list of node names or a custom function.
    let conflict_strategy = crate::conflicts::check_strategy(conflict_strategy);
    let me = me_or_raise();
    for db in &dbs {
        let known = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1)", &[db.as_str().into()]).ok().flatten() == Some(true);
        if !known && *db != me.name {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("unknown db {db} in sync {name}"), "Add it first with rbucardo.add_db(name, conninfo).");
        }
    }
    Spi::run_with_args(
        "INSERT INTO rbucardo.sync (name, herd, dbs, conflict_strategy) VALUES ($1, $2, $3, $4)",
        &[name.into(), herd.into(), dbs.into(), conflict_strategy.as_str().into()],
    )
    .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("sync {name} already exists"), "Remove it first with rbucardo.remove_sync(name)."));
    crate::sequences::on_add_sync(name, herd, sequence_strategy);
    crate::worker::wake_local_worker_at_commit();
    format!("added sync {name}")
}

fn update_sync(name: &str, sql: &str) {
    let n = Spi::connect_mut(|c| c.update(sql, None, &[name.into()]).map(|t| t.len()).unwrap_or(0));
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {name}"), "See SELECT * FROM rbucardo.syncs.");
    }
    crate::worker::wake_local_worker_at_commit();
}

/// Stops replicating a sync (its change log entries are kept until peers confirm them).
#[pg_extern(volatile)]
fn remove_sync(name: &str) -> String {
    update_sync(name, "DELETE FROM rbucardo.sync WHERE name = $1");
    format!("removed sync {name}")
}

/// Pauses a sync: nothing is exchanged for it until resume_sync; changes keep being captured.
#[pg_extern(volatile)]
fn pause_sync(name: &str) -> String {
    update_sync(name, "UPDATE rbucardo.sync SET paused = true WHERE name = $1");
    format!("paused sync {name}")
}

/// Resumes a paused sync.
#[pg_extern(volatile)]
fn resume_sync(name: &str) -> String {
    update_sync(name, "UPDATE rbucardo.sync SET paused = false WHERE name = $1");
    format!("resumed sync {name}")
}

/// Wakes this database's worker now instead of at its next wake-up.
#[pg_extern(volatile)]
fn kick(name: &str) -> String {
    update_sync(name, "SELECT 1 FROM rbucardo.sync WHERE name = $1");
    crate::worker::wake_local_worker();
    format!("kicked sync {name}")
}

/// A peer this node talks to, as the worker and the peer-facing functions see it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub conninfo: Option<String>,
    pub node_id: Option<i32>,
}

/// Peers that take part in at least one sync that is not paused.
pub fn active_peers() -> Vec<Peer> {
    Spi::connect(|c| {
        c.select(
            "SELECT d.name, d.conninfo, d.node_id FROM rbucardo.db d
              WHERE EXISTS (SELECT 1 FROM rbucardo.sync s WHERE d.name = ANY (s.dbs) AND NOT s.paused)
              ORDER BY d.name",
            None,
            &[],
        )
        .unwrap()
        .map(|r| Peer { name: r.get(1).unwrap().unwrap(), conninfo: r.get(2).unwrap(), node_id: r.get(3).unwrap() })
        .collect()
    })
}

/// Records the node id a peer announced; a different id than the one on record is refused,
/// because it means two servers claim the same name.
pub fn learn_peer_id(name: &str, node_id: i32) {
    let known = Spi::get_one_with_args::<i32>("SELECT node_id FROM rbucardo.db WHERE name = $1", &[name.into()]);
    match known {
        Ok(Some(id)) if id == node_id => {}
        Ok(Some(id)) => raise(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            format!("peer {name} announced node id {node_id}, but it is known here as node id {id}"),
            "Two servers use the same node name, or the peer was re-initialised; fix its identity or remove and re-add the db.",
        ),
        _ => {
            let exists = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1)", &[name.into()]).ok().flatten() == Some(true);
            if !exists {
                raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("node {name} is not a known db here"), format!("On this node, run SELECT rbucardo.add_db('{name}');"));
            }
            Spi::run_with_args("UPDATE rbucardo.db SET node_id = $2 WHERE name = $1", &[name.into(), node_id.into()])
                .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("node id {node_id} is already used by another db"), "Node ids must be unique in the cluster."));
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn one(sql: &str) -> Option<String> {
        Spi::get_one::<String>(sql).unwrap()
    }

    #[pg_test]
    fn replica_key_prefers_primary_key_then_smallest_not_null_unique_index() {
        Spi::run("CREATE TABLE rk_pk (a int, b int PRIMARY KEY, c int NOT NULL UNIQUE)").unwrap();
        Spi::run("CREATE TABLE rk_rel (x int NOT NULL, y int NOT NULL, z int UNIQUE, UNIQUE (x, y))").unwrap();
        Spi::run("CREATE TABLE rk_none (x int, y int UNIQUE)").unwrap();
        let key = |t: &str| {
            let oid = Spi::get_one::<pg_sys::Oid>(&format!("SELECT '{t}'::regclass::oid")).unwrap().unwrap();
            crate::capture::replica_key(oid)
        };
        assert_eq!(key("rk_pk"), Some(vec!["b".to_string()]));
        // z is unique but nullable, so the two-column index on NOT NULL columns is the key.
        assert_eq!(key("rk_rel"), Some(vec!["x".to_string(), "y".to_string()]));
        assert_eq!(key("rk_none"), None);
    }

    #[pg_test]
    fn add_table_installs_capture_triggers() {
        Spi::run("CREATE TABLE at_rel (x int NOT NULL, y int NOT NULL, UNIQUE (x, y))").unwrap();
        Spi::run("SELECT rbucardo.add_herd('at_herd')").unwrap();
        let msg = one("SELECT rbucardo.add_table('at_herd', 'at_rel')").unwrap();
        assert!(msg.contains("key: x, y"), "{msg}");
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'at_rel'::regclass AND tgname LIKE 'rbucardo_capture%'").unwrap();
        assert_eq!(n, Some(2));
        // Adding it again is harmless.
        one("SELECT rbucardo.add_table('at_herd', 'at_rel')");
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'at_rel'::regclass AND tgname LIKE 'rbucardo_capture%'").unwrap();
        assert_eq!(n, Some(2));
    }

    #[pg_test(error = "table nokey has no primary key and no unique index on NOT NULL columns")]
    fn add_table_refuses_a_table_without_key() {
        Spi::run("CREATE TABLE nokey (x int, y text)").unwrap();
        Spi::run("SELECT rbucardo.add_herd('nk')").unwrap();
        Spi::run("SELECT rbucardo.add_table('nk', 'public.nokey')").unwrap();
    }

    #[pg_test(error = "no herd named missing")]
    fn add_table_needs_a_herd() {
        Spi::run("CREATE TABLE hk (id int primary key)").unwrap();
        Spi::run("SELECT rbucardo.add_table('missing', 'hk')").unwrap();
    }

    #[pg_test(error = "node id 0 is out of range")]
    fn init_node_checks_the_id() {
        Spi::run("SELECT rbucardo.init_node('main', 0)").unwrap();
    }

    #[pg_test(error = "unknown conflict strategy \"sometimes\"")]
    fn add_sync_checks_the_strategy() {
        Spi::run("SELECT rbucardo.add_herd('s_herd')").unwrap();
        Spi::run("SELECT rbucardo.add_sync('s', 's_herd', ARRAY['x'], 'sometimes')").unwrap();
    }

    #[pg_test(error = "unknown db nowhere in sync s2")]
    fn add_sync_checks_the_dbs() {
        Spi::run("SELECT rbucardo.init_node('main', 1)").unwrap();
        Spi::run("SELECT rbucardo.add_herd('s2_herd')").unwrap();
        Spi::run("SELECT rbucardo.add_sync('s2', 's2_herd', ARRAY['main', 'nowhere'])").unwrap();
    }

    #[pg_test]
    fn a_copied_node_refuses_to_replicate_as_its_source() {
        Spi::run("SELECT rbucardo.init_node('main', 1)").unwrap();
        assert!(crate::catalog::me().is_ok());
        // What a physical copy on another server looks like: same row, other fingerprint.
        Spi::run("UPDATE rbucardo.node SET fingerprint = '1:/elsewhere:5432'").unwrap();
        let err = crate::catalog::me().unwrap_err();
        assert!(err.contains("is a copy of node main"), "{err}");
    }

    #[pg_test]
    fn views_hide_passwords() {
        Spi::run("SELECT rbucardo.add_db('peer_a', 'host=h port=5 user=u password=hunter2 dbname=store')").unwrap();
        let shown = one("SELECT conninfo FROM rbucardo.dbs WHERE name = 'peer_a'").unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("host=h"), "{shown}");
    }

    #[pg_test]
    fn hlc_is_monotonic_and_moves_past_remote_clocks() {
        let a = crate::clock::now();
        let b = crate::clock::now();
        assert!(b > a);
        let far = b + 1_000_000;
        crate::clock::observe(far);
        assert!(crate::clock::now() > far);
    }
}
