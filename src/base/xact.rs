//! Transactions, subtransactions, and who runs the code inside them.
//!
//! Everything that changes the backend's transaction state or identity goes through here, so
//! that each save/restore pair is written once and always balanced:
//! - [`in_txn`]: a worker's own short transaction; an ERROR becomes a value.
//! - [`subtransaction`] / [`undoable`]: a subtransaction rolled back on an ERROR, or when the
//!   body decides so by returning `Err`; no error is raised just to unwind.
//! - [`RunAs`]: run as another role until dropped.
//! - [`LocalSetting`]: a setting of ours until dropped, e.g. `search_path = pg_catalog,
//!   pg_temp` for code running with raised privileges, so that no object of a user's schema
//!   can stand in for a built-in.

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// The message of a caught error, for a status or a record.
pub fn error_message(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// The SQLSTATE of a caught error; `None` for a Rust panic.
pub fn error_code(e: &CaughtError) -> Option<PgSqlErrorCode> {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => Some(r.sql_error_code()),
        CaughtError::RustPanic { .. } => None,
    }
}

/// The message of a caught error with its detail, when the detail says something (pgrx puts
/// a backtrace in the detail of a panic; that is left out).
pub fn error_message_with_detail(e: &CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => match r.detail().map(str::trim).filter(|d| !d.is_empty() && !d.contains("   0: ")) {
            Some(detail) => format!("{} ({detail})", r.message()),
            None => r.message().to_string(),
        },
        CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Runs `f` in its own local transaction (a background worker's unit of work); an ERROR
/// becomes `Err(message)` and the transaction is rolled back, so the worker survives it.
/// Callers must be outside any transaction (worker code only): inside a BEGIN block the abort
/// below would tear down the caller's transaction under its running query.
pub fn in_txn<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe) -> Result<R, String> {
    // SAFETY: called by a background worker between transactions (never inside one): this is
    // the sequence PostgreSQL's own workers use to run a transaction with a snapshot.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // Whatever a command run earlier in this session set, the worker's own queries mean the
    // built-ins (the guard drops before the commit; SET LOCAL made inside survives it).
    let result = PgTryBuilder::new(|| {
        let _path = LocalSetting::pinned_search_path();
        Ok(f())
    })
    .catch_others(|e| Err(error_message(&e)))
    .execute();
    // SAFETY: the transaction started above is still current: `f` either returned normally
    // (its subtransactions and snapshots balanced) or raised, and an abort cleans up anything.
    unsafe {
        if result.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}

/// Runs `f` in a subtransaction. It is released when `f` returns `Ok`, and rolled back when
/// `f` returns `Err` (the body asks for its work to be undone) or raises an ERROR (returned as
/// the outer `Err`).
pub fn undoable<R, E>(f: impl FnOnce() -> Result<R, E>) -> Result<Result<R, E>, CaughtError> {
    // SAFETY: the begin/release/rollback calls are balanced on every path, and the memory
    // context and resource owner are put back as PostgreSQL's PL handlers do after an internal
    // subtransaction.
    unsafe {
        let cx = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cx);
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f()))).catch_others(Err).execute();
        if matches!(result, Ok(Ok(_))) {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cx);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// Runs `f` in a subtransaction that is rolled back if `f` raises an error, which is returned.
pub fn subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, CaughtError> {
    undoable(|| Ok::<R, std::convert::Infallible>(f())).map(|r| match r {
        Ok(v) => v,
        Err(never) => match never {},
    })
}

/// While alive, the backend runs as another role (as SECURITY DEFINER functions do: the
/// session user stays, `current_user` changes). Dropping it, also while an error unwinds,
/// puts the previous user and security context back.
pub struct RunAs {
    user: pg_sys::Oid,
    context: i32,
    /// For a restricted guard: the settings level whose changes are undone on drop.
    sandbox: Option<i32>,
}

impl RunAs {
    /// Runs as `role`.
    pub fn role(role: pg_sys::Oid) -> RunAs {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: reads and sets this backend's current user id, on its main thread; Drop
        // restores what was read here.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        }
        RunAs { user, context, sandbox: None }
    }

