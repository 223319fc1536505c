//! One view of the chain from main (rbucardo.cluster): every node reports its state over the
//! links it already has, and a report travels on, so main sees every node and a branch sees
//! the other branch through main.

mod common;

use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster};

const T: Duration = Duration::from_secs(60);

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

fn wait_for(cluster: &Cluster, i: usize, what: &str, sql: &str, want: &str) {
    wait_until(what, T, || {
        let got = one(cluster, i, sql);
        if got == want { Ok(true) } else { Err(format!("{}: {sql} gives {got:?}, want {want:?}", NODE_NAMES[i])) }
    });
}

#[test]
fn main_sees_every_node_and_which_need_an_operator() {
    let cluster = start_store("cluster_view", Topology::Star);
    let rows = "SELECT string_agg(node || ' ' || hops || ' ' || coalesce(via, '-') || ' ' || (version = (SELECT extversion FROM pg_extension WHERE extname = 'rbucardo')), ', ' ORDER BY node) FROM rbucardo.cluster";
    wait_for(&cluster, MAIN, "every node in main's view", rows, "branch1 1 branch1 true, branch2 1 branch2 true, main 0 - true");
    // branch2 only talks to main: main passes its report on.
    wait_for(&cluster, BRANCH1, "branch2 two hops from branch1", rows, "branch1 0 - true, branch2 2 main true, main 1 main true");
    wait_for(&cluster, MAIN, "nobody needs an operator", "SELECT count(*) FROM rbucardo.cluster WHERE attention IS NOT NULL", "0");

    // branch1 gets a constraint of its own that main's next product breaks: it parks there.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; ALTER TABLE products ADD CONSTRAINT cheap CHECK (price < 1000)");
    // branch2 is cut off; three changes wait for it on main.
    cluster.link(BRANCH2, MAIN).cut();
    let heard = one(&cluster, MAIN, "SELECT last_contact FROM rbucardo.cluster WHERE node = 'branch2'");
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (71, 'gold', 5000, 1)");
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (72, 'tin', 5, 1)");
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (73, 'iron', 6, 1)");
    wait_for(&cluster, MAIN, "branch1's parked transaction in main's view", "SELECT exceptions || ' ' || attention FROM rbucardo.cluster WHERE node = 'branch1'", "1 1 open exceptions");
    wait_for(&cluster, MAIN, "the changes waiting for branch2", "SELECT waiting_in FROM rbucardo.cluster WHERE node = 'branch2'", "3");
    // The one query an operator of many stores runs.
    assert_eq!(one(&cluster, MAIN, "SELECT string_agg(node, ',' ORDER BY node) FROM rbucardo.cluster WHERE attention IS NOT NULL"), "branch1");
    // Nothing new from branch2 while it is cut off; the others' reports go on.
    assert_eq!(one(&cluster, MAIN, "SELECT last_contact FROM rbucardo.cluster WHERE node = 'branch2'"), heard);
    wait_for(&cluster, MAIN, "branch2 silent for a while", "SELECT (silent_for > interval '6 seconds')::text FROM rbucardo.cluster WHERE node = 'branch2'", "true");
    assert_eq!(one(&cluster, MAIN, "SELECT (silent_for < interval '6 seconds')::text FROM rbucardo.cluster WHERE node = 'branch1'"), "true");
    assert_eq!(one(&cluster, MAIN, "SELECT (log_rows >= 3 AND log_bytes > 0)::text FROM rbucardo.cluster WHERE node = 'main'"), "true");
    assert_eq!(one(&cluster, MAIN, "SELECT (lag > interval '0')::text FROM rbucardo.cluster WHERE node = 'branch2'"), "true");

    // Healed: branch2 catches up, branch1's exception is discarded; nobody needs an operator.
    cluster.link(BRANCH2, MAIN).restore();
    cluster.node(BRANCH1).sql(DB, "SELECT rbucardo.exception_discard(min(id)) FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    wait_for(&cluster, MAIN, "nobody needs an operator again", "SELECT coalesce(string_agg(node || ': ' || attention, '; '), '') FROM rbucardo.cluster WHERE attention IS NOT NULL", "");
    wait_for(&cluster, MAIN, "nothing waits for branch2", "SELECT waiting_in FROM rbucardo.cluster WHERE node = 'branch2'", "0");

    // A peer may not speak for another direct peer of main, by name or by node id, nor send a
    // report from the future; a malformed report is kept cleaned, never breaking the view.
    for forged in [
        r#"{"node_id": 3, "name": "branch2", "at": "2999-01-01T00:00:00Z", "exceptions": 99, "peers": []}"#,
        r#"{"node_id": 3, "name": "branch1", "at": "NOW", "exceptions": 99, "peers": []}"#,
        r#"{"node_id": 3, "name": "store9", "at": "NOW", "exceptions": 99, "peers": []}"#,
        r#"{"node_id": 9, "name": "store9", "at": "infinity", "exceptions": 99, "peers": []}"#,
    ] {
        let forged = forged.replace("NOW", &one(&cluster, MAIN, "SELECT now()::text"));
        cluster.node(MAIN).sql(DB, &format!("SELECT rbucardo.store_reports('branch1', '[{{\"hops\": 0, \"report\": {forged}}}]')"));
        assert_eq!(one(&cluster, MAIN, "SELECT string_agg(node || ' ' || exceptions, ', ' ORDER BY node) FROM rbucardo.cluster WHERE exceptions > 0 OR node = 'store9'"), "", "{forged}");
    }
    let odd = r#"{"node_id": 9, "name": "store9", "at": "NOW", "exceptions": "x", "log_oldest": "infinity", "peers": {"a": 1}, "version": 7}"#
        .replace("NOW", &one(&cluster, MAIN, "SELECT now()::text"));
    cluster.node(MAIN).sql(DB, &format!("SELECT rbucardo.store_reports('branch1', '[{{\"hops\": 1, \"report\": {odd}}}]')"));
    assert_eq!(
        one(&cluster, MAIN, "SELECT node || ' ' || hops || ' ' || via || ' ' || coalesce(exceptions::text, '-') || ' ' || coalesce(log_oldest_age::text, '-') FROM rbucardo.cluster WHERE node = 'store9'"),
        "store9 2 branch1 - -"
    );
}
