//! Self-tests of the harness. They run without the extension (`preload(false)`),
//! so they can pass before rbucardo itself builds.

use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

use rbucardo_cluster_tests::{process_alive, wait_until, Cluster, Conn, Direction};

fn cluster(name: &str, nodes: usize) -> Cluster {
    Cluster::builder(name).nodes(nodes).preload(false).start()
}

/// Uid of `user`, or of the current process when `user` is `None`.
fn uid(user: Option<&str>) -> u32 {
    let output = Command::new("id")
        .arg("-u")
        .args(user)
        .output()
        .expect("run id -u");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("numeric uid from id -u")
}

#[test]
fn three_named_nodes_start_and_answer() {
    let cluster = Cluster::builder("three")
        .node_names(&["main", "branch1", "branch2"])
        .preload(false)
        .start();
    let names: Vec<&str> = cluster.nodes().iter().map(|n| n.name()).collect();
    assert_eq!(names, ["main", "branch1", "branch2"]);
    for node in cluster.nodes() {
        assert_eq!(
            node.query_one("postgres", "SELECT 1"),
            Some("1".to_string()),
            "{}",
            node.name()
        );
        if uid(None) == 0 {
            let owner = std::fs::metadata(node.data_dir())
                .expect("stat data dir")
                .uid();
            assert_eq!(
                owner,
                uid(Some("postgres")),
                "{} data dir owner",
                node.name()
            );
        }
    }
    let ports: std::collections::HashSet<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    assert_eq!(ports.len(), 3, "distinct ports");
}

#[test]
fn proxy_cut_stall_and_cut_mid_transfer() {
    let cluster = cluster("proxy", 2);
    let link = cluster.link(0, 1);
    let info = cluster.link_conninfo(0, 1, "postgres");
    let mut conn = Conn::connect(&info).expect("connect through link 0->1");
    assert_eq!(conn.query_one("SELECT 1"), Ok(Some("1".to_string())));

    // cut: the open connection dies, new ones are refused, other links live on.
    link.cut();
    assert!(
        conn.query_one("SELECT 1").is_err(),
        "query on a cut link must fail"
    );
    assert!(
        Conn::connect(&info).is_err(),
        "connect on a cut link must fail"
    );
    let mut other =
        Conn::connect(&cluster.link_conninfo(1, 0, "postgres")).expect("link 1->0 is unaffected");
    assert_eq!(other.query_one("SELECT 2"), Ok(Some("2".to_string())));
    link.restore();
    let mut conn = Conn::connect(&info).expect("connect after restore");
    assert_eq!(conn.query_one("SELECT 3"), Ok(Some("3".to_string())));

    // stall: a query hangs while stalled and completes once restored.
    link.stall();
    let (sender, receiver) = mpsc::channel();
    let stalled_query = std::thread::spawn(move || {
        let _ = sender.send(conn.query_one("SELECT 42"));
        conn
    });
    assert_eq!(
        receiver.recv_timeout(Duration::from_secs(1)),
        Err(RecvTimeoutError::Timeout)
    );
    link.restore();
    let result = receiver
        .recv_timeout(Duration::from_secs(10))
        .expect("query completes after restore");
    assert_eq!(result, Ok(Some("42".to_string())));
    let mut conn = stalled_query.join().expect("stalled query thread");

    // cut_after: small traffic passes, a large result is cut after exactly n bytes.
    assert_eq!(
        conn.query_one("SELECT 'small'"),
        Ok(Some("small".to_string()))
    );
    let before = link.bytes_forwarded(Direction::ServerToClient);
    link.cut_after(100_000);
    let error = conn
        .query_one("SELECT repeat('x', 1000000)")
        .expect_err("large result must be cut");
    assert_eq!(
        link.bytes_forwarded(Direction::ServerToClient) - before,
        100_000,
        "error was: {error}"
    );
    assert!(
        Conn::connect(&info).is_err(),
        "link stays cut after cut_after"
    );
    assert!(link.connections_accepted() >= 4);
}

#[test]
fn panicking_test_leaves_no_process_behind() {
    struct Recorded {
        pids: Vec<u32>,
        proxy_port: u16,
        logs: Vec<PathBuf>,
        dir: PathBuf,
    }
    let recorded = Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let cluster = cluster("panicking", 2);
        let proxy_port = cluster.link(0, 1).port();
        let pids = cluster
            .nodes()
            .iter()
            .map(|n| n.postmaster_pid().expect("postmaster running"))
            .collect();
        let logs = cluster.nodes().iter().map(|n| n.log_path()).collect();
        *recorded.lock().unwrap() = Some(Recorded {
            pids,
            proxy_port,
            logs,
            dir: cluster.dir().to_path_buf(),
        });
        panic!("deliberate panic with a running cluster");
    });
    assert!(outcome.is_err());
    let recorded = recorded
        .into_inner()
        .unwrap()
        .expect("cluster started before the panic");
    wait_until("postmasters to exit", Duration::from_secs(10), || {
        Ok(recorded.pids.iter().all(|pid| !process_alive(*pid)))
    });
    assert!(
        TcpStream::connect(("127.0.0.1", recorded.proxy_port)).is_err(),
        "proxy port still open"
    );
    for log in &recorded.logs {
        assert!(log.exists(), "kept log {} missing", log.display());
    }
    std::fs::remove_dir_all(&recorded.dir).expect("remove the kept cluster directory");
}

#[test]
fn kill9_then_start_recovers_committed_data() {
    let cluster = cluster("kill9", 1);
    let node = cluster.node(0);
    node.sql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000);",
    );
    node.kill9();
    assert_eq!(node.postmaster_pid(), None);
    assert!(
        Conn::connect(&node.conninfo("postgres")).is_err(),
        "server must be down after kill9"
    );
    node.start();
    assert_eq!(
        node.query_one("postgres", "SELECT count(*) FROM t"),
        Some("1000".to_string())
    );
    let log = std::fs::read_to_string(node.log_path()).expect("read server log");
    assert!(
        log.contains("automatic recovery in progress"),
        "no crash recovery in log:\n{log}"
    );
}

#[test]
fn restart_keeps_port_and_tables_compare() {
    let cluster = cluster("restart", 2);
    for node in cluster.nodes() {
        node.createdb("app db");
        node.sql("app db", "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'a'), (2, NULL);");
    }
    let port = cluster.node(1).port();
    cluster.node(1).restart();
    assert_eq!(cluster.node(1).port(), port);
    cluster.assert_tables_equal("app db", "items", "id", &[0, 1]);
    cluster
        .node(1)
        .sql("app db", "UPDATE items SET v = 'b' WHERE id = 2");
    let compare = || cluster.assert_tables_equal("app db", "items", "id", &[0, 1]);
    let mismatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(compare));
    let message = *mismatch
        .expect_err("tables differ")
        .downcast::<String>()
        .expect("string panic");
    assert!(
        message.contains("first difference at row 1: node0: (2,) | node1: (2,b)"),
        "{message}"
    );
}
