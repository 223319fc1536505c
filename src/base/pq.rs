//! Connections to peer PostgreSQL servers, through libpq, without ever blocking the backend.
//!
//! PostgreSQL's rule for libpq inside a server process (see `libpq-be-fe-helpers.h`): never
//! block inside libpq. A blocked backend ignores its latch, so it can neither be cancelled nor
//! shut down, and it holds up the postmaster at shutdown. Everything here therefore uses libpq's
//! asynchronous API (`PQconnectStartParams`/`PQconnectPoll`, `PQsendQuery*`, `PQflush`,
//! `PQconsumeInput`/`PQisBusy`/`PQgetResult`) and sleeps only in `WaitLatchOrSocket` or a
//! `WaitEventSet`, which wake on the process latch, on SIGTERM and on postmaster death.
//!
//! Every operation takes a timeout. When it runs out the operation returns
//! [`PeerError::Timeout`] and the connection is left in an unknown protocol state: the caller
//! must drop it and connect again ([`PeerConn::is_broken`] reports `true` from then on).
//!
//! Known limit: libpq resolves host names synchronously in `PQconnectStartParams`. Peers given by
//! `hostaddr` (or by a host name the resolver answers quickly) avoid that short blocking step.
//!
//! Everything must run on the backend's main thread (the types are neither `Send` nor `Sync`).

use libpq_sys as pq;
use pgrx::pg_sys;
use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};
use std::fmt;
use std::ptr;
use std::time::{Duration, Instant};

/// What went wrong talking to a peer. Callers decide from the variant whether to retry the
/// statement (`Query`), reconnect (`Connect`, `Timeout`, `Closed`) or exit (`Shutdown`).
/// No message ever contains a password: connection errors are scrubbed of the conninfo's secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// The connection could not be established (bad conninfo, refused, authentication, ...).
    Connect(String),
    /// The peer answered a statement with an error; the connection is still usable.
    Query(String),
    /// The operation did not finish in time; the connection must be dropped.
    Timeout(String),
    /// SIGTERM arrived (`ShutdownRequestPending`) while waiting; the process should exit.
    Shutdown,
    /// The connection is lost or unusable; drop it and connect again.
    Closed(String),
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Connect(m) => write!(f, "could not connect to peer: {m}"),
            PeerError::Query(m) => write!(f, "peer query failed: {m}"),
            PeerError::Timeout(m) => write!(f, "peer operation timed out: {m}"),
            PeerError::Shutdown => write!(f, "shutdown requested while talking to a peer"),
            PeerError::Closed(m) => write!(f, "peer connection lost: {m}"),
        }
    }
}

impl std::error::Error for PeerError {}

impl PeerError {
    /// Whether the peer answered with an error of SQLSTATE `code` (result_error puts it in
    /// the message).
    pub fn is_sqlstate(&self, code: &str) -> bool {
        matches!(self, PeerError::Query(m) if m.contains(&format!("(SQLSTATE {code})")))
    }
}

/// A query parameter. Text lets the server infer the type from the statement (write casts such
/// as `$1::int8` where needed); Bytes goes in binary as `bytea`, so payloads need no escaping.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    /// SQL NULL.
    Null,
    /// Text format, type left for the server to infer (OID 0).
    Text(&'a str),
    /// Binary format, type `bytea` (OID 17).
    Bytes(&'a [u8]),
}

/// One result row. Columns hold the server's BINARY representation (results are requested with
/// resultFormat = 1), which the typed getters decode; `None` means SQL NULL, a missing column,
/// or a value that does not decode as the requested type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(Vec<Option<Vec<u8>>>);

impl Row {
    /// Number of columns, so callers can check the shape of a peer's answer.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for a row without columns.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// An `int8` column (also accepts `int4` and `int2`, told apart by length), because counts
    /// and ids arrive in whichever integer width the peer's expression happened to produce.
    pub fn i64(&self, col: usize) -> Option<i64> {
        let b = self.bytes(col)?;
        match b.len() {
            8 => Some(i64::from_be_bytes(b.try_into().ok()?)),
            4 => Some(i32::from_be_bytes(b.try_into().ok()?) as i64),
            2 => Some(i16::from_be_bytes(b.try_into().ok()?) as i64),
            _ => None,
        }
    }

    /// An `int4` column (also accepts `int2`); an `int8` is refused rather than truncated.
    pub fn i32(&self, col: usize) -> Option<i32> {
        let b = self.bytes(col)?;
        match b.len() {
            4 => Some(i32::from_be_bytes(b.try_into().ok()?)),
            2 => Some(i16::from_be_bytes(b.try_into().ok()?) as i32),
            _ => None,
        }
    }

    /// A `bool` column (one byte in binary format).
    pub fn bool(&self, col: usize) -> Option<bool> {
        match self.bytes(col)? {
            [b] => Some(*b != 0),
            _ => None,
        }
    }

    /// A `text`, `varchar` or `name` column: their binary form is the raw string, and the
    /// connection always uses client_encoding UTF8. `None` also for invalid UTF-8.
    pub fn text(&self, col: usize) -> Option<String> {
        String::from_utf8(self.bytes(col)?.to_vec()).ok()
    }

    /// The raw binary value, e.g. a `bytea` payload, without copying.
    pub fn bytes(&self, col: usize) -> Option<&[u8]> {
        self.0.get(col)?.as_deref()
    }
}

/// An open connection to a peer server. Dropping it closes the connection (`PQfinish`) and
/// returns its file descriptor reservation (`ReleaseExternalFD`), also when a PostgreSQL error
/// unwinds through the owner.
pub struct PeerConn {
    conn: *mut pq::PGconn,
    /// Whether `AcquireExternalFD` succeeded and must be balanced on drop.
    fd_reserved: bool,
    /// Set while an operation is in flight; still set afterwards means it was abandoned
    /// (timeout, shutdown, COPY) and the protocol state is unknown.
    poisoned: bool,
    /// Password and sslpassword from the conninfo, scrubbed out of every error message.
    secrets: Vec<String>,
    /// Filled by libpq's notice processor, which holds a pointer to the Vec itself: boxed so
    /// that pointer stays valid when the PeerConn moves.
    #[allow(clippy::box_collection)]
    notices: Box<Vec<String>>,
    /// Statements prepared on this connection, by text and parameter types: a hub is called
    /// hundreds of times a second with the same few statements, and parsing each call again
    /// was a tenth of its peer backends' time.
    prepared: std::collections::HashMap<(String, Vec<pq::Oid>), CString>,
    /// The prepared statement of the call in flight: forgotten if the peer says it no longer
    /// fits (see `receive`), prepared anew next time.
    in_flight: Option<(String, Vec<pq::Oid>)>,
    /// Statements prepared so far, for their names.
    statements: u32,
    /// This process's connections so far when this one opened, for statement names.
    serial: u32,
    /// Statements forgotten, to deallocate on the peer before the next prepare.
    stale: Vec<CString>,
}

/// Connections this process opened, for unique statement names.
static CONNECTIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sets the process latch again when dropped, if a wait of ours consumed a latch wake-up: the
/// latch belongs to the caller's main loop, and a wake-up meant for it must not be lost.
struct LatchRestore(bool);

impl Drop for LatchRestore {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: MyLatch is this process's own latch, valid for the life of the backend.
            unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
        }
    }
}