    /// Runs as `role` in a security-restricted operation (as PostgreSQL runs maintenance and
    /// logical replication as a table's owner): code that role owns (triggers, CHECK
    /// constraints, index expressions) runs with its rights only, and can neither change the
    /// role nor leave settings behind for the superuser session: whatever it sets (SET,
    /// set_config, at any level) is undone when the guard drops, as PostgreSQL does around its
    /// own restricted operations.
    pub fn restricted(role: pg_sys::Oid) -> RunAs {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        // SAFETY: as in `role`; the settings level is popped in Drop, in nesting order.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            let sandbox = pg_sys::NewGUCNestLevel();
            pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32);
            RunAs { user, context, sandbox: Some(sandbox) }
        }
    }

    /// Runs as the bootstrap superuser, who owns the extension's tables: for writes to
    /// rbucardo's own catalog on behalf of a user who has no rights on it.
    pub fn extension_owner() -> RunAs {
        RunAs::role(pg_sys::Oid::from_u32(pg_sys::BOOTSTRAP_SUPERUSERID))
    }

    /// The role that was current before this guard.
    pub fn previous_user(&self) -> pg_sys::Oid {
        self.user
    }
}

impl Drop for RunAs {
    fn drop(&mut self) {
        // SAFETY: restores the values saved in `role`/`restricted`, on the same thread; the
        // settings level (if any) is reverted as on abort, before the user is restored.
        unsafe {
            if let Some(level) = self.sandbox {
                pg_sys::AtEOXact_GUC(false, level);
            }
            pg_sys::SetUserIdAndSecContext(self.user, self.context);
        }
    }
}

/// While alive, a setting has a value of ours (as a function's `SET` clause does it: a new GUC
/// nesting level, undone on drop, so the value before comes back whatever it was).
pub struct LocalSetting {
    /// None when the setting had the value already: nothing to put back.
    level: Option<i32>,
}

/// Whether setting `name` has the text value `value` now (in the form `current_setting`
/// shows it). A transaction that changes no setting lets PostgreSQL pop a settings level
/// without looking at every setting (its `guc_dirty`), which the applier's per-row owner
/// sandboxes (`RunAs::restricted`) depend on: once anything was set, each pop scans all of
/// them, 6.5 % of a catch-up's CPU. So a setting that already holds the value (the worker's
/// session keeps replica mode, a link session the pinned search_path) is not set again.
fn has_value(name: &std::ffi::CStr, value: &std::ffi::CStr) -> bool {
    // SAFETY: GetConfigOption returns NULL (missing_ok) or the setting's current value as a
    // NUL-terminated string valid until the setting changes; it is compared at once.
    unsafe {
        let now = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        !now.is_null() && std::ffi::CStr::from_ptr(now) == value
    }
}

impl LocalSetting {
    /// Sets `name` to `value` until dropped. `superuser` for settings only superusers may
    /// change (the caller has checked that it may).
    pub fn new(name: &std::ffi::CStr, value: &std::ffi::CStr, superuser: bool) -> LocalSetting {
        let context = if superuser { pg_sys::GucContext::PGC_SUSET } else { pg_sys::GucContext::PGC_USERSET };
        if has_value(name, value) {
            return LocalSetting { level: None };
        }
        // SAFETY: NewGUCNestLevel/set_config_option/AtEOXact_GUC are the calls fmgr makes for
        // a function's SET clause; the level is popped in Drop, in nesting order (guards are
        // scoped values), and a transaction abort pops it anyway. (Popped as at commit, it
        // puts back only this guard's own value, as a SET clause does: a SET or SET LOCAL run
        // inside outlives it either way.)
        unsafe {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(name.as_ptr(), value.as_ptr(), context, pg_sys::GucSource::PGC_S_SESSION, pg_sys::GucAction::GUC_ACTION_SAVE, true, 0, false);
            LocalSetting { level: Some(level) }
        }
    }

    /// `search_path = pg_catalog, pg_temp`: code that runs with raised privileges holds one, so
    /// that unqualified operators, functions and casts in its queries resolve to the built-in
    /// ones whatever a user put in their search_path.
    pub fn pinned_search_path() -> LocalSetting {
        LocalSetting::new(c"search_path", c"pg_catalog, pg_temp", false)
    }

    /// `session_replication_role = replica`: applied rows fire no capture triggers and no
    /// foreign-key checks (src/apply/fk.rs checks those).
    pub fn replica_mode() -> LocalSetting {
        LocalSetting::new(c"session_replication_role", c"replica", true)
    }
}

