//! Conflicts: an incoming change that finds the local row other than its sender saw it is
//! resolved by the sync's strategy and logged with both versions (issue "conflicts", first
//! part: detection, the conflict log, source/target/skip/abort and conflict_reapply).

mod common;

use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::wait_until;

fn one(cluster: &rbucardo_cluster_tests::Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// Main and branch1 change the same product while apart; each node resolves the incoming
/// change by its sync's strategy and keeps the other version in its conflict log.
#[test]
fn update_update_conflict_is_logged_with_both_versions() {
    let cluster = start_store("conflict_update", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (42, 'tea', 10.00, 100)");
    wait_until("product on branch1", Duration::from_secs(30), || Ok(one(&cluster, BRANCH1, "SELECT count(*) FROM products WHERE id = 42") == "1"));
    // main keeps its own version (target), branch1 takes the incoming one (source).
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_conflict_strategy(name, 'target') FROM rbucardo.sync");
    cluster.node(BRANCH1).sql(DB, "SELECT rbucardo.set_conflict_strategy(name, 'source') FROM rbucardo.sync");

    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 12.00 WHERE id = 42");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 11.00 WHERE id = 42");
    cluster.link(BRANCH1, MAIN).restore();

    for i in [MAIN, BRANCH1] {
        wait_until("conflict logged", Duration::from_secs(60), || Ok(one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts") == "1"));
    }
    // On main (target): the local 12.00 stays, branch1's 11.00 is the logged loser.
    let main_log = one(&cluster, MAIN, "SELECT concat_ws('|', kind, tbl, key->>'id', local_version->>'price', remote_version->>'price', rule, winner, remote_origin) FROM rbucardo.conflicts");
    assert_eq!(main_log, "update_differs|public.products|42|12.00|11.00|target|local|2");
    assert_eq!(one(&cluster, MAIN, "SELECT price FROM products WHERE id = 42"), "12.00");
    // On branch1 (source): main's 12.00 wins, the local 11.00 is logged.
    let b1_log = one(&cluster, BRANCH1, "SELECT concat_ws('|', kind, local_version->>'price', remote_version->>'price', rule, winner, remote_origin) FROM rbucardo.conflicts");
    assert_eq!(b1_log, "update_differs|11.00|12.00|source|remote|1");
    wait_until("branch1 took main's price", Duration::from_secs(30), || Ok(one(&cluster, BRANCH1, "SELECT price FROM products WHERE id = 42") == "12.00"));

    // The loser on branch1 (its own 11.00) can be written back: it replicates as a new change.
    let id = one(&cluster, BRANCH1, "SELECT id FROM rbucardo.conflicts");
    cluster.node(BRANCH1).sql(DB, &format!("SELECT rbucardo.conflict_reapply({id})"));
    assert_eq!(one(&cluster, BRANCH1, "SELECT reapplied_at IS NOT NULL FROM rbucardo.conflicts"), "t");
    for i in ALL {
        wait_until("reapplied price everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT price FROM products WHERE id = 42") == "11.00"));
    }
}

/// An insert whose key exists with other values, and a delete of a row already gone, under
/// `source`: the incoming insert overwrites (the local row is logged); the delete is logged.
#[test]
fn insert_exists_is_logged_and_delete_missing_counted() {
    let cluster = start_store("conflict_insert", Topology::Star);
    for i in [MAIN, BRANCH1] {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_conflict_strategy(name, 'source') FROM rbucardo.sync");
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (7, 'from main', 1.00, 1)");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (7, 'from branch1', 2.00, 2)");
    cluster.link(BRANCH1, MAIN).restore();
    for i in [MAIN, BRANCH1] {
        wait_until("insert conflict logged", Duration::from_secs(60), || {
            Ok(one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts WHERE kind = 'insert_exists'") == "1")
        });
    }
    assert_eq!(
        one(&cluster, MAIN, "SELECT concat_ws('|', local_version->>'name', remote_version->>'name', winner) FROM rbucardo.conflicts"),
        "from main|from branch1|remote"
    );

    // Both delete the row while apart: each side finds it gone when the other's delete arrives.
    // Nothing is lost, so it is counted, not logged.
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "DELETE FROM products WHERE id = 7");
    cluster.node(BRANCH1).sql(DB, "DELETE FROM products WHERE id = 7");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("delete conflict counted on main", Duration::from_secs(60), || {
        Ok(one(&cluster, MAIN, "SELECT conflicts FROM rbucardo.conflict_stats WHERE kind = 'delete_missing' AND outcome = 'both_deleted' AND NOT logged") == "1")
    });
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.conflicts WHERE kind = 'delete_missing'"), "0");
}

/// `abort` stops the stream from that peer with a clear error and applies nothing of the
/// batch; changing the strategy lets it resume.
#[test]
fn abort_stops_the_stream_until_the_operator_acts() {
    let cluster = start_store("conflict_abort", Topology::Star);
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_conflict_strategy(name, 'abort') FROM rbucardo.sync");
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (9, 'main', 1.00, 1)");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (9, 'branch1', 2.00, 2)");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (10, 'branch1 later', 3.00, 3)");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("branch1 reports the refusal", Duration::from_secs(60), || {
        Ok(one(&cluster, BRANCH1, "SELECT coalesce(last_error, '') FROM rbucardo.peer_state WHERE db = 'main'").contains("strategy is abort"))
    });
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM products WHERE id = 10"), "0", "nothing of the refused batch may be applied");
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_conflict_strategy(name, 'target') FROM rbucardo.sync");
    wait_until("stream resumed", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM products WHERE id = 10") == "1"));
    assert_eq!(one(&cluster, MAIN, "SELECT name FROM products WHERE id = 9"), "main");
}

