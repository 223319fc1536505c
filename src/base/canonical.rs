//! Canonical text output of values: what a row looks like on the wire does not depend on the
//! session that captured or compares it.

// utils/bytea.h, which pgrx does not bind: the server's `bytea_output` setting.
// SAFETY: matches the server's declaration `extern PGDLLIMPORT int bytea_output;` (an int
// holding a ByteaOutputType); only read and written on the backend's main thread.
unsafe extern "C" {
    static mut bytea_output: i32;
}
/// `BYTEA_OUTPUT_HEX` of utils/bytea.h.
const BYTEA_OUTPUT_HEX: i32 = 1;

/// The same settings as SET LOCAL statements, for a session of a peer that prints values for
/// this node (a joining node's table copy, src/runtime/join.rs).
pub const CANONICAL_SETTINGS_SQL: &str = "SET LOCAL DateStyle = 'ISO, MDY'; SET LOCAL IntervalStyle = 'postgres'; \
     SET LOCAL extra_float_digits = 1; SET LOCAL bytea_output = 'hex'; SET LOCAL TimeZone = 'UTC'";

/// While alive, values print in one canonical text form whatever the session's settings:
/// ISO dates, UTC time zone, postgres interval style, shortest exact floats, hex bytea. The capturing
/// session's DateStyle or TimeZone must not change what a value looks like on the wire, and
/// the applier compares local rows with incoming old images in the same form.
pub struct CanonicalOutput {
    date_style: i32,
    date_order: i32,
    interval_style: i32,
    float_digits: i32,
    bytea_output: i32,
    timezone: *mut pgrx::pg_sys::pg_tz,
}

impl CanonicalOutput {
    pub fn new() -> CanonicalOutput {
        use pgrx::pg_sys;
        // SAFETY: these are plain backend-global settings of this process; they are read and
        // written on the backend's main thread only, and Drop puts the saved values back.
        unsafe {
            let saved = CanonicalOutput {
                date_style: pg_sys::DateStyle,
                date_order: pg_sys::DateOrder,
                interval_style: pg_sys::IntervalStyle,
                float_digits: pg_sys::extra_float_digits,
                bytea_output,
                timezone: pg_sys::session_timezone,
            };
            pg_sys::DateStyle = pg_sys::USE_ISO_DATES as i32;
            pg_sys::DateOrder = pg_sys::DATEORDER_MDY as i32;
            pg_sys::IntervalStyle = pg_sys::INTSTYLE_POSTGRES as i32;
            pg_sys::extra_float_digits = 1;
            bytea_output = BYTEA_OUTPUT_HEX;
            let utc = utc_zone();
            if !utc.is_null() {
                pg_sys::session_timezone = utc;
            }
            saved
        }
    }
}

/// UTC's zone, looked up once per backend: capture prints rows in it many thousands of times a
/// second, and `pg_tzset` searches a hash table per call. The zone it returns is never freed.
fn utc_zone() -> *mut pgrx::pg_sys::pg_tz {
    thread_local! {
        static UTC: std::cell::Cell<*mut pgrx::pg_sys::pg_tz> = const { std::cell::Cell::new(std::ptr::null_mut()) };
    }
    UTC.with(|utc| {
        if utc.get().is_null() {
            // SAFETY: pg_tzset takes a NUL-terminated name and returns NULL or a zone kept in
            // the backend's zone cache (TopMemoryContext) for the life of the process.
            utc.set(unsafe { pgrx::pg_sys::pg_tzset(c"UTC".as_ptr()) });
        }
        utc.get()
    })
}

impl Drop for CanonicalOutput {
    fn drop(&mut self) {
        // SAFETY: restores the values saved by `new`, on the same thread.
        unsafe {
            pgrx::pg_sys::DateStyle = self.date_style;
            pgrx::pg_sys::DateOrder = self.date_order;
            pgrx::pg_sys::IntervalStyle = self.interval_style;
            pgrx::pg_sys::extra_float_digits = self.float_digits;
            bytea_output = self.bytea_output;
            pgrx::pg_sys::session_timezone = self.timezone;
        }
    }
}
