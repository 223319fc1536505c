//! Polling with a deadline, the only way tests should wait for asynchronous
//! effects (replication, restarts, process exit): a bare sleep is either too
//! short on a loaded CI machine or wastes time everywhere else.

use std::time::{Duration, Instant};

/// How often conditions are re-evaluated.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `cond` every ~50ms until it returns `Ok(true)`.
///
/// `Ok(false)` and `Err(_)` both mean "not yet"; an error's text is kept so
/// that a timeout panic says *why* the condition never held (e.g. the last
/// connection error), alongside `what` and the timeout.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> Result<bool, String>) {
    if let Err(last_state) = poll_until(timeout, cond) {
        panic!("timed out after {timeout:?} waiting for {what} ({last_state})");
    }
}

/// Like `wait_until`, re-evaluating `cond` every `interval` instead of every
/// ~50ms: for conditions that are costly to evaluate (checksums of large
/// tables) and would otherwise compete with the servers for the CPU.
pub fn wait_until_every(
    what: &str,
    timeout: Duration,
    interval: Duration,
    cond: impl FnMut() -> Result<bool, String>,
) {
    if let Err(last_state) = poll_every(timeout, interval, cond) {
        panic!("timed out after {timeout:?} waiting for {what} ({last_state})");
    }
}

/// Non-panicking `wait_until_every`: `Ok(())` once `cond` returns `Ok(true)`,
/// else, at the deadline, the last state (the condition's last error or
/// "condition returned false"), so the caller can gather diagnostics (server
/// state, logs) before failing.
pub fn poll_every(
    timeout: Duration,
    interval: Duration,
    mut cond: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_state = match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => "condition returned false".to_string(),
            Err(e) => format!("last error: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(last_state);
        }
        std::thread::sleep(interval);
    }
}

/// Non-panicking core of `wait_until`, for cleanup code that must not panic
/// (it runs in `Drop`, possibly while unwinding). On timeout returns the last
/// state: the condition's last error or "condition returned false".
pub(crate) fn poll_until(
    timeout: Duration,
    cond: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    poll_every(timeout, POLL_INTERVAL, cond)
}