/// The same price changed on all three nodes while apart: under `latest` the change made last
/// wins on every node, whatever order the changes meet in, and each node keeps the versions it
/// discarded in its conflict log.
#[test]
fn latest_change_wins_everywhere() {
    let cluster = start_store("conflict_latest", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (5, 'coffee', 10.00, 100)");
    for i in ALL {
        wait_until("product everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id = 5") == "1"));
        assert_eq!(one(&cluster, i, "SELECT conflict_strategy FROM rbucardo.syncs LIMIT 1"), "latest");
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    // In this order: the branch1 change is the latest.
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 12.00 WHERE id = 5");
    cluster.node(BRANCH2).sql(DB, "UPDATE products SET price = 13.00 WHERE id = 5");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 11.00 WHERE id = 5");
    cluster.link(BRANCH2, MAIN).restore();
    cluster.link(BRANCH1, MAIN).restore();
    for i in ALL {
        wait_until("the latest price everywhere", Duration::from_secs(60), || {
            let prices: Vec<String> = ALL.iter().map(|&n| one(&cluster, n, "SELECT price || ' conflicts: ' || (SELECT coalesce(string_agg(kind || ' ' || coalesce(local_version->>'price', '-') || '/' || coalesce(remote_version->>'price', '-') || ' ' || winner, '; '), '') FROM rbucardo.conflicts) FROM products WHERE id = 5")).collect();
            if prices[i].starts_with("11.00 ") { Ok(true) } else { Err(format!("{prices:?}")) }
        });
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    // main met both branch changes as conflicts: it kept 13.00 over its own 12.00 (or the
    // reverse order), then took 11.00; both losers are logged.
    let main_losers = one(&cluster, MAIN, "SELECT string_agg(CASE winner WHEN 'remote' THEN local_version->>'price' ELSE remote_version->>'price' END, ',' ORDER BY 1) FROM rbucardo.conflicts");
    assert!(main_losers.contains("12.00"), "main lost its own 12.00 without a log entry: {main_losers}");
    // branch1's own change is the latest: every conflict there was won by the local version.
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FILTER (WHERE winner <> 'local') FROM rbucardo.conflicts"), "0");
    assert_ne!(one(&cluster, BRANCH1, "SELECT count(*) FROM rbucardo.conflicts"), "0");
}

/// Two branches change different columns of one row while apart: both changes survive
/// everywhere (column-level merge, on by default), and the merge is in the log.
#[test]
fn changes_to_different_columns_both_survive() {
    let cluster = start_store("conflict_merge", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (3, 'milk', 1.00, 10)");
    for i in ALL {
        wait_until("product everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id = 3") == "1"));
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 1.20 WHERE id = 3");
    cluster.node(BRANCH2).sql(DB, "UPDATE products SET name = 'whole milk' WHERE id = 3");
    cluster.link(BRANCH1, MAIN).restore();
    cluster.link(BRANCH2, MAIN).restore();
    for i in ALL {
        wait_until("both changes everywhere", Duration::from_secs(60), || {
            let row = one(&cluster, i, "SELECT name || '|' || price FROM products WHERE id = 3");
            if row == "whole milk|1.20" { Ok(true) } else { Err(row) }
        });
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    // A clean merge is counted, not logged.
    assert_ne!(one(&cluster, MAIN, "SELECT coalesce(sum(conflicts), 0) FROM rbucardo.conflict_stats WHERE outcome = 'column_merge'"), "0");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.conflicts"), "0");
}

/// Stock is sold on all three nodes while apart; with the column set to delta every node ends
/// at the original count minus every sale.
#[test]
fn delta_column_adds_up_sales_from_every_node() {
    let cluster = start_store("conflict_delta", Topology::Star);
    for i in ALL {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')");
    }
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (8, 'bread', 2.00, 100)");
    for i in ALL {
        wait_until("product everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id = 8") == "1"));
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    for (i, sold) in [(MAIN, 3), (BRANCH1, 1), (BRANCH2, 2)] {
        for _ in 0..sold {
            cluster.node(i).sql(DB, "UPDATE products SET stock = stock - 1 WHERE id = 8");
        }
    }
    cluster.link(BRANCH1, MAIN).restore();
    cluster.link(BRANCH2, MAIN).restore();
    for i in ALL {
        wait_until("stock down by every sale", Duration::from_secs(60), || {
            let stock = one(&cluster, i, "SELECT stock FROM products WHERE id = 8");
            if stock == "94" { Ok(true) } else { Err(format!("{} has {stock}", NODE_NAMES[i])) }
        });
    }
}

/// A priority list decides by who made the change: main's version beats branch1's, whatever
/// the clocks say.
#[test]
fn node_priority_list_decides() {
    let cluster = start_store("conflict_priority", Topology::Star);
    for i in [MAIN, BRANCH1] {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_table_strategy('products', 'main,branch1')");
    }
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (4, 'salt', 1.00, 5)");
    wait_until("product on branch1", Duration::from_secs(30), || Ok(one(&cluster, BRANCH1, "SELECT count(*) FROM products WHERE id = 4") == "1"));
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 3.00 WHERE id = 4");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 4.00 WHERE id = 4"); // later, but lower priority
    cluster.link(BRANCH1, MAIN).restore();
    for i in [MAIN, BRANCH1] {
        wait_until("main's price", Duration::from_secs(60), || {
            let p = one(&cluster, i, "SELECT price FROM products WHERE id = 4");
            if p == "3.00" && one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts") == "1" { Ok(true) } else { Err(p) }
        });
    }
    assert_eq!(one(&cluster, BRANCH1, "SELECT winner || ' ' || rule FROM rbucardo.conflicts"), "remote main,branch1");
    let bad = cluster.node(MAIN).connect(DB).execute("SELECT rbucardo.set_table_strategy('products', 'main,nowhere')");
    assert!(bad.unwrap_err().contains("unknown conflict strategy"));
}

