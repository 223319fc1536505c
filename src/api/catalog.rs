//! Catalog and user API: this node's identity, its peers, herds of tables and syncs.
//!
//! These functions are how an operator builds a topology; the same calls run on every node
//! (a star: branches list only the main server; or a full mesh). They own the tables `node`,
//! `db`, `herd`, `herd_table` and `sync`.

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::node::{fingerprint, me, me_or_raise, valid_name};
use crate::base::signals;
use crate::schema::herd;

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
        crate::log::spancache::forget();
        Spi::run(
            "DELETE FROM rbucardo.change_log;
             UPDATE rbucardo.db SET node_id = NULL;
             UPDATE rbucardo.peer_state SET in_tick = 0, in_seq = rbucardo.whole_tick(),
                    out_tick = 0, out_seq = rbucardo.whole_tick(), state = 'disconnected', last_error = NULL;",
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
    crate::schema::sequences::on_init_node();
    signals::wake_local_worker_at_commit();
    format!("node {name} is node id {node_id}")
}

/// Adds a peer. With a conninfo this node connects to it and does both directions over that
/// connection; without one the peer is passive here and connects in (a branch behind NAT).
#[pg_extern(volatile)]
fn add_db(name: &str, conninfo: default!(Option<&str>, "NULL")) -> String {
    if !valid_name(name) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_NAME, format!("invalid db name {name:?}"), "Use the peer's node name (letters, digits, underscores).");
    }
    if let Some(c) = conninfo {
        if crate::base::pq::redact_conninfo(c) == "<invalid conninfo>" {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid conninfo for {name}"), "Use libpq key=value pairs or a postgresql:// URI.");
        }
    }
    if me().is_ok_and(|m| m.name == name) {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{name} is this node"), "add_db() names the other nodes; this node's name is set by init_node().");
    }
    // The defaults for the mission's star: the node this one connects out to (main, seen from
    // a branch) administers the schema and relays the other branches' changes; a node that
    // connects in (a branch, seen from main) speaks for itself, and its schema changes wait
    // for a role to run as. See docs/security.md.
    let (ddl, relay) = if conninfo.is_some() { ("trusted", true) } else { ("limited", false) };
    Spi::run_with_args(
        "INSERT INTO rbucardo.db (name, conninfo, ddl, relay) VALUES ($1, $2, $3, $4)",
        &[name.into(), conninfo.into(), ddl.into(), relay.into()],
    )
        .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("db {name} already exists"), "Remove it first with rbucardo.remove_db(), or pick another name."));
    Spi::run_with_args("INSERT INTO rbucardo.peer_state (db) VALUES ($1)", &[name.into()]).expect("peer state");
    signals::wake_local_worker_at_commit();
    format!("added db {name}{}", if conninfo.is_some() { "" } else { " (passive: it connects to this node)" })
}

/// Sets what this node lets a peer send it: its DDL level ('none', 'limited' or 'trusted'),
/// the role its schema changes run as at the limited level (never a superuser), and whether it
/// may relay other nodes' changes. NULL leaves a setting as it is.
#[pg_extern(volatile)]
fn set_peer_policy(
    name: &str,
    ddl: default!(Option<&str>, "NULL"),
    ddl_role: default!(Option<&str>, "NULL"),
    relay: default!(Option<bool>, "NULL"),
) -> String {
    if let Some(level) = ddl {
        if crate::base::node::DdlLevel::parse(level).is_none() {
            raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown DDL level {level:?}"), "Use 'none', 'limited' or 'trusted' (see docs/security.md).");
        }
    }
    if let Some(role) = ddl_role {
        match crate::base::node::too_strong_for_limited(role) {
            Err(why) => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, why, "Create a role of limited rights for the peer's schema changes first."),
            Ok(Some(why)) => raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("role {role:?} is too strong to run a peer's schema changes: {why}"),
                "Choose a role with only the rights those changes need (CREATE on the replicated schemas, ownership of their tables), or make the peer trusted.",
            ),
            Ok(None) => {}
        }
    }
    let n = Spi::connect_mut(|c| {
        c.update(
            "UPDATE rbucardo.db SET ddl = coalesce($2, ddl), ddl_role = coalesce($3::name, ddl_role), relay = coalesce($4, relay) WHERE name = $1",
            None,
            &[name.into(), ddl.into(), ddl_role.into(), relay.into()],
        )
        .map(|t| t.len())
        .unwrap_or(0)
    });
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no db named {name}"), "See SELECT * FROM rbucardo.dbs.");
    }
    signals::wake_local_worker_at_commit();
    let (ddl, role, relay) = Spi::get_three_with_args::<String, String, bool>("SELECT ddl, ddl_role::text, relay FROM rbucardo.db WHERE name = $1", &[name.into()]).unwrap_or((None, None, None));
    format!(
        "{name}: DDL {}{}, {}",
        ddl.unwrap_or_default(),
        role.map(|r| format!(" as {r}")).unwrap_or_default(),
        if relay == Some(true) { "may relay other nodes' changes" } else { "speaks only for itself" }
    )
}