/// The end of one operation and what to call it in a timeout message.
struct Deadline {
    at: Instant,
    total: Duration,
    what: &'static str,
}

impl Deadline {
    fn new(total: Duration, what: &'static str) -> Deadline {
        let now = Instant::now();
        // A huge timeout must not overflow Instant; a year is "forever" here.
        let at = now
            .checked_add(total)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        Deadline { at, total, what }
    }

    /// Time left before the deadline (zero once it has passed).
    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Milliseconds left for WaitLatchOrSocket, or Timeout once the deadline has passed.
    fn remaining_ms(&self) -> Result<c_long, PeerError> {
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(PeerError::Timeout(format!(
                "{} did not finish within {:?}",
                self.what, self.total
            )));
        }
        Ok(millis(left))
    }
}

/// A duration as a wait timeout in milliseconds: rounded up (so a short wait does not become a
/// busy poll) and clamped to what WaitEventSetWait accepts.
fn millis(d: Duration) -> c_long {
    let ms = d.as_nanos().div_ceil(1_000_000);
    ms.min(i32::MAX as u128) as c_long
}

/// SIGTERM in a background worker only sets `ShutdownRequestPending` (and the latch).
fn check_shutdown() -> Result<(), PeerError> {
    // SAFETY: a sig_atomic_t global written only by this process's SIGTERM handler; read
    // volatile through a raw pointer, as C reads it, so no reference to the static mut is made.
    if unsafe { ptr::addr_of!(pg_sys::ShutdownRequestPending).read_volatile() } != 0 {
        return Err(PeerError::Shutdown);
    }
    Ok(())
}

/// What to do after a latch wake: worker shutdown first, then ordinary interrupts (query
/// cancel, backend termination), which raise an ERROR/FATAL that unwinds through our guards.
fn after_latch_wake() -> Result<(), PeerError> {
    // SAFETY: MyLatch is this process's own latch; only its owner may reset it, which we are.
    unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
    check_shutdown()?;
    pgrx::check_for_interrupts!();
    Ok(())
}

/// `p` must be NULL or a NUL-terminated string valid for the call (every caller passes one
/// owned by libpq: a PGconn's, a PGresult's or a PGnotify's, still alive).
fn cstr_to_string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-NULL here, and NUL-terminated and alive by the contract above; the bytes
        // are copied before returning.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Replaces every secret in a message (libpq normally never echoes a password, but a message
/// that reaches a view or log must not depend on that).
fn scrub(msg: &str, secrets: &[String]) -> String {
    let mut out = msg.trim_end().to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "********");
    }
    out
}

/// libpq's own test (`recognized_connection_string`): a URI or anything with `=` is a
/// connection string; anything else passed as conninfo is just a database name.
fn is_connection_string(conninfo: &str) -> bool {
    conninfo.starts_with("postgresql://") || conninfo.starts_with("postgres://") || conninfo.contains('=')
}

/// Keywords whose values are secrets and are never shown.
const SECRET_KEYWORDS: [&str; 2] = ["password", "sslpassword"];

/// The conninfo's options as (keyword, value) pairs, via `PQconninfoParse`. Err carries
/// libpq's parse error message (which may quote the input).
fn parse_conninfo(conninfo: &str) -> Result<Vec<(String, String)>, String> {
    let c = CString::new(conninfo).map_err(|_| "connection string contains a NUL byte".to_string())?;
    let mut errmsg: *mut c_char = ptr::null_mut();
    // SAFETY: `c` is a NUL-terminated string alive for the call; libpq only reads it and writes
    // an error string it allocated (or nothing) into `errmsg`.
    let opts = unsafe { pq::PQconninfoParse(c.as_ptr(), &mut errmsg) };
    if opts.is_null() {
        let msg = cstr_to_string(errmsg).unwrap_or_else(|| "out of memory".into());
        if !errmsg.is_null() {
            // SAFETY: errmsg was malloc'd by PQconninfoParse and is freed once, after the copy.
            unsafe { pq::PQfreemem(errmsg as *mut c_void) };
        }
        return Err(msg.trim_end().to_string());
    }
    let mut out = Vec::new();
    let mut o = opts;
    // SAFETY: PQconninfoParse returned an array ended by an entry whose keyword is NULL, so the
    // walk stays inside it; keywords and values are copied before PQconninfoFree frees them.
    unsafe {
        while !(*o).keyword.is_null() {
            if let (Some(k), Some(v)) = (cstr_to_string((*o).keyword), cstr_to_string((*o).val)) {
                out.push((k, v));
            }
            o = o.add(1);
        }
        pq::PQconninfoFree(opts);
    }
    Ok(out)
}

/// Quotes a conninfo value when needed, the way libpq parses it back.
fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    let mut q = String::with_capacity(v.len() + 2);
    q.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('\'');
    q
}

