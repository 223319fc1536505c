//! Fault paths where nodes used to end up different without any error (issue "no silent
//! divergence"): each test reproduces one path deterministically and checks every node ends
//! with the same rows, and every sale counted once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster};

const T: Duration = Duration::from_secs(60);

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// Waits until `sql` gives `want` on every node in `nodes`.
fn wait_all(cluster: &Cluster, nodes: &[usize], what: &str, sql: &str, want: &str) {
    for &i in nodes {
        wait_until(what, T, || {
            let got = one(cluster, i, sql);
            if got == want {
                Ok(true)
            } else {
                Err(format!("{}: {sql} gives {got:?}, want {want:?}\n{}", NODE_NAMES[i], diagnostics(cluster)))
            }
        });
    }
}

fn delta_stock(cluster: &Cluster) {
    for i in ALL {
        cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')");
    }
}

/// A product's price and its stock change on main and on branch1 while they are apart. The
/// price goes to the later version (branch1's); both sales count on every node, whether column
/// merge is on or off. (The delta merge used to be dropped as soon as another column of the row
/// conflicted, so every node lost one sale.)
#[test]
fn a_sale_survives_a_price_conflict_with_and_without_column_merge() {
    let cluster = start_store("fault_delta_price", Topology::Star);
    delta_stock(&cluster);
    for (id, merge) in [(21, true), (22, false)] {
        if !merge {
            for i in ALL {
                cluster.node(i).sql(DB, "SELECT rbucardo.set_column_merge('products', false)");
            }
        }
        cluster.node(MAIN).sql(DB, &format!("INSERT INTO products (id, name, price, stock) VALUES ({id}, 'soap', 10.00, 100)"));
        wait_all(&cluster, &ALL, "product everywhere", &format!("SELECT count(*) FROM products WHERE id = {id}"), "1");
        cluster.link(BRANCH1, MAIN).cut();
        cluster.node(MAIN).sql(DB, &format!("UPDATE products SET price = 11.00, stock = stock - 1 WHERE id = {id}"));
        cluster.node(BRANCH1).sql(DB, &format!("UPDATE products SET price = 12.00, stock = stock - 1 WHERE id = {id}"));
        cluster.link(BRANCH1, MAIN).restore();
        let sql = format!("SELECT price || ' ' || stock FROM products WHERE id = {id}");
        wait_all(&cluster, &ALL, &format!("both sales and the later price (merge {merge})"), &sql, "12.00 98");
        // The price conflict is in the log: main's 11.00 lost, on main and on branch1.
        for i in [MAIN, BRANCH1] {
            let logged = one(&cluster, i, &format!("SELECT count(*) FROM rbucardo.conflicts WHERE key = '{{\"id\": \"{id}\"}}' AND kind = 'update_differs'"));
            assert_ne!(logged, "0", "{}: the price conflict is logged", NODE_NAMES[i]);
        }
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
}

/// A transaction from branch1 breaks a constraint only main has: main parks it and forwards it
/// to branch2 at once, under branch1's origin. When main applies it later, it is not forwarded
/// again, so branch1 does not apply its own sale a second time (it used to come back as a
/// change of main). While it is parked, an `exception_retry` inside an operator's transaction
/// leaves the rest of that transaction captured (it used to stay in replica mode).
#[test]
fn a_parked_transaction_is_applied_once_everywhere() {
    let cluster = start_store("fault_parked_once", Topology::Star);
    delta_stock(&cluster);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, stock) VALUES (31, 'milk', 100)");
    wait_all(&cluster, &ALL, "product everywhere", "SELECT count(*) FROM products WHERE id = 31", "1");
    cluster.node(MAIN).sql(DB, "SET rbucardo.replicate_ddl = off; ALTER TABLE pos_order_line ADD CONSTRAINT main_only CHECK (qty < 1000)");
    cluster.node(BRANCH1).sql(
        DB,
        "BEGIN;
         UPDATE products SET stock = stock - 5 WHERE id = 31;
         INSERT INTO pos_order (id, node) VALUES (2000100, 'branch1');
         INSERT INTO pos_order_line (id, order_id, product_id, qty) VALUES (2000100, 2000100, 31, 2000);
         COMMIT;",
    );
    wait_until("parked on main", T, || Ok(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL AND kind = 'constraint'") == "1"));
    let id = one(&cluster, MAIN, "SELECT id FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    // The operator reads the parked transaction as rows, not bytes.
    assert_eq!(
        one(&cluster, MAIN, &format!("SELECT string_agg(concat_ws(' ', tbl, op, key->>'id', new->>'qty', old->>'stock', new->>'stock'), '; ' ORDER BY ordinal) FROM rbucardo.exception_rows WHERE id = {id}")),
        "public.products update 31 100 95; public.pos_order insert 2000100; public.pos_order_line insert 2000100 2000",
        "the parked transaction as readable rows"
    );
    // Forwarded to branch2 while still parked on main.
    wait_all(&cluster, &[BRANCH2], "the parked sale on branch2", "SELECT stock FROM products WHERE id = 31", "95");
    assert_eq!(one(&cluster, MAIN, "SELECT stock FROM products WHERE id = 31"), "100", "not applied on main while parked");
    // The retry fails (the constraint is still there); what follows in the same transaction is
    // an ordinary local change and replicates.
    cluster.node(MAIN).sql(
        DB,
        &format!("BEGIN; SELECT rbucardo.exception_retry({id}); INSERT INTO users (id, login) VALUES (7, 'after_retry'); COMMIT;"),
    );
    wait_all(&cluster, &ALL, "a change made after exception_retry in its transaction", "SELECT count(*) FROM users WHERE id = 7", "1");
    // The blocker goes; the worker's retry applies it on main.
    cluster.node(MAIN).sql(DB, "SET rbucardo.replicate_ddl = off; ALTER TABLE pos_order_line DROP CONSTRAINT main_only");
    wait_until("applied on main", T, || Ok(one(&cluster, MAIN, &format!("SELECT resolution FROM rbucardo.exceptions WHERE id = {id}")) == "applied"));
    // A later change of main passes everything main would forward before it.
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login) VALUES (8, 'marker')");
    wait_all(&cluster, &ALL, "the marker", "SELECT count(*) FROM users WHERE id = 8", "1");
    wait_all(&cluster, &ALL, "the sale counted once", "SELECT stock FROM products WHERE id = 31", "95");
    for (table, key) in [("products", "id"), ("pos_order", "id"), ("pos_order_line", "id"), ("users", "id")] {
        cluster.assert_tables_equal(DB, table, key, &ALL);
    }
}

/// While branch1 is offline, main's only sync with it is removed (a sync with branch2 alone
/// remains) and later added again. main must not trim what branch1 has not confirmed meanwhile:
/// every peer holds the log until remove_db (it used to count only peers in a sync).
#[test]
fn a_sync_removed_and_added_again_while_a_branch_is_offline_loses_nothing() {
    let cluster = start_store("fault_sync_readded", Topology::Star);
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(
        DB,
        "SELECT rbucardo.add_sync('only_branch2', 'store', ARRAY['main', 'branch2']);
         SELECT rbucardo.remove_sync('store_sync');",
    );
    cluster.node(MAIN).sql(DB, "INSERT INTO bulk (id, tag, payload) SELECT g, 41, 'while apart' FROM generate_series(1000001, 1000200) g");
    // What main applies from branch2 meanwhile goes on to branch1 too: main keeps a copy for
    // it, although no sync with branch1 is left.
    cluster.node(BRANCH2).sql(DB, "INSERT INTO bulk (id, tag, payload) SELECT g, 42, 'from branch2' FROM generate_series(1000201, 1000300) g");
    wait_all(&cluster, &[BRANCH2], "branch2 has the rows", "SELECT count(*) FROM bulk WHERE tag = 41", "200");
    wait_all(&cluster, &[MAIN], "main has branch2's rows", "SELECT count(*) FROM bulk WHERE tag = 42", "100");
    // branch2 has confirmed them, so a trim that forgets branch1 would delete them now. The
    // worker trims every 5 s: watch for two trim periods that they stay (an absence cannot be
    // waited for).
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let logged = one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.change_log");
        assert_ne!(logged, "0", "main trimmed its change log past the offline branch1");
        std::thread::sleep(Duration::from_millis(500));
    }
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.add_sync('store_sync', 'store', ARRAY['main', 'branch1', 'branch2'])");
    cluster.link(BRANCH1, MAIN).restore();
    wait_all(&cluster, &[BRANCH1], "branch1 gets what was written while its sync was gone", "SELECT count(*) FROM bulk WHERE tag = 41", "200");
    wait_all(&cluster, &[BRANCH1], "branch1 gets what branch2 wrote meanwhile", "SELECT count(*) FROM bulk WHERE tag = 42", "100");
    cluster.assert_tables_equal(DB, "bulk", "id", &ALL);
}

/// main's sync with branch1 is paused (each branch has a sync of its own) while branch2
/// writes: main applies branch2's rows with no peer to forward them to at that moment, but
/// keeps them in its log for branch1, which gets them all when the sync resumes.
#[test]
fn a_paused_peer_gets_what_its_hub_applied_from_another_meanwhile() {
    let cluster = start_store("fault_paused_peer", Topology::Star);
    cluster.node(MAIN).sql(
        DB,
        "SELECT rbucardo.remove_sync('store_sync');
         SELECT rbucardo.add_sync('with_branch1', 'store', ARRAY['main', 'branch1']);
         SELECT rbucardo.add_sync('with_branch2', 'store', ARRAY['main', 'branch2']);
         SELECT rbucardo.pause_sync('with_branch1');",
    );
    cluster.node(BRANCH2).sql(DB, "INSERT INTO bulk (id, tag, payload) SELECT g, 43, 'while paused' FROM generate_series(1000301, 1000400) g");
    wait_all(&cluster, &[MAIN], "main has branch2's rows", "SELECT count(*) FROM bulk WHERE tag = 43", "100");
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM bulk WHERE tag = 43"), "0", "the sync is paused");
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.resume_sync('with_branch1')");
    wait_all(&cluster, &[BRANCH1], "branch1 gets branch2's rows", "SELECT count(*) FROM bulk WHERE tag = 43", "100");
    cluster.assert_tables_equal(DB, "bulk", "id", &ALL);
}

/// A session that prints bytea in the escape format changes another column of a row with a
/// bytea value: the peers compare the old image in one canonical form (hex), so this is no
/// conflict (it used to be one, logged as update_differs).
#[test]
fn bytea_images_compare_whatever_the_session_prints() {
    let cluster = start_store("fault_bytea", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, photo) VALUES (41, 'lamp', '\\x00ff41'::bytea)");
    wait_all(&cluster, &ALL, "product everywhere", "SELECT count(*) FROM products WHERE id = 41", "1");
    cluster.node(BRANCH1).sql(DB, "SET bytea_output = escape; UPDATE products SET name = 'lamp b1' WHERE id = 41");
    wait_all(&cluster, &ALL, "the new name", "SELECT name FROM products WHERE id = 41", "lamp b1");
    for i in ALL {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts"), "0", "{}: a false conflict was logged", NODE_NAMES[i]);
    }
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
}

/// branch1 has a local-only table that references a replicated one. main truncates the
/// replicated table: branch1 cannot TRUNCATE it without CASCADE (which would empty its local
/// table), so it deletes its rows instead, and the stream goes on (it used to stop for good).
#[test]
fn a_truncate_of_a_table_a_local_table_references_does_not_stop_the_stream() {
    let cluster = start_store("fault_truncate_local_fk", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO cash_session (id, opened_by) VALUES (1, 'ana'), (2, 'bob')");
    wait_all(&cluster, &ALL, "sessions everywhere", "SELECT count(*) FROM cash_session", "2");
    cluster.node(BRANCH1).sql(
        DB,
        "SET rbucardo.replicate_ddl = off;
         CREATE TABLE public.till_note (id int PRIMARY KEY, session_id int REFERENCES cash_session (id), note text);
         INSERT INTO till_note VALUES (1, 1, 'counted twice');",
    );
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM rbucardo.herd_table WHERE relid = 'public.till_note'::regclass"), "0", "the local table stays local");
    cluster.node(MAIN).sql(DB, "TRUNCATE cash_session");
    cluster.node(MAIN).sql(DB, "INSERT INTO cash_session (id, opened_by) VALUES (3, 'cleo')");
    wait_all(&cluster, &ALL, "the truncate and the row after it", "SELECT string_agg(id::text, ',') FROM cash_session", "3");
    assert_eq!(one(&cluster, BRANCH1, "SELECT note FROM till_note WHERE id = 1"), "counted twice", "the local table keeps its rows");
    cluster.assert_tables_equal(DB, "cash_session", "id", &ALL);
}

/// Under `latest`, a conflict on a column compares with the clock of the last change that set
/// that column here: branch1 changes a price, main changes it later, then branch1 sells one
/// (the stock only, later still). Every node ends with main's price and both sales (with a
/// clock per row, branch1's sale made its own older price look newer and each node kept its
/// own price; the randomized fault test found it).
#[test]
fn a_later_sale_does_not_make_an_older_price_win() {
    let cluster = start_store("fault_column_clock", Topology::Star);
    delta_stock(&cluster);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (51, 'tea', 1.00, 100)");
    wait_all(&cluster, &ALL, "product everywhere", "SELECT count(*) FROM products WHERE id = 51", "1");
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 3.00 WHERE id = 51");
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 2.00, stock = stock - 1 WHERE id = 51");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET stock = stock - 1 WHERE id = 51");
    cluster.link(BRANCH1, MAIN).restore();
    wait_all(&cluster, &ALL, "main's later price and both sales", "SELECT price || ' ' || stock FROM products WHERE id = 51", "2.00 98");
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
}


/// A transaction far larger than a batch travels in parts of about 8 MB. main keeps the parts
/// it has while branch1's link is cut, and keeps them through a crash; when the link is back,
/// branch1 goes on from there, and main applies the transaction whole, once, and forwards it
/// to branch2 in parts too, through a cut mid-fetch. Then an UPDATE of every row from main
/// travels the other way. (A transaction used to travel whole: one over 512 MB was refused by
/// every receiver, for good.)
#[test]
fn a_transaction_larger_than_a_batch_travels_in_parts() {
    use rbucardo_cluster_tests::Direction;
    let cluster = start_store("fault_big_txn", Topology::Star);
    let sum = "SELECT count(*) || ' ' || md5(string_agg(id || ' ' || tag || ' ' || payload, ',' ORDER BY id)) FROM bulk";
    // About 40 MB of change data in one transaction: 20,000 rows of 2 kB.
    cluster.link(BRANCH1, MAIN).cut_after_bytes(20 << 20, Direction::ClientToServer);
    cluster.node(BRANCH1).sql(DB, "INSERT INTO bulk (id, tag, payload) SELECT i, 1, repeat(md5(i::text), 64) FROM generate_series(1, 20000) i");
    let want = one(&cluster, BRANCH1, sum);
    assert!(want.starts_with("20000 "), "{want}");
    wait_until("main holds parts of the transaction", T, || {
        let parts = one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.incoming_part");
        if parts.parse::<i64>().unwrap_or(0) >= 2 { Ok(true) } else { Err(format!("{parts} parts; {}", diagnostics(&cluster))) }
    });
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM bulk"), "0", "nothing is applied before the last part");
    let held = one(&cluster, MAIN, "SELECT max(part_end) FROM rbucardo.incoming_part");
    cluster.node(MAIN).kill9();
    cluster.node(MAIN).start();
    assert_eq!(one(&cluster, MAIN, "SELECT max(part_end) FROM rbucardo.incoming_part"), held, "the parts survive a crash");
    let pushed = cluster.link(BRANCH1, MAIN).bytes_forwarded(Direction::ClientToServer);
    cluster.link(BRANCH1, MAIN).restore();
    // branch2 fetches it from main in parts, through a cut in the middle.
    cluster.link(BRANCH2, MAIN).cut_after(12 << 20);
    wait_until("branch2's link cut mid-transaction", T, || Ok(one(&cluster, MAIN, "SELECT count(*) FROM bulk") == "20000"));
    cluster.link(BRANCH2, MAIN).restore();
    wait_all(&cluster, &ALL, "the whole transaction everywhere", sum, &want);
    // branch1 went on from the parts main held: it sent far less than the transaction again.
    let resent = cluster.link(BRANCH1, MAIN).bytes_forwarded(Direction::ClientToServer) - pushed;
    assert!(resent < 35 << 20, "branch1 sent {resent} bytes after the link came back: it started the transaction again");

    // An UPDATE of every row (old and new images: about 80 MB) from main to both branches.
    cluster.node(MAIN).sql(DB, "UPDATE bulk SET tag = 2, payload = upper(payload)");
    let want = one(&cluster, MAIN, sum);
    cluster.link(BRANCH1, MAIN).cut_after(30 << 20);
    wait_all(&cluster, &[BRANCH2], "the update on branch2", sum, &want);
    cluster.link(BRANCH1, MAIN).restore();
    wait_all(&cluster, &ALL, "the update everywhere", sum, &want);
    for i in ALL {
        // Applied once: a second apply would have met its own rows (insert_exists, identical).
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM rbucardo.conflict_counts WHERE tbl = 'public.bulk'"), "0", "{}", NODE_NAMES[i]);
        wait_all(&cluster, &[i], "no part left", "SELECT count(*) FROM rbucardo.incoming_part", "0");
    }
}

/// A backlog of about 2 MB each way, made while branch1 was cut off, arrives in apply
/// transactions of about 256 KB: branch1 applies what it pulls from main in slices of the
/// fetched batch, main what branch1 pushes in small batches. In one transaction, every update
/// of a hot row walked the versions the batch had made before (docs/performance.md). Every
/// node ends with every row and both hot rows' every sale.
#[test]
fn a_backlog_is_applied_in_bounded_transactions_and_converges() {
    let cluster = start_store("fault_slices", Topology::Star);
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, stock) VALUES (31, 'hot main', 10000), (32, 'hot branch1', 10000)");
    wait_all(&cluster, &ALL, "the hot rows everywhere", "SELECT count(*) FROM products WHERE id IN (31, 32)", "2");
    cluster.link(BRANCH1, MAIN).cut();
    for (node, tag, product) in [(MAIN, 3, 31), (BRANCH1, 4, 32)] {
        for t in 0..40 {
            let first = tag * 100_000 + t * 50;
            cluster.node(node).sql(
                DB,
                &format!(
                    "BEGIN;
                     INSERT INTO bulk (id, tag, payload) SELECT i, {tag}, repeat(md5(i::text), 32) FROM generate_series({first}, {first} + 49) i;
                     UPDATE products SET stock = stock - 1 WHERE id = {product};
                     COMMIT"
                ),
            );
        }
    }
    // Each side holds its own backlog only: what follows arrives by catching up.
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM bulk WHERE tag = 3"), "0");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM bulk WHERE tag = 4"), "0");
    cluster.link(BRANCH1, MAIN).restore();
    let sum = "SELECT count(*) || ' ' || md5(string_agg(id || ' ' || tag || ' ' || payload, ',' ORDER BY id)) FROM bulk";
    wait_all(&cluster, &ALL, "both backlogs everywhere", "SELECT count(*) FROM bulk", "4000");
    let want = one(&cluster, MAIN, sum);
    wait_all(&cluster, &ALL, "the same rows everywhere", sum, &want);
    wait_all(&cluster, &ALL, "every sale of both hot rows", "SELECT string_agg(id || ':' || stock, ' ' ORDER BY id) FROM products WHERE id IN (31, 32)", "31:9960 32:9960");
    // Transactions that applied each backlog where it arrived: one per 8 MB batch before. A
    // source transaction is about 52 KB: four fill 256 KB. A push fills more if the round trip
    // through the test's proxy measured more than about 13 ms when the link connected.
    for (node, tag, how, at_least, at_most) in [(BRANCH1, 3, "pulled from main", 4, 300), (MAIN, 4, "pushed by branch1", 2, 1000)] {
        let per_txn = one(&cluster, node, &format!("SELECT count(*) || ' ' || max(n) FROM (SELECT count(*) AS n FROM bulk WHERE tag = {tag} GROUP BY xmin::text) t"));
        let (txns, most) = per_txn.split_once(' ').map(|(a, b)| (a.parse::<i64>().unwrap(), b.parse::<i64>().unwrap())).unwrap();
        assert!(txns >= at_least && most <= at_most, "{}: the 2 MB {how} was applied in {txns} transaction(s), up to {most} rows in one", NODE_NAMES[node]);
    }
}

