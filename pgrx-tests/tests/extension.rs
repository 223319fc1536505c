//! Foundation: the extension loads only when preloaded, and a worker runs in
//! every database that has the extension, and only there.

mod common;

use std::time::Duration;

use common::DB;
use rbucardo_cluster_tests::{wait_until, Cluster, Conn, Node};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Pids of rbucardo processes of `backend_type` connected to `datname`
/// (`None`: the launcher, which has no database).
fn processes(node: &Node, backend_type: &str, datname: Option<&str>) -> Result<Vec<String>, String> {
    let mut conn = Conn::connect(&node.conninfo("postgres"))?;
    let filter = match datname {
        Some(db) => format!("datname = {}", common::lit(db)),
        None => "datname IS NULL".to_string(),
    };
    let rows = conn.query(&format!(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = {} AND {filter} ORDER BY pid",
        common::lit(backend_type)
    ))?;
    Ok(rows.into_iter().filter_map(|r| r[0].clone()).collect())
}

fn wait_workers(node: &Node, db: &str, want: usize) -> Vec<String> {
    let mut pids = Vec::new();
    wait_until(
        &format!("{}: {want} rbucardo worker(s) in database {db}", node.name()),
        TIMEOUT,
        || {
            pids = processes(node, "rbucardo worker", Some(db))?;
            if pids.len() == want {
                Ok(true)
            } else {
                Err(format!("workers in {db}: {pids:?}"))
            }
        },
    );
    pids
}

#[test]
fn worker_starts_in_every_database_with_the_extension() {
    let cluster = Cluster::start_named("ext_workers", &common::NODE_NAMES);
    for node in cluster.nodes() {
        node.createdb(DB);
        node.sql(DB, "CREATE EXTENSION rbucardo");
    }
    for node in cluster.nodes() {
        wait_until(&format!("{}: the rbucardo launcher", node.name()), TIMEOUT, || {
            Ok(processes(node, "rbucardo launcher", None)?.len() == 1)
        });
        wait_workers(node, DB, 1);
        // A database without the extension keeps no worker.
        wait_workers(node, "postgres", 0);
    }
}

#[test]
fn drop_extension_stops_the_worker_and_create_brings_it_back() {
    let cluster = Cluster::start_named("ext_drop", &["main"]);
    let node = cluster.node(0);
    node.createdb(DB);
    node.sql(DB, "CREATE EXTENSION rbucardo");
    let first = wait_workers(node, DB, 1);
    node.sql(DB, "DROP EXTENSION rbucardo");
    wait_workers(node, DB, 0);
    node.sql(DB, "CREATE EXTENSION rbucardo");
    let second = wait_workers(node, DB, 1);
    assert_ne!(first, second, "a new worker process must have started");
}

#[test]
fn create_extension_refused_without_shared_preload_libraries() {
    let cluster = Cluster::builder("ext_nopreload")
        .node_names(&["main"])
        .preload(false)
        .start();
    let node = cluster.node(0);
    node.createdb(DB);
    let error = node
        .connect(DB)
        .execute("CREATE EXTENSION rbucardo")
        .expect_err("CREATE EXTENSION must fail when rbucardo is not preloaded");
    assert!(
        error.contains("shared_preload_libraries"),
        "error does not mention shared_preload_libraries: {error}"
    );
    let installed = node.query_one(
        DB,
        "SELECT count(*) FROM pg_extension WHERE extname = 'rbucardo'",
    );
    assert_eq!(installed.as_deref(), Some("0"));
    let launchers = processes(node, "rbucardo launcher", None).unwrap();
    assert!(launchers.is_empty(), "launcher without preload: {launchers:?}");
}