/// Appliers keep what they resolved about a table from batch to batch (src/apply/mod.rs,
/// `session`): a strategy set after they have applied rows of the table must still decide the
/// next conflict. branch1's worker resolved products (the insert it pulled) under the default
/// strategy, under which branch1's later price would win.
#[test]
fn a_strategy_set_while_the_table_is_replicating_decides_the_next_conflict() {
    let cluster = start_store("conflict_strategy_change", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (5, 'pepper', 1.00, 5)");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (6, 'cumin', 1.50, 5)");
    for i in [MAIN, BRANCH1] {
        wait_until("rows both ways", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id IN (5, 6)") == "2"));
    }
    for i in [MAIN, BRANCH1] {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_table_strategy('products', 'main,branch1')");
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 3.00 WHERE id = 5");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 4.00 WHERE id = 5"); // later, but lower priority
    cluster.link(BRANCH1, MAIN).restore();
    for i in [MAIN, BRANCH1] {
        wait_until("main's price by priority", Duration::from_secs(60), || {
            let p = one(&cluster, i, "SELECT price FROM products WHERE id = 5");
            if p == "3.00" && one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts WHERE rule = 'main,branch1'") == "1" { Ok(true) } else { Err(p) }
        });
    }
}

/// Two users with the same login created on two branches while apart (login is unique but not
/// the key): the second to reach main is parked, not lost and not blocking later changes; an
/// operator clears the blocker and retries it.
#[test]
fn unique_violation_is_parked_and_retried() {
    let cluster = start_store("conflict_parked", Topology::Star);
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000001, 'ana', 'Ana of branch1')");
    cluster.node(BRANCH2).sql(DB, "INSERT INTO users (id, login, name) VALUES (3000001, 'ana', 'Ana of branch2')");
    cluster.node(BRANCH2).sql(DB, "INSERT INTO users (id, login, name) VALUES (3000002, 'bob', 'Bob of branch2')");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("branch1's ana on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE id = 2000001") == "1"));
    cluster.link(BRANCH2, MAIN).restore();
    // branch2's ana is parked on main; its later transaction (bob) still arrives.
    wait_until("bob on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE id = 3000002") == "1"));
    let parked = one(&cluster, MAIN, "SELECT id || '|' || reason FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    assert!(parked.contains("duplicate key"), "expected a parked unique violation on main, got {parked:?}");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE id = 3000001"), "0");
    assert_eq!(one(&cluster, BRANCH2, "SELECT count(*) FROM users WHERE id = 3000001"), "1", "the parked user is still on its branch");
    // Automatic retries keep failing while the blocker is there; the record says so.
    wait_until("a retry recorded", Duration::from_secs(30), || Ok(one(&cluster, MAIN, "SELECT max(retries) FROM rbucardo.exceptions") != "0"));
    // The operator renames the first ana and retries: branch2's ana applies and replicates on.
    cluster.node(MAIN).sql(DB, "UPDATE users SET login = 'ana.b1' WHERE id = 2000001");
    let id = parked.split('|').next().unwrap().to_string();
    // The worker's own retry may get there first (it retries every few seconds); then the
    // exception is no longer open.
    match cluster.node(MAIN).connect(DB).query_one(&format!("SELECT rbucardo.exception_retry({id})")) {
        Ok(answer) => assert_eq!(answer.as_deref(), Some("t")),
        Err(e) => assert!(e.contains(&format!("no open exception {id}")), "{e}"),
    }
    assert_eq!(one(&cluster, MAIN, &format!("SELECT resolution FROM rbucardo.exceptions WHERE id = {id}")), "applied");
    for i in [MAIN, BRANCH1] {
        wait_until("branch2's ana everywhere", Duration::from_secs(60), || {
            if one(&cluster, i, "SELECT count(*) FROM users WHERE id = 3000001") == "1" {
                return Ok(true);
            }
            Err(format!("{}: users {}, exceptions {}, peers {}", NODE_NAMES[i],
                one(&cluster, i, "SELECT string_agg(id || ' ' || login, ', ') FROM users"),
                one(&cluster, i, "SELECT string_agg(id || ' ' || coalesce(resolution, 'open') || ' ' || reason, '; ') FROM rbucardo.exceptions"),
                one(&cluster, i, "SELECT string_agg(db || ' ' || state || ' ' || coalesce(last_error, ''), '; ') FROM rbucardo.peer_state")))
        });
    }
    // Discarding keeps the record.
    cluster.node(MAIN).sql(DB, "INSERT INTO rbucardo.exceptions (origin, origin_tick, origin_seq, via, hlc, chunks, reason) VALUES (3, 0, 0, 3, 0, '\\x00', 'test')");
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.exception_discard(max(id)) FROM rbucardo.exceptions");
    assert_eq!(one(&cluster, MAIN, "SELECT resolution FROM rbucardo.exceptions ORDER BY id DESC LIMIT 1"), "discarded");
}

