//! Filling a table from a stream of COPY text rows: the local half of a joining node's table
//! copy (src/runtime/join.rs). PostgreSQL's own COPY FROM reads the rows through a callback,
//! as its logical replication's table sync does, so they are parsed, checked and indexed by
//! the code that parses COPY, and only one row is held in memory at a time.
//!
//! The caller runs it in replica mode (`session_replication_role = replica`): the capture
//! trigger does not fire (copied rows are not new changes) and neither do foreign-key checks
//! (tables arrive in any order).

use std::cell::Cell;
use std::ffi::{c_int, c_void, CString};
use std::ptr;

use pgrx::prelude::*;

use crate::base::error::raise;

/// Gives the next row in COPY text format (with its newline), `None` after the last; an
/// `Err` aborts the copy with that message.
pub type RowSource<'a> = dyn FnMut() -> Result<Option<Vec<u8>>, String> + 'a;

/// The source of the copy in progress and the row being handed over.
struct Feed<'a> {
    source: &'a mut RowSource<'a>,
    row: Vec<u8>,
    at: usize,
}

thread_local! {
    /// The feed of the copy in progress (COPY's callback takes no argument of ours); set only
    /// for the duration of `copy_in`.
    static FEED: Cell<*mut c_void> = const { Cell::new(ptr::null_mut()) };
}

/// Clears FEED however `copy_in` ends, an ERROR included.
struct FeedGuard;

impl Drop for FeedGuard {
    fn drop(&mut self) {
        FEED.with(|f| f.set(ptr::null_mut()));
    }
}

/// COPY FROM's data source: at least `minread` bytes (fewer only at the end), at most
/// `maxread`, into `outbuf`.
#[pg_guard]
unsafe extern "C-unwind" fn read_rows(outbuf: *mut c_void, minread: c_int, maxread: c_int) -> c_int {
    let feed = FEED.with(|f| f.get()) as *mut Feed;
    if feed.is_null() {
        raise(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, "COPY data requested outside a table copy", "This is a bug in rbucardo.");
    }
    // SAFETY: FEED points to the Feed on copy_in's stack while CopyFrom (our only caller) runs.
    let feed = unsafe { &mut *feed };
    let (minread, maxread) = (minread.max(1) as usize, maxread.max(1) as usize);
    let mut written = 0usize;
    while written < minread {
        if feed.at == feed.row.len() {
            match (feed.source)() {
                Ok(Some(row)) => {
                    feed.row = row;
                    feed.at = 0;
                    continue;
                }
                Ok(None) => break,
                Err(e) => raise(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, format!("table copy failed: {e}"), "The copy starts again from the beginning of the table."),
            }
        }
        let n = (feed.row.len() - feed.at).min(maxread - written);
        // SAFETY: outbuf has room for maxread bytes (COPY's contract) and written + n <= maxread.
        unsafe { ptr::copy_nonoverlapping(feed.row.as_ptr().add(feed.at), (outbuf as *mut u8).add(written), n) };
        feed.at += n;
        written += n;
    }
    written as c_int
}

/// Copies every row `source` gives into the table `relid`, columns `cols` in that order, with
/// COPY's text format. Returns the rows written.
pub fn copy_in(relid: pg_sys::Oid, cols: &[String], source: &mut RowSource) -> u64 {
    let mut feed = Feed { source, row: Vec::new(), at: 0 };
    let _guard = FeedGuard;
    FEED.with(|f| f.set(&mut feed as *mut Feed as *mut c_void));
    // SAFETY: in a transaction; the relation is opened here and closed at the end with its lock
    // kept to commit; the attribute name list holds palloc'd strings as COPY expects; COPY reads
    // its data only through read_rows, which FEED points at `feed` (alive until the guard).
    unsafe {
        let lock = pg_sys::RowExclusiveLock as c_int;
        let rel = pg_sys::table_open(relid, lock);
        let pstate = pg_sys::make_parsestate(ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, ptr::null_mut(), false, false);
        let mut names: *mut pg_sys::List = ptr::null_mut();
        for c in cols {
            let c = CString::new(c.as_str()).expect("column name without NUL");
            names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(c.as_ptr())) as *mut c_void);
        }
        // The rows come from a peer session with client_encoding UTF8.
        let options = pg_sys::lappend(
            ptr::null_mut(),
            pg_sys::makeDefElem(pg_sys::pstrdup(c"encoding".as_ptr()), pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())) as *mut pg_sys::Node, -1) as *mut c_void,
        );
        let cstate = pg_sys::BeginCopyFrom(pstate, rel, ptr::null_mut(), ptr::null(), false, Some(read_rows), names, options);
        let rows = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as c_int);
        rows
    }
}
