//! DDL replication (invariant 6): schema changes travel in the same ordered stream as the rows.
//!
//! Owns the event triggers `rbucardo_ddl` (ddl_command_end) and `rbucardo_ddl_drop` (sql_drop),
//! both calling the C function [`rbucardo_ddl_trigger`], and the GUC `rbucardo.replicate_ddl`.
//!
//! - **Capture.** At the end of a DDL command that touched an object in a replicated schema (a
//!   schema holding at least one table of a herd), the client's query string
//!   (`current_query()`) is appended to the transaction's change buffer (src/capture.rs) as an
//!   `Op::Ddl` change, with the search_path of the moment, so it gets an ordinal between the row
//!   changes made before and after it. A query string holding several statements is recorded
//!   once per transaction, when its first replicated command ends. Statements of it that are not
//!   schema changes (SELECT, INSERT/UPDATE/DELETE/MERGE, COPY, transaction control, SET, ...) and
//!   CREATE TEMP statements are left out of the recorded text: their rows travel as row changes.
//!   Commands run by CREATE EXTENSION, with `rbucardo.replicate_ddl = off`, or in apply sessions
//!   (`session_replication_role = replica`) are not recorded.
//! - **Apply.** [`apply`] runs the text with SPI, in order with the rows, with the recorded
//!   search_path set locally. A failure raises an error naming the command: the batch is
//!   refused and that peer's stream stops until the schema is fixed here.
//! - **Herds follow the schema.** A table created in a replicated schema joins the herd of the
//!   other tables there (the first by name) through `add_table`: on the origin when its CREATE
//!   TABLE ends, on a peer when the replicated CREATE TABLE ends (the triggers are ENABLE ALWAYS
//!   and act in replica mode only while [`apply`] runs). Their sequences are then partitioned
//!   by the `rbucardo_sequences` event trigger and `add_table` (src/sequences.rs).
//! - **Drops.** A dropped table leaves its herd (`herd_table`) on every node.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::base::error::raise;
use crate::base::sqltext::{abbreviate, replicable_text, sets_anything};
use crate::base::xact::{LocalSetting, RunAs};
use crate::log::capture;
use crate::schema::herd;

/// `rbucardo.replicate_ddl`: off makes schema changes local to this node.
pub static REPLICATE_DDL: GucSetting<bool> = GucSetting::<bool>::new(true);