/// The same login made on all three nodes while apart, with the login index set to `rename`
/// (star, then mesh): nothing parks, every user stays, and every node renames the same two,
/// the later ones, to login~id, whichever order the rows reach it in. The order made in the
/// same transaction as a renamed user arrives too, and the collisions are in the conflict log.
#[test]
fn unique_collision_renames_the_later_row_on_every_node() {
    for topology in [Topology::Star, Topology::Mesh] {
        let cluster = start_store(&format!("conflict_rename_{topology:?}").to_lowercase(), topology);
        for i in ALL {
            let set = one(&cluster, i, "SELECT rbucardo.set_unique_strategy('users_login_key', 'rename')");
            assert_eq!(set, "a collision on users_login_key renames the later row's login");
        }
        let links: Vec<(usize, usize)> = ALL.iter().flat_map(|&a| ALL.iter().map(move |&b| (a, b))).filter(|(a, b)| a != b).collect();
        for &(a, b) in &links {
            cluster.link(a, b).cut();
        }
        // In this order, so each is later than the one before (one clock per node, all near
        // the same time; each insert commits before the next starts).
        cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login, name) VALUES (1000001, 'ana', 'Ana of main')");
        cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000001, 'ana', 'Ana of branch1')");
        cluster.node(BRANCH2).sql(DB, "BEGIN; INSERT INTO users (id, login, name) VALUES (3000001, 'ana', 'Ana of branch2');
                                       INSERT INTO pos_order (id, node, ref, total) VALUES (3000001, 'branch2', 3000001, 5); COMMIT;");
        for &(a, b) in &links {
            cluster.link(a, b).restore();
        }
        let want = "1000001 ana, 2000001 ana~2000001, 3000001 ana~3000001";
        for i in ALL {
            wait_until("every ana, the later two renamed", Duration::from_secs(60), || {
                let got = one(&cluster, i, "SELECT string_agg(id || ' ' || login, ', ' ORDER BY id) FROM users WHERE login LIKE 'ana%'");
                let order = one(&cluster, i, "SELECT count(*) FROM pos_order WHERE ref = 3000001");
                if got == want && order == "1" {
                    Ok(true)
                } else {
                    Err(format!("{}: {got}; order {order}; exceptions {}\n{}", NODE_NAMES[i], one(&cluster, i, "SELECT string_agg(reason, '; ') FROM rbucardo.exceptions"), diagnostics(&cluster)))
                }
            });
            assert_eq!(one(&cluster, i, "SELECT count(*) FROM rbucardo.exceptions"), "0", "{}: nothing parked", NODE_NAMES[i]);
        }
        cluster.assert_tables_equal(DB, "users", "id", &ALL);
        // Each node that met a collision logged it. In the star main met both branches' ana; in
        // the mesh a node may get a row already renamed by the node that relayed it first.
        let log_sql = "SELECT coalesce(string_agg(key->>'id' || ' ' || rule, ', ' ORDER BY key->>'id'), '') FROM rbucardo.conflicts WHERE kind = 'unique_collision'";
        let logs: Vec<String> = ALL.iter().map(|&i| one(&cluster, i, log_sql)).collect();
        let watched: Vec<usize> = if topology == Topology::Star { vec![MAIN] } else { ALL.to_vec() };
        for id in ["2000001", "3000001"] {
            let want = format!("{id} rename on public.users_login_key");
            assert!(watched.iter().any(|&i| logs[i].contains(&want)), "{topology:?}: no node logged {want}: {logs:?}");
        }
        // Nothing was lost, so there is nothing to reapply; 'park' puts the default back.
        let reapply = cluster.node(MAIN).connect(DB).execute("SELECT rbucardo.conflict_reapply(min(id)) FROM rbucardo.conflicts WHERE kind = 'unique_collision'");
        assert!(reapply.unwrap_err().contains("keeps both rows"));
        assert_eq!(one(&cluster, MAIN, "SELECT rbucardo.set_unique_strategy('users_login_key', 'park')"), "a collision on users_login_key parks the transaction");
    }
}

