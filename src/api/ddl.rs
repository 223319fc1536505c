//! `replicate_ddl`: DDL run here and on every node, whatever schema it touches.

use pgrx::prelude::*;

/// Runs `sql` here and replicates it to every node, whatever schema it touches (DDL outside the
/// replicated schemas is otherwise local). Row changes it makes travel as row changes.
#[pg_extern(volatile)]
fn replicate_ddl(sql: &str) -> String {
    crate::schema::ddl::replicate(sql)
}