thread_local! {
    /// Set while [`replicate_ddl`] runs its command: the key under which it recorded it.
    static EXPLICIT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Registers the GUC; called from `_PG_init`.
pub fn init() {
    GucRegistry::define_bool_guc(
        c"rbucardo.replicate_ddl",
        c"Whether schema changes in replicated schemas are replicated to the peers.",
        c"Off: DDL run in this session stays on this node (superusers only).",
        &REPLICATE_DDL,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// A command seen by the event trigger.
struct Cmd {
    objid: Option<pg_sys::Oid>,
    is_class: bool,
    schema: Option<String>,
    tag: String,
}

fn commands(drop: bool) -> Vec<Cmd> {
    let sql = if drop {
        "SELECT objid, classid = 'pg_catalog.pg_class'::pg_catalog.regclass, schema_name, object_type
           FROM pg_catalog.pg_event_trigger_dropped_objects() WHERE NOT is_temporary"
    } else {
        "SELECT objid, classid = 'pg_catalog.pg_class'::pg_catalog.regclass, schema_name, command_tag
           FROM pg_catalog.pg_event_trigger_ddl_commands() WHERE NOT in_extension"
    };
    Spi::connect(|c| {
        c.select(sql, None, &[])
            .expect("reading the event trigger's commands")
            .map(|r| Cmd {
                objid: r.get::<pg_sys::Oid>(1).ok().flatten(),
                is_class: r.get::<bool>(2).ok().flatten() == Some(true),
                schema: r.get::<String>(3).ok().flatten(),
                tag: r.get::<String>(4).ok().flatten().unwrap_or_default(),
            })
            .collect()
    })
}

/// Schemas that hold at least one table of a herd.
fn replicated_schemas() -> Vec<String> {
    Spi::get_one::<Vec<String>>(
        "SELECT pg_catalog.array_agg(DISTINCT n.nspname::text)
           FROM rbucardo.herd_table t
           JOIN pg_catalog.pg_class c ON c.oid = t.relid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// A table just created in a replicated schema joins the herd of the other tables there.
fn auto_join(table: pg_sys::Oid) {
    let herd = Spi::get_one_with_args::<String>(
        "SELECT t.herd FROM rbucardo.herd_table t JOIN pg_catalog.pg_class c ON c.oid = t.relid
          WHERE c.relnamespace = (SELECT relnamespace FROM pg_catalog.pg_class
                                   WHERE oid = $1 AND relkind = 'r' AND relpersistence = 'p')
            AND t.relid <> $1
            AND NOT EXISTS (SELECT 1 FROM rbucardo.herd_table h WHERE h.relid = $1)
          ORDER BY t.herd LIMIT 1",
        &[table.into()],
    )
    .ok()
    .flatten();
    let Some(herd) = herd else { return };
    if crate::base::node::replica_key(table).is_none() {
        let name = Spi::get_one_with_args::<String>("SELECT $1::pg_catalog.regclass::text", &[table.into()]).ok().flatten().unwrap_or_default();
        ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("new table {name} did not join herd {herd}: it has no primary key and no unique index on NOT NULL columns"),
            "Add a primary key, then run rbucardo.add_table() on every node."
        );
        return;
    }
    herd::add_table(&herd, table);
}

/// `role`: the user running the command (before the trigger switched to the extension's owner).
///
/// # Safety
///
/// `td` must be the EventTriggerData of the event trigger call now running (checked by
/// `rbucardo_ddl_trigger`), on the backend's main thread.
unsafe fn on_event(td: *mut pg_sys::EventTriggerData, role: &str, search_path: String) {
    // SAFETY: td->event is a static event name and GetCommandTagName returns a static tag
    // name; SessionReplicationRole is a plain backend global; debug_query_string is checked
    // for NULL and otherwise the NUL-terminated text of the running client query.
    let drop = CStr::from_ptr((*td).event).to_bytes() == b"sql_drop";
    let tag = CStr::from_ptr(pg_sys::GetCommandTagName((*td).tag)).to_string_lossy().into_owned();
    let replica = pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
    let applying = crate::apply::ddl::applying();
    let record = !replica && REPLICATE_DDL.get();
    let query = if pg_sys::debug_query_string.is_null() {
        None
    } else {
        Some(CStr::from_ptr(pg_sys::debug_query_string).to_string_lossy().into_owned())
    };
    let explicit = EXPLICIT.with(|e| e.borrow().clone());
    let key = match &explicit {
        Some(k) => Some(k.clone()),
        None => query.as_ref().map(|q| format!("{}\u{0}{q}", pg_sys::GetCurrentStatementStartTimestamp())),
    };
    if Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('rbucardo.herd_table') IS NOT NULL").ok().flatten() != Some(true) {
        return; // rbucardo itself is being dropped
    }
    let cmds = commands(drop);
    if cmds.is_empty() {
        return;
    }
    let in_herd = |c: &Cmd| {
        drop && c.is_class
            && c.objid.is_some_and(|o| {
                Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd_table WHERE relid = $1)", &[o.into()])
                    .ok()
                    .flatten()
                    == Some(true)
            })
    };
    if record {
        if let (Some(query), Some(key)) = (query, key.as_ref().filter(|_| explicit.is_none())) {
            let key = key.clone();
            if !capture::ddl_recorded(&key) {
                let schemas = replicated_schemas();
                let hit = cmds.iter().find(|c| c.schema.as_ref().is_some_and(|s| schemas.contains(s)) || in_herd(c));
                if let Some(hit) = hit {
                    let text = replicable_text(&query);
                    if !text.is_empty() {
                        let schema = hit.schema.clone().unwrap_or_default();
                        capture::record_ddl(key, &schema, &tag, text, search_path, role.to_string());
                    }
                }
            }
        }
    }
    if record && !drop {
        // The recorded change carries the shape of the tables its query string touched, as
        // they are after its latest command: a peer that finds the change made already checks
        // that it ended the same (see `apply`).
        let tables: Vec<pg_sys::Oid> = cmds.iter().filter(|c| c.is_class).filter_map(|c| c.objid).collect();
        if let Some(key) = key {
            if let Some(all) = capture::ddl_touched(&key, &tables) {
                capture::set_ddl_shape(&key, table_shape(&all));
            }
        }
    }
    if drop {
        // Dropped tables leave their herd here, whether the drop is replicated or not.
        // (Only when a table went: a change to herd_table drops every session's kept
        // configuration, src/base/kept.rs.)
        let oids: Vec<pg_sys::Oid> = cmds.iter().filter(|c| c.is_class).filter_map(|c| c.objid).collect();
        if !oids.is_empty() {
            Spi::run_with_args("DELETE FROM rbucardo.herd_table WHERE relid = ANY ($1)", &[oids.into()]).expect("forgetting dropped tables");
        }
    } else if record || (replica && applying) {
        for c in &cmds {
            if c.is_class && matches!(c.tag.as_str(), "CREATE TABLE" | "CREATE TABLE AS" | "SELECT INTO") {
                if let Some(oid) = c.objid {
                    auto_join(oid);
                }
            }
        }
    }
}

/// V1 call info for the event trigger function.
// SAFETY: the exported name is the one fmgr looks up for `rbucardo_ddl_trigger` and clashes
// with no other symbol; the signature is the C one PG_FUNCTION_INFO_V1 declares.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_rbucardo_ddl_trigger() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The event trigger function of `rbucardo_ddl` (ddl_command_end) and `rbucardo_ddl_drop`
/// (sql_drop).
///
/// # Safety
///
/// Only fmgr calls it (as `rbucardo.ddl_trigger()`), with a valid `fcinfo`.
#[pg_guard]
// SAFETY: `rbucardo_ddl_trigger` is the C symbol named in the extension's CREATE FUNCTION and
// clashes with no other; the signature is that of a V1 C function.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn rbucardo_ddl_trigger(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid (see above); context is NULL or a Node, of which only the tag is
    // read until the CALLED_AS_EVENT_TRIGGER check passes. creating_extension is a backend
    // global, and GetUserNameFromId (noerr false) returns a palloc'd name or raises.
    let td = (*fcinfo).context as *mut pg_sys::EventTriggerData;
    if td.is_null() || (*td).type_ != pg_sys::NodeTag::T_EventTriggerData {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED,
            "rbucardo.ddl_trigger() must be called as an event trigger",
            "It is attached by the extension; do not call it directly.",
        );
    }
    let replica = pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
    if pg_sys::creating_extension || (replica && !crate::apply::ddl::applying() && CStr::from_ptr((*td).event).to_bytes() != b"sql_drop") {
        return pg_sys::Datum::from(0usize);
    }
    // What the user's session sees, before anything is pinned.
    let search_path = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')").ok().flatten().unwrap_or_default();
    // The catalog belongs to the extension, not to the user running the DDL; and while it
    // runs as the extension's owner, nothing in the user's search_path may stand in for what
    // its queries call.
    let owner = RunAs::extension_owner();
    let _path = LocalSetting::pinned_search_path();
    let role = CStr::from_ptr(pg_sys::GetUserNameFromId(owner.previous_user(), false)).to_string_lossy().into_owned();
    on_event(td, &role, search_path);
    pg_sys::Datum::from(0usize)
}