/// A user transaction on main holds a row while main applies a batch from branch1. An earlier
/// conflict in that batch made main read its row clocks already; the user transaction commits
/// after that, while the applier waits for the row. The user's price is the later one (it was
/// made after branch1's), so it must win on main as on branch1: main has to judge the row by
/// the clock of the version it finds once it holds the row, not by what it read before.
#[test]
fn a_local_change_that_commits_while_the_applier_waits_is_judged_by_its_own_clock() {
    let cluster = start_store("conflict_waited_row", Topology::Star);
    for (id, price) in [(61, "1.00"), (62, "2.00")] {
        cluster.node(MAIN).sql(DB, &format!("INSERT INTO products (id, name, price, stock) VALUES ({id}, 'p{id}', {price}, 10)"));
    }
    for i in ALL {
        wait_until("the products everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id IN (61, 62)") == "2"));
    }
    cluster.link(BRANCH1, MAIN).cut();
    // A price conflict on 61, which makes main read row clocks; then branch1's price for 62.
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 11.00 WHERE id = 61");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 12.00 WHERE id = 61");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 22.00 WHERE id = 62");
    // Later than branch1's: main's own price for 62, held open.
    let mut user = cluster.node(MAIN).connect(DB);
    user.execute("BEGIN; UPDATE products SET price = 33.00 WHERE id = 62").unwrap();
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("the applier waits for row 62", Duration::from_secs(60), || {
        let waiting = one(&cluster, MAIN, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%peer_push%'");
        if waiting == "1" { Ok(true) } else { Err(format!("{waiting} appliers waiting; 61 on main: {}", one(&cluster, MAIN, "SELECT price FROM products WHERE id = 61"))) }
    });
    user.execute("COMMIT").unwrap();
    for i in ALL {
        wait_until("main's later price for 62 everywhere", Duration::from_secs(60), || {
            let got = one(&cluster, i, "SELECT string_agg(id || ' ' || price, ', ' ORDER BY id) FROM products WHERE id IN (61, 62)");
            if got == "61 12.00, 62 33.00" { Ok(true) } else { Err(format!("{}: {got}", NODE_NAMES[i])) }
        });
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
}

/// branch1 makes a user `ana` and deletes it again while cut off; main made its own `ana`
/// meanwhile. Only main ever holds both rows (when branch1's insert arrives, before its
/// delete): main's row sorts last, so main renames it. The branches never see a collision, so
/// they rename nothing themselves: main's rename is main's own change, and reaches them as one.
/// Were it not captured, the branches would keep main's row as `ana` for good.
#[test]
fn a_rename_reaches_the_nodes_that_never_met_the_other_row() {
    let cluster = start_store("conflict_rename_gone", Topology::Star);
    for i in ALL {
        one(&cluster, i, "SELECT rbucardo.set_unique_strategy('users_login_key', 'rename')");
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (1000001, 'ana', 'Ana of branch1')");
    cluster.node(BRANCH1).sql(DB, "DELETE FROM users WHERE id = 1000001");
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000001, 'ana', 'Ana of main')");
    wait_until("main's ana on branch2", Duration::from_secs(60), || Ok(one(&cluster, BRANCH2, "SELECT count(*) FROM users WHERE id = 2000001") == "1"));
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("main met branch1's ana", Duration::from_secs(60), || {
        Ok(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.conflicts WHERE kind = 'unique_collision' AND key->>'id' = '2000001'") == "1")
    });
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000009, 'after', 'marker')");
    for i in ALL {
        wait_until("the marker and main's renamed ana everywhere", Duration::from_secs(60), || {
            let got = one(&cluster, i, "SELECT string_agg(id || ' ' || login, ', ' ORDER BY id) FROM users WHERE id IN (1000001, 2000001, 2000009)");
            if got == "2000001 ana~2000001, 2000009 after" { Ok(true) } else { Err(format!("{}: {got}", NODE_NAMES[i])) }
        });
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM rbucardo.exceptions"), "0", "{}: nothing parked", NODE_NAMES[i]);
    }
    cluster.assert_tables_equal(DB, "users", "id", &ALL);
}

/// main's user deletes main's `ana` (row 2000009) in a transaction that stays open while
/// branch1's `ana` (row 1000005) arrives; 2000009 sorts last, so it would give its login up. The
/// applier must settle against the row as it is once locked: the delete commits, nothing
/// collides, and no rename of the deleted row goes out to bring it back on the other nodes.
#[test]
fn a_rename_never_revives_a_row_deleted_while_the_applier_waited() {
    let cluster = start_store("conflict_rename_deleted", Topology::Star);
    for i in ALL {
        one(&cluster, i, "SELECT rbucardo.set_unique_strategy('users_login_key', 'rename')");
    }
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000009, 'ana', 'Ana of main')");
    wait_until("main's ana on branch2", Duration::from_secs(30), || Ok(one(&cluster, BRANCH2, "SELECT count(*) FROM users WHERE id = 2000009") == "1"));
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (1000005, 'ana', 'Ana of branch1')");
    let mut user = cluster.node(MAIN).connect(DB);
    user.execute("BEGIN; DELETE FROM users WHERE id = 2000009").unwrap();
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("the applier waits for main's ana", Duration::from_secs(60), || {
        let waiting = one(&cluster, MAIN, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND backend_type = 'client backend' AND pid <> pg_backend_pid()");
        if waiting == "1" { Ok(true) } else { Err(format!("{waiting} waiting")) }
    });
    user.execute("COMMIT").unwrap();
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (1000006, 'marker', 'after')");
    for i in ALL {
        wait_until("branch1's ana alone everywhere", Duration::from_secs(60), || {
            let got = one(&cluster, i, "SELECT string_agg(id || ' ' || login, ', ' ORDER BY id) FROM users WHERE id IN (1000005, 1000006, 2000009)");
            if got == "1000005 ana, 1000006 marker" { Ok(true) } else { Err(format!("{}: {got}", NODE_NAMES[i])) }
        });
    }
    cluster.assert_tables_equal(DB, "users", "id", &ALL);
}

/// `set_unique_strategy` refuses what it cannot do, with a clear error.
#[test]
fn set_unique_strategy_refuses_bad_input() {
    let cluster = start_store("conflict_rename_bad", Topology::Star);
    let node = cluster.node(MAIN);
    node.sql(
        DB,
        "CREATE UNIQUE INDEX products_price_key ON products (price); CREATE UNIQUE INDEX users_lower_login ON users (lower(login));
         ALTER TABLE products ADD CONSTRAINT products_name_key UNIQUE (name) DEFERRABLE",
    );
    for (sql, want) in [
        ("SELECT rbucardo.set_unique_strategy('users_pkey', 'rename')", "users_pkey is the table's replica key"),
        ("SELECT rbucardo.set_unique_strategy('products_price_key', 'rename')", "products_price_key has no text column to rename"),
        ("SELECT rbucardo.set_unique_strategy('users_lower_login', 'rename')", "users_lower_login is not a plain unique index"),
        ("SELECT rbucardo.set_unique_strategy('users', 'rename')", "users is not an index"),
        // A deferred check cannot be looked up before the write.
        ("SELECT rbucardo.set_unique_strategy('products_name_key', 'rename')", "products_name_key is not a plain unique index"),
        ("SELECT rbucardo.set_unique_strategy('users_login_key', 'drop')", "unknown unique strategy \"drop\""),
    ] {
        let err = node.connect(DB).execute(sql).unwrap_err();
        assert!(err.contains(want), "{sql}: {err}");
    }
}

/// branch1's clock is an hour behind. It changes a price after seeing main's change; branch2,
/// cut off, had changed the same price a little before main did. Under `latest` branch1's
/// change wins everywhere: it was made after main's, which was made after branch2's. A
/// wall-clock rule would have let branch2's change win (branch1's wall clock says an hour ago).
#[test]
fn causally_later_change_wins_despite_a_clock_an_hour_behind() {
    let cluster = start_store("conflict_skew", Topology::Star);
    cluster.node(BRANCH1).sql("postgres", "ALTER SYSTEM SET rbucardo.clock_skew = -3600");
    cluster.node(BRANCH1).sql("postgres", "SELECT pg_reload_conf()");
    wait_until("skew in effect", Duration::from_secs(10), || Ok(one(&cluster, BRANCH1, "SHOW rbucardo.clock_skew") == "-3600"));
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (6, 'rice', 10.00, 10)");
    for i in ALL {
        wait_until("product everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM products WHERE id = 6") == "1"));
    }
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(BRANCH2).sql(DB, "UPDATE products SET price = 22.00 WHERE id = 6");
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 20.00 WHERE id = 6");
    wait_until("main's price on branch1", Duration::from_secs(30), || Ok(one(&cluster, BRANCH1, "SELECT price FROM products WHERE id = 6") == "20.00"));
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 21.00 WHERE id = 6");
    wait_until("branch1's price on main", Duration::from_secs(30), || Ok(one(&cluster, MAIN, "SELECT price FROM products WHERE id = 6") == "21.00"));
    cluster.link(BRANCH2, MAIN).restore();
    for i in ALL {
        wait_until("branch1's price everywhere", Duration::from_secs(60), || {
            let p = one(&cluster, i, "SELECT price FROM products WHERE id = 6");
            if p == "21.00" { Ok(true) } else { Err(format!("{} has {p}", NODE_NAMES[i])) }
        });
    }
    // branch2's own change reaches main after branch2 pulled; main keeps branch1's price.
    wait_until("branch2's change judged on main", Duration::from_secs(60), || {
        let c = one(&cluster, MAIN, "SELECT coalesce(string_agg(remote_version->>'price' || ' ' || winner, ','), '') FROM rbucardo.conflicts");
        if c.is_empty() { Err("no conflict yet".into()) } else { Ok(c == "22.00 local") }
    });
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
}

