//! Operating-system helpers: running PostgreSQL binaries as the right user,
//! and watching or killing processes by pid through /proc.
//!
//! PostgreSQL refuses to run as root, and CI runs the tests as root, so every
//! server-side command goes through `runuser -u postgres` in that case and
//! runs directly otherwise. Signals are sent with the `kill` utility so the
//! crate needs no libc binding.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// Unprivileged account that owns data directories when the tests run as root.
pub(crate) const SERVER_USER: &str = "postgres";

/// Whether this process runs with effective uid 0 (read from /proc once).
pub(crate) fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid: line in /proc/self/status");
        // Fields: real, effective, saved, filesystem.
        uid_line.split_whitespace().nth(2) == Some("0")
    })
}

/// A command for a server-side binary, run as `postgres` when we are root.
/// It runs from `cwd`, which must be readable by that user.
pub(crate) fn server_command(program: &Path, cwd: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", SERVER_USER, "--"]).arg(program);
        runuser
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd);
    cmd
}

/// Runs `cmd` to completion; the error carries its exit status and output.
pub(crate) fn run(mut cmd: Command) -> Result<String, String> {
    let output = cmd.output().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    Err(format!(
        "{cmd:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Makes `dir` (recursively) owned by the server user when we are root, so
/// initdb and the server can write there. No-op otherwise.
pub(crate) fn give_to_server_user(dir: &Path) {
    if is_root() {
        let mut chown = Command::new("chown");
        chown.arg("-R").arg(format!("{SERVER_USER}:")).arg(dir);
        run(chown).unwrap_or_else(|e| panic!("give {} to {SERVER_USER}: {e}", dir.display()));
    }
}

/// Whether `pid` is a running process. Zombies count as dead: a killed
/// postmaster is reaped by PID 1, which in containers may never happen.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_fields(&stat).is_some_and(|(state, _)| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Pids whose parent is `parent`, found by scanning /proc.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_fields(&stat).map(|(_, ppid)| ppid == parent))
                .unwrap_or(false)
        })
        .collect()
}

/// Sends `signal` (e.g. "KILL", "STOP") to every pid in `pids`; errors
/// (a process already gone) are ignored.
pub(crate) fn signal(pids: &[u32], signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .output();
}

/// (state, ppid) from a /proc/<pid>/stat line. The command name sits in
/// parentheses and may contain spaces, so parse after the last ')'.
fn stat_fields(stat: &str) -> Option<(&str, u32)> {
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((state, ppid))
}