/// The columns and types of `tables` (ordinary and partitioned tables only), as JSON text.
fn table_shape(tables: &[pg_sys::Oid]) -> String {
    Spi::get_one_with_args::<pgrx::JsonB>("SELECT rbucardo.table_shape($1::pg_catalog.oid[])", &[tables.to_vec().into()])
        .ok()
        .flatten()
        .map(|j| j.0.to_string())
        .unwrap_or_else(|| "{}".into())
}

/// The shape of every replicated table here, with its md5: what peers compare with theirs.
/// Every link asks for it every few seconds, and a hub serves every store's: it is kept
/// while no table, schema, type or the configuration changed (src/base/kept.rs).
pub fn my_shape() -> (String, pgrx::JsonB) {
    thread_local! {
        static SHAPE: crate::base::kept::Kept<(String, serde_json::Value)> = Default::default();
    }
    let (md5, shape) = SHAPE.with(|k| {
        k.get_or("", || {
            let (md5, shape) = Spi::get_two::<String, pgrx::JsonB>(
                "SELECT pg_catalog.md5(s::text), s
                   FROM rbucardo.table_shape(ARRAY(SELECT relid FROM rbucardo.herd_table)) s",
            )
            .expect("computing the table shape");
            (md5.unwrap_or_default(), shape.map_or(serde_json::json!({}), |s| s.0))
        })
    });
    (md5, pgrx::JsonB(shape))
}

/// Keeps the shape a peer reported, for validate_schema.
pub fn store_peer_shape(peer_name: &str, shape: pgrx::JsonB) {
    Spi::run_with_args(
        "UPDATE rbucardo.peer_state SET schema_shape = $2, schema_at = pg_catalog.now() WHERE db = $1",
        &[peer_name.into(), shape.into()],
    )
    .expect("storing a peer's table shape");
}