/// A customer and their first order were made on branch2 in one transaction, with a login
/// branch1 also took while both were apart; the order's line came in the next transaction.
/// On main the customer's transaction is parked (the login), so the line arrives before its
/// parent order: apply checks the foreign key itself (it runs with foreign keys off) and parks
/// the line too, instead of writing an orphan. When branch1 renames its user, that batch lets
/// both parked transactions apply at once, and every node ends with the same rows.
#[test]
fn child_whose_parent_has_not_arrived_is_parked_then_applied() {
    let cluster = start_store("conflict_parent", Topology::Star);
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000001, 'ana', 'Ana of branch1')");
    cluster.node(BRANCH2).sql(
        DB,
        "BEGIN;
         INSERT INTO users (id, login, name) VALUES (3000001, 'ana', 'Ana of branch2');
         INSERT INTO pos_order (id, node, ref, total) VALUES (3000001, 'branch2', 3000001, 12.50);
         COMMIT;",
    );
    cluster.node(BRANCH2).sql(DB, "INSERT INTO pos_order_line (id, order_id, product_id, qty, note) VALUES (3000010, 3000001, NULL, 2, 'line')");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("branch1's ana on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE id = 2000001") == "1"));
    cluster.link(BRANCH2, MAIN).restore();

    wait_until("both of branch2's transactions parked on main", Duration::from_secs(60), || {
        let open = one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL");
        if open == "2" { Ok(true) } else { Err(format!("{open} open exceptions")) }
    });
    let line = one(&cluster, MAIN, "SELECT reason FROM rbucardo.exceptions WHERE resolved_at IS NULL ORDER BY id DESC LIMIT 1");
    assert!(line.contains("foreign key") && line.contains("pos_order_line") && line.contains("3000001"), "the line's reason: {line}");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM pos_order_line WHERE id = 3000010"), "0", "no orphan line on main");
    assert_eq!(one(&cluster, MAIN, "SELECT exceptions FROM rbucardo.status WHERE db = 'branch2'"), "2");
    assert_eq!(one(&cluster, MAIN, "SELECT exceptions FROM rbucardo.status WHERE db = 'branch1'"), "0");

    // branch1 renames its ana: the batch that brings the rename lets the parked customer (and
    // with it the order) apply, then the line: no operator call.
    cluster.node(BRANCH1).sql(DB, "UPDATE users SET login = 'ana.b1' WHERE id = 2000001");
    wait_until("parked transactions applied on main", Duration::from_secs(60), || {
        let applied = one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.exceptions WHERE resolution = 'applied'");
        let state = one(&cluster, MAIN, "SELECT string_agg(coalesce(resolution, 'open') || ': ' || reason, '; ' ORDER BY id) FROM rbucardo.exceptions");
        if applied == "2" { Ok(true) } else { Err(state) }
    });
    assert_eq!(one(&cluster, MAIN, "SELECT exceptions FROM rbucardo.status WHERE db = 'branch2'"), "0");
    assert_eq!(one(&cluster, MAIN, "SELECT order_id FROM pos_order_line WHERE id = 3000010"), "3000001");
    for i in ALL {
        wait_until("the order and its line everywhere", Duration::from_secs(60), || {
            let got = one(&cluster, i, "SELECT (SELECT count(*) FROM users WHERE id IN (2000001, 3000001)) || ' ' || (SELECT count(*) FROM pos_order_line l JOIN pos_order o ON o.id = l.order_id WHERE l.id = 3000010)");
            if got == "2 1" { Ok(true) } else { Err(format!("{}: {got}", NODE_NAMES[i])) }
        });
    }
    for (table, key) in [("users", "id"), ("pos_order", "id"), ("pos_order_line", "id")] {
        wait_until("same rows everywhere", Duration::from_secs(60), || {
            let dumps: Vec<Vec<String>> = ALL.iter().map(|&i| cluster.node(i).dump_table(DB, table, key)).collect();
            Ok(dumps.iter().all(|d| d == &dumps[0]))
        });
        cluster.assert_tables_equal(DB, table, key, &ALL);
    }
}

