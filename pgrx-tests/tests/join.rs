//! Online join: a fourth store joins a running three-node star from main while every node
//! writes, with its link cut in the middle of a table copy, and ends with every row equal on
//! all four nodes, nothing missed and nothing applied twice (delta columns would show a
//! change applied twice); a store without tables gets them from main's definitions.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster, Direction};

const BRANCH3: usize = 3;
const EVERY: [usize; 4] = [MAIN, BRANCH1, BRANCH2, BRANCH3];
const T: Duration = Duration::from_secs(180);
const BULK_ROWS: i64 = 20_000;

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

fn wait_for(cluster: &Cluster, i: usize, what: &str, sql: &str, want: &str) {
    wait_until(what, T, || {
        let got = one(cluster, i, sql);
        if got == want { Ok(true) } else { Err(format!("node {i}: {sql} gives {got:?}, want {want:?}")) }
    });
}

/// branch3 gets the extension and its identity, knows main, and main lists it in the sync.
fn prepare_branch3(cluster: &Cluster, with_schema: bool) {
    let n = cluster.node(BRANCH3);
    n.createdb(DB);
    if with_schema {
        n.sql(DB, SCHEMA);
    }
    n.sql(DB, "CREATE EXTENSION rbucardo");
    n.sql(DB, "SELECT rbucardo.init_node('branch3', 4)");
    n.sql(DB, &format!("SELECT rbucardo.add_db('main', {})", lit(&cluster.link_conninfo(BRANCH3, MAIN, DB))));
    let m = cluster.node(MAIN);
    m.sql(DB, "SELECT rbucardo.add_db('branch3')");
    m.sql(DB, "SELECT rbucardo.add_sync_db('store_sync', 'branch3')");
}

/// Each table's rows, hashed, on node `i`.
fn digest(cluster: &Cluster, i: usize, tables: &[(&str, &str)]) -> Vec<String> {
    tables
        .iter()
        .map(|(t, order)| one(cluster, i, &format!("SELECT count(*) || ' ' || coalesce(md5(string_agg(x::text, '|' ORDER BY {order})), '') FROM {t} x")))
        .collect()
}

fn wait_equal(cluster: &Cluster, tables: &[(&str, &str)]) {
    wait_until("every node to hold the same rows", T, || {
        let first = digest(cluster, MAIN, tables);
        for i in [BRANCH1, BRANCH2, BRANCH3] {
            let d = digest(cluster, i, tables);
            if d != first {
                return Err(format!("{:?} on main, {d:?} on node {i}", first));
            }
        }
        Ok(true)
    });
    for (t, order) in tables {
        cluster.assert_tables_equal(DB, t, order, &EVERY);
    }
}

/// One sale on node `k`: an order, a unit of stock, a tag on a bulk row (both delta columns).
fn sale(k: usize, i: i64) -> String {
    format!(
        "BEGIN;
         INSERT INTO pos_order (id, node, total) VALUES ({}, '{}', {i});
         UPDATE products SET stock = stock - 1 WHERE id = {};
         UPDATE bulk SET tag = tag + 1 WHERE id = {};
         COMMIT;",
        base(k) + i,
        ["main", "branch1", "branch2", "branch3"][k],
        1 + i % 5,
        (i * 7919 + k as i64 * 13) % BULK_ROWS + 1
    )
}