/// Called by `CREATE EXTENSION` so the new database gets its worker without waiting.
#[pg_extern(volatile, parallel_unsafe)]
fn wake_launcher() {
    signals::wake_launcher_at_commit();
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
    // The log it held back goes at once, not at the worker's next trim (with rbucardo's
    // statements resolved as in the housekeeper, whatever this session's search_path).
    let _path = crate::base::xact::LocalSetting::pinned_search_path();
    if let Ok(me) = crate::base::node::me() {
        crate::log::changelog::trim(me.id, None);
    }
    signals::wake_local_worker_at_commit();
    format!("removed db {name}")
}

/// Creates a named set of tables.
#[pg_extern(volatile)]
fn add_herd(name: &str) -> String {
    Spi::run_with_args("INSERT INTO rbucardo.herd (name) VALUES ($1)", &[name.into()])
        .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("herd {name} already exists"), "Pick another name, or add tables to the existing herd."));
    format!("added herd {name}")
}

/// Adds a table to a herd and starts capturing its changes. The table needs a primary key or a
/// unique index on NOT NULL columns (Odoo's many2many tables have only the latter).
#[pg_extern(sql = "CREATE FUNCTION rbucardo.add_table(herd text, tbl regclass) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn add_table(herd: &str, tbl: pg_sys::Oid) -> String {
    herd::add_table(herd, tbl)
}

/// Adds every ordinary table of a schema to a herd; stops at the first table that cannot be
/// replicated, naming it.
#[pg_extern(volatile)]
fn add_all_tables(herd: &str, schema: default!(&str, "'public'")) -> i64 {
    herd::add_all_tables(herd, schema)
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
    herd::require_herd(herd);
    // A named rule, a priority list of node names or a custom function.
    let conflict_strategy = crate::apply::conflicts::check_strategy(conflict_strategy);
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
    crate::schema::sequences::on_add_sync(name, herd, sequence_strategy);
    signals::wake_local_worker_at_commit();
    format!("added sync {name}")
}

/// Adds a peer to an existing sync: on a provider, the store that joins through it (see
/// rbucardo.join). A node that replicates already gets a new direct peer this way only if
/// that peer's retained log is no older than its data (docs/operations.md).
#[pg_extern(volatile)]
fn add_sync_db(sync: &str, db: &str) -> String {
    let known = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1)", &[db.into()]).ok().flatten() == Some(true);
    if !known {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("unknown db {db}"), "Add it first with rbucardo.add_db(name, conninfo).");
    }
    let n = Spi::connect_mut(|c| {
        c.update("UPDATE rbucardo.sync SET dbs = dbs || $2 WHERE name = $1 AND NOT $2 = ANY (dbs)", None, &[sync.into(), db.into()]).map(|t| t.len()).unwrap_or(0)
    });
    if n == 0 {
        let exists = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.sync WHERE name = $1)", &[sync.into()]).ok().flatten() == Some(true);
        if !exists {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {sync}"), "See SELECT * FROM rbucardo.syncs.");
        }
        return format!("{db} is in sync {sync} already");
    }
    signals::wake_local_worker_at_commit();
    format!("added {db} to sync {sync}")
}