/// Tables the executor path cannot serve go through SQL; conflicts are detected, resolved and
/// logged there too. Here main has a column of its own (`seen`) in `notes`, so rows from the
/// branches, which lack it, take the SQL path on main; the branches change the same rows while
/// apart and main meets the second one's changes as conflicts.
#[test]
fn conflicts_are_detected_on_the_sql_apply_path() {
    let cluster = start_store("conflict_sqlpath", Topology::Star);
    for i in ALL {
        let extra = if i == MAIN { ", seen boolean NOT NULL DEFAULT false" } else { "" };
        cluster.node(i).sql(
            DB,
            &format!(
                "SET rbucardo.replicate_ddl = off;
                 CREATE TABLE notes (id int PRIMARY KEY, body text, price numeric(10,2){extra});
                 SELECT rbucardo.add_table('store', 'notes');"
            ),
        );
    }
    cluster.node(BRANCH1).sql(DB, "INSERT INTO notes VALUES (2, 'orig', 1.00), (3, 'orig', 1.00)");
    for i in ALL {
        wait_until("notes everywhere", Duration::from_secs(30), || Ok(one(&cluster, i, "SELECT count(*) FROM notes") == "2"));
    }
    // A local-only value, written without capture: updates from the branches must keep it.
    cluster.node(MAIN).sql(DB, "SET session_replication_role = replica; UPDATE notes SET seen = true");

    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "BEGIN; UPDATE notes SET price = 2.00 WHERE id = 2; DELETE FROM notes WHERE id = 3; INSERT INTO notes VALUES (4, 'b1', 1.00); COMMIT;");
    cluster.node(BRANCH2).sql(DB, "BEGIN; UPDATE notes SET price = 3.00 WHERE id = 2; UPDATE notes SET body = 'b2' WHERE id = 3; INSERT INTO notes VALUES (4, 'b2', 2.00); COMMIT;");
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("branch1's changes on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM notes WHERE id = 4") == "1"));
    cluster.link(BRANCH2, MAIN).restore();

    // latest: branch2 wrote last, so its versions win everywhere.
    let want = "2 orig 3.00|3 b2 1.00|4 b2 2.00";
    for i in ALL {
        wait_until("branch2's versions everywhere", Duration::from_secs(60), || {
            let got = one(&cluster, i, "SELECT string_agg(concat_ws(' ', id, body, price), '|' ORDER BY id) FROM notes");
            if got == want { Ok(true) } else { Err(format!("{}: {got}", NODE_NAMES[i])) }
        });
    }
    wait_until("main's conflicts logged", Duration::from_secs(30), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.conflicts") == "3"));
    assert_eq!(
        one(&cluster, MAIN, "SELECT string_agg(concat_ws(' ', key->>'id', kind, local_version->>'price', remote_version->>'price', rule, winner, remote_origin), '|' ORDER BY key->>'id') FROM rbucardo.conflicts"),
        "2 update_differs 2.00 3.00 latest remote 3|3 update_missing 1.00 latest remote 3|4 insert_exists 1.00 2.00 latest remote 3"
    );
    assert_eq!(one(&cluster, MAIN, "SELECT string_agg(id || ' ' || seen, '|' ORDER BY id) FROM notes"), "2 true|3 false|4 false", "local-only column kept on update, default on insert");
}