#[test]
fn a_store_joins_a_running_star_under_load_through_a_link_cut() {
    let cluster = start_store_with_spare("join_under_load", "branch3");
    // products belongs to an ordinary role: the copy writes it as that role, the join's own
    // bookkeeping as the worker.
    let owned_by_clerk = "CREATE ROLE clerk; BEGIN; SET LOCAL rbucardo.replicate_ddl = off; ALTER TABLE products OWNER TO clerk; COMMIT;";
    for i in ALL {
        cluster.node(i).sql(DB, owned_by_clerk);
        cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta'); SELECT rbucardo.set_column_strategy('bulk', 'tag', 'delta')");
    }
    cluster.node(MAIN).sql(
        DB,
        &format!(
            "INSERT INTO products (id, name, stock) SELECT g, 'p' || g, 1000 FROM generate_series(1, 5) g;
             INSERT INTO bulk (id, tag, payload) SELECT g, 0, repeat(md5(g::text), 30) FROM generate_series(1, {BULK_ROWS}) g;"
        ),
    );
    for i in [BRANCH1, BRANCH2] {
        wait_for(&cluster, i, "the bulk rows on the branches", "SELECT count(*) FROM bulk", &BULK_ROWS.to_string());
    }
    prepare_branch3(&cluster, true);
    cluster.node(BRANCH3).sql(DB, owned_by_clerk);
    cluster.node(BRANCH3).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta'); SELECT rbucardo.set_column_strategy('bulk', 'tag', 'delta')");

    let stop = AtomicBool::new(false);
    let committed = AtomicI64::new(0);
    std::thread::scope(|scope| {
        for k in ALL {
            let (cluster, stop, committed) = (&cluster, &stop, &committed);
            scope.spawn(move || {
                let mut conn = cluster.node(k).connect(DB);
                let mut i = 1;
                while !stop.load(Ordering::SeqCst) {
                    conn.execute(&sale(k, i)).unwrap_or_else(|e| panic!("sale on node {k}: {e}"));
                    committed.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(20)); // pace, not synchronisation
                }
            });
        }
        // The link from branch3 to main breaks after about 4 MB of the copies (the bulk table
        // alone is about 20 MB), while rows are being copied.
        let link = cluster.link(BRANCH3, MAIN);
        link.cut_after_bytes(link.bytes_forwarded(Direction::ServerToClient) + 4_000_000, Direction::ServerToClient);
        let said = one(&cluster, BRANCH3, "SELECT rbucardo.join('main')");
        assert!(said.starts_with("joining from main: 7 tables"), "{said}");
        wait_until("the copy to fail at the cut", T, || {
            let e = one(&cluster, BRANCH3, "SELECT coalesce(string_agg(last_error, '; '), '') FROM rbucardo.join_table");
            if e.is_empty() { Err("no failure yet".into()) } else { Ok(true) }
        });
        assert_eq!(one(&cluster, BRANCH3, "SELECT state FROM rbucardo.join_run"), "copying");
        link.restore();
        wait_for(&cluster, BRANCH3, "the join to finish", "SELECT state FROM rbucardo.join_run", "done");
        // Sales go on a little after the join, on branch3 too.
        let at = committed.load(Ordering::SeqCst);
        wait_until("more sales after the join", T, || if committed.load(Ordering::SeqCst) > at + 30 { Ok(true) } else { Err("waiting".into()) });
        cluster.node(BRANCH3).sql(DB, &(1..=5).map(|i| sale(BRANCH3, i)).collect::<String>());
        stop.store(true, Ordering::SeqCst);
    });
    let sales = committed.load(Ordering::SeqCst) + 5;

    wait_equal(&cluster, TABLES);
    // Every sale counted once everywhere: no change missed by a copy or applied again after it.
    for i in EVERY {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM pos_order"), sales.to_string(), "orders on node {i}");
        assert_eq!(one(&cluster, i, "SELECT sum(1000 - stock) FROM products"), sales.to_string(), "stock sold on node {i}");
        assert_eq!(one(&cluster, i, "SELECT sum(tag) FROM bulk"), sales.to_string(), "bulk tags on node {i}");
    }
    // The cut cost the table in progress one more copy; the view tells the story.
    let bulk = one(&cluster, BRANCH3, "SELECT state || ' ' || rows || ' ' || (attempts >= 2)::text || ' ' || (bytes > 0)::text FROM rbucardo.join_progress WHERE table_name = 'bulk'");
    assert_eq!(bulk, format!("copied {BULK_ROWS} true true"));
    assert_eq!(one(&cluster, BRANCH3, "SELECT count(*) FROM rbucardo.join_progress WHERE join_state = 'done' AND state = 'copied'"), "7");
    let log = std::fs::read_to_string(cluster.node(BRANCH3).log_path()).unwrap_or_default();
    assert!(log.contains("rbucardo: joining from main: copied public.bulk: 20000 rows"), "no copy report in branch3's log");
    assert!(log.contains("rbucardo: joined from main"), "no join report in branch3's log");
}