fn update_sync(name: &str, sql: &str) {
    let n = Spi::connect_mut(|c| c.update(sql, None, &[name.into()]).map(|t| t.len()).unwrap_or(0));
    if n == 0 {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {name}"), "See SELECT * FROM rbucardo.syncs.");
    }
    signals::wake_local_worker_at_commit();
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

/// Wakes this database's worker now instead of at its next wake-up, for a round that pulls
/// from every peer it connects to.
#[pg_extern(volatile)]
fn kick(name: &str) -> String {
    update_sync(name, "SELECT 1 FROM rbucardo.sync WHERE name = $1");
    signals::ask_for_pulls();
    format!("kicked sync {name}")
}

/// V1 call info for `config_changed`, as PG_FUNCTION_INFO_V1 would declare it.
// SAFETY: the exported name is the one fmgr looks up for `rbucardo_config_changed` and
// clashes with no other symbol; the signature is the C one PG_FUNCTION_INFO_V1 declares.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_rbucardo_config_changed() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// Trigger on `node`, `db`, `sync` and `herd_table` (per row changed, and per TRUNCATE): a
/// change made by hand, not through the functions above (which bump the generation
/// themselves: on a catalog not yet updated from 0.1 there is no trigger), reaches the worker
/// and what every backend keeps of the configuration (src/base/kept.rs) at commit all the
/// same: the invalidation per changing command, the generation bump once per transaction. A
/// statement that changes no row does nothing. Such a transaction may not be prepared:
/// COMMIT PREPARED would bump nothing.
///
/// # Safety
///
/// Only fmgr calls it (as the trigger function `rbucardo.config_changed()`).
#[pg_guard]
// SAFETY: `rbucardo_config_changed` is the C symbol named in the CREATE FUNCTION below and
// clashes with no other; the signature is that of a V1 C function.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn rbucardo_config_changed(_fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    thread_local! {
        static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    // This session's own later commands see the change too: the invalidation is queued for
    // every command that changes a row (PostgreSQL drops the duplicates within a command).
    // SAFETY: queues an invalidation message in the current transaction, as DDL does.
    unsafe { pg_sys::CacheInvalidateRelcacheAll() };
    if !ARMED.with(|a| a.replace(true)) {
        signals::wake_local_worker_at_commit();
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || ARMED.with(|a| a.set(false)));
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, || ARMED.with(|a| a.set(false)));
        pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Prepare, || ARMED.with(|a| a.set(false)));
        crate::base::xact::refuse_prepare("changed rbucardo's configuration");
    }
    pg_sys::Datum::from(0usize)
}

pgrx::extension_sql!(
    "CREATE FUNCTION rbucardo.config_changed() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'rbucardo_config_changed';
     REVOKE ALL ON FUNCTION rbucardo.config_changed() FROM PUBLIC;
     CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.node FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.db FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.sync FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_changed AFTER INSERT OR UPDATE OR DELETE ON rbucardo.herd_table FOR EACH ROW EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.node FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.db FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.sync FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
     CREATE TRIGGER config_truncated AFTER TRUNCATE ON rbucardo.herd_table FOR EACH STATEMENT EXECUTE FUNCTION rbucardo.config_changed();
     -- Also in replica mode (apply sessions, a peer's session once it pushed).
     ALTER TABLE rbucardo.node ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
     ALTER TABLE rbucardo.db ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
     ALTER TABLE rbucardo.sync ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;
     ALTER TABLE rbucardo.herd_table ENABLE ALWAYS TRIGGER config_changed, ENABLE ALWAYS TRIGGER config_truncated;",
    name = "config_changed_triggers",
    requires = ["catalog"]
);

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
            crate::base::node::replica_key(oid)
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
        assert!(crate::base::node::me().is_ok());
        // What a physical copy on another server looks like: same row, other fingerprint.
        Spi::run("UPDATE rbucardo.node SET fingerprint = '1:/elsewhere:5432'").unwrap();
        let err = crate::base::node::me().unwrap_err();
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
        let a = crate::base::clock::now();
        let b = crate::base::clock::now();
        assert!(b > a);
        let far = b + 1_000_000;
        crate::base::clock::observe(far);
        assert!(crate::base::clock::now() > far);
    }
}