/// md5 of the shape a peer last reported.
pub fn peer_shape_md5(peer_name: &str) -> Option<String> {
    Spi::get_one_with_args::<String>("SELECT pg_catalog.md5(schema_shape::text) FROM rbucardo.peer_state WHERE db = $1", &[peer_name.into()])
        .ok()
        .flatten()
}

/// Runs `sql` here and replicates it to every node, whatever schema it touches (DDL outside the
/// replicated schemas is otherwise local). Row changes it makes travel as row changes.
pub fn replicate(sql: &str) -> String {
    let text = replicable_text(sql);
    if text.is_empty() {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "rbucardo.replicate_ddl() found no schema change in its argument",
            "Pass DDL such as CREATE, ALTER, DROP or COMMENT; row changes to replicated tables replicate by themselves.",
        );
    }
    if sets_anything(sql) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "rbucardo.replicate_ddl() does not take SET statements",
            "Peers run the command with the search_path and as the role current at the call: qualify names (schema.table) or SET them before calling.",
        );
    }
    if !REPLICATE_DDL.get() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rbucardo.replicate_ddl() was called with rbucardo.replicate_ddl = off",
            "RESET rbucardo.replicate_ddl, or run the command directly to keep it local.",
        );
    }
    let search_path = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')").ok().flatten().unwrap_or_default();
    let schema = Spi::get_one::<String>("SELECT pg_catalog.current_schema()::text").ok().flatten().unwrap_or_default();
    // SAFETY: reads a timestamp this backend keeps for its current statement, on its main thread.
    let key = format!("replicate_ddl\u{0}{}\u{0}{sql}", unsafe { pg_sys::GetCurrentStatementStartTimestamp() });
    // Recorded before it runs, so that rows it writes come after it in the stream.
    let role = Spi::get_one::<String>("SELECT current_user::text").ok().flatten().unwrap_or_default();
    capture::record_ddl(key.clone(), &schema, "replicate_ddl", text.clone(), search_path, role);
    EXPLICIT.with(|e| *e.borrow_mut() = Some(key));
    let result = PgTryBuilder::new(|| Spi::run(sql).map_err(|e| e.to_string())).finally(|| EXPLICIT.with(|e| *e.borrow_mut() = None)).execute();
    if let Err(e) = result {
        raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("rbucardo.replicate_ddl(): {e}"), "Nothing was run or replicated.");
    }
    format!("replicated: {}", abbreviate(&text))
}


