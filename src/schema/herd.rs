//! Herd membership: which tables are replicated, with the capture triggers that make them so.
//! Used by `add_table` and by the DDL event trigger (a table created in a replicated schema
//! joins the herd of the other tables there). Owns `herd` and `herd_table`.

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::node::replica_key;

/// Raises an error unless the herd exists.
pub fn require_herd(herd: &str) {
    if Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd WHERE name = $1)", &[herd.into()]).ok().flatten() != Some(true) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no herd named {herd}"), "Create it first with rbucardo.add_herd(name).");
    }
}

/// Adds a table to a herd and starts capturing its changes (see `rbucardo.add_table`).
pub fn add_table(herd: &str, tbl: pg_sys::Oid) -> String {
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
    let schema = Spi::get_one_with_args::<String>("SELECT n.nspname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1", &[tbl.into()])
        .ok()
        .flatten()
        .unwrap_or_default();
    if schema == "rbucardo" || schema == "information_schema" || schema.starts_with("pg_") {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{name} belongs to rbucardo or to the system"), "Replicate your application's tables.");
    }
    let Some(key) = replica_key(tbl) else {
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
    // Its conflict policy may now come from another sync.
    crate::base::signals::wake_local_worker_at_commit();
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
    crate::schema::sequences::on_add_table(herd, tbl);
    format!("added {name} to herd {herd} (key: {})", key.join(", "))
}

/// Adds every ordinary table of a schema to a herd; stops at the first table that cannot be
/// replicated, naming it.
pub fn add_all_tables(herd: &str, schema: &str) -> i64 {
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

