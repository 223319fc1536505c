//! Compare and repair: differences planted on two peers (changes made with capture off, so
//! they never travel) are found by rbucardo.diff, also while writes run elsewhere in the
//! same tables; repair's dry run changes nothing, the real repair travels through the stream
//! to the one peer it is addressed to, and the next diff is empty.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster};

const T: Duration = Duration::from_secs(120);

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

fn rows(cluster: &Cluster, i: usize, sql: &str) -> Vec<String> {
    cluster.node(i).query(DB, sql).into_iter().map(|r| r.into_iter().map(|v| v.unwrap_or_else(|| "NULL".into())).collect::<Vec<_>>().join(" ")).collect()
}

/// A change on node `i` that is not captured: a divergence no stream will fix.
fn plant(cluster: &Cluster, i: usize, sql: &str) {
    cluster.node(i).sql(DB, &format!("BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"));
}

#[test]
fn differences_planted_on_two_peers_are_found_and_repaired_through_the_stream() {
    let cluster = start_store("diff_repair", Topology::Mesh);
    cluster.node(MAIN).sql(
        DB,
        "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta');
         INSERT INTO products (id, name, price, stock, created, tags) SELECT g, 'p' || g, g, 100, '2026-01-01 10:00+02', '{x}' FROM generate_series(1, 20000) g;
         INSERT INTO users VALUES (1, 'ana', 'Ana'), (2, 'bo', 'Bo');
         INSERT INTO product_tag_rel SELECT g, g * 10 FROM generate_series(1, 5) g;",
    );
    for i in [BRANCH1, BRANCH2] {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')");
        wait_until("the products on the branches", T, || {
            let n = one(&cluster, i, "SELECT count(*) FROM products");
            if n == "20000" { Ok(true) } else { Err(n) }
        });
    }
    assert!(rows(&cluster, MAIN, "SELECT * FROM rbucardo.diff('store_sync')").is_empty(), "equal tables differ");

    // branch1: a changed price, a lost row; branch2: an extra row, a stock count off, a user renamed.
    plant(&cluster, BRANCH1, "UPDATE products SET price = 999 WHERE id = 7");
    plant(&cluster, BRANCH1, "DELETE FROM products WHERE id = 12345");
    plant(&cluster, BRANCH2, "INSERT INTO products (id, name, stock) VALUES (30001, 'ghost', 1)");
    plant(&cluster, BRANCH2, "UPDATE products SET stock = 97 WHERE id = 5");
    plant(&cluster, BRANCH2, "UPDATE users SET name = 'Bob' WHERE id = 2");
    plant(&cluster, BRANCH1, "DELETE FROM product_tag_rel WHERE product_id = 3 AND tag_id = 30");

    // Sales go on everywhere while main compares: none of them is a difference.
    let stop = AtomicBool::new(false);
    let sold = AtomicI64::new(0);
    let found = std::thread::scope(|scope| {
        for k in ALL {
            let (cluster, stop, sold) = (&cluster, &stop, &sold);
            scope.spawn(move || {
                let mut conn = cluster.node(k).connect(DB);
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    let id = 100 + (i * 3 + k as i64) % 50;
                    conn.execute(&format!("UPDATE products SET stock = stock - 1 WHERE id = {id}")).unwrap();
                    conn.execute(&format!("INSERT INTO pos_order (id, node, total) VALUES ({}, 'n', 1)", base(k) + i)).unwrap();
                    sold.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10)); // pace, not synchronisation
                }
            });
        }
        let found = rows(&cluster, MAIN, "SELECT peer, table_name, key::text, here->>'price', there->>'price', here->>'stock', there->>'stock', there->>'name' FROM rbucardo.diff('store_sync') ORDER BY 1, 2, 3");
        stop.store(true, Ordering::SeqCst);
        found
    });
    assert!(sold.load(Ordering::SeqCst) > 0);
    assert_eq!(
        found,
        vec![
            "branch1 public.product_tag_rel [\"3\", \"30\"] NULL NULL NULL NULL NULL",
            "branch1 public.products [\"12345\"] 12345.00 NULL 100 NULL NULL",
            "branch1 public.products [\"7\"] 7.00 999.00 100 100 p7",
            "branch2 public.products [\"30001\"] NULL NULL NULL 1 ghost",
            "branch2 public.products [\"5\"] 5.00 5.00 100 97 p5",
            "branch2 public.users [\"2\"] NULL NULL NULL NULL Bob",
        ]
    );
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.diff_result"), "6");

    // The dry run says what it would do and changes nothing.
    let plan = rows(&cluster, MAIN, "SELECT table_name, key::text, action FROM rbucardo.repair('store_sync', 'branch2') ORDER BY 1, 2");
    assert_eq!(plan, vec!["public.products [\"30001\"] delete", "public.products [\"5\"] update", "public.users [\"2\"] update"]);
    assert_eq!(one(&cluster, BRANCH2, "SELECT stock FROM products WHERE id = 5"), "97");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.diff_result"), "6");

    // The real repairs: each travels to its peer alone. branch2's stock comes back to 100
    // exactly (a delta column: the change's old image is branch2's row), and branch1 is not
    // touched by branch2's repair (it would count the stock difference again).
    let log_before = one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.change_log WHERE only_for IS NOT NULL");
    assert_eq!(log_before, "0");
    rows(&cluster, MAIN, "SELECT * FROM rbucardo.repair('store_sync', 'branch2', dry_run => false)");
    rows(&cluster, MAIN, "SELECT * FROM rbucardo.repair('store_sync', 'branch1', 'products', keys => '[[\"7\"], [\"12345\"]]', dry_run => false)");
    for (i, sql, want) in [
        (BRANCH2, "SELECT stock FROM products WHERE id = 5", "100"),
        (BRANCH2, "SELECT count(*) FROM products WHERE id = 30001", "0"),
        (BRANCH2, "SELECT name FROM users WHERE id = 2", "Bo"),
        (BRANCH1, "SELECT price FROM products WHERE id = 7", "7.00"),
        (BRANCH1, "SELECT count(*) FROM products WHERE id = 12345", "1"),
    ] {
        wait_until("the repair on the peer", T, || {
            let got = one(&cluster, i, sql);
            if got == want { Ok(true) } else { Err(format!("{sql}: {got}")) }
        });
    }
    // A second repair to branch1 waits until the first has reached it (its old images are
    // branch1's rows before it); then a key of two columns, written with numbers.
    let refused = cluster.node(MAIN).connect(DB).execute("SELECT * FROM rbucardo.repair('store_sync', 'branch1', 'product_tag_rel', keys => '[[3,30]]', dry_run => false)");
    if let Err(e) = &refused {
        assert!(e.contains("an earlier repair has not reached branch1 yet"), "{e}");
    }
    assert!(cluster.node(MAIN).query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync')").as_deref() == Some("t"));
    if refused.is_err() {
        let by_key = rows(&cluster, MAIN, "SELECT action FROM rbucardo.repair('store_sync', 'branch1', 'product_tag_rel', keys => '[[3,30]]', dry_run => false)");
        assert_eq!(by_key, vec!["insert"]);
    }
    wait_until("the composite-key repair on branch1", T, || {
        let got = one(&cluster, BRANCH1, "SELECT count(*) FROM product_tag_rel WHERE product_id = 3");
        if got == "1" { Ok(true) } else { Err(got) }
    });
    assert!(cluster.node(MAIN).query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync')").as_deref() == Some("t"));
    assert_eq!(one(&cluster, BRANCH1, "SELECT stock FROM products WHERE id = 5"), "100", "branch2's repair reached branch1");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.change_log WHERE only_for IS NOT NULL AND only_for <> 2 AND only_for <> 3"), "0");
    // Nothing differs any more, from any node's point of view.
    assert!(rows(&cluster, MAIN, "SELECT * FROM rbucardo.diff('store_sync')").is_empty());
    assert!(rows(&cluster, BRANCH1, "SELECT * FROM rbucardo.diff('store_sync')").is_empty());
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.diff_result"), "0");
    for (t, order) in TABLES {
        cluster.assert_tables_equal(DB, t, order, &ALL);
    }
}
