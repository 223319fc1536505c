//! A set of PostgreSQL nodes for one test, with a proxy on every link
//! between them, and guaranteed cleanup.
//!
//! Each cluster lives in its own directory (`<name>-<pid>-<counter>`) so tests
//! running in parallel threads never collide. Dropping the cluster stops every
//! server and proxy even when the test panics; a failed test keeps its data
//! directories and prints where the server logs are.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::node::{conninfo, node_addr, Node};
use crate::process::give_to_server_user;
use crate::proxy::Proxy;

/// Settings every node gets: fast (no fsync), small, and verbose enough to debug.
const BASE_SETTINGS: &str = "\
fsync = off
max_worker_processes = 16
max_connections = 50
shared_buffers = 16MB
log_min_messages = info
rbucardo.report_interval = 5
log_line_prefix = '%m [%p] %q%a '
";
/// Rows listed per side when two tables differ.
const DIFF_ROWS_SHOWN: usize = 10;

/// Distinguishes clusters created by one test process.
static CLUSTER_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Configures a `Cluster` before starting it; see `Cluster::builder`.
pub struct ClusterBuilder {
    name: String,
    node_names: Vec<String>,
    preload: bool,
    extra_conf: String,
}

impl ClusterBuilder {
    /// `n` nodes named `node0`, `node1`, ...
    pub fn nodes(mut self, n: usize) -> Self {
        self.node_names = (0..n).map(|i| format!("node{i}")).collect();
        self
    }

    /// One node per name, in order (e.g. `["main", "branch1", "branch2"]`);
    /// names only label nodes in messages, indices address them.
    pub fn node_names(mut self, names: &[&str]) -> Self {
        self.node_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Whether to load the extension with `shared_preload_libraries='rbucardo'`
    /// (default on). The harness's own tests turn it off: a server whose
    /// preload library is missing refuses to start.
    pub fn preload(mut self, preload: bool) -> Self {
        self.preload = preload;
        self
    }

    /// Extra postgresql.conf lines, applied after the harness defaults so they override them.
    pub fn extra_conf(mut self, lines: &str) -> Self {
        self.extra_conf.push_str(lines);
        self.extra_conf.push('\n');
        self
    }

    /// Creates and starts every node (in parallel), each answering on its own port.
    pub fn start(self) -> Cluster {
        assert!(
            !self.node_names.is_empty(),
            "cluster {}: no nodes requested",
            self.name
        );
        let dir = cluster_dir(&self.name);
        let nodes = self
            .node_names
            .iter()
            .enumerate()
            .map(|(i, name)| Node::new(name, dir.join(format!("node{i}"))))
            .collect::<Vec<_>>();
        let links = (0..nodes.len() * nodes.len())
            .map(|_| OnceLock::new())
            .collect();
        // From here on, Drop cleans up whatever got started, even if a start panics.
        let cluster = Cluster { dir, nodes, links };
        let settings = self.settings();
        std::thread::scope(|scope| {
            for node in &cluster.nodes {
                let settings = &settings;
                scope.spawn(move || {
                    node.init();
                    node.first_start(settings);
                });
            }
        });
        cluster
    }

    fn settings(&self) -> String {
        let preload = if self.preload {
            "shared_preload_libraries = 'rbucardo'\n"
        } else {
            ""
        };
        format!("{BASE_SETTINGS}{preload}{}", self.extra_conf)
    }
}

/// Running PostgreSQL nodes plus lazily created proxies for the links between them.
pub struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    /// `links[from * n + to]`: the proxy in front of `to` used by `from`.
    links: Vec<OnceLock<Proxy>>,
}

impl Cluster {
    /// A builder for clusters with custom node names, preload or settings.
    /// `name` labels the cluster's directory (use the test's name).
    pub fn builder(name: &str) -> ClusterBuilder {
        ClusterBuilder {
            name: name.to_string(),
            node_names: Vec::new(),
            preload: true,
            extra_conf: String::new(),
        }
    }

    /// `n` nodes named `node0`.., with the extension preloaded.
    pub fn start(name: &str, n: usize) -> Cluster {
        Cluster::builder(name).nodes(n).start()
    }

    /// One node per name, with the extension preloaded.
    pub fn start_named(name: &str, node_names: &[&str]) -> Cluster {
        Cluster::builder(name).node_names(node_names).start()
    }

