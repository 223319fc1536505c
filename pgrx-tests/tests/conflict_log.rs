//! The conflict log holds what a person should look at: versions that lost. Clean merges (delta
//! columns adding up, disjoint columns, identical arrivals) are counted in
//! `rbucardo.conflict_stats`, logged only where an auditor asks for it, and the log and resolved
//! exceptions are pruned after the retention period, never an open exception.

mod common;

use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster};

const T: Duration = Duration::from_secs(60);

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// Three stores sell the same products while cut off: every sale merges cleanly (a delta
/// column), so nothing reaches the conflict log and every merge is counted. A price changed on
/// two nodes is logged. With logging of clean outcomes on, merges are logged too.
#[test]
fn clean_merges_are_counted_and_lost_versions_logged() {
    let cluster = start_store("conflict_log_merges", Topology::Star);
    for i in ALL {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')");
    }
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) SELECT g, 'p' || g, 1.00, 1000 FROM generate_series(1, 5) g");
    for i in ALL {
        wait_until("products everywhere", T, || Ok(one(&cluster, i, "SELECT count(*) FROM products") == "5"));
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    let mut sold = 0;
    for i in ALL {
        for round in 0..4 {
            for id in 1..=5 {
                cluster.node(i).sql(DB, &format!("UPDATE products SET stock = stock - {} WHERE id = {id}", 1 + (round + i) % 3));
                sold += 1 + (round + i) % 3;
            }
        }
    }
    // And one real conflict: the price of product 1, changed on main and then on branch1.
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 2.00 WHERE id = 1");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 3.00 WHERE id = 1");
    cluster.link(BRANCH1, MAIN).restore();
    cluster.link(BRANCH2, MAIN).restore();
    let want = format!("{}", 5 * 1000 - sold);
    for i in ALL {
        wait_until("every sale everywhere", T, || {
            let total = one(&cluster, i, "SELECT sum(stock) FROM products");
            if total == want { Ok(true) } else { Err(format!("{}: {total}, want {want}\n{}", NODE_NAMES[i], diagnostics(&cluster))) }
        });
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    for i in ALL {
        // Only the price conflict is in the log: main's version lost on main and on branch2
        // (which met main's price before branch1's), branch1 met main's version and kept its own.
        let logged = one(&cluster, i, "SELECT string_agg(kind || ' ' || winner || ' ' || (key->>'id'), ', ') FROM rbucardo.conflicts");
        let want = if i == BRANCH1 { "update_differs local 1" } else { "update_differs remote 1" };
        assert_eq!(logged, want, "{}: conflict log", NODE_NAMES[i]);
    }
    // The merges are counted: main met the sales of both branches on rows it had changed.
    let merges: i64 = one(&cluster, MAIN, "SELECT coalesce(sum(conflicts), 0) FROM rbucardo.conflict_stats WHERE outcome = 'column_merge' AND NOT logged").parse().unwrap();
    assert!(merges >= 5, "main counted {merges} clean merges");
    let lost = one(&cluster, MAIN, "SELECT sum(conflicts) FROM rbucardo.conflict_stats WHERE logged");
    assert_eq!(lost, "1", "one logged conflict counted on main");

    // An auditor logs clean merges of products too.
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_conflict_logging('products', true)");
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "UPDATE products SET stock = stock - 1 WHERE id = 2");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET stock = stock - 1 WHERE id = 2");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("the audited merge logged on main", T, || {
        Ok(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.conflicts WHERE rule = 'merge' AND winner = 'merged' AND key->>'id' = '2'") == "1")
    });
}

/// Entries older than the retention (90 days by default) are pruned by the worker: conflicts
/// and resolved exceptions, never an open exception.
#[test]
fn old_conflicts_and_resolved_exceptions_are_pruned_open_ones_kept() {
    let cluster = start_store("conflict_log_retention", Topology::Star);
    let main = cluster.node(MAIN);
    main.sql(
        DB,
        "INSERT INTO rbucardo.conflicts (at, tbl, key, kind, remote_origin, remote_hlc, rule, winner)
         VALUES (now() - interval '100 days', 'public.products', '{\"id\": \"1\"}', 'update_differs', 2, 1, 'latest', 'local'),
                (now() - interval '10 days', 'public.products', '{\"id\": \"2\"}', 'update_differs', 2, 1, 'latest', 'local');
         INSERT INTO rbucardo.exceptions (origin, origin_tick, origin_seq, via, hlc, chunks, reason, resolved_at, resolution)
         VALUES (2, 0, 1, 2, 0, '\\x00', 'old and resolved', now() - interval '100 days', 'discarded'),
                (2, 0, 2, 2, 0, '\\x00', 'old and open', NULL, NULL);
         UPDATE rbucardo.exceptions SET at = now() - interval '100 days' WHERE reason LIKE 'old%';",
    );
    wait_until("the old conflict and the resolved exception pruned", T, || {
        // (The open one's reason changes as the worker retries it; its id stays.)
        let left = one(&cluster, MAIN, "SELECT (SELECT count(*) FROM rbucardo.conflicts) || ' ' || (SELECT string_agg(coalesce(resolution, 'open'), ',') FROM rbucardo.exceptions)");
        if left == "1 open" { Ok(true) } else { Err(left) }
    });
    assert_eq!(one(&cluster, MAIN, "SELECT key->>'id' FROM rbucardo.conflicts"), "2", "the recent conflict stays");
}
