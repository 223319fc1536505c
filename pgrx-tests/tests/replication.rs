//! Replication core: scenario tests on three real nodes (main, branch1,
//! branch2) with a fault-injecting proxy on every link. Each test ends by
//! checking that every table is identical, row by row, on every node and holds
//! exactly what the workload committed.

mod common;

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster, Direction};

const CONVERGE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// 1. Star, concurrent writes of every kind on all three nodes.

#[test]
fn t1_star_concurrent_writes_of_every_kind_converge() {
    let cluster = start_store("t1_star_mixed", Topology::Star);
    let b1 = base(BRANCH1);

    // A table only branch1 writes to: filled, replicated, then truncated.
    run_on(
        &cluster,
        BRANCH1,
        &[format!(
            "INSERT INTO cash_session SELECT {b1} + i, 'branch1', i * 100 FROM generate_series(1, 20) i"
        )],
    );
    converge(&cluster, &expected(&[("cash_session", 20)]), CONVERGE);
    run_on(&cluster, BRANCH1, &["TRUNCATE cash_session".to_string()]);
    converge(&cluster, &expected(&[]), CONVERGE);

    let mut work: Vec<(usize, Vec<String>)> = ALL.iter().map(|&k| (k, mixed_workload(k))).collect();
    work[BRANCH1].1.insert(
        7,
        format!(
            "INSERT INTO cash_session SELECT {b1} + 100 + i, 'branch1 again', i FROM generate_series(1, 7) i"
        ),
    );
    // Transactions committed per node, including the two of the TRUNCATE phase.
    let committed = [
        work[MAIN].1.len() as i64,
        work[BRANCH1].1.len() as i64 + 2,
        work[BRANCH2].1.len() as i64,
    ];
    run_concurrently(&cluster, work);
    for k in ALL {
        assert_mixed_rows_on_writer(&cluster, k);
    }

    converge(&cluster, &mixed_expected(&[("cash_session", 7)]), CONVERGE);
    assert_applied_exactly_once(&cluster, committed);
}

// ---------------------------------------------------------------------------
// 2. Both branch links cut during 100,000 row changes on each node.

/// 100,000 row changes on node `k` in 200 transactions: 180 of 500 inserts
/// (10 orders, 490 lines), 10 of 500 updates and 10 of 500 deletes.
fn hundred_thousand_changes(k: usize) -> Vec<String> {
    let b = base(k);
    let n = NODE_NAMES[k];
    let mut txns = Vec::new();
    for t in 0..180 {
        txns.push(format!(
            "BEGIN;
             INSERT INTO pos_order (id, node, ref, total)
             SELECT {b} + {t} * 10 + j, '{n}', {t}, j * 1.5 FROM generate_series(0, 9) j;
             INSERT INTO pos_order_line (id, order_id, product_id, qty, note)
             SELECT {b} + {t} * 490 + l, {b} + {t} * 10 + l % 10, l % 97, 1, 'bulk line'
               FROM generate_series(0, 489) l;
             COMMIT;"
        ));
        if t >= 20 && (t - 20) % 15 == 0 && (t - 20) / 15 < 10 {
            let u = (t - 20) / 15;
            txns.push(format!(
                "UPDATE pos_order_line SET qty = qty + 1, note = 'updated'
                  WHERE id BETWEEN {b} + {lo} AND {b} + {hi}",
                lo = u * 500,
                hi = u * 500 + 499
            ));
        }
        if t >= 25 && (t - 25) % 15 == 0 && (t - 25) / 15 < 10 {
            let d = (t - 25) / 15;
            txns.push(format!(
                "DELETE FROM pos_order_line WHERE id BETWEEN {b} + {lo} AND {b} + {hi}",
                lo = 5000 + d * 500,
                hi = 5000 + d * 500 + 499
            ));
        }
    }
    assert_eq!(txns.len(), 200);
    txns
}

#[test]
fn t2_branch_links_cut_during_100k_changes_per_node_then_catch_up() {
    let cluster = start_store("t2_partition_100k", Topology::Star);
    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();

    let work: Vec<(usize, Vec<String>)> =
        ALL.iter().map(|&k| (k, hundred_thousand_changes(k))).collect();
    let committed = committed_per_node(&work);
    let writing = Instant::now();
    run_concurrently(&cluster, work);
    eprintln!(
        "t2: 300,000 row changes committed on three nodes in {:.1}s",
        writing.elapsed().as_secs_f64()
    );
    // The partition held: main has nothing of the branches.
    let foreign = cluster
        .node(MAIN)
        .query_one(DB, &format!("SELECT count(*) FROM pos_order_line WHERE id >= {}", base(BRANCH1)));
    assert_eq!(foreign.as_deref(), Some("0"), "rows crossed a cut link");

    let restored = Instant::now();
    cluster.link(BRANCH1, MAIN).restore();
    cluster.link(BRANCH2, MAIN).restore();
    // Measured on its own too: main receives both branches' changes directly.
    let mut probe = Probe::new(&cluster);
    let main_full = format!(
        "SELECT count(*) FROM pos_order_line WHERE id >= {} AND id < {}",
        base(BRANCH1),
        base(BRANCH2) + 1_000_000
    );
    wait_until("main to hold both branches' lines", Duration::from_secs(240), || {
        Ok(probe.int(MAIN, &main_full)? == 2 * 83_200)
    });
    let secs = restored.elapsed().as_secs_f64();
    eprintln!(
        "t2 catch-up on main: the branches' 200,000 row changes applied {secs:.1}s after the links returned: {:.0} changes/s",
        200_000.0 / secs
    );
    let want = expected(&[("pos_order", 3 * 1800), ("pos_order_line", 3 * 83_200)]);
    converge(&cluster, &want, Duration::from_secs(240));
    let secs = restored.elapsed().as_secs_f64();
    eprintln!(
        "t2 catch-up: 300,000 row changes (100,000 per node) converged on all nodes {secs:.1}s after the links returned: {:.0} changes/s",
        300_000.0 / secs
    );
    assert_applied_exactly_once(&cluster, committed);
}

/// Transactions per node in a workload, indexed by node.
fn committed_per_node(work: &[(usize, Vec<String>)]) -> [i64; 3] {
    let mut out = [0; 3];
    for (k, txns) in work {
        out[*k] += txns.len() as i64;
    }
    out
}

// ---------------------------------------------------------------------------
// 3. A transaction held open across several sync rounds still arrives.