    /// Node `i`; panics if out of range.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes
            .get(i)
            .unwrap_or_else(|| panic!("cluster has {} nodes, no node {i}", self.nodes.len()))
    }

    /// All nodes, in index order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// This cluster's directory (one `node<i>` data directory per node).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The proxy that node `from` uses to reach node `to`, created on first
    /// use. One proxy per ordered pair, so cutting one link leaves the others.
    pub fn link(&self, from: usize, to: usize) -> &Proxy {
        let n = self.nodes.len();
        assert!(
            from < n && to < n,
            "link {from}->{to}: cluster has {n} nodes"
        );
        self.links[from * n + to].get_or_init(|| Proxy::start(node_addr(self.node(to))))
    }

    /// Conninfo for database `db` on node `to`, going through the `from -> to` proxy.
    pub fn link_conninfo(&self, from: usize, to: usize, db: &str) -> String {
        conninfo(self.link(from, to).port(), db)
    }

    /// Asserts `table` has identical rows (ordered by `order_by`) on all of
    /// `nodes`, comparing each with the first; panics with counts, the first
    /// differing position and rows missing on either side.
    pub fn assert_tables_equal(&self, db: &str, table: &str, order_by: &str, nodes: &[usize]) {
        let Some((&first, rest)) = nodes.split_first() else {
            return;
        };
        let reference = self.node(first).dump_table(db, table, order_by);
        for &other in rest {
            let rows = self.node(other).dump_table(db, table, order_by);
            let (a, b) = (self.node(first).name(), self.node(other).name());
            if let Some(diff) = describe_difference(a, &reference, b, &rows) {
                panic!("table {table} (db {db}) differs:\n{diff}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Proxies first: their connections die, so no server waits on a client.
        for link in &mut self.links {
            drop(link.take());
        }
        for node in &self.nodes {
            node.shut_down_for_good();
        }
        // A crashed backend or worker makes PostgreSQL restart every process of that server:
        // tests would often still converge afterwards, so look for it explicitly.
        let crashes: Vec<String> = self.nodes.iter().flat_map(|n| crash_lines(n)).collect();
        if !crashes.is_empty() && !std::thread::panicking() {
            eprintln!("rbucardo-cluster-tests: keeping {}", self.dir.display());
            panic!("a server process crashed during the test:\n{}", crashes.join("\n"));
        }
        if std::thread::panicking() {
            eprintln!(
                "rbucardo-cluster-tests: test failed, keeping {}",
                self.dir.display()
            );
            for node in &self.nodes {
                eprintln!(
                    "  {} server log: {}",
                    node.name(),
                    node.log_path().display()
                );
            }
        } else if std::env::var_os("RBUCARDO_KEEP_CLUSTERS").is_some() {
            // For development: keep the servers' data and logs of a run that passed.
            eprintln!("rbucardo-cluster-tests: keeping {} (RBUCARDO_KEEP_CLUSTERS)", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "rbucardo-cluster-tests: could not remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Server log lines that mean a process of the server died abnormally.
fn crash_lines(node: &Node) -> Vec<String> {
    let log = fs::read_to_string(node.log_path()).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("was terminated by signal") || l.contains("PANIC:") || (l.contains("exited with exit code") && !l.contains("exit code 0") && !l.contains("exit code 1")))
        .map(|l| format!("  {}: {l}", node.name()))
        .collect()
}

/// A fresh, empty directory for one cluster, owned by the server user:
/// `$RBUCARDO_TEST_DIR` (or `<tmp>/rbucardo-tests`)/`<name>-<pid>-<counter>`.
fn cluster_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("RBUCARDO_TEST_DIR").map_or_else(
        || std::env::temp_dir().join("rbucardo-tests"),
        PathBuf::from,
    );
    create_shared_dir(&base);
    let counter = CLUSTER_COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = base.join(format!("{name}-{}-{counter}", std::process::id()));
    if dir.exists() {
        // Left over by an earlier process that had the same pid.
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove stale {}: {e}", dir.display()));
    }
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    give_to_server_user(&dir);
    dir
}

/// Creates the base directory if needed, world-writable with the sticky bit
/// like /tmp, so root and non-root runs can share it.
fn create_shared_dir(base: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if base.is_dir() {
        return;
    }
    fs::create_dir_all(base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    fs::set_permissions(base, fs::Permissions::from_mode(0o1777))
        .unwrap_or_else(|e| panic!("chmod 1777 {}: {e}", base.display()));
}

/// `None` if `a` and `b` are equal; otherwise a readable description.
fn describe_difference(a_name: &str, a: &[String], b_name: &str, b: &[String]) -> Option<String> {
    if a == b {
        return None;
    }
    let mut out = format!("{a_name}: {} rows, {b_name}: {} rows\n", a.len(), b.len());
    let position = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let show = |rows: &[String]| {
        rows.get(position)
            .map_or("<no row>".to_string(), Clone::clone)
    };
    out += &format!(
        "first difference at row {position}: {a_name}: {} | {b_name}: {}\n",
        show(a),
        show(b)
    );
    out += &only_in(a_name, a, b);
    out += &only_in(b_name, b, a);
    Some(out)
}

/// Up to `DIFF_ROWS_SHOWN` rows of `rows` that `other` lacks (as a multiset).
fn only_in(name: &str, rows: &[String], other: &[String]) -> String {
    let mut remaining: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for row in other {
        *remaining.entry(row).or_default() += 1;
    }
    let missing: Vec<&String> = rows
        .iter()
        .filter(|row| match remaining.get_mut(row.as_str()) {
            Some(count) if *count > 0 => {
                *count -= 1;
                false
            }
            _ => true,
        })
        .collect();
    if missing.is_empty() {
        return String::new();
    }
    let mut out = format!("{} rows only on {name}:\n", missing.len());
    for row in missing.iter().take(DIFF_ROWS_SHOWN) {
        out += &format!("  {row}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe_difference;

    fn rows(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn equal_tables_have_no_difference() {
        assert_eq!(
            describe_difference("a", &rows(&["(1)"]), "b", &rows(&["(1)"])),
            None
        );
    }

    #[test]
    fn difference_names_position_and_missing_rows() {
        let diff = describe_difference(
            "main",
            &rows(&["(1)", "(2)", "(3)"]),
            "branch1",
            &rows(&["(1)", "(3)"]),
        )
        .unwrap();
        assert!(diff.contains("main: 3 rows, branch1: 2 rows"), "{diff}");
        assert!(
            diff.contains("first difference at row 1: main: (2) | branch1: (3)"),
            "{diff}"
        );
        assert!(diff.contains("1 rows only on main:\n  (2)"), "{diff}");
        assert!(!diff.contains("only on branch1"), "{diff}");
    }
}