#[test]
fn a_store_without_tables_gets_them_from_the_provider() {
    let cluster = start_store_with_spare("join_schema", "branch3");
    cluster.node(MAIN).sql(DB, "CREATE TABLE receipt (id serial PRIMARY KEY, note text NOT NULL DEFAULT 'none', mood mood[])");
    for i in [BRANCH1, BRANCH2] {
        wait_for(&cluster, i, "the new table on the branches", "SELECT count(*) FROM rbucardo.herd_table WHERE relid = to_regclass('receipt')", "1");
    }
    cluster.node(MAIN).sql(
        DB,
        "INSERT INTO users VALUES (1, 'ana', 'Ana'), (2, 'bo', 'Bo');
         INSERT INTO products (id, name, price, tags, attrs, mood, created) VALUES (1, 'tea', 2.5, '{a,b}', '{\"x\": 1}', 'happy', '2026-01-02 03:04:05+00');
         INSERT INTO receipt (note, mood) SELECT 'r' || g, '{ok,sad}' FROM generate_series(1, 50) g;",
    );
    wait_for(&cluster, BRANCH1, "the receipts on branch1", "SELECT count(*) FROM receipt", "50");
    prepare_branch3(&cluster, false);
    // Without copy_schema, missing tables are named.
    let refused = cluster.node(BRANCH3).connect(DB).execute("SELECT rbucardo.join('main')").unwrap_err();
    assert!(refused.contains("tables missing here: public.bulk"), "{refused}");
    cluster.node(BRANCH3).sql(DB, "SELECT rbucardo.join('main', copy_schema => true)");
    wait_for(&cluster, BRANCH3, "the join to finish", "SELECT state FROM rbucardo.join_run", "done");
    let mut tables = TABLES.to_vec();
    tables.push(("receipt", "id"));
    wait_equal(&cluster, &tables);
    // Same definitions: keys, the foreign key, the enum, the default.
    assert_eq!(
        one(&cluster, BRANCH3, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'pos_order_line'::regclass AND contype IN ('p', 'f')"),
        "2"
    );
    assert_eq!(one(&cluster, BRANCH3, "SELECT enum_range(NULL::mood)::text"), "{sad,ok,happy}");
    // The serial was re-based past the copied rows, in branch3's own part of the values: a
    // receipt made there reaches every node without colliding.
    cluster.node(BRANCH3).sql(DB, "INSERT INTO receipt (note) VALUES ('from branch3')");
    let id = one(&cluster, BRANCH3, "SELECT id FROM receipt WHERE note = 'from branch3'");
    assert!(id.parse::<i64>().unwrap() > 50, "branch3's receipt got id {id}");
    for i in [MAIN, BRANCH1, BRANCH2] {
        wait_for(&cluster, i, "branch3's receipt", "SELECT count(*) FROM receipt", "51");
    }
    assert_eq!(one(&cluster, BRANCH3, "SELECT note FROM receipt WHERE id = 1"), "r1");
    // Changes after the join flow both ways.
    cluster.node(BRANCH1).sql(DB, "UPDATE users SET name = 'Ana B' WHERE id = 1");
    wait_for(&cluster, BRANCH3, "branch1's change on branch3", "SELECT name FROM users WHERE id = 1", "Ana B");
}

/// A schema change on the provider while the copies are made could leave a copy that the
/// replayed change gets wrong: the join refuses to end, visibly, and a new join succeeds.
#[test]
fn a_schema_change_during_the_join_is_refused_and_a_new_join_succeeds() {
    let cluster = start_store_with_spare("join_ddl", "branch3");
    cluster.node(MAIN).sql(DB, &format!("INSERT INTO bulk (id, tag, payload) SELECT g, 0, repeat(md5(g::text), 30) FROM generate_series(1, {BULK_ROWS}) g"));
    wait_for(&cluster, BRANCH1, "the bulk rows on branch1", "SELECT count(*) FROM bulk", &BULK_ROWS.to_string());
    prepare_branch3(&cluster, true);
    let link = cluster.link(BRANCH3, MAIN);
    link.cut_after_bytes(link.bytes_forwarded(Direction::ServerToClient) + 2_000_000, Direction::ServerToClient);
    cluster.node(BRANCH3).sql(DB, "SELECT rbucardo.join('main')");
    wait_until("the copy to stop at the cut", T, || {
        let e = one(&cluster, BRANCH3, "SELECT coalesce(string_agg(last_error, '; '), '') FROM rbucardo.join_table");
        if e.is_empty() { Err("no failure yet".into()) } else { Ok(true) }
    });
    cluster.node(MAIN).sql(DB, "CREATE INDEX users_name ON users (name)");
    link.restore();
    wait_until("the join to be refused", T, || {
        let e = one(&cluster, BRANCH3, "SELECT coalesce(string_agg(last_error, '; '), '') FROM rbucardo.join_progress");
        let s = one(&cluster, BRANCH3, "SELECT coalesce(last_error, '') FROM rbucardo.status WHERE db = 'main'");
        if s.contains("a schema change ran on the provider during the join: CREATE INDEX users_name ON users (name)") { Ok(true) } else { Err(format!("{e} / {s}")) }
    });
    assert_eq!(one(&cluster, BRANCH3, "SELECT state FROM rbucardo.join_run"), "copying");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.peer_state WHERE db = 'branch3' AND join_until IS NOT NULL"), "0");
    // Start again, the tables emptied without replicating that.
    let tables: Vec<&str> = TABLES.iter().map(|(t, _)| *t).collect();
    cluster.node(BRANCH3).sql(
        DB,
        &format!("DELETE FROM rbucardo.join_run; BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE {}; COMMIT;", tables.join(", ")),
    );
    cluster.node(BRANCH3).sql(DB, "SELECT rbucardo.join('main')");
    wait_for(&cluster, BRANCH3, "the second join", "SELECT state FROM rbucardo.join_run", "done");
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login) VALUES (9, 'zoe')");
    wait_for(&cluster, BRANCH3, "a change after the join", "SELECT login FROM users WHERE id = 9", "zoe");
    // Schema changes after the join replicate as usual.
    cluster.node(MAIN).sql(DB, "ALTER TABLE cash_session ADD COLUMN note text");
    wait_for(&cluster, BRANCH3, "the column on branch3", "SELECT count(*) FROM pg_attribute WHERE attrelid = 'cash_session'::regclass AND attname = 'note'", "1");
    wait_equal(&cluster, TABLES);
}
