//! rbucardo: multi-master replication for PostgreSQL, entirely inside the server.
//!
//! This file only wires the subsystems together; each module's header says what it owns.
//! See docs/architecture.md for how the pieces fit.

use pgrx::prelude::*;

pub mod apply;
pub mod capture;
pub mod catalog;
pub mod changelog;
pub mod clock;
pub mod conflicts;
pub mod ddl;
pub mod encoding;
pub mod error;
pub mod exceptions;
pub mod monitor;
pub mod peer;
pub mod replicator;
pub mod sequences;
pub mod transport;
pub mod worker;

::pgrx::pg_module_magic!(name, version);

// Catalog tables and views are plain SQL, kept in sql/ so they read as SQL.
pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
pgrx::extension_sql_file!("../sql/conflicts.sql", name = "conflicts", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/exceptions.sql", name = "exceptions", requires = ["catalog"]);
pgrx::extension_sql_file!("../sql/monitoring.sql", name = "monitoring", requires = ["catalog", "exceptions", monitor::redact_conninfo]);
// Last step of CREATE EXTENSION: have the launcher start this database's worker after commit.
pgrx::extension_sql!("SELECT rbucardo.wake_launcher();", name = "wake_launcher", finalize);

/// Refuses to load unless preloaded: the launcher, the shared memory and the capture hooks only
/// exist when the library is in `shared_preload_libraries`, and half a replication system is worse
/// than a clear error.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        ereport!(
            PgLogLevel::ERROR,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "rbucardo must be loaded via shared_preload_libraries",
            "Add rbucardo to shared_preload_libraries in postgresql.conf and restart the server."
        );
    }
    clock::init();
    ddl::init();
    worker::init();
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