#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn replicable_text_keeps_schema_changes_only() {
        let t = crate::base::sqltext::replicable_text(
            "BEGIN; CREATE TABLE a (id int); INSERT INTO a VALUES (1); CREATE TEMP TABLE tmp (x int);
             SET search_path = public; ALTER TABLE a ADD COLUMN b text DEFAULT 'x;y'; SELECT 1; COMMIT;",
        );
        assert_eq!(t, "CREATE TABLE a (id int);\nALTER TABLE a ADD COLUMN b text DEFAULT 'x;y'");
        assert_eq!(crate::base::sqltext::replicable_text("SELECT rbucardo.add_table('h', 't')"), "");
    }

    #[pg_test]
    fn shapes_show_missing_and_retyped_columns() {
        Spi::run("CREATE TABLE shp_a (id int PRIMARY KEY, note text, size int)").unwrap();
        let shape = Spi::get_one::<pgrx::JsonB>("SELECT rbucardo.table_shape(ARRAY['shp_a'::regclass::oid])").unwrap().unwrap();
        assert_eq!(shape.0, serde_json::json!({"public.shp_a": {"id": "integer", "note": "text", "size": "integer"}}));
        let diff = Spi::get_one::<String>(
            "SELECT string_agg(concat_ws(' ', table_name, column_name, coalesce(here, '-'), coalesce(there, '-')), ',')
               FROM rbucardo.shape_differences(rbucardo.table_shape(ARRAY['shp_a'::regclass::oid]),
                    '{\"public.shp_a\": {\"id\": \"integer\", \"note\": \"character varying(5)\", \"extra\": \"date\"}}')",
        );
        assert_eq!(diff, Ok(Some("public.shp_a extra - date,public.shp_a note text character varying(5),public.shp_a size integer -".into())));
    }

    #[pg_test(error = "sync \"nope\" does not exist")]
    fn validate_schema_refuses_an_unknown_sync() {
        Spi::run("SELECT * FROM rbucardo.validate_schema('nope')").unwrap();
    }

    #[pg_test(error = "rbucardo.replicate_ddl() does not take SET statements")]
    fn replicate_ddl_refuses_set() {
        Spi::run("SELECT rbucardo.replicate_ddl('SET search_path = elsewhere; CREATE TABLE t (id int PRIMARY KEY)')").unwrap();
    }

    #[pg_test(error = "rbucardo.replicate_ddl() found no schema change in its argument")]
    fn replicate_ddl_needs_ddl() {
        Spi::run("SELECT rbucardo.replicate_ddl('SELECT 1; INSERT INTO nowhere VALUES (1)')").unwrap();
    }

    #[pg_test]
    fn ddl_in_a_replicated_schema_is_recorded_once_with_the_rows() {
        Spi::run(
            "CREATE SCHEMA ddl_t;
             CREATE TABLE ddl_t.base (id int PRIMARY KEY);
             SELECT rbucardo.add_herd('ddl_h');
             SELECT rbucardo.add_table('ddl_h', 'ddl_t.base');",
        )
        .unwrap();
        // Inside a pg_test the client query is the test itself (a SELECT): nothing is recorded,
        // but new tables still join the herd.
        Spi::run("CREATE TABLE ddl_t.n1 (id serial PRIMARY KEY, v text); ALTER TABLE ddl_t.n1 ADD COLUMN w int").unwrap();
        let joined = Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM rbucardo.herd_table WHERE herd = 'ddl_h' AND relid = 'ddl_t.n1'::regclass)",
        );
        assert_eq!(joined, Ok(Some(true)));
        Spi::run("CREATE TEMP TABLE ddl_tmp (id int PRIMARY KEY)").unwrap();
        let temp_joined = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd_table WHERE relid = 'ddl_tmp'::regclass)");
        assert_eq!(temp_joined, Ok(Some(false)));
        Spi::run("DROP TABLE ddl_t.n1").unwrap();
        let left = Spi::get_one::<i64>("SELECT count(*) FROM rbucardo.herd_table WHERE herd = 'ddl_h'");
        assert_eq!(left, Ok(Some(1)));
    }

    /// A user who may create objects shadows `=` on oids (used by the event trigger's catalog
    /// queries) with a function that makes them superuser, puts their schema first in
    /// search_path, runs DDL in a replicated schema and writes a replicated table (the capture
    /// trigger). Both run parts of their work as the bootstrap superuser, with search_path
    /// pinned: the shadow is never called with their rights.
    #[pg_test]
    fn a_shadowing_operator_does_not_run_inside_the_event_trigger() {
        Spi::run(
            "CREATE SCHEMA sec_t;
             CREATE TABLE sec_t.base (id int PRIMARY KEY);
             SELECT rbucardo.add_herd('sec_h');
             SELECT rbucardo.add_table('sec_h', 'sec_t.base');
             CREATE ROLE sec_hostile;
             GRANT CREATE, USAGE ON SCHEMA sec_t TO sec_hostile;
             CREATE SCHEMA sec_evil AUTHORIZATION sec_hostile;
             CREATE TABLE sec_evil.calls (who text);
             GRANT INSERT ON sec_evil.calls TO PUBLIC;
             CREATE FUNCTION sec_evil.eq(oid, oid) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO sec_evil.calls VALUES (current_user);
                 BEGIN
                     ALTER ROLE sec_hostile SUPERUSER;
                 EXCEPTION WHEN others THEN NULL;
                 END;
                 RETURN $1 OPERATOR(pg_catalog.=) $2;
             END $$;
             CREATE OPERATOR sec_evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = sec_evil.eq);
             CREATE FUNCTION sec_evil.eq(oid, regclass) RETURNS boolean LANGUAGE sql AS 'SELECT sec_evil.eq($1, $2::oid)';
             CREATE OPERATOR sec_evil.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = sec_evil.eq);
             GRANT INSERT ON sec_t.base TO sec_hostile;
             SET ROLE sec_hostile;
             SET search_path = sec_evil, pg_catalog;
             CREATE TABLE sec_t.made (id int PRIMARY KEY);
             DROP TABLE sec_t.made;
             INSERT INTO sec_t.base VALUES (1);
             RESET search_path;
             RESET ROLE;",
        )
        .unwrap();
        let superuser = Spi::get_one::<bool>("SELECT rolsuper FROM pg_roles WHERE rolname = 'sec_hostile'").unwrap();
        assert_eq!(superuser, Some(false), "the shadowing operator ran with raised privileges");
        let privileged_calls = Spi::get_one::<i64>("SELECT count(*) FROM sec_evil.calls c JOIN pg_roles r ON r.rolname = c.who WHERE r.rolsuper").unwrap();
        assert_eq!(privileged_calls, Some(0), "the shadowing operator was called as a superuser");
    }
}