/// Removes the password (and sslpassword) from a conninfo so it can be shown in views and logs.
/// Accepts key=value and URI forms and returns key=value pairs; a bare database name comes back
/// as `dbname=...`; anything libpq cannot parse becomes `<invalid conninfo>` (its parse error
/// could quote the password).
pub fn redact_conninfo(conninfo: &str) -> String {
    if !is_connection_string(conninfo) {
        return if conninfo.is_empty() {
            String::new()
        } else {
            format!("dbname={}", quote_value(conninfo))
        };
    }
    match parse_conninfo(conninfo) {
        Ok(opts) => opts
            .iter()
            .filter(|(k, _)| !SECRET_KEYWORDS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", quote_value(v)))
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "<invalid conninfo>".to_string(),
    }
}

/// Collects libpq notices (WARNING/NOTICE from the peer) instead of letting libpq print them to
/// the server's stderr; they are logged at DEBUG1 after each operation.
///
/// # Safety
///
/// Only libpq calls it, as installed by `PeerConn::connect`: `arg` is that PeerConn's boxed
/// `notices` Vec, and `message` a NUL-terminated string valid for the call.
unsafe extern "C" fn notice_processor(arg: *mut c_void, message: *const c_char) {
    if arg.is_null() || message.is_null() {
        return;
    }
    // SAFETY: by the contract above (also for `message` below). The Box outlives the PGconn
    // (Drop runs PQfinish before the fields drop), and libpq calls this only from inside our
    // own libpq calls, when no Rust reference to the Vec is live.
    let notices = &mut *(arg as *mut Vec<String>);
    if notices.len() < 100 {
        notices.push(CStr::from_ptr(message).to_string_lossy().trim_end().to_string());
    }
}

/// Frees a PGresult on every path out of the result loop.
struct ResultGuard(*mut pq::PGresult);

impl Drop for ResultGuard {
    fn drop(&mut self) {
        // SAFETY: the guard is built only from a non-NULL PGresult returned by PQgetResult and
        // owns it: nothing else clears it, and no copy of the pointer outlives the guard.
        unsafe { pq::PQclear(self.0) };
    }
}

/// Frees a WaitEventSet even when an ERROR unwinds out of the wait (PostgreSQL 15 does not
/// track wait event sets in resource owners, so a lost one would leak its epoll descriptor).
struct WaitSetGuard(*mut pg_sys::WaitEventSet);

impl Drop for WaitSetGuard {
    fn drop(&mut self) {
        // SAFETY: the set was created by CreateWaitEventSet in wait_for_activity, is owned by
        // this guard alone, and is freed once, while its memory context is still alive.
        unsafe { pg_sys::FreeWaitEventSet(self.0) };
    }
}

impl PeerConn {
    /// Opens a connection without blocking the backend, giving up after `timeout` (libpq's
    /// `connect_timeout` only works for blocking connects, so this deadline replaces it).
    /// `conninfo` is key=value or a URI; application_name defaults to `rbucardo` so peers can
    /// see replication sessions in pg_stat_activity, and client_encoding is forced to UTF8 so
    /// text columns decode as UTF-8.
    pub fn connect(conninfo: &str, timeout: Duration) -> Result<PeerConn, PeerError> {
        let deadline = Deadline::new(timeout, "connecting to the peer");
        let secrets: Vec<String> = if is_connection_string(conninfo) {
            match parse_conninfo(conninfo) {
                Ok(opts) => opts
                    .into_iter()
                    .filter(|(k, _)| SECRET_KEYWORDS.contains(&k.as_str()))
                    .map(|(_, v)| v)
                    .collect(),
                // libpq's parse errors can quote the input: withhold them when it holds secrets.
                Err(msg) => {
                    let lower = conninfo.to_ascii_lowercase();
                    return Err(PeerError::Connect(if lower.contains("password") || conninfo.contains('@') {
                        "invalid connection string (details withheld because it contains a password)".into()
                    } else {
                        format!("invalid connection string: {msg}")
                    }));
                }
            }
        } else {
            Vec::new()
        };
        let c_conninfo = CString::new(conninfo)
            .map_err(|_| PeerError::Connect("connection string contains a NUL byte".into()))?;

        // SAFETY: fd.c's per-backend descriptor accounting, on the main thread; a success is
        // balanced by ReleaseExternalFD in Drop (fd_reserved).
        if !unsafe { pg_sys::AcquireExternalFD() } {
            return Err(PeerError::Connect(
                "could not reserve a file descriptor for the peer connection: all descriptors \
                 allowed by max_files_per_process are in use (raise max_files_per_process)"
                    .into(),
            ));
        }
        // From here on, Drop releases the descriptor and the PGconn on every path.
        let mut pc = PeerConn {
            conn: ptr::null_mut(),
            fd_reserved: true,
            poisoned: false,
            secrets,
            notices: Box::new(Vec::new()),
            prepared: std::collections::HashMap::new(),
            in_flight: None,
            statements: 0,
            serial: CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            stale: Vec::new(),
        };

        // Keywords are applied in order and the dbname entry is expanded as a conninfo: so the
        // conninfo may override application_name, and nothing overrides client_encoding.
        let keywords = [c"application_name".as_ptr(), c"dbname".as_ptr(), c"client_encoding".as_ptr(), ptr::null()];
        let values = [c"rbucardo".as_ptr(), c_conninfo.as_ptr(), c"UTF8".as_ptr(), ptr::null()];
        // SAFETY: both arrays are NULL-terminated, of equal length, and point to NUL-terminated
        // strings alive for the call (libpq copies them); the PGconn returned is owned by `pc`.
        pc.conn = unsafe { pq::PQconnectStartParams(keywords.as_ptr(), values.as_ptr(), 1) };
        if pc.conn.is_null() {
            return Err(PeerError::Connect("out of memory".into()));
        }
        if pc.status() == pq::ConnStatusType::CONNECTION_BAD {
            return Err(PeerError::Connect(pc.conn_error()));
        }
        // SAFETY: pc.conn is non-NULL; `arg` points into the heap allocation of pc.notices, which
        // does not move when `pc` moves and is freed only after Drop has run PQfinish.
        unsafe {
            let arg = &mut *pc.notices as *mut Vec<String> as *mut c_void;
            pq::PQsetNoticeProcessor(pc.conn, Some(notice_processor), arg);
        }

        let mut latch = LatchRestore(false);
        let mut status = pq::PostgresPollingStatusType::PGRES_POLLING_WRITING;
        loop {
            let io = match status {
                pq::PostgresPollingStatusType::PGRES_POLLING_OK => break,
                pq::PostgresPollingStatusType::PGRES_POLLING_FAILED => {
                    return Err(PeerError::Connect(pc.conn_error()));
                }
                pq::PostgresPollingStatusType::PGRES_POLLING_READING => pg_sys::WL_SOCKET_READABLE,
                _ => pg_sys::WL_SOCKET_WRITEABLE,
            };
            let rc = pc.wait(io, &deadline, &mut latch).map_err(|e| match e {
                PeerError::Closed(m) => PeerError::Connect(m),
                e => e,
            })?;
            if rc & io != 0 {
                // SAFETY: pc.conn is the non-NULL PGconn started above, owned by `pc`.
                status = unsafe { pq::PQconnectPoll(pc.conn) };
            }
        }
        // Non-blocking sends: PQsendQuery* queue what the socket cannot take, we PQflush.
        // SAFETY: pc.conn is the non-NULL, now connected PGconn owned by `pc`.
        if unsafe { pq::PQsetnonblocking(pc.conn, 1) } != 0 {
            return Err(PeerError::Connect(pc.conn_error()));
        }
        Ok(pc)
    }

    /// Runs one statement with parameters and returns its rows in binary format. A server
    /// error becomes `Query` (message, SQLSTATE, detail, hint) and leaves the connection usable;
    /// several-MB parameters are fine (sent with non-blocking flushes).
    pub fn query(&mut self, sql: &str, params: &[Param], timeout: Duration) -> Result<Vec<Row>, PeerError> {
        self.send(sql, params, timeout)?;
        self.receive(timeout)
    }

    /// The second half of [`PeerConn::query`]: waits for the results of the statement sent.
    pub fn receive(&mut self, timeout: Duration) -> Result<Vec<Row>, PeerError> {
        let result = self.finish(&Deadline::new(timeout, "peer query"));
        let statement = self.in_flight.take();
        // Most errors are the call's (a refused batch, an expired peer, a lock timeout) and
        // leave the statement as good as it was; only these say the statement itself no longer
        // fits the peer (its functions or tables changed). Its name is freed before the next
        // prepare, so a peer that keeps failing does not collect statements.
        if let (Err(e), Some(statement)) = (&result, statement) {
            const STALE: [&str; 6] = ["0A000", "26000", "42883", "42P01", "3F000", "42804"];
            if STALE.iter().any(|code| e.is_sqlstate(code)) {
                if let Some(name) = self.prepared.remove(&statement) {
                    self.stale.push(name);
                }
            }
        }
        result
    }

    /// The first half of [`PeerConn::query`]: sends the statement and returns while the peer
    /// runs it, so the caller can work meanwhile; [`PeerConn::receive`] must follow.
    pub fn send(&mut self, sql: &str, params: &[Param], timeout: Duration) -> Result<(), PeerError> {
        let deadline = Deadline::new(timeout, "peer query");
        let sql = CString::new(sql).map_err(|_| PeerError::Query("statement contains a NUL byte".into()))?;
        if params.len() > 65535 {
            return Err(PeerError::Query("too many parameters (at most 65535)".into()));
        }
        // Text values need a terminating NUL; keep the CStrings alive until the send.
        let mut texts = Vec::new();
        for p in params {
            if let Param::Text(s) = p {
                texts.push(CString::new(*s).map_err(|_| PeerError::Query("text parameter contains a NUL byte".into()))?);
            }
        }
        let mut texts_iter = texts.iter();
        let mut types = Vec::with_capacity(params.len());
        let mut values = Vec::with_capacity(params.len());
        let mut lengths = Vec::with_capacity(params.len());
        let mut formats = Vec::with_capacity(params.len());
        for p in params {
            let (ty, val, len, fmt): (pq::Oid, *const c_char, c_int, c_int) = match p {
                Param::Null => (0, ptr::null(), 0, 0),
                Param::Text(_) => (0, texts_iter.next().unwrap().as_ptr(), 0, 0),
                Param::Bytes(b) => {
                    let len = c_int::try_from(b.len())
                        .map_err(|_| PeerError::Query("bytea parameter larger than 2 GB".into()))?;
                    // A NULL pointer would mean SQL NULL: give empty values a valid address.
                    let val = if b.is_empty() { c"".as_ptr() } else { b.as_ptr() as *const c_char };
                    (17, val, len, 1)
                }
            };
            types.push(ty);
            values.push(val);
            lengths.push(len);
            formats.push(fmt);
        }
        let key = (sql.to_string_lossy().into_owned(), types.clone());
        if !self.prepared.contains_key(&key) {
            for name in std::mem::take(&mut self.stale) {
                // Best effort: the statement may be gone already.
                let _ = self.execute(&format!("DEALLOCATE {}", name.to_string_lossy()), deadline.remaining());
            }
            // Unique per process and connection: a session pooler that does not reset its
            // server sessions may hand this connection one that holds statements of another.
            self.statements += 1;
            // SAFETY: a plain global of this backend.
            let pid = unsafe { pg_sys::MyProcPid };
            let name = CString::new(format!("rbucardo_{pid}_{}_{}", self.serial, self.statements)).expect("no NUL");
            // SAFETY: as below; `name`, `sql` and `types` are alive for the call and copied.
            self.run(&deadline, |conn| unsafe { pq::PQsendPrepare(conn, name.as_ptr(), sql.as_ptr(), params.len() as c_int, types.as_ptr()) })?;
            self.prepared.insert(key.clone(), name);
        }
        let name = self.prepared[&key].clone();
        // SAFETY: `start` calls this at once with its live, non-NULL PGconn; the three arrays
        // hold params.len() entries each, and the values point into `texts` and `params`, alive
        // here; libpq copies everything into its output buffer before returning.
        self.start(&deadline, |conn| unsafe {
            pq::PQsendQueryPrepared(conn, name.as_ptr(), params.len() as c_int, values.as_ptr(), lengths.as_ptr(), formats.as_ptr(), 1)
        })?;
        self.in_flight = Some(key);
        Ok(())
    }

    /// Runs a statement string without parameters or results, e.g. `LISTEN x` or several
    /// `;`-separated statements (which `query` cannot do); the first server error is returned.
    pub fn execute(&mut self, sql: &str, timeout: Duration) -> Result<(), PeerError> {
        let deadline = Deadline::new(timeout, "peer statement");
        let sql = CString::new(sql).map_err(|_| PeerError::Query("statement contains a NUL byte".into()))?;
        // SAFETY: `run` calls this at once with its live, non-NULL PGconn; `sql` is a
        // NUL-terminated string alive for the call, and libpq copies it.
        self.run(&deadline, |conn| unsafe { pq::PQsendQuery(conn, sql.as_ptr()) })
            .map(|_| ())
    }

    /// Starts a `COPY ... TO STDOUT` statement (text format); its rows then come one at a time
    /// from [`PeerConn::copy_row`], so a table of any size streams through in bounded memory.
    /// Until the last row is read the connection is busy (and broken if abandoned).
    pub fn copy_out(&mut self, sql: &str, timeout: Duration) -> Result<(), PeerError> {
        let deadline = Deadline::new(timeout, "peer COPY");
        let sql = CString::new(sql).map_err(|_| PeerError::Query("statement contains a NUL byte".into()))?;
        // SAFETY: `start` calls this at once with its live, non-NULL PGconn; `sql` is a
        // NUL-terminated string alive for the call, and libpq copies it.
        self.start(&deadline, |conn| unsafe { pq::PQsendQuery(conn, sql.as_ptr()) })?;
        let mut latch = LatchRestore(false);
        loop {
            // SAFETY (this loop's libpq calls): self.conn is the live PGconn owned by self.
            while unsafe { pq::PQisBusy(self.conn) } != 0 {
                let rc = self.wait(pg_sys::WL_SOCKET_READABLE, &deadline, &mut latch)?;
                if rc & pg_sys::WL_SOCKET_READABLE != 0 && unsafe { pq::PQconsumeInput(self.conn) } == 0 {
                    return Err(self.failure(PeerError::Closed));
                }
            }
            // SAFETY: see above; a result returned is ours, cleared by the guard.
            let res = unsafe { pq::PQgetResult(self.conn) };
            if res.is_null() {
                self.poisoned = false;
                return Err(PeerError::Query("the statement is not a COPY TO STDOUT".into()));
            }
            let res = ResultGuard(res);
            // SAFETY: res.0 is a live, non-NULL PGresult owned by the guard.
            match unsafe { pq::PQresultStatus(res.0) } {
                pq::ExecStatusType::PGRES_COPY_OUT => return Ok(()),
                pq::ExecStatusType::PGRES_COPY_IN | pq::ExecStatusType::PGRES_COPY_BOTH => {
                    return Err(PeerError::Query("the peer expects COPY data we do not send".into()));
                }
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {}
                _ => {
                    let e = self.result_error(res.0);
                    drop(res);
                    // The rest of the results, so that the connection is idle again.
                    self.finish(&deadline)?;
                    return Err(e);
                }
            }
        }
    }

    /// The next row of the COPY started by [`PeerConn::copy_out`], in COPY text format with
    /// its newline; `None` after the last one (the connection is then idle again). `timeout`
    /// bounds the wait for each row.
    pub fn copy_row(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, PeerError> {
        let deadline = Deadline::new(timeout, "peer COPY row");
        let mut latch = LatchRestore(false);
        loop {
            let mut buf: *mut c_char = ptr::null_mut();
            // SAFETY: self.conn is the live PGconn owned by self, in COPY OUT state (copy_out);
            // a row returned is a malloc'd buffer of n bytes, copied and freed once here.
            let n = unsafe { pq::PQgetCopyData(self.conn, &mut buf, 1) };
            if n > 0 {
                let row = unsafe { std::slice::from_raw_parts(buf as *const u8, n as usize) }.to_vec();
                unsafe { pq::PQfreemem(buf as *mut c_void) };
                return Ok(Some(row));
            }
            match n {
                0 => {
                    let rc = self.wait(pg_sys::WL_SOCKET_READABLE, &deadline, &mut latch)?;
                    // SAFETY: as above.
                    if rc & pg_sys::WL_SOCKET_READABLE != 0 && unsafe { pq::PQconsumeInput(self.conn) } == 0 {
                        return Err(self.failure(PeerError::Closed));
                    }
                }
                -1 => {
                    // The end: the COPY's own result (an error if the peer failed midway).
                    self.finish(&deadline)?;
                    return Ok(None);
                }
                _ => return Err(self.failure(PeerError::Closed)),
            }
        }
    }

    /// Channel names of the NOTIFYs received so far (LISTEN on this connection first). Reads
    /// whatever the socket already holds and never waits; call it after `wait_for_activity`.
    pub fn notifications(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if self.conn.is_null() {
            return out;
        }
        // SAFETY: self.conn is non-NULL (checked above) and owned by self. Each PGnotify is
        // malloc'd by libpq for us: its relname is copied before PQfreemem frees it, once.
        unsafe {
            // A failure shows up in is_broken(); notifications already queued are still returned.
            pq::PQconsumeInput(self.conn);
            loop {
                let n = pq::PQnotifies(self.conn);
                if n.is_null() {
                    break;
                }
                if let Some(name) = cstr_to_string((*n).relname) {
                    out.push(name);
                }
                pq::PQfreemem(n as *mut c_void);
            }
        }
        out
    }

    /// The connection's socket, for callers that build their own wait sets (-1 when closed).
    pub fn socket(&self) -> i32 {
        if self.conn.is_null() {
            return -1;
        }
        // SAFETY: self.conn is non-NULL (checked above) and owned by self until Drop.
        unsafe { pq::PQsocket(self.conn) }
    }

    /// True when the connection cannot be used any more: libpq lost it (PQstatus is not
    /// CONNECTION_OK) or an operation was abandoned by a timeout or shutdown. Reconnect then.
    pub fn is_broken(&self) -> bool {
        self.conn.is_null() || self.poisoned || self.status() != pq::ConnStatusType::CONNECTION_OK
    }

    fn status(&self) -> pq::ConnStatusType {
        // SAFETY: self.conn is the PGconn owned by self (non-NULL once `connect` returns it; it
        // is reset only in Drop), and PQstatus also accepts NULL (CONNECTION_BAD).
        unsafe { pq::PQstatus(self.conn) }
    }

    /// libpq's connection-level error message, without secrets.
    fn conn_error(&self) -> String {
        // SAFETY: self.conn is owned by self (PQerrorMessage also accepts NULL); the message
        // lives in the PGconn and is copied at once.
        let msg = cstr_to_string(unsafe { pq::PQerrorMessage(self.conn) }).unwrap_or_default();
        let msg = scrub(&msg, &self.secrets);
        if msg.is_empty() {
            "unknown libpq error".into()
        } else {
            msg
        }
    }

    /// A connection-level failure: Closed if libpq lost the connection, else `other`.
    fn failure(&self, other: fn(String) -> PeerError) -> PeerError {
        if self.status() == pq::ConnStatusType::CONNECTION_OK {
            other(self.conn_error())
        } else {
            PeerError::Closed(self.conn_error())
        }
    }

    /// The error carried by a failed result: primary message, SQLSTATE, detail and hint.
    /// `res` must be a live PGresult (the caller's ResultGuard holds it).
    fn result_error(&self, res: *const pq::PGresult) -> PeerError {
        // SAFETY: `res` is live (see above); the field strings live in it and are copied at once.
        let field = |code: u8| cstr_to_string(unsafe { pq::PQresultErrorField(res, code as c_int) });
        let mut msg = match field(pq::PG_DIAG_MESSAGE_PRIMARY) {
            Some(m) => m,
            // SAFETY: as for `field`: the message lives in `res` and is copied at once.
            None => cstr_to_string(unsafe { pq::PQresultErrorMessage(res) })
                .filter(|m| !m.trim().is_empty())
                .unwrap_or_else(|| self.conn_error()),
        };
        if let Some(state) = field(pq::PG_DIAG_SQLSTATE) {
            msg.push_str(&format!(" (SQLSTATE {state})"));
        }
        if let Some(detail) = field(pq::PG_DIAG_MESSAGE_DETAIL) {
            msg.push_str(&format!("\nDETAIL: {detail}"));
        }
        if let Some(hint) = field(pq::PG_DIAG_MESSAGE_HINT) {
            msg.push_str(&format!("\nHINT: {hint}"));
        }
        let msg = scrub(&msg, &self.secrets);
        if self.status() == pq::ConnStatusType::CONNECTION_OK {
            PeerError::Query(msg)
        } else {
            PeerError::Closed(msg)
        }
    }

    /// Waits for `io` on the socket, the latch, or the deadline. Returns the wake events.
    fn wait(&self, io: u32, deadline: &Deadline, latch: &mut LatchRestore) -> Result<u32, PeerError> {
        check_shutdown()?;
        pgrx::check_for_interrupts!();
        let ms = deadline.remaining_ms()?;
        let sock = self.socket();
        if sock < 0 {
            return Err(PeerError::Closed(self.conn_error()));
        }
        let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH | io;
        // SAFETY: waits on this process's own latch and on the open socket of our PGconn
        // (checked >= 0 above), on the main thread.
        let rc = unsafe {
            pg_sys::WaitLatchOrSocket(pg_sys::MyLatch, events as c_int, sock, ms, pg_sys::PG_WAIT_EXTENSION)
        } as u32;
        if rc & pg_sys::WL_LATCH_SET != 0 {
            latch.0 = true;
            after_latch_wake()?;
        }
        Ok(rc)
    }

    /// Sends with `send`, flushes, and collects every result of the command string.
    fn run(&mut self, deadline: &Deadline, send: impl FnOnce(*mut pq::PGconn) -> c_int) -> Result<Vec<Row>, PeerError> {
        self.start(deadline, send)?;
        self.finish(deadline)
    }

    /// Sends with `send` and pushes the whole command out; [`PeerConn::finish`] collects the
    /// results. In between the connection is busy (and counts as broken if abandoned).
    fn start(&mut self, deadline: &Deadline, send: impl FnOnce(*mut pq::PGconn) -> c_int) -> Result<(), PeerError> {
        if self.is_broken() {
            return Err(PeerError::Closed(if self.poisoned {
                "an earlier operation was abandoned (timeout or shutdown); reconnect".into()
            } else {
                self.conn_error()
            }));
        }
        let mut latch = LatchRestore(false);
        self.poisoned = true;
        if send(self.conn) == 0 {
            let e = self.failure(PeerError::Query);
            // Nothing was queued: the connection is as idle as before.
            self.poisoned = false;
            return Err(e);
        }

        // Push the whole command out; the server may talk meanwhile, so keep reading too.
        loop {
            // SAFETY: self.conn is non-NULL (is_broken checked it above) and owned by self.
            match unsafe { pq::PQflush(self.conn) } {
                0 => break,
                1 => {}
                _ => return Err(self.failure(PeerError::Closed)),
            }
            let rc = self.wait(pg_sys::WL_SOCKET_WRITEABLE | pg_sys::WL_SOCKET_READABLE, deadline, &mut latch)?;
            // SAFETY: as for PQflush above.
            if rc & pg_sys::WL_SOCKET_READABLE != 0 && unsafe { pq::PQconsumeInput(self.conn) } == 0 {
                return Err(self.failure(PeerError::Closed));
            }
        }
        Ok(())
    }

    /// Collects every result of the command sent by [`PeerConn::start`].
    fn finish(&mut self, deadline: &Deadline) -> Result<Vec<Row>, PeerError> {
        let mut latch = LatchRestore(false);

        let mut rows = Vec::new();
        let mut first_error = None;
        loop {
            // SAFETY (this loop's libpq calls): self.conn is the PGconn owned by self, non-NULL
            // from `connect` until Drop.
            while unsafe { pq::PQisBusy(self.conn) } != 0 {
                let rc = self.wait(pg_sys::WL_SOCKET_READABLE, deadline, &mut latch)?;
                // SAFETY: see the loop's comment above.
                if rc & pg_sys::WL_SOCKET_READABLE != 0 && unsafe { pq::PQconsumeInput(self.conn) } == 0 {
                    return Err(self.failure(PeerError::Closed));
                }
            }
            // SAFETY: see the loop's comment above; a result returned is ours to PQclear.
            let res = unsafe { pq::PQgetResult(self.conn) };
            if res.is_null() {
                break;
            }
            let res = ResultGuard(res);
            // SAFETY: res.0 is a live, non-NULL PGresult owned by the guard.
            match unsafe { pq::PQresultStatus(res.0) } {
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_SINGLE_TUPLE => {
                    if first_error.is_none() {
                        rows.extend(copy_rows(res.0));
                    }
                }
                pq::ExecStatusType::PGRES_COMMAND_OK | pq::ExecStatusType::PGRES_EMPTY_QUERY => {}
                pq::ExecStatusType::PGRES_COPY_IN
                | pq::ExecStatusType::PGRES_COPY_OUT
                | pq::ExecStatusType::PGRES_COPY_BOTH => {
                    // Stays poisoned: the peer now expects a COPY exchange we do not speak.
                    return Err(PeerError::Query("COPY is not supported on peer connections".into()));
                }
                _ => {
                    if first_error.is_none() {
                        first_error = Some(self.result_error(res.0));
                    }
                }
            }
        }
        self.poisoned = false;
        for n in self.notices.drain(..) {
            pgrx::debug1!("rbucardo peer: {}", n);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }
}

/// Copies a result's rows out of libpq's memory. `res` must be a live PGresult (the caller's
/// ResultGuard holds it).
fn copy_rows(res: *const pq::PGresult) -> Vec<Row> {
    // SAFETY: `res` is live for the whole call (see above) and r, c stay below PQntuples and
    // PQnfields; PQgetvalue then points to PQgetlength bytes inside `res`, copied at once
    // (a zero length is not turned into a slice).
    unsafe {
        let (ntuples, nfields) = (pq::PQntuples(res), pq::PQnfields(res));
        (0..ntuples)
            .map(|r| {
                Row((0..nfields)
                    .map(|c| {
                        if pq::PQgetisnull(res, r, c) != 0 {
                            return None;
                        }
                        let len = pq::PQgetlength(res, r, c) as usize;
                        let p = pq::PQgetvalue(res, r, c) as *const u8;
                        Some(if len == 0 { Vec::new() } else { std::slice::from_raw_parts(p, len).to_vec() })
                    })
                    .collect())
            })
            .collect()
    }
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        // SAFETY: self owns the PGconn and the descriptor reservation; each is released once
        // (the fields are cleared), and PQfinish runs before `notices`, which the notice
        // processor points to, is freed.
        unsafe {
            if !self.conn.is_null() {
                pq::PQfinish(self.conn);
                self.conn = ptr::null_mut();
            }
            if self.fd_reserved {
                pg_sys::ReleaseExternalFD();
                self.fd_reserved = false;
            }
        }
    }
}

/// Waits until the latch is set, any of the given connections' sockets is readable, or the
/// timeout passes: the idle wait of a worker that listens to peers and to local wake-ups at once.
/// Returns `Err(Shutdown)` on SIGTERM (`ShutdownRequestPending`); exits the process on
/// postmaster death. The latch is reset here, so after every return the caller re-checks all
/// its work (local queue, `notifications()` of each connection). A connection without a socket
/// (lost) makes it return at once, so the caller sees `is_broken()`. Notifications already
/// read into libpq are not waited for: call `notifications()` before waiting.
pub fn wait_for_activity(conns: &[&PeerConn], timeout: Duration) -> Result<(), PeerError> {
    check_shutdown()?;
    pgrx::check_for_interrupts!();
    if conns.iter().any(|c| c.socket() < 0) {
        return Ok(());
    }
    let nevents = conns.len() + 2;
    // SAFETY: the set has room for the latch, postmaster death and one socket per connection
    // (all >= 0, checked above); MyLatch is this process's own latch. The guard frees the set
    // even if an ERROR unwinds, `occurred` has `nevents` plain-data entries (all-zero is valid)
    // and only the `n` filled in are read.
    unsafe {
        let set = WaitSetGuard(pg_sys::CreateWaitEventSet(pg_sys::CurrentMemoryContext, nevents as c_int));
        pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_LATCH_SET, pg_sys::PGINVALID_SOCKET, pg_sys::MyLatch, ptr::null_mut());
        pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_EXIT_ON_PM_DEATH, pg_sys::PGINVALID_SOCKET, ptr::null_mut(), ptr::null_mut());
        for c in conns {
            pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_SOCKET_READABLE, c.socket(), ptr::null_mut(), ptr::null_mut());
        }
        let mut occurred: Vec<pg_sys::WaitEvent> = vec![std::mem::zeroed(); nevents];
        let n = pg_sys::WaitEventSetWait(
            set.0,
            millis(timeout),
            occurred.as_mut_ptr(),
            nevents as c_int,
            pg_sys::PG_WAIT_EXTENSION,
        );
        drop(set);
        if occurred[..n.max(0) as usize].iter().any(|e| e.events & pg_sys::WL_LATCH_SET != 0) {
            after_latch_wake()?;
        }
    }
    Ok(())
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    const T: Duration = Duration::from_secs(10);

    /// A conninfo for this very server, over its Unix socket (or TCP when it has none).
    fn self_conninfo() -> String {
        let get = |sql: &str| Spi::get_one::<String>(sql).unwrap().unwrap();
        let port = get("SELECT current_setting('port')");
        let dirs = get("SELECT current_setting('unix_socket_directories')");
        let db = get("SELECT current_database()::text");
        let user = get("SELECT current_user::text");
        let host = dirs.split(',').next().unwrap_or("").trim().to_string();
        let host = if host.is_empty() { "127.0.0.1".to_string() } else { host };
        format!(
            "host={} port={} dbname={} user={}",
            quote_value(&host),
            port,
            quote_value(&db),
            quote_value(&user)
        )
    }

    fn connect() -> PeerConn {
        PeerConn::connect(&self_conninfo(), T).expect("connect to self")
    }

    #[pg_test]
    fn peer_typed_getters() {
        let mut c = connect();
        assert!(!c.is_broken());
        assert!(c.socket() >= 0);
        let rows = c
            .query("SELECT 1::int8, 'héllo'::text, true, '\\x0001ff'::bytea, NULL::text, 7::int4", &[], T)
            .unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.len(), 6);
        assert_eq!(r.i64(0), Some(1));
        assert_eq!(r.text(1).as_deref(), Some("héllo"));
        assert_eq!(r.bool(2), Some(true));
        assert_eq!(r.bytes(3), Some(&[0u8, 1, 255][..]));
        assert_eq!(r.text(4), None);
        assert_eq!(r.bytes(4), None);
        assert_eq!(r.i32(5), Some(7));
        assert_eq!(r.i64(5), Some(7));
        assert_eq!(r.i32(0), None, "int8 is not silently truncated");
        assert_eq!(r.i64(99), None);

        let rows = c
            .query(
                "SELECT $1::int8 + 1, $2::text IS NULL, $3::text, application_name, current_setting('client_encoding') \
                 FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[Param::Text("41"), Param::Null, Param::Text("ünï")],
                T,
            )
            .unwrap();
        assert_eq!(rows[0].i64(0), Some(42));
        assert_eq!(rows[0].bool(1), Some(true));
        assert_eq!(rows[0].text(2).as_deref(), Some("ünï"));
        assert_eq!(rows[0].text(3).as_deref(), Some("rbucardo"));
        assert_eq!(rows[0].text(4).as_deref(), Some("UTF8"));

        // Several result rows, and empty bytea is not NULL.
        let rows = c.query("SELECT g, $1::bytea FROM generate_series(1, 3) g", &[Param::Bytes(b"")], T).unwrap();
        assert_eq!(rows.iter().map(|r| r.i32(0).unwrap()).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(rows[2].bytes(1), Some(&[][..]));

        c.execute("CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1), (2)", T).unwrap();
        let rows = c.query("SELECT count(*) FROM t", &[], T).unwrap();
        assert_eq!(rows[0].i64(0), Some(2));
    }

    #[pg_test]
    fn peer_application_name_from_conninfo_wins() {
        let mut c = PeerConn::connect(&format!("{} application_name=other", self_conninfo()), T).unwrap();
        let rows = c.query("SELECT current_setting('application_name')", &[], T).unwrap();
        assert_eq!(rows[0].text(0).as_deref(), Some("other"));
    }

    #[pg_test]
    fn peer_query_error_keeps_connection() {
        let mut c = connect();
        match c.query("SELECT 1/0", &[], T) {
            Err(PeerError::Query(m)) => {
                assert!(m.contains("division by zero"), "{m}");
                assert!(m.contains("22012"), "{m}");
            }
            other => panic!("expected Query error, got {other:?}"),
        }
        assert!(!c.is_broken());
        assert_eq!(c.query("SELECT 2::int8", &[], T).unwrap()[0].i64(0), Some(2));

        match c.execute("SELECT 1; SELECT 1/0; SELECT 3", T) {
            Err(PeerError::Query(m)) => assert!(m.contains("division by zero"), "{m}"),
            other => panic!("expected Query error, got {other:?}"),
        }
        // Detail and hint are included.
        match c.execute("DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail', HINT = 'the hint'; END $$", T) {
            Err(PeerError::Query(m)) => {
                assert!(m.contains("boom") && m.contains("the detail") && m.contains("the hint"), "{m}")
            }
            other => panic!("expected Query error, got {other:?}"),
        }
        assert_eq!(c.query("SELECT 3::int8", &[], T).unwrap()[0].i64(0), Some(3));
    }

    #[pg_test]
    fn peer_statements_are_prepared_once_and_kept_through_call_errors() {
        let mut c = connect();
        let count = |c: &mut PeerConn| c.query("SELECT count(*)::int8 FROM pg_prepared_statements", &[], T).unwrap()[0].i64(0).unwrap();
        for i in 1..=3i64 {
            assert_eq!(c.query("SELECT 10 / $1::int8", &[Param::Text(&i.to_string())], T).unwrap()[0].i64(0), Some(10 / i));
        }
        assert_eq!(count(&mut c), 2, "the division and the count, each prepared once");
        // An error of the call leaves its statement prepared.
        assert!(matches!(c.query("SELECT 10 / $1::int8", &[Param::Text("0")], T), Err(PeerError::Query(_))));
        assert_eq!(c.query("SELECT 10 / $1::int8", &[Param::Text("5")], T).unwrap()[0].i64(0), Some(2));
        assert_eq!(count(&mut c), 2);
        // A statement that no longer fits the peer is prepared anew, the old one deallocated.
        c.execute("DROP TABLE IF EXISTS peer_stmt_t; CREATE TABLE peer_stmt_t (a int8); INSERT INTO peer_stmt_t VALUES (7)", T).unwrap();
        assert_eq!(c.query("SELECT * FROM peer_stmt_t", &[], T).unwrap()[0].i64(0), Some(7));
        c.execute("ALTER TABLE peer_stmt_t ADD COLUMN b int8", T).unwrap();
        match c.query("SELECT * FROM peer_stmt_t", &[], T) {
            Err(PeerError::Query(m)) => assert!(m.contains("0A000"), "{m}"),
            other => panic!("expected the stale plan's error, got {other:?}"),
        }
        assert_eq!(c.query("SELECT * FROM peer_stmt_t", &[], T).unwrap()[0].len(), 2);
        assert_eq!(count(&mut c), 3, "the division, the count and the new select");
        c.execute("DROP TABLE peer_stmt_t", T).unwrap();
    }

    #[pg_test]
    fn peer_large_bytea_round_trip() {
        let mut c = connect();
        let payload: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let rows = c.query("SELECT length($1)", &[Param::Bytes(&payload)], T).unwrap();
        assert_eq!(rows[0].i64(0), Some(payload.len() as i64));
        let rows = c.query("SELECT $1", &[Param::Bytes(&payload)], T).unwrap();
        assert!(rows[0].bytes(0) == Some(&payload[..]), "payload differs after round trip");
    }

    #[pg_test]
    fn peer_notifications() {
        let mut a = connect();
        let mut b = connect();
        a.execute("LISTEN rb_test", T).unwrap();
        assert!(a.notifications().is_empty());
        b.execute("NOTIFY rb_test", T).unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            wait_for_activity(&[&a], Duration::from_secs(5)).unwrap();
            seen.extend(a.notifications());
            if seen.iter().any(|n| n == "rb_test") {
                break;
            }
        }
        assert!(seen.iter().any(|n| n == "rb_test"), "got {seen:?}");
        // Nothing pending: a short wait just times out.
        wait_for_activity(&[&a, &b], Duration::from_millis(50)).unwrap();
        assert!(a.notifications().is_empty());
    }

    #[pg_test]
    fn peer_connect_refused_is_quick() {
        let start = Instant::now();
        match PeerConn::connect("host=127.0.0.1 port=1 dbname=x password=secret", Duration::from_secs(5)) {
            Err(PeerError::Connect(m)) => assert!(!m.contains("secret"), "{m}"),
            Err(e) => panic!("expected Connect error, got {e:?}"),
            Ok(_) => panic!("connected to port 1"),
        }
        assert!(start.elapsed() < Duration::from_secs(3));
        // Unparseable conninfo holding a password: no detail leaks.
        match PeerConn::connect("host=h password secret", T) {
            Err(e @ PeerError::Connect(_)) => assert!(!e.to_string().contains("secret"), "{e}"),
            Err(e) => panic!("expected Connect error, got {e:?}"),
            Ok(_) => panic!("connected with an invalid conninfo"),
        }
        match PeerConn::connect("postgresql://u:secret@[::1/db", T) {
            Err(e @ PeerError::Connect(_)) => assert!(!e.to_string().contains("secret"), "{e}"),
            Err(e) => panic!("expected Connect error, got {e:?}"),
            Ok(_) => panic!("connected with an invalid URI"),
        }
    }

    #[pg_test]
    fn peer_timeout_breaks_connection() {
        let mut c = connect();
        let start = Instant::now();
        match c.query("SELECT pg_sleep(5)", &[], Duration::from_millis(200)) {
            Err(PeerError::Timeout(_)) => {}
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(c.is_broken());
        assert!(matches!(c.query("SELECT 1", &[], T), Err(PeerError::Closed(_))));
    }

    #[pg_test(error = "canceling statement due to user request")]
    fn peer_wait_honours_query_cancel() {
        // The peer cancels this backend while it waits for the peer's answer: the wait must
        // wake on the latch and raise the cancel instead of sitting out the 30 s timeout.
        let pid = Spi::get_one::<i32>("SELECT pg_backend_pid()").unwrap().unwrap();
        let mut c = connect();
        let _ = c.execute(
            &format!("SELECT pg_sleep(0.2); SELECT pg_cancel_backend({pid}); SELECT pg_sleep(30)"),
            Duration::from_secs(30),
        );
        panic!("the query was not cancelled");
    }

    #[pg_test]
    fn peer_drop_releases_descriptors() {
        // About max_files_per_process / 3 external descriptors exist; leaking one per
        // connection would make AcquireExternalFD fail well before 400 connections.
        let info = self_conninfo();
        for _ in 0..400 {
            let c = PeerConn::connect(&info, T).unwrap();
            drop(c);
        }
        let _ = PeerConn::connect("host=127.0.0.1 port=1", T);
        let _ = PeerConn::connect("host=h password secret", T);
        assert!(!connect().is_broken());
    }

    #[pg_test]
    fn peer_redact_conninfo() {
        let r = redact_conninfo("host=h port=5 password=secret dbname=x");
        assert!(!r.contains("secret"), "{r}");
        assert!(r.contains("host=h") && r.contains("port=5") && r.contains("dbname=x"), "{r}");
        let r = redact_conninfo("postgresql://u:secret@h:5/db");
        assert!(!r.contains("secret"), "{r}");
        assert!(r.contains("user=u") && r.contains("host=h") && r.contains("dbname=db"), "{r}");
        let r = redact_conninfo("host=h sslpassword=secret application_name='a b'");
        assert!(!r.contains("secret") && r.contains("application_name='a b'"), "{r}");
        assert_eq!(redact_conninfo("host=h password secret"), "<invalid conninfo>");
        assert_eq!(redact_conninfo("mydb"), "dbname=mydb");
    }
}