#[test]
fn t3_long_open_transaction_arrives_after_later_commits() {
    let cluster = start_store("t3_long_txn", Topology::Star);
    let (b0, b1, b2) = (base(MAIN), base(BRANCH1), base(BRANCH2));
    let branch1 = cluster.node(BRANCH1);
    let mut long = branch1.connect(DB);
    // An order with its lines, and a 9 MB row: more than the capture buffer
    // holds, so part of the transaction is written to the change log early,
    // before the later transactions below.
    long.execute(&format!(
        "BEGIN;
         INSERT INTO pos_order (id, node, ref, total) VALUES ({b1} + 1, 'branch1', 1, 99.99);
         INSERT INTO pos_order_line (id, order_id, product_id, qty, note)
         SELECT {b1} + 10 + l, {b1} + 1, l, l, 'long' FROM generate_series(1, 3) l;
         INSERT INTO bulk VALUES ({b1} + 1, 777, repeat('L', 9000000));"
    ))
    .expect("open the long transaction");

    // Three later transactions, each waited for on main: three sync rounds.
    let mut probe = Probe::new(&cluster);
    for r in 1..=3 {
        branch1.sql(DB, &format!("INSERT INTO users VALUES ({b1} + {r}, 'b1_u{r}', 'later {r}')"));
        wait_until(&format!("user {r} of branch1 on main"), CONVERGE, || {
            Ok(probe.int(MAIN, &format!("SELECT count(*) FROM users WHERE id = {b1} + {r}"))? == 1)
        });
    }
    cluster.node(MAIN).sql(DB, &format!("INSERT INTO users VALUES ({b0} + 1, 'm_u1', 'main')"));
    cluster.node(BRANCH2).sql(DB, &format!("INSERT INTO users VALUES ({b2} + 1, 'b2_u1', 'branch2')"));
    converge(&cluster, &expected(&[("users", 5)]), CONVERGE);

    long.execute("COMMIT").expect("commit the long transaction");
    let want = expected(&[("users", 5), ("pos_order", 1), ("pos_order_line", 3), ("bulk", 1)]);
    converge(&cluster, &want, CONVERGE);
    for i in [MAIN, BRANCH2] {
        let len = cluster
            .node(i)
            .query_one(DB, &format!("SELECT length(payload) FROM bulk WHERE id = {b1} + 1"));
        assert_eq!(len.as_deref(), Some("9000000"), "{}", NODE_NAMES[i]);
    }
    assert_applied_exactly_once(&cluster, [1, 4, 1]);
}

