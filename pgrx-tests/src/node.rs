//! One PostgreSQL 15 server of a test cluster: its data directory, port and
//! lifecycle (initdb, start, stop, crash), plus SQL helpers that panic with
//! the node's name, the SQL and the server's error so failures read well.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use crate::pg::{Conn, Rows};
use crate::process::{
    children_of, give_to_server_user, is_root, process_alive, run, server_command, signal,
    SERVER_USER,
};
use crate::wait::{poll_until, wait_until};

/// Where initdb, pg_ctl and postgres live unless `RBUCARDO_PG_BIN` says otherwise.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Harness settings file, included from postgresql.conf so it can be
/// rewritten (new port) without editing postgresql.conf again.
const HARNESS_CONF: &str = "harness.conf";
/// Seconds pg_ctl may wait for a start or stop (crash recovery included).
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// Fresh ports tried when the first start hits a port taken meanwhile.
const PORT_ATTEMPTS: usize = 5;
/// How long killed server processes get to disappear.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A PostgreSQL server owned by a `Cluster`, reachable on 127.0.0.1.
pub struct Node {
    name: String,
    data_dir: PathBuf,
    /// Chosen at first start (retried on clash), then fixed so that proxies
    /// and conninfo strings stay valid across restarts.
    port: AtomicU16,
}

/// Why `pg_ctl start` failed, and whether another port might help.
struct StartFailure {
    port_clash: bool,
    message: String,
}

impl Node {
    pub(crate) fn new(name: &str, data_dir: PathBuf) -> Node {
        Node {
            name: name.to_string(),
            data_dir,
            port: AtomicU16::new(0),
        }
    }

    /// Human-readable name used in every panic message ("main", "node1", ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP port on 127.0.0.1; stable for the node's whole life.
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    /// The data directory (PGDATA); also holds `server.log`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log written by `pg_ctl -l`: the first place to look when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// Direct (proxy-free) conninfo for `db` as superuser `postgres`.
    pub fn conninfo(&self, db: &str) -> String {
        conninfo(self.port(), db)
    }