/// `SET LOCAL name = value` without parsing a statement: for settings any user may change, in
/// paths that run many times a second (a fetch, a push, a tick). Nothing is set when the
/// setting shows that value already (`has_value`; a value in another form, "60s" for "1min",
/// is set all the same).
pub fn set_local(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    if has_value(name, value) {
        return;
    }
    // SAFETY: what SET LOCAL runs; inside a transaction, on the backend's main thread.
    unsafe {
        pg_sys::set_config_option(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_USERSET, pg_sys::GucSource::PGC_S_SESSION, pg_sys::GucAction::GUC_ACTION_LOCAL, true, 0, false);
    }
}

/// Puts the rest of this session in replica mode (`session_replication_role = replica`, kept
/// after the transaction ends), for sessions that only replicate: the worker, and a peer's
/// link session once it pushes, if it logged in as a superuser (src/runtime/endpoints.rs).
/// Changing the setting makes PostgreSQL drop every cached plan of the session (its assign
/// hook resets the plan cache), so switching it on and off around every applied batch had
/// each batch parse and plan all its statements again: half a hub's CPU with 20 stores.
/// Native logical replication's apply worker also stays in replica mode. A session of any
/// other user never keeps it: replica mode skips triggers and foreign-key checks, which only
/// a superuser may ask for, and such a session could go on to write tables with it.
pub fn replica_session() {
    // SAFETY: plain globals of this backend; set_config_option is how SET sets it.
    unsafe {
        if !pg_sys::superuser_arg(pg_sys::GetSessionUserId()) {
            return;
        }
        if pg_sys::SessionReplicationRole != pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32 {
            pg_sys::set_config_option(
                c"session_replication_role".as_ptr(),
                c"replica".as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SET,
                true,
                0,
                false,
            );
        }
    }
}

/// While alive, every setting changed (with SET, SET LOCAL or set_config, at any level) is
/// undone when it drops, as if its transaction had aborted: replicated DDL runs inside one, so
/// that nothing it sets outlives it in the applying session.
pub struct SettingsSandbox {
    level: i32,
}

impl SettingsSandbox {
    pub fn new() -> SettingsSandbox {
        // SAFETY: a GUC nesting level, popped in Drop in nesting order (see LocalSetting).
        SettingsSandbox { level: unsafe { pg_sys::NewGUCNestLevel() } }
    }
}

impl Default for SettingsSandbox {
    fn default() -> Self {
        SettingsSandbox::new()
    }
}

impl Drop for SettingsSandbox {
    fn drop(&mut self) {
        // SAFETY: pops the level pushed in `new`; `false` reverts whatever was set at it.
        unsafe { pg_sys::AtEOXact_GUC(false, self.level) };
    }
}

impl Drop for LocalSetting {
    fn drop(&mut self) {
        if let Some(level) = self.level {
            // SAFETY: pops exactly the level pushed in `new` (see there).
            unsafe { pg_sys::AtEOXact_GUC(true, level) };
        }
    }
}

thread_local! {
    /// Why the current transaction may not be prepared, if something said so
    /// (`refuse_prepare`).
    static NO_PREPARE: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
    static NO_PREPARE_HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Refuses PREPARE TRANSACTION for the current transaction, saying that it `why` ("wrote to
/// rbucardo's change log"): what rbucardo does at commit (counting and waking, bumping the
/// configuration generation) or holds to it (the tick, stream and origin locks) must not
/// outlive the session in a prepared transaction. One callback per backend.
pub fn refuse_prepare(why: &'static str) {
    NO_PREPARE.with(|w| w.set(Some(why)));
    if !NO_PREPARE_HOOKED.with(|h| h.replace(true)) {
        // SAFETY: registers a 'static function with the signature PostgreSQL expects, once per
        // backend (NO_PREPARE_HOOKED).
        unsafe { pg_sys::RegisterXactCallback(Some(no_prepare_callback), std::ptr::null_mut()) };
    }
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `refuse_prepare`, at a transaction event on the
/// backend's main thread. The body itself uses no unsafe operation.
#[pg_guard]
unsafe extern "C-unwind" fn no_prepare_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_PREPARE => {
            if let Some(why) = NO_PREPARE.with(std::cell::Cell::get) {
                crate::base::error::raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("PREPARE TRANSACTION is not supported in a transaction that {why}"),
                    "Commit the transaction directly.",
                );
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PREPARE | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT => {
            NO_PREPARE.with(|w| w.set(None))
        }
        _ => {}
    }
}
