//! rbucardo: multi-master replication for PostgreSQL, entirely inside the server.
//!
//! This file only wires the layers together. Each folder of src/ is a layer and imports only
//! from the layers below it (base, log, apply, schema, api, runtime; see docs/architecture.md
//! and scripts/check-layers.sh, which the test command runs).

use pgrx::prelude::*;

pub mod api;
pub mod apply;
pub mod base;
pub mod log;
pub mod runtime;
pub mod schema;

::pgrx::pg_module_magic!(name, version);

// Catalog tables and views are plain SQL, kept in sql/ so they read as SQL.
pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
pgrx::extension_sql_file!("../sql/conflicts.sql", name = "conflicts", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/exceptions.sql", name = "exceptions", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/monitoring.sql", name = "monitoring", requires = ["catalog", "exceptions", api::monitor::redact_conninfo, api::exceptions::exception_changes]);
pgrx::extension_sql_file!("../sql/ddl.sql", name = "ddl", requires = ["catalog", "capture_trigger_function"]);
pgrx::extension_sql_file!("../sql/cluster.sql", name = "cluster", requires = ["catalog", "conflicts", "exceptions", "monitoring", "ddl", api::monitor::peer_retention_seconds]);
// Last step of CREATE EXTENSION: have the launcher start this database's worker after commit.
pgrx::extension_sql_file!("../sql/join.sql", name = "join", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/diff.sql", name = "diff", requires = ["catalog"]);
pgrx::extension_sql!("SELECT rbucardo.wake_launcher();", name = "wake_launcher", finalize);

/// Refuses to load unless preloaded: the launcher, the shared memory and the capture hooks only
/// exist when the library is in `shared_preload_libraries`, and half a replication system is worse
/// than a clear error.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain global, set by the postmaster while it loads preloaded libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rbucardo must be loaded via shared_preload_libraries",
            "Add rbucardo to shared_preload_libraries in postgresql.conf and restart the server."
        );
    }
    base::clock::init();
    base::signals::init();
    schema::ddl::init();
    log::retention::init();
    log::spancache::init();
    apply::parts::init();
    runtime::housekeeper::init();
    runtime::replicator::init();
    runtime::worker::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn extension_schema_exists() {
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pg_namespace WHERE nspname = 'rbucardo'");
        assert_eq!(n, Ok(Some(1)));
    }

    #[pg_test]
    fn sql_and_rust_agree_on_the_whole_tick() {
        let n = Spi::get_one::<i64>("SELECT rbucardo.whole_tick()");
        assert_eq!(n, Ok(Some(crate::base::wire::WHOLE_TICK)));
    }
}

/// Hooks for `cargo pgrx test`: the test server must preload the library like a real one.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'rbucardo'"]
    }
}