    /// Opens a direct connection to `db`, panicking with the node's name on failure.
    pub fn connect(&self, db: &str) -> Conn {
        Conn::connect(&self.conninfo(db)).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Runs statements on a fresh connection; panics with node, db, SQL and server error.
    pub fn sql(&self, db: &str, sql: &str) {
        self.connect(db)
            .execute(sql)
            .unwrap_or_else(|e| self.sql_failed(db, sql, e));
    }

    /// Runs a query on a fresh connection and returns its rows as text.
    pub fn query(&self, db: &str, sql: &str) -> Rows {
        self.connect(db)
            .query(sql)
            .unwrap_or_else(|e| self.sql_failed(db, sql, e))
    }

    /// First column of the first row of a query (`None` for NULL or no row).
    pub fn query_one(&self, db: &str, sql: &str) -> Option<String> {
        self.connect(db)
            .query_one(sql)
            .unwrap_or_else(|e| self.sql_failed(db, sql, e))
    }

    /// Creates database `name` (quoted as an identifier).
    pub fn createdb(&self, name: &str) {
        self.sql(
            "postgres",
            &format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")),
        );
    }

    /// Every row of `table` as its row-literal text, ordered by `order_by`.
    /// Both are SQL fragments (e.g. `"public.items"`, `"id"`) used verbatim.
    pub fn dump_table(&self, db: &str, table: &str, order_by: &str) -> Vec<String> {
        let sql = format!("SELECT t::text FROM {table} t ORDER BY {order_by}");
        self.query(db, &sql)
            .into_iter()
            .map(|row| row.into_iter().next().flatten().unwrap_or_default())
            .collect()
    }

    /// Starts the server (crash recovery included after `kill9`) and waits
    /// until it accepts connections; panics with the new log lines on failure.
    pub fn start(&self) {
        if let Err(failure) = self.try_start() {
            panic!("{}: start failed: {}", self.name, failure.message);
        }
    }

    /// Clean shutdown (`pg_ctl stop -m fast`), waiting until the server is gone.
    pub fn stop(&self) {
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "stop", "-m", "fast"]);
        run(cmd).unwrap_or_else(|e| panic!("{}: stop failed: {e}", self.name));
    }

    /// Clean stop followed by start on the same port.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Simulates a crash of the whole node: SIGKILL to the postmaster and all
    /// of its children at once, so nothing gets to write or clean up, then
    /// waits until they are gone. `start()` then performs crash recovery.
    ///
    /// Killing the children too (unlike a lone `kill -9` of the postmaster,
    /// whose backends linger until they notice) makes the crash instantaneous
    /// and lets `start()` succeed right away.
    pub fn kill9(&self) {
        let pid = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{}: kill9 but the server is not running", self.name));
        let pids = kill_server_tree(pid);
        let what = format!("{}: killed server processes {pids:?} to exit", self.name);
        wait_until(&what, EXIT_TIMEOUT, || {
            Ok(pids.iter().all(|p| !process_alive(*p)))
        });
        self.remove_stale_lock_files();
    }

    /// Pid of the running postmaster, from the first line of `postmaster.pid`;
    /// `None` when the server is not running (also after `kill9`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let content = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: u32 = content.lines().next()?.trim().parse().ok()?;
        process_alive(pid).then_some(pid)
    }

    /// Creates the data directory with initdb and hooks the harness settings in.
    pub(crate) fn init(&self) {
        let mut cmd = server_command(&pg_bin("initdb"), self.parent_dir());
        cmd.arg("-D").arg(&self.data_dir);
        cmd.args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
        if let Err(e) = run(cmd) {
            let hint = if is_root() {
                format!(" (is every parent directory traversable by user {SERVER_USER}?)")
            } else {
                String::new()
            };
            panic!("{}: initdb failed{hint}: {e}", self.name);
        }
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .unwrap_or_else(|e| panic!("open {}: {e}", conf.display()));
        writeln!(file, "\ninclude '{HARNESS_CONF}'")
            .unwrap_or_else(|e| panic!("append to {}: {e}", conf.display()));
    }

    /// First start: picks a free port, writes `harness.conf` (port, socket
    /// directory, then `settings`) and starts, retrying with a new port when
    /// another process grabbed the chosen one in between.
    pub(crate) fn first_start(&self, settings: &str) {
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            self.port.store(free_port(), Ordering::SeqCst);
            self.write_harness_conf(settings);
            match self.try_start() {
                Ok(()) => return,
                Err(StartFailure {
                    port_clash: true,
                    message,
                }) => last_failure = message,
                Err(StartFailure {
                    port_clash: false,
                    message,
                }) => panic!("{}: start failed: {message}", self.name),
            }
        }
        panic!(
            "{}: no free port after {PORT_ATTEMPTS} attempts: {last_failure}",
            self.name
        );
    }

    /// Stops the server whatever its state: `pg_ctl stop -m immediate`, then
    /// SIGKILL if it is still alive. Never panics (it runs inside `Drop`).
    pub(crate) fn shut_down_for_good(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", "10", "stop", "-m", "immediate"]);
        if run(cmd).is_err() || process_alive(pid) {
            let pids = kill_server_tree(pid);
            let _ = poll_until(EXIT_TIMEOUT, || Ok(pids.iter().all(|p| !process_alive(*p))));
        }
    }

    /// After `kill9` the dead postmaster may linger as a zombie until PID 1
    /// reaps it (in containers: seconds, or never), and a new postmaster takes
    /// any existing pid in its lock files for "another server running". Every
    /// server process is dead, so the lock files are stale; the old shared
    /// memory segment is found via the data directory's inode and removed at
    /// the next start.
    fn remove_stale_lock_files(&self) {
        let socket_lock = format!(".s.PGSQL.{}.lock", self.port());
        for name in ["postmaster.pid", socket_lock.as_str()] {
            let path = self.data_dir.join(name);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    panic!("{}: remove stale {}: {e}", self.name, path.display());
                }
            }
        }
    }

    fn try_start(&self) -> Result<(), StartFailure> {
        let log = self.log_path();
        let log_offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(&log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        run(cmd).map(|_| ()).map_err(|e| {
            let new_log = read_from(&log, log_offset);
            StartFailure {
                port_clash: new_log.contains("Address already in use"),
                message: format!("{e}\n--- {} (new lines) ---\n{new_log}", log.display()),
            }
        })
    }

    fn write_harness_conf(&self, settings: &str) {
        let socket_dir = self.data_dir.display().to_string().replace('\'', "''");
        let text = format!(
            "# Written by rbucardo-cluster-tests.\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{socket_dir}'\n{settings}",
            self.port()
        );
        let path = self.data_dir.join(HARNESS_CONF);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        give_to_server_user(&path);
    }

    fn pg_ctl(&self) -> std::process::Command {
        let mut cmd = server_command(&pg_bin("pg_ctl"), self.parent_dir());
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    /// The cluster directory, owned by the server user: a safe working directory.
    fn parent_dir(&self) -> &Path {
        self.data_dir.parent().expect("node data dir has a parent")
    }

    fn sql_failed(&self, db: &str, sql: &str, error: String) -> ! {
        panic!("{} (db {db}): SQL failed:\n{sql}\n--> {error}", self.name)
    }
}

/// Conninfo for superuser `postgres` on 127.0.0.1:`port`. The connect timeout
/// keeps a connection attempt through a stalled proxy from hanging forever.
pub(crate) fn conninfo(port: u16, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user=postgres dbname='{}' connect_timeout=5",
        db.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// The socket address of a node, for proxies.
pub(crate) fn node_addr(node: &Node) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], node.port()))
}

fn pg_bin(program: &str) -> PathBuf {
    let dir = std::env::var_os("RBUCARDO_PG_BIN")
        .map_or_else(|| PathBuf::from(DEFAULT_PG_BIN), PathBuf::from);
    dir.join(program)
}

/// A port that was free a moment ago (bind to port 0, then release it).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of probe listener")
        .port()
}

/// SIGKILLs a postmaster and its children. The postmaster is stopped first so
/// it cannot fork while its children are listed; once it dies they would be
/// re-parented and impossible to find.
/// Returns every pid it killed.
fn kill_server_tree(postmaster: u32) -> Vec<u32> {
    signal(&[postmaster], "STOP");
    let mut pids = children_of(postmaster);
    pids.insert(0, postmaster);
    signal(&pids, "KILL");
    pids
}

/// The part of a file after `offset`: the log lines of the latest attempt.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = fs::File::open(path) {
        if file.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_string(&mut text);
        }
    }
    text
}