/// A parked transaction that can no longer be applied for another reason (its table was
/// renamed here since) stays parked with that reason; the batches after it still apply.
#[test]
fn a_parked_transaction_that_now_fails_otherwise_does_not_block_the_stream() {
    let cluster = start_store("conflict_parked_gone", Topology::Star);
    for i in ALL {
        cluster.node(i).sql(DB, "SET rbucardo.replicate_ddl = off;
                                 CREATE TABLE badge (id int PRIMARY KEY, code text NOT NULL UNIQUE);
                                 SELECT rbucardo.add_table('store', 'badge')");
    }
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO badge VALUES (1, 'gold')");
    cluster.node(BRANCH2).sql(DB, "INSERT INTO badge VALUES (3000001, 'gold')");
    cluster.link(BRANCH2, MAIN).restore();
    wait_until("branch2's badge parked on main", Duration::from_secs(60), || {
        Ok(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL AND reason LIKE '%duplicate key%'") == "1")
    });
    // The table goes away here: retrying the parked transaction now fails with another error.
    cluster.node(MAIN).sql(DB, "SET rbucardo.replicate_ddl = off; ALTER TABLE badge RENAME TO badge_old");
    for k in 1..=3 {
        cluster.node(BRANCH2).sql(DB, &format!("INSERT INTO users (id, login, name) VALUES (300000{k} + 10, 'late{k}', 'after the park')"));
    }
    wait_until("branch2's later users on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE login LIKE 'late%'") == "3"));
    wait_until("the new reason recorded", Duration::from_secs(60), || {
        let reason = one(&cluster, MAIN, "SELECT reason FROM rbucardo.exceptions WHERE resolved_at IS NULL");
        if reason.contains("does not exist") { Ok(true) } else { Err(reason) }
    });
    for i in ALL {
        let errors = one(&cluster, i, "SELECT count(*) FROM rbucardo.peer_state WHERE last_error IS NOT NULL");
        assert_eq!(errors, "0", "{}: {:?}", NODE_NAMES[i], cluster.node(i).query(DB, "SELECT db, last_error FROM rbucardo.peer_state"));
    }
}