/// The tick technique's edge: a transaction whose changes were numbered in
/// the change log (at pre-commit) but which becomes visible only after a later
/// tick was cut must still be shipped, without any further traffic.
///
/// `synchronous_standby_names` names a standby that never connects, and one
/// session runs with `synchronous_commit = on`: its COMMIT then waits after
/// the change log insert and the commit record, while every snapshot still
/// sees it running, until `pg_cancel_backend` releases it. Everything else
/// runs with `synchronous_commit = local`, which does not wait. While it waits,
/// another transaction commits on main (a fetch cuts a tick only once a commit
/// was counted since the newest tick: the waiting one is not counted yet), and
/// the test fetches from main as branch1's worker does every round (calling
/// `peer_fetch` itself to choose the moment): a tick is cut past the waiting
/// transaction, by that fetch or by the worker, woken by the other commit.
/// After the waiting commit, nothing else commits.
///
/// A tick's snapshot knows a running transaction in one of two ways, and a fetch lists each
/// through its own statement (changelog.rs, `list_near_head`): in its list of running ones
/// when a later transaction had finished (odd rounds: the other transaction starts after the
/// waiting one), or at or past its xmax when none had (even rounds: the other one takes its
/// id first). Each round checks which the tick saw.
#[test]
fn t3b_commit_that_becomes_visible_after_a_later_tick_is_still_shipped() {
    let cluster = start_store_with(
        "t3b_delayed_commit",
        Topology::Star,
        "synchronous_standby_names = 'nobody'\nsynchronous_commit = local",
    );
    let main = cluster.node(MAIN);
    let b0 = base(MAIN);
    let mut probe = Probe::new(&cluster);
    let mut seen_past_xmax = false;
    for round in 1..=6 {
        let id = b0 + round;
        let past_xmax = round % 2 == 0;
        let mut other = main.connect(DB);
        if past_xmax {
            other.execute("BEGIN; SELECT pg_current_xact_id();").unwrap();
        }
        let mut conn = main.connect(DB);
        let pid = conn.query_one("SELECT pg_backend_pid()").unwrap().unwrap();
        let xid = conn
            .query_one(&format!(
                "SET synchronous_commit = on;
                 BEGIN;
                 INSERT INTO users VALUES ({id}, 'm_delayed_{round}', 'commit delayed');
                 SELECT pg_current_xact_id();"
            ))
            .unwrap()
            .unwrap();
        let committer = std::thread::spawn(move || conn.execute("COMMIT"));
        wait_until(&format!("round {round}: COMMIT waiting for the standby"), Duration::from_secs(30), || {
            Ok(probe.int(MAIN, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'SyncRep'"))? == 1)
        });
        // Its changes are numbered; another transaction commits, and a peer fetches now,
        // which cuts a tick.
        let other_insert = format!("INSERT INTO users VALUES ({}, 'm_other_{round}', 'committed while the other waits')", id + 100);
        if past_xmax {
            other.execute(&format!("{other_insert}; COMMIT")).unwrap();
        } else {
            other.execute(&other_insert).unwrap();
        }
        let numbered = probe.int(MAIN, "SELECT last_value FROM rbucardo.change_seq").unwrap();
        probe
            .query(
                MAIN,
                "SELECT length(rbucardo.peer_fetch('branch1', out_tick, out_seq, 1000))
                   FROM rbucardo.peer_state WHERE db = 'branch1'",
            )
            .unwrap();
        // (If this node's worker was cutting a tick at that moment, the fetch read without
        // cutting one, and the worker's tick covers it a moment later.)
        let tick = main.query(DB, "SELECT tick_id, snap::text, last_seq FROM rbucardo.tick ORDER BY tick_id DESC LIMIT 1");
        wait_until(&format!("round {round}: a tick covering change seq {numbered}"), Duration::from_secs(10), || {
            let covered = probe.int(MAIN, "SELECT coalesce(max(last_seq), 0) FROM rbucardo.tick")?;
            if covered >= numbered { Ok(true) } else { Err(format!("{:?}", main.query(DB, "SELECT tick_id, snap::text, last_seq FROM rbucardo.tick ORDER BY tick_id DESC LIMIT 1"))) }
        });
        let seen_as = probe
            .query(
                MAIN,
                &format!(
                    "SELECT CASE WHEN '{xid}'::xid8 IN (SELECT pg_snapshot_xip(snap)) THEN 'running'
                                 WHEN '{xid}'::xid8 >= pg_snapshot_xmax(snap) THEN 'past xmax' ELSE 'finished' END
                       FROM rbucardo.tick WHERE last_seq >= {numbered} ORDER BY tick_id LIMIT 1"
                ),
            )
            .unwrap();
        // (In an even round a transaction with a later id finishing in between, say a peer's
        // confirmation, makes the tick list it as running: allowed, as long as one round saw
        // it past the xmax.)
        let seen_as = seen_as.first().and_then(|r| r[0].clone()).unwrap_or_default();
        let allowed: &[&str] = if past_xmax { &["past xmax", "running"] } else { &["running"] };
        assert!(allowed.contains(&seen_as.as_str()), "round {round}: the first tick covering the waiting transaction saw it {seen_as}");
        seen_past_xmax |= seen_as == "past xmax";
        main.sql(DB, &format!("SELECT pg_cancel_backend({pid})"));
        committer
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: the delayed COMMIT failed: {e}"));
        assert_eq!(main.query_one(DB, &format!("SELECT count(*) FROM users WHERE id = {id}")).as_deref(), Some("1"));
        for i in [BRANCH1, BRANCH2] {
            let what = format!(
                "round {round}: the delayed transaction (xid {xid}, user {id}) on {}; \
                 it committed after the tick (id, snapshot, last_seq) {tick:?} was cut",
                NODE_NAMES[i]
            );
            wait_until(&what, Duration::from_secs(30), || {
                Ok(probe.int(i, &format!("SELECT count(*) FROM users WHERE id = {id}"))? == 1)
            });
        }
    }
    assert!(seen_past_xmax, "no round had a tick see the waiting transaction past its xmax");
    converge(&cluster, &expected(&[("users", 12)]), CONVERGE);
    assert_applied_exactly_once(&cluster, [12, 0, 0]);
}

// ---------------------------------------------------------------------------
// 4. main crashes (kill -9) while applying branch1's catch-up.

/// 68,000 changes of branch1 in 128 transactions: 120 × (10 orders + 490
/// lines), 5 × 1000 product_tag_rel rows, 2 × 1000 line updates, and 1000
/// product_tag_rel deletes.
fn catch_up_load(k: usize) -> Vec<String> {
    let b = base(k);
    let n = NODE_NAMES[k];
    let mut txns: Vec<String> = (0..120)
        .map(|t| {
            format!(
                "BEGIN;
                 INSERT INTO pos_order (id, node, ref, total)
                 SELECT {b} + {t} * 10 + j, '{n}', {t}, j FROM generate_series(0, 9) j;
                 INSERT INTO pos_order_line (id, order_id, product_id, qty)
                 SELECT {b} + {t} * 490 + l, {b} + {t} * 10 + l % 10, l, 1 FROM generate_series(0, 489) l;
                 COMMIT;"
            )
        })
        .collect();
    for p in 0..5 {
        txns.push(format!(
            "INSERT INTO product_tag_rel SELECT {b} + p, tg
               FROM generate_series({lo}, {hi}) p, generate_series(1, 5) tg",
            lo = p * 200,
            hi = p * 200 + 199
        ));
    }
    for u in 0..2 {
        txns.push(format!(
            "UPDATE pos_order_line SET qty = qty + 1 WHERE id BETWEEN {b} + {lo} AND {b} + {hi}",
            lo = u * 1000,
            hi = u * 1000 + 999
        ));
    }
    txns.push("DELETE FROM product_tag_rel WHERE tag_id = 5".to_string());
    txns
}

/// On node `i`: every branch1 order is complete (10 per transaction, 49 lines
/// per order), no line lacks its order, and the transactions present are a
/// prefix of branch1's commit order. Returns how many transactions are there.
fn assert_orders_atomic_and_in_order(cluster: &Cluster, i: usize, lines_per_order: i64) -> i64 {
    let node = cluster.node(i);
    let one = |sql: &str| -> i64 { node.query_one(DB, sql).unwrap().parse().unwrap() };
    let partial_txns = one(
        "SELECT count(*) FROM (SELECT ref FROM pos_order WHERE node = 'branch1' GROUP BY ref HAVING count(*) <> 10) x",
    );
    let partial_orders = one(&format!(
        "SELECT count(*) FROM (SELECT o.id FROM pos_order o LEFT JOIN pos_order_line l ON l.order_id = o.id
           WHERE o.node = 'branch1' GROUP BY o.id HAVING count(l.id) <> {lines_per_order}) x"
    ));
    let orphans = one(
        "SELECT count(*) FROM pos_order_line l WHERE NOT EXISTS (SELECT 1 FROM pos_order o WHERE o.id = l.order_id)",
    );
    let txns = one("SELECT count(DISTINCT ref) FROM pos_order WHERE node = 'branch1'");
    let max_ref = one("SELECT coalesce(max(ref) + 1, 0) FROM pos_order WHERE node = 'branch1'");
    assert_eq!(
        (partial_txns, partial_orders, orphans),
        (0, 0, 0),
        "{}: remote transactions applied in part (transactions with missing orders, orders with missing lines, lines without order)",
        node.name()
    );
    assert_eq!(
        txns,
        max_ref,
        "{}: branch1's transactions were not applied in commit order (a gap before the newest)",
        node.name()
    );
    txns
}

#[test]
fn t4_main_killed_while_applying_catch_up_loses_and_duplicates_nothing() {
    let cluster = start_store("t4_crash_apply", Topology::Star);
    let link = cluster.link(BRANCH1, MAIN);
    link.cut();
    let load = catch_up_load(BRANCH1);
    let committed = [0, load.len() as i64, 0];
    run_on(&cluster, BRANCH1, &load);

    let mut probe = Probe::new(&cluster);
    link.restore();
    wait_until("main to start applying branch1's batch", Duration::from_secs(60), || {
        Ok(probe.int(MAIN, ACTIVE_PUSHES)? > 0)
    });
    let main = cluster.node(MAIN);
    main.kill9();
    main.start();
    let applied = assert_orders_atomic_and_in_order(&cluster, MAIN, 49);
    eprintln!("t4: after the crash main had {applied} of branch1's 120 order transactions");

    let want = expected(&[
        ("pos_order", 1200),
        ("pos_order_line", 58_800),
        ("product_tag_rel", 4000),
    ]);
    converge(&cluster, &want, Duration::from_secs(180));
    for i in ALL {
        let node = cluster.node(i);
        let dup = node.query_one(
            DB,
            "SELECT count(*) - (SELECT count(*) FROM (SELECT DISTINCT product_id, tag_id FROM product_tag_rel) d)
               FROM product_tag_rel",
        );
        assert_eq!(dup.as_deref(), Some("0"), "{}: duplicate product_tag_rel rows", node.name());
        assert_orders_atomic_and_in_order(&cluster, i, 49);
    }
    assert_applied_exactly_once(&cluster, committed);
}

// ---------------------------------------------------------------------------
// 5. Link cut in the middle of a batch transfer.

/// One transaction per tag, 20 rows of ~10 kB each.
fn tagged_bulk(k: usize, tags: RangeInclusive<i64>) -> Vec<String> {
    let b = base(k);
    tags.map(|t| {
        format!(
            "INSERT INTO bulk SELECT {b} + {t} * 100 + r, {t}, repeat(md5(({t} * 100 + r)::text), 320)
               FROM generate_series(1, 20) r"
        )
    })
    .collect()
}

/// On node `i`: each tag's transaction is there whole (20 rows) or not at all,
/// and the tags there are a prefix of `tags` (commit order). Returns how many.
fn complete_tags(cluster: &Cluster, i: usize, tags: &RangeInclusive<i64>) -> i64 {
    let node = cluster.node(i);
    let rows = node.query(
        DB,
        &format!(
            "SELECT tag, count(*) FROM bulk WHERE tag BETWEEN {} AND {} GROUP BY tag ORDER BY tag",
            tags.start(),
            tags.end()
        ),
    );
    for (n, row) in rows.iter().enumerate() {
        let tag: i64 = row[0].as_deref().unwrap().parse().unwrap();
        let count = row[1].as_deref().unwrap();
        assert_eq!(count, "20", "{}: transaction {tag} applied in part ({count} of 20 rows)", node.name());
        assert_eq!(
            tag,
            tags.start() + n as i64,
            "{}: transactions applied out of commit order (tags present: {:?})",
            node.name(),
            rows.iter().map(|r| r[0].clone().unwrap()).collect::<Vec<_>>()
        );
    }
    rows.len() as i64
}

/// Lets `budget` more bytes through `link` in `direction`, then cuts it, and
/// waits until the cut has happened.
fn restore_then_cut_after(cluster: &Cluster, from: usize, to: usize, budget: u64, direction: Direction) {
    let link = cluster.link(from, to);
    let before = link.bytes_forwarded(direction);
    link.restore();
    link.cut_after_bytes(budget, direction);
    wait_until(
        &format!("{budget} bytes {direction:?} through link {from}->{to}, then the cut"),
        Duration::from_secs(60),
        || Ok(link.bytes_forwarded(direction) >= before + budget),
    );
}

#[test]
fn t5_link_cut_mid_batch_applies_nothing_partial() {
    let cluster = start_store("t5_cut_mid_batch", Topology::Star);
    let mut probe = Probe::new(&cluster);
    let link = cluster.link(BRANCH1, MAIN);

    // Push direction: branch1 sends its ~20 MB to main.
    link.cut();
    let pushed = 1..=100;
    run_on(&cluster, BRANCH1, &tagged_bulk(BRANCH1, pushed.clone()));
    for budget in [2_000_000, 11_000_000] {
        restore_then_cut_after(&cluster, BRANCH1, MAIN, budget, Direction::ClientToServer);
        wait_until("main to stop applying after the cut", Duration::from_secs(60), || {
            Ok(probe.int(MAIN, ACTIVE_PUSHES)? == 0)
        });
        let whole = complete_tags(&cluster, MAIN, &pushed);
        eprintln!("t5: link cut after {budget} bytes pushed: main holds {whole} of 100 whole transactions");
    }
    link.restore();
    converge(&cluster, &expected(&[("bulk", 2000)]), CONVERGE);

    // Pull direction: branch1 fetches main's ~10 MB.
    link.cut();
    let pulled = 101..=150;
    run_on(&cluster, MAIN, &tagged_bulk(MAIN, pulled.clone()));
    restore_then_cut_after(&cluster, BRANCH1, MAIN, 1_500_000, Direction::ServerToClient);
    let whole = complete_tags(&cluster, BRANCH1, &pulled);
    eprintln!("t5: link cut after 1.5 MB fetched: branch1 holds {whole} of 50 whole transactions");
    link.restore();
    converge(&cluster, &expected(&[("bulk", 3000)]), CONVERGE);
    assert_applied_exactly_once(&cluster, [50, 100, 0]);
}

// ---------------------------------------------------------------------------
// 6. Full mesh: convergence, exactly once, and the change log drains.

#[test]
fn t6_full_mesh_converges_without_duplicates_and_change_log_drains() {
    let cluster = start_store("t6_mesh", Topology::Mesh);
    let work: Vec<(usize, Vec<String>)> = ALL.iter().map(|&k| (k, mixed_workload(k))).collect();
    let committed = committed_per_node(&work);
    run_concurrently(&cluster, work);
    for k in ALL {
        assert_mixed_rows_on_writer(&cluster, k);
    }
    converge(&cluster, &mixed_expected(&[]), CONVERGE);
    assert_applied_exactly_once(&cluster, committed);
    wait_change_log_drained(&cluster, Duration::from_secs(60));
    // Nothing was applied twice while the log drained.
    assert_applied_exactly_once(&cluster, committed);
}

// ---------------------------------------------------------------------------
// 7. Tables without a primary key.

#[test]
fn t7_unique_index_table_replicates_and_keyless_table_is_refused() {
    let cluster = start_store("t7_no_pk", Topology::Star);
    let work: Vec<(usize, Vec<String>)> = ALL
        .iter()
        .map(|&k| {
            let b = base(k);
            (
                k,
                vec![
                    format!("INSERT INTO product_tag_rel SELECT {b} + i, t FROM generate_series(1, 50) i, generate_series(1, 2) t"),
                    // Bounded below too: rows of other nodes may already be here.
                    format!("DELETE FROM product_tag_rel WHERE tag_id = 2 AND product_id > {b} AND product_id <= {b} + 20"),
                    format!("UPDATE product_tag_rel SET tag_id = 9 WHERE product_id BETWEEN {b} + 21 AND {b} + 25 AND tag_id = 2"),
                    format!(
                        "BEGIN;
                         DELETE FROM product_tag_rel WHERE product_id = {b} + 30 AND tag_id = 1;
                         INSERT INTO product_tag_rel VALUES ({b} + 30, 1);
                         COMMIT;"
                    ),
                ],
            )
        })
        .collect();
    run_concurrently(&cluster, work);
    converge(&cluster, &expected(&[("product_tag_rel", 3 * 80)]), CONVERGE);
    let deletes: Vec<(usize, Vec<String>)> = ALL
        .iter()
        .map(|&k| {
            let b = base(k);
            (
                k,
                vec![format!(
                    "DELETE FROM product_tag_rel WHERE tag_id = 9 AND product_id >= {b} AND product_id < {b} + 1000000"
                )],
            )
        })
        .collect();
    run_concurrently(&cluster, deletes);
    converge(&cluster, &expected(&[("product_tag_rel", 3 * 75)]), CONVERGE);
    assert_applied_exactly_once(&cluster, [5, 5, 5]);

    let main = cluster.node(MAIN);
    main.sql(
        DB,
        "CREATE TABLE no_key (a int, b text);
         CREATE TABLE nullable_unique (a int UNIQUE, b text);",
    );
    for table in ["no_key", "nullable_unique"] {
        let error = main
            .connect(DB)
            .execute(&format!("SELECT rbucardo.add_table('store', '{table}'::regclass)"))
            .expect_err(&format!("add_table must refuse {table}"));
        assert!(
            error.contains("primary key"),
            "refusing {table}: error does not mention \"primary key\": {error}"
        );
        let triggers = main.query_one(
            DB,
            &format!("SELECT count(*) FROM pg_trigger WHERE tgrelid = '{table}'::regclass"),
        );
        assert_eq!(triggers.as_deref(), Some("0"), "refused table {table} got a trigger");
    }
}

// ---------------------------------------------------------------------------
// 8. A corrupt batch is refused whole.

/// A batch framed as the wire format says: magic, payload length and crc32
/// (little endian), payload.
fn framed(payload: &[u8]) -> Vec<u8> {
    let mut out = b"RBC3".to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn push_sql(batch: &[u8]) -> String {
    format!(
        "SELECT * FROM rbucardo.peer_push('branch1', decode('{}', 'hex'))",
        to_hex(batch)
    )
}

#[test]
fn t8_corrupt_batches_are_refused_whole() {
    let cluster = start_store("t8_corrupt_batch", Topology::Star);
    let (main, branch1) = (cluster.node(MAIN), cluster.node(BRANCH1));
    let b1 = base(BRANCH1);
    // branch1's worker must not ship these rows itself.
    cluster.link(BRANCH1, MAIN).cut();
    // Two transactions.
    branch1.sql(
        DB,
        &format!("INSERT INTO users SELECT {b1} + i, 'b1_u' || i, 'User ' || i FROM generate_series(1, 50) i"),
    );
    branch1.sql(
        DB,
        &format!(
            "BEGIN;
             INSERT INTO pos_order (id, node, ref) VALUES ({b1} + 1, 'branch1', 1), ({b1} + 2, 'branch1', 2);
             INSERT INTO pos_order_line (id, order_id, qty) SELECT {b1} + l, {b1} + 1 + l % 2, l FROM generate_series(10, 15) l;
             COMMIT;"
        ),
    );
    // branch1's real batch, from where main stands in branch1's stream (what
    // branch1's worker would push next; the stream's start, (0, 9223372036854775807),
    // may already be trimmed).
    let in_state = main.query(DB, "SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = 'branch1'");
    let (tick, seq) = (in_state[0][0].clone().unwrap(), in_state[0][1].clone().unwrap());
    let hex = branch1
        .query_one(
            DB,
            &format!("SELECT encode(rbucardo.peer_fetch('main', {tick}, {seq}, 8388608), 'hex')"),
        )
        .expect("peer_fetch returned NULL");
    let genuine = from_hex(&hex);
    assert!(genuine.len() > 200, "batch of {} bytes is too small to hold the rows", genuine.len());

    let state_sql = "SELECT in_tick, in_seq, applied_in FROM rbucardo.peer_state WHERE db = 'branch1'";
    let state_before = main.query(DB, state_sql);
    let users_before = main.dump_table(DB, "users", "id");

    // The genuine batch is acceptable (applied, then rolled back), so the
    // refusals below are about corruption and nothing else.
    let mut conn = main.connect(DB);
    conn.execute("BEGIN").unwrap();
    conn.query(&push_sql(&genuine))
        .unwrap_or_else(|e| panic!("the genuine batch was refused: {e}"));
    let seen = conn
        .query_one(&format!("SELECT count(*) FROM users WHERE id > {b1}"))
        .unwrap();
    assert_eq!(seen.as_deref(), Some("50"), "the genuine batch applies its rows");
    conn.execute("ROLLBACK").unwrap();

    let mut flipped = genuine.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x5a;
    // A value changed with the structure intact: only the checksum tells.
    let mut altered_value = genuine.clone();
    let at = genuine
        .windows(7)
        .position(|w| w == b"User 25")
        .expect("the batch carries the text of user 25");
    altered_value[at] = b'X';
    let mut bad_length = genuine.clone();
    bad_length[5] ^= 0x01;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("one byte flipped in the middle", flipped),
        ("one character of a value changed", altered_value),
        ("truncated to half", genuine[..genuine.len() / 2].to_vec()),
        ("truncated by one byte", genuine[..genuine.len() - 1].to_vec()),
        ("length field altered", bad_length),
        ("random garbage", pseudo_random_bytes(genuine.len(), 0x5eed)),
        ("garbage with a valid frame and checksum", framed(&pseudo_random_bytes(4000, 0xbad))),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in &cases {
        let error = main
            .connect(DB)
            .query(&push_sql(bytes))
            .expect_err(&format!("a batch {what} was accepted"));
        assert!(
            error.contains("refused a batch"),
            "batch {what}: error does not say the batch was refused: {error}"
        );
    }
    assert_eq!(main.dump_table(DB, "users", "id"), users_before, "main's users changed");
    assert_eq!(main.query(DB, state_sql), state_before, "main's position in branch1's stream changed");

    cluster.link(BRANCH1, MAIN).restore();
    converge(
        &cluster,
        &expected(&[("users", 50), ("pos_order", 2), ("pos_order_line", 6)]),
        CONVERGE,
    );
    assert_applied_exactly_once(&cluster, [0, 2, 0]);
}

/// wait_for_sync returns true only once the peers have what was committed before the call,
/// and false on timeout while a link is down.
#[test]
fn t9_wait_for_sync_waits_for_peers_and_times_out_on_a_cut_link() {
    let cluster = start_store("t9_wait_for_sync", Topology::Star);
    let b1 = cluster.node(BRANCH1);
    b1.sql(DB, &format!("INSERT INTO users VALUES ({}, 'w1', 'waited for')", base(BRANCH1) + 900));
    assert_eq!(b1.query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync', '30s')").as_deref(), Some("t"));
    // No waiting here: wait_for_sync already made sure main has it.
    assert_eq!(
        cluster.node(MAIN).query_one(DB, &format!("SELECT count(*) FROM users WHERE id = {}", base(BRANCH1) + 900)).as_deref(),
        Some("1")
    );
    cluster.link(BRANCH1, MAIN).cut();
    b1.sql(DB, &format!("INSERT INTO users VALUES ({}, 'w2', 'not yet')", base(BRANCH1) + 901));
    assert_eq!(b1.query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync', '2s')").as_deref(), Some("f"));
    cluster.link(BRANCH1, MAIN).restore();
    assert_eq!(b1.query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync', '60s')").as_deref(), Some("t"));
    assert_eq!(
        cluster.node(MAIN).query_one(DB, &format!("SELECT count(*) FROM users WHERE id = {}", base(BRANCH1) + 901)).as_deref(),
        Some("1")
    );
    // On the hub, whose stores connect to it: true once both fetched main's row and confirmed
    // it (a fetch that brings nothing writes its confirmation at once).
    let main = cluster.node(MAIN);
    main.sql(DB, &format!("INSERT INTO users VALUES ({}, 'w3', 'from the hub')", base(MAIN) + 902));
    assert_eq!(main.query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync', '30s')").as_deref(), Some("t"));
    for i in [BRANCH1, BRANCH2] {
        assert_eq!(
            cluster.node(i).query_one(DB, &format!("SELECT count(*) FROM users WHERE id = {}", base(MAIN) + 902)).as_deref(),
            Some("1"),
            "{}",
            NODE_NAMES[i]
        );
    }
    // In REPEATABLE READ it could only time out: refused, with a hint.
    let mut conn = main.connect(DB);
    let err = conn
        .query_one("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT rbucardo.wait_for_sync('store_sync', '2s')")
        .expect_err("wait_for_sync in REPEATABLE READ");
    assert!(err.contains("needs READ COMMITTED"), "{err}");
}

// ---------------------------------------------------------------------------
// 11. Tiered hubs: main <- hub <- store1, and main <- store2.

/// A regional hub between main and its stores: store1 reaches main only through the hub, store2
/// connects to main directly. Every node writes orders, the hub's link to main is cut for a
/// while in the middle; every order reaches every node once (three hops from store1 to
/// store2), and the tables end identical.
#[test]
fn t11_tiered_hubs_carry_every_order_three_hops_once() {
    const NAMES: [&str; 4] = ["main", "hub", "store1", "store2"];
    let (main, hub, store1, store2) = (0, 1, 2, 3);
    let cluster = Cluster::builder("t11_tiers").node_names(&NAMES).start();
    // Each node's peers: (peer, connects to it).
    let peers: [&[(usize, bool)]; 4] = [&[(hub, false), (store2, false)], &[(main, true), (store1, false)], &[(hub, true)], &[(main, true)]];
    for (i, mine) in peers.iter().enumerate() {
        let node = cluster.node(i);
        node.createdb(DB);
        node.sql(DB, SCHEMA);
        node.sql(DB, "CREATE EXTENSION rbucardo");
        node.sql(DB, &format!("SELECT rbucardo.init_node({}, {})", lit(NAMES[i]), i + 1));
        let mut dbs = vec![lit(NAMES[i])];
        for &(j, outbound) in mine.iter() {
            let conninfo = if outbound { lit(&cluster.link_conninfo(i, j, DB)) } else { "NULL".to_string() };
            node.sql(DB, &format!("SELECT rbucardo.add_db({}, {conninfo})", lit(NAMES[j])));
            dbs.push(lit(NAMES[j]));
        }
        node.sql(
            DB,
            &format!(
                "SELECT rbucardo.add_herd('store'); SELECT rbucardo.add_all_tables('store', 'public');
                 SELECT rbucardo.add_sync('store_sync', 'store', ARRAY[{}])",
                dbs.join(", ")
            ),
        );
    }
    // main lets the hub speak for the stores behind it (a peer speaks only for itself unless
    // allowed to relay).
    cluster.node(main).sql(DB, "SELECT rbucardo.set_peer_policy('hub', relay => true)");
    let per_node = 150;
    let write = |i: usize, from: i64, to: i64| {
        let mut conn = cluster.node(i).connect(DB);
        for n in from..to {
            let id = (i as i64 + 1) * 1_000_000 + n;
            conn.execute(&format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({id}, {}, {n}, {n})", lit(NAMES[i]))).unwrap();
        }
    };
    std::thread::scope(|s| {
        for i in 0..4 {
            s.spawn(move || write(i, 0, per_node / 2));
        }
    });
    cluster.link(hub, main).cut();
    std::thread::scope(|s| {
        for i in 0..4 {
            s.spawn(move || write(i, per_node / 2, per_node));
        }
    });
    cluster.link(hub, main).restore();
    let want = (per_node * 4).to_string();
    for i in 0..4 {
        wait_until(&format!("every order on {}", NAMES[i]), CONVERGE, || {
            let got = cluster.node(i).query_one(DB, "SELECT count(*) FROM pos_order").unwrap_or_default();
            if got == want { Ok(true) } else { Err(format!("{got} of {want}")) }
        });
    }
    cluster.assert_tables_equal(DB, "pos_order", "id", &[main, hub, store1, store2]);
    for i in 0..4 {
        // Once: a second apply of an order would have met it already there.
        let met = cluster.node(i).query_one(DB, "SELECT count(*) FROM rbucardo.conflict_counts WHERE tbl = 'public.pos_order'").unwrap_or_default();
        assert_eq!(met, "0", "{}: an order arrived twice", NAMES[i]);
    }
}

// ---------------------------------------------------------------------------
// 12. One batch writes the same few rows thousands of times.

/// A store offline for a while sends one batch in which a few rows change in nearly every
/// transaction: the applier finds such rows by where it last wrote them (src/apply/rows.rs,
/// `Recent`), not through their index. The batch also moves keys, deletes and re-inserts
/// them, truncates the table and rewrites it with a schema change: every node must end with
/// exactly the rows and sums the branch committed.
#[test]
fn t12_a_batch_that_rewrites_hot_rows_thousands_of_times_converges() {
    let cluster = start_store("t12_hot_rows", Topology::Star);
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_peer_policy('branch1', ddl => 'trusted')");
    let b = base(BRANCH1);
    let hot = |t: i64| b + 1 + t % 5;
    let mut txns = vec![format!("INSERT INTO cash_session SELECT {b} + i, 'branch1', 0 FROM generate_series(1, 5) i")];
    // What each key should hold at the end, kept alongside the statements.
    let mut amount: std::collections::BTreeMap<i64, i64> = (1..=5).map(|i| (b + i, 0)).collect();
    for t in 0..3000i64 {
        let id = hot(t);
        let mut txn = format!("BEGIN; UPDATE cash_session SET amount = amount + 1 WHERE id = {id};");
        *amount.get_mut(&id).unwrap() += 1;
        match t % 500 {
            // A key moves away and a new row takes it: the old key's row is found again only
            // through the index.
            100 => {
                let moved = b + 1000 + t;
                txn += &format!("UPDATE cash_session SET id = {moved} WHERE id = {id}; INSERT INTO cash_session VALUES ({id}, 'again', 7);");
                let was = amount.remove(&id).unwrap();
                amount.insert(moved, was);
                amount.insert(id, 7);
            }
            // Deleted and inserted again under the same key.
            200 => {
                txn += &format!("DELETE FROM cash_session WHERE id = {id}; INSERT INTO cash_session VALUES ({id}, 'reborn', 100);");
                amount.insert(id, 100);
            }
            _ => {}
        }
        txn += " COMMIT;";
        txns.push(txn);
        if t == 1200 {
            // A new file for the table: where earlier rows were written means nothing now.
            txns.push(format!("BEGIN; TRUNCATE cash_session; INSERT INTO cash_session SELECT {b} + i, 'after truncate', 10 FROM generate_series(1, 5) i; COMMIT;"));
            amount = (1..=5).map(|i| (b + i, 10)).collect();
        }
        if t == 2100 {
            txns.push("ALTER TABLE cash_session ALTER COLUMN amount TYPE numeric(14,2)".to_string());
        }
    }
    // Converged once with the link up, so the rest travels as one backlog.
    converge(&cluster, &expected(&[]), CONVERGE);
    cluster.link(BRANCH1, MAIN).cut();
    run_on(&cluster, BRANCH1, &txns);
    cluster.link(BRANCH1, MAIN).restore();
    converge(&cluster, &expected(&[("cash_session", amount.len() as i64)]), CONVERGE);
    let want: Vec<String> = amount.iter().map(|(id, a)| format!("{id}|{a}")).collect();
    for i in ALL {
        let got: Vec<String> = cluster.node(i).query(DB, "SELECT id || '|' || amount::int FROM cash_session ORDER BY id").into_iter().map(|r| r[0].clone().unwrap_or_default()).collect();
        assert_eq!(got, want, "{}: cash_session differs from what branch1 committed", NODE_NAMES[i]);
    }
}

/// Runs `sql` on main only: replica mode keeps its schema changes out of the stream.
fn local_on_main(cluster: &Cluster, sql: &str) {
    cluster.node(MAIN).sql(DB, &format!("SET session_replication_role = replica; {sql}"));
}

/// A table emptied by a local trigger in the middle of a batch: main's own `ENABLE ALWAYS`
/// trigger truncates cash_session while it applies branch1's backlog, right after the batch
/// truncated and refilled it (so PostgreSQL empties the same file in place). Where the batch
/// wrote those rows means nothing any more; the stream must go on, and what main forwards must
/// leave branch2 equal to branch1.
#[test]
fn t13_a_table_emptied_by_a_local_trigger_mid_batch_does_not_stop_the_stream() {
    let cluster = start_store("t13_trigger_truncate", Topology::Star);
    local_on_main(
        &cluster,
        "CREATE FUNCTION empty_cash() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.ref = -1 THEN TRUNCATE public.cash_session; END IF; RETURN NEW; END $$;
         CREATE TRIGGER empty_cash AFTER INSERT ON pos_order FOR EACH ROW EXECUTE FUNCTION empty_cash();
         ALTER TABLE pos_order ENABLE ALWAYS TRIGGER empty_cash;",
    );
    let b = base(BRANCH1);
    converge(&cluster, &expected(&[]), CONVERGE);
    cluster.link(BRANCH1, MAIN).cut();
    let mut txns = vec![format!("BEGIN; TRUNCATE cash_session; INSERT INTO cash_session SELECT {b} + i, 'branch1', 0 FROM generate_series(1, 500) i; COMMIT;")];
    txns.push(format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({b} + 1, 'branch1', -1, 0)"));
    for i in (1..=500).step_by(7) {
        txns.push(format!("UPDATE cash_session SET amount = amount + 1 WHERE id = {b} + {i}"));
    }
    txns.push(format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({b} + 2, 'branch1', 2, 0)"));
    run_on(&cluster, BRANCH1, &txns);
    cluster.link(BRANCH1, MAIN).restore();
    for i in [MAIN, BRANCH2] {
        wait_until(&format!("branch1's last order on {}", NODE_NAMES[i]), CONVERGE, || {
            let got = cluster.node(i).query_one(DB, &format!("SELECT count(*) FROM pos_order WHERE id = {b} + 2")).unwrap_or_default();
            if got == "1" { Ok(true) } else { Err(diagnostics(&cluster)) }
        });
    }
    cluster.assert_tables_equal(DB, "cash_session", "id", &[BRANCH1, BRANCH2]);
    cluster.assert_tables_equal(DB, "pos_order", "id", &ALL);
}

/// A trigger dropped by a local trigger in the middle of a batch: main's `ENABLE ALWAYS`
/// trigger on pos_order drops cash_session's `ENABLE ALWAYS` trigger `mark_cash` when an order
/// with ref -7 arrives. The apply keeps a table's executor state (with the triggers the table
/// had then) for a whole batch: the cash_session row after that order must not be marked on
/// main, as it would not be on a server that ran the same statements itself.
#[test]
fn t13c_a_trigger_dropped_mid_batch_fires_no_more() {
    let cluster = start_store("t13c_trigger_drop", Topology::Star);
    local_on_main(
        &cluster,
        "CREATE FUNCTION mark_cash() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.opened_by := 'marked'; RETURN NEW; END $$;
         CREATE TRIGGER mark_cash BEFORE INSERT ON cash_session FOR EACH ROW EXECUTE FUNCTION mark_cash();
         ALTER TABLE cash_session ENABLE ALWAYS TRIGGER mark_cash;
         CREATE FUNCTION unmark() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.ref = -7 THEN DROP TRIGGER mark_cash ON public.cash_session; END IF; RETURN NEW; END $$;
         CREATE TRIGGER unmark AFTER INSERT ON pos_order FOR EACH ROW EXECUTE FUNCTION unmark();
         ALTER TABLE pos_order ENABLE ALWAYS TRIGGER unmark;",
    );
    let b = base(BRANCH1);
    converge(&cluster, &expected(&[]), CONVERGE);
    cluster.link(BRANCH1, MAIN).cut();
    let txns = vec![
        format!("INSERT INTO cash_session VALUES ({b} + 1, 'branch1', 1)"),
        format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({b} + 1, 'branch1', -7, 0)"),
        format!("INSERT INTO cash_session VALUES ({b} + 2, 'branch1', 2)"),
        format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({b} + 2, 'branch1', 2, 0)"),
    ];
    run_on(&cluster, BRANCH1, &txns);
    cluster.link(BRANCH1, MAIN).restore();
    wait_until("branch1's last order on main", CONVERGE, || {
        let got = cluster.node(MAIN).query_one(DB, &format!("SELECT count(*) FROM pos_order WHERE id = {b} + 2")).unwrap_or_default();
        if got == "1" { Ok(true) } else { Err(diagnostics(&cluster)) }
    });
    let got: Vec<String> = cluster
        .node(MAIN)
        .query(DB, &format!("SELECT id - {b} || ':' || opened_by FROM cash_session WHERE id > {b} ORDER BY id"))
        .into_iter()
        .map(|r| r[0].clone().unwrap_or_default())
        .collect();
    assert_eq!(got, vec!["1:marked".to_string(), "2:branch1".to_string()], "main's cash_session: marked only before the trigger was dropped");
}

/// Reads `SELECT tick, seq ...` as a position.
fn position(node: &rbucardo_cluster_tests::Node, sql: &str) -> (i64, i64) {
    let row = node.query(DB, sql).into_iter().next().unwrap_or_else(|| panic!("{}: no row for {sql}", node.name()));
    let num = |i: usize| row[i].as_deref().and_then(|v| v.parse::<i64>().ok()).unwrap_or_else(|| panic!("{}: {sql} gave {row:?}", node.name()));
    (num(0), num(1))
}

/// A receiver that crashes right after it applied a push. Pushes commit without waiting for
/// their WAL to reach the disk (src/base/durable.rs), so a crash may take the last ones back;
/// the sender trims what the receiver confirmed, so the receiver must never have confirmed
/// them. Here main's WAL reaches the disk late (wal_writer_delay 10 s), and main serves only
/// branch1, so it cuts no tick (a synchronous commit) for a peer that would flush it sooner.
/// After every crash, what branch1 was told main has must still be there, and every user
/// branch1 inserted must reach main.
#[test]
fn t14_a_receiver_crash_takes_back_nothing_its_sender_was_told() {
    crash_after_push("t14_crash_unflushed", Topology::Star);
}

/// The same in a mesh, where main also pulls branch1's stream: its fetch confirms where main
/// stands in that stream, which branch1's unflushed pushes moved (the fetch flushes first).
/// Each round waits until branch1 was told main has the new user (a fetch tells it within a
/// pull interval) before main crashes. This checks that the mesh loses nothing through such
/// crashes; it rarely sees the flush missing, since main's worker cuts a tick (a durable
/// commit) a few milliseconds after the fetch, in the same round.
#[test]
fn t14b_in_a_mesh_a_fetch_confirms_only_what_is_on_disk() {
    crash_after_push("t14b_crash_mesh", Topology::Mesh);
}

fn crash_after_push(name: &str, topology: Topology) {
    let cluster = start_store_with(name, topology, "wal_writer_delay = '10s'");
    let (main, branch1) = (cluster.node(MAIN), cluster.node(BRANCH1));
    let pair = "SELECT rbucardo.remove_sync('store_sync');
                SELECT rbucardo.add_sync('store_sync', 'store', ARRAY['main', 'branch1']);
                SELECT rbucardo.remove_db('branch2');";
    main.sql(DB, pair);
    let branch2 = cluster.node(BRANCH2);
    branch2.sql(DB, "SELECT rbucardo.remove_sync('store_sync'); SELECT rbucardo.remove_db('main');");
    if topology == Topology::Mesh {
        branch1.sql(DB, pair);
        branch2.sql(DB, "SELECT rbucardo.remove_db('branch1');");
    }
    let b = base(BRANCH1);
    let rounds = 4;
    let told_sql = "SELECT out_tick, out_seq FROM rbucardo.peer_state WHERE db = 'main'";
    let has_sql = "SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = 'branch1'";
    for round in 1..=rounds {
        branch1.sql(DB, &format!("INSERT INTO users VALUES ({b} + {round}, 'crash_{round}', 'before crash {round}')"));
        wait_until(&format!("branch1's user {round} on main"), CONVERGE, || {
            Ok(main.query_one(DB, &format!("SELECT count(*) FROM users WHERE id = {b} + {round}")).as_deref() == Some("1"))
        });
        if topology == Topology::Mesh {
            let applied = position(main, has_sql);
            wait_until(&format!("branch1 told main has user {round}"), CONVERGE, || Ok(position(branch1, told_sql) >= applied));
        }
        main.kill9();
        let told = position(branch1, told_sql);
        main.start();
        let has = position(main, has_sql);
        assert!(
            told <= has,
            "round {round}: branch1 was told main has its stream up to {told:?}, but after the crash main has it only up to {has:?}: \
             branch1 may trim what main lost"
        );
    }
    wait_until("every user of branch1 on main", CONVERGE, || {
        let n = main.query_one(DB, &format!("SELECT count(*) FROM users WHERE id BETWEEN {b} + 1 AND {b} + {rounds}")).unwrap_or_default();
        if n == rounds.to_string() { Ok(true) } else { Err(format!("{n} of {rounds}; {}", diagnostics(&cluster))) }
    });
    cluster.assert_tables_equal(DB, "users", "id", &[MAIN, BRANCH1]);
}

/// A peer whose catalog has no peer_push_flushed (rbucardo 0.1, or a new library before
/// ALTER EXTENSION UPDATE) is pushed to with peer_push, which commits durably: the stream
/// goes on, and what main was told it has is confirmed.
#[test]
fn t15_a_peer_without_the_flushed_push_still_gets_the_stream() {
    let cluster = start_store("t15_old_push", Topology::Star);
    let (main, branch1) = (cluster.node(MAIN), cluster.node(BRANCH1));
    main.sql(DB, "ALTER EXTENSION rbucardo DROP FUNCTION rbucardo.peer_push_flushed(text, bytea);
                  DROP FUNCTION rbucardo.peer_push_flushed(text, bytea);");
    let b = base(BRANCH1);
    branch1.sql(DB, &format!("INSERT INTO users SELECT {b} + i, 'old_' || i, 'pushed with peer_push' FROM generate_series(1, 20) i"));
    wait_until("branch1's users on main", CONVERGE, || {
        let n = main.query_one(DB, &format!("SELECT count(*) FROM users WHERE id BETWEEN {b} + 1 AND {b} + 20")).unwrap_or_default();
        if n == "20" { Ok(true) } else { Err(format!("{n} of 20; {}", diagnostics(&cluster))) }
    });
    wait_until("main's confirmation of branch1's stream", CONVERGE, || {
        Ok(branch1.query_one(DB, "SELECT pending_out FROM rbucardo.status WHERE db = 'main'").as_deref() == Some("0"))
    });
    converge(&cluster, &expected(&[("users", 20)]), CONVERGE);
}