/// main takes transactions of at most 16 MB from its peers. branch1 makes one of about 40 MB,
/// then a small one. The stream from branch1 stops at the large one, visibly in main's status,
/// and nothing after it is applied (it is not skipped); once the limit is raised, both arrive.
#[test]
fn a_transaction_over_the_limit_stops_the_stream_visibly_until_it_is_raised() {
    let cluster = start_store("fault_txn_limit", Topology::Star);
    cluster.node(MAIN).sql("postgres", "ALTER SYSTEM SET rbucardo.max_transaction_mb = 16");
    cluster.node(MAIN).sql("postgres", "SELECT pg_reload_conf()");
    wait_all(&cluster, &[MAIN], "the limit in effect", "SHOW rbucardo.max_transaction_mb", "16MB");
    let sum = "SELECT count(*) || ' ' || md5(string_agg(id || ' ' || tag || ' ' || payload, ',' ORDER BY id)) FROM bulk";
    cluster.node(BRANCH1).sql(DB, "INSERT INTO bulk (id, tag, payload) SELECT i, 1, repeat(md5(i::text), 64) FROM generate_series(1, 20000) i");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000077, 'after-bulk', 'marker')");
    let want = one(&cluster, BRANCH1, sum);
    wait_until("main refuses the large transaction", T, || {
        let st = one(&cluster, MAIN, "SELECT state || ': ' || coalesce(last_error, '') FROM rbucardo.status WHERE db = 'branch1'");
        if st.starts_with("refused: ") && st.contains("rbucardo.max_transaction_mb (16 MB)") { Ok(true) } else { Err(st) }
    });
    for i in [MAIN, BRANCH2] {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM bulk"), "0", "{}: nothing of it", NODE_NAMES[i]);
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM users WHERE id = 2000077"), "0", "{}: nothing after it either", NODE_NAMES[i]);
    }
    cluster.node(MAIN).sql("postgres", "ALTER SYSTEM SET rbucardo.max_transaction_mb = 1024");
    cluster.node(MAIN).sql("postgres", "SELECT pg_reload_conf()");
    wait_all(&cluster, &ALL, "the large transaction everywhere", sum, &want);
    wait_all(&cluster, &ALL, "the marker everywhere", "SELECT count(*) FROM users WHERE id = 2000077", "1");
    wait_all(&cluster, &[MAIN], "main's status clear again", "SELECT state FROM rbucardo.status WHERE db = 'branch1'", "connected");
    for i in ALL {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM rbucardo.conflict_counts WHERE tbl = 'public.bulk'"), "0", "{}", NODE_NAMES[i]);
        wait_all(&cluster, &[i], "no part left", "SELECT count(*) FROM rbucardo.incoming_part", "0");
    }
}

