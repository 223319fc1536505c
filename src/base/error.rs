//! One way to raise a user-facing error: every bad input gets a message and a hint, so the
//! operator learns what to do instead of reading a backtrace.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Raises an ERROR with a hint; never returns (the transaction is aborted by PostgreSQL).
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), "rbucardo").set_hint(hint.into()).report(PgLogLevel::ERROR);
    unreachable!("ereport(ERROR) returned")
}
