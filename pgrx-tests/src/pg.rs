//! Minimal blocking PostgreSQL client on top of libpq.
//!
//! The harness drives real servers from outside, so it needs a client that is
//! independent of the extension and of any async runtime. Results come back as
//! text exactly as the server formats them, which keeps comparisons between
//! nodes simple and faithful.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;

use libpq_sys as pq;

/// Rows of a text-format result: one `Vec` per row, `None` for SQL NULL.
pub type Rows = Vec<Vec<Option<String>>>;

/// One open libpq connection; closed with `PQfinish` on drop.
///
/// Options such as `connect_timeout=5` go in the conninfo string as usual;
/// they matter when connecting through a proxy that may be stalled.
pub struct Conn {
    raw: *mut pq::PGconn,
}

// A PGconn may move between threads as long as one thread uses it at a time,
// which `&mut self` on every query method guarantees. Tests need this to run a
// query that blocks (stalled link) on a helper thread.
unsafe impl Send for Conn {}

impl Conn {
    /// Opens a connection, returning libpq's error message when it fails.
    pub fn connect(conninfo: &str) -> Result<Conn, String> {
        let c_info =
            CString::new(conninfo).map_err(|_| "conninfo contains a NUL byte".to_string())?;
        // SAFETY: c_info is a valid NUL-terminated string for the call's duration.
        let raw = unsafe { pq::PQconnectdb(c_info.as_ptr()) };
        if raw.is_null() {
            return Err(format!(
                "libpq could not allocate a connection for `{conninfo}`"
            ));
        }
        let conn = Conn { raw };
        // SAFETY: raw is a non-null connection owned by `conn`.
        if unsafe { pq::PQstatus(raw) } != pq::ConnStatusType::CONNECTION_OK {
            return Err(format!("connect `{conninfo}`: {}", conn.error_message()));
        }
        Ok(conn)
    }

    /// Runs one or more statements, discarding any rows.
    pub fn execute(&mut self, sql: &str) -> Result<(), String> {
        self.exec(sql).map(|_| ())
    }

    /// Runs SQL and returns every row of the last statement as text.
    pub fn query(&mut self, sql: &str) -> Result<Rows, String> {
        self.exec(sql)
    }

    /// First column of the first row (`None` for NULL or for no rows at all).
    pub fn query_one(&mut self, sql: &str) -> Result<Option<String>, String> {
        let rows = self.exec(sql)?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten()))
    }

    fn exec(&mut self, sql: &str) -> Result<Rows, String> {
        let c_sql = CString::new(sql).map_err(|_| "SQL contains a NUL byte".to_string())?;
        // SAFETY: self.raw is a live connection, c_sql outlives the call.
        let res = unsafe { pq::PQexec(self.raw, c_sql.as_ptr()) };
        if res.is_null() {
            return Err(self.error_message());
        }
        let result = PgResult(res);
        match result.status() {
            pq::ExecStatusType::PGRES_TUPLES_OK => Ok(result.rows()),
            pq::ExecStatusType::PGRES_COMMAND_OK | pq::ExecStatusType::PGRES_EMPTY_QUERY => {
                Ok(Vec::new())
            }
            status => Err(result.error_message().unwrap_or_else(|| {
                format!(
                    "unexpected result status {status:?}: {}",
                    self.error_message()
                )
            })),
        }
    }

    fn error_message(&self) -> String {
        // SAFETY: self.raw is live; libpq returns a string owned by the connection.
        unsafe { c_string(pq::PQerrorMessage(self.raw)) }
            .unwrap_or_else(|| "unknown libpq error".to_string())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: raw came from PQconnectdb and is finished exactly once.
        unsafe { pq::PQfinish(self.raw) }
    }
}

/// Owns a `PGresult` so that every path frees it.
struct PgResult(*mut pq::PGresult);

impl PgResult {
    fn status(&self) -> pq::ExecStatusType {
        // SAFETY: self.0 is a live result.
        unsafe { pq::PQresultStatus(self.0) }
    }

    /// The server's (or libpq's) message for a failed result, if any.
    fn error_message(&self) -> Option<String> {
        // SAFETY: self.0 is live; the message is owned by the result.
        unsafe { c_string(pq::PQresultErrorMessage(self.0)) }
    }

    fn rows(&self) -> Rows {
        // SAFETY: self.0 is live and indices stay within ntuples x nfields.
        unsafe {
            let (n_rows, n_cols) = (pq::PQntuples(self.0), pq::PQnfields(self.0));
            (0..n_rows)
                .map(|r| (0..n_cols).map(|c| self.value(r, c)).collect())
                .collect()
        }
    }

    /// SAFETY: `row` and `col` must be within the result's bounds.
    unsafe fn value(&self, row: i32, col: i32) -> Option<String> {
        if pq::PQgetisnull(self.0, row, col) == 1 {
            None
        } else {
            Some(
                CStr::from_ptr(pq::PQgetvalue(self.0, row, col))
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    }
}

impl Drop for PgResult {
    fn drop(&mut self) {
        // SAFETY: the result is cleared exactly once.
        unsafe { pq::PQclear(self.0) }
    }
}

/// Copies a libpq-owned C string, trimming the trailing newline libpq adds;
/// `None` when the pointer is null or the message is empty.
///
/// SAFETY: `ptr` must be null or point to a NUL-terminated string.
unsafe fn c_string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    let text = CStr::from_ptr(ptr).to_string_lossy().trim_end().to_string();
    (!text.is_empty()).then_some(text)
}