/// A row whose key's JSON text is too long for `row_clock`'s index (hex with control
/// characters between, each escaped in six bytes: 2,574 bytes of key, about 2,950 of JSON)
/// keeps its clocks all the same, under a digest. Keeping them used to fail at every trim, so
/// no node's log emptied again.
#[test]
fn a_row_whose_key_is_too_long_to_index_keeps_its_clock_and_the_log_drains() {
    let cluster = start_store("fault_long_key", Topology::Star);
    cluster.node(MAIN).sql(DB, "CREATE TABLE long_keys (k text PRIMARY KEY, v int)");
    wait_all(&cluster, &ALL, "the table everywhere", "SELECT count(*) FROM pg_tables WHERE tablename = 'long_keys'", "1");
    let key = "(SELECT string_agg(md5(i::text) || chr(1 + i % 7), '' ORDER BY i) FROM generate_series(1, 78) i)";
    cluster.node(MAIN).sql(DB, &format!("INSERT INTO long_keys VALUES ({key}, 1)"));
    cluster.node(BRANCH1).sql(DB, "INSERT INTO long_keys VALUES ('short', 1)");
    wait_all(&cluster, &ALL, "both rows everywhere", "SELECT count(*) FROM long_keys", "2");
    // A later change to the long row, from a branch: applied on main and on branch2.
    cluster.node(BRANCH1).sql(DB, &format!("UPDATE long_keys SET v = 2 WHERE k = {key}"));
    wait_all(&cluster, &ALL, "the update everywhere", "SELECT sum(v) FROM long_keys", "3");
    wait_change_log_drained(&cluster, T);
    for i in ALL {
        assert_eq!(
            one(&cluster, i, "SELECT string_agg(CASE WHEN key LIKE 'sha256:%' THEN 'digest ' || length(key) ELSE key END || ' ' || col, ', ' ORDER BY key) FROM rbucardo.row_clock WHERE relid = 'long_keys'::regclass AND col = 'v'"),
            "digest 71 v",
            "{}: the long row's clock of v, kept under its digest",
            NODE_NAMES[i]
        );
    }
    cluster.assert_tables_equal(DB, "long_keys", "k", &ALL);
}
