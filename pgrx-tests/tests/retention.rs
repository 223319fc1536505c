//! Retention: a peer away longer than rbucardo.peer_retention stops holding the change log
//! back; when it returns it is told it must rejoin, and never receives a stream with a hole,
//! while what it made meanwhile still comes in.

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

fn set_retention(cluster: &Cluster, i: usize, value: &str) {
    cluster.node(i).sql("postgres", &format!("ALTER SYSTEM SET rbucardo.peer_retention = '{value}'"));
    cluster.node(i).sql("postgres", "SELECT pg_reload_conf()");
    wait_for(cluster, i, "the retention in effect", "SHOW rbucardo.peer_retention", value);
}

#[test]
fn a_peer_away_past_retention_expires_and_must_rejoin() {
    let cluster = start_store("retention_expire", Topology::Star);
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (81, 'held', 1, 1)");
    // Warned well before: past half the retention, main's row in the cluster view says so.
    set_retention(&cluster, MAIN, "16s");
    wait_until("the warning", T, || {
        let a = one(&cluster, MAIN, "SELECT coalesce(attention, '') FROM rbucardo.cluster WHERE node = 'main'");
        if a.contains("holds its log past half its retention for branch2 since ") { Ok(true) } else { Err(a) }
    });
    set_retention(&cluster, MAIN, "3s");
    wait_for(&cluster, MAIN, "branch2 expired", "SELECT state || ' ' || (last_error LIKE 'not in contact since % longer than rbucardo.peer_retention (00:00:03)%')::text FROM rbucardo.status WHERE db = 'branch2'", "expired true");
    // The log is trimmed without it (branch1 has everything).
    wait_for(&cluster, MAIN, "the log trimmed", "SELECT count(*) FROM rbucardo.change_log", "0");
    // branch1 carries on both ways.
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (83, 'after', 1, 1)");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (2000084, 'from branch1', 1, 1)");
    wait_for(&cluster, BRANCH1, "main's product on branch1", "SELECT count(*) FROM products WHERE id IN (81, 83)", "2");
    wait_for(&cluster, MAIN, "branch1's product on main", "SELECT count(*) FROM products WHERE id = 2000084", "1");
    // branch2 comes back: it is told to rejoin and gets nothing more from main, but what it
    // sold while away still reaches main.
    cluster.node(BRANCH2).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (3000082, 'from branch2', 1, 1)");
    cluster.link(BRANCH2, MAIN).restore();
    wait_until("branch2 told to rejoin", T, || {
        let e = one(&cluster, BRANCH2, "SELECT coalesce(last_error, '') FROM rbucardo.status WHERE db = 'main'");
        if e.contains("branch2 must rejoin") { Ok(true) } else { Err(e) }
    });
    wait_for(&cluster, MAIN, "branch2's sale on main", "SELECT count(*) FROM products WHERE id = 3000082", "1");
    wait_for(&cluster, BRANCH1, "branch2's sale on branch1", "SELECT count(*) FROM products WHERE id = 3000082", "1");
    assert_eq!(one(&cluster, BRANCH2, "SELECT count(*) FROM products WHERE id IN (81, 83, 2000084)"), "0", "no stream with a hole");
    assert_eq!(one(&cluster, MAIN, "SELECT state FROM rbucardo.status WHERE db = 'branch2'"), "expired");

    // branch2 rejoins online: its tables emptied without replicating that, copied from main,
    // and it is whole again, both ways.
    let tables: Vec<&str> = TABLES.iter().map(|(t, _)| *t).collect();
    cluster.node(BRANCH2).sql(DB, &format!("BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE {}; COMMIT;", tables.join(", ")));
    cluster.node(BRANCH2).sql(DB, "SELECT rbucardo.join('main')");
    wait_for(&cluster, BRANCH2, "the rejoin", "SELECT state FROM rbucardo.join_run", "done");
    wait_for(&cluster, MAIN, "branch2 no longer expired", "SELECT state FROM rbucardo.status WHERE db = 'branch2'", "connected");
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (85, 'after the rejoin', 1, 1)");
    cluster.node(BRANCH2).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (3000086, 'branch2 again', 1, 1)");
    wait_for(&cluster, BRANCH2, "main's product on branch2", "SELECT count(*) FROM products WHERE id = 85", "1");
    wait_for(&cluster, BRANCH1, "branch2's product on branch1", "SELECT count(*) FROM products WHERE id = 3000086", "1");
    assert!(cluster.node(MAIN).query_one(DB, "SELECT rbucardo.wait_for_sync('store_sync')").as_deref() == Some("t"));
    for (t, order) in TABLES {
        cluster.assert_tables_equal(DB, t, order, &ALL);
    }
}

#[test]
fn remove_db_frees_the_log_at_once() {
    let cluster = start_store("retention_remove", Topology::Star);
    cluster.link(BRANCH2, MAIN).cut();
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) SELECT 900 + i, 'held', 1, 1 FROM generate_series(1, 5) i");
    wait_for(&cluster, BRANCH1, "the products on branch1", "SELECT count(*) FROM products WHERE id BETWEEN 901 AND 905", "5");
    wait_for(&cluster, MAIN, "branch1 confirmed", "SELECT pending_out FROM rbucardo.status WHERE db = 'branch1'", "0");
    assert_eq!(one(&cluster, MAIN, "SELECT (count(*) > 0)::text FROM rbucardo.change_log"), "true", "held for branch2");
    let freed = one(
        &cluster,
        MAIN,
        "SELECT rbucardo.remove_sync('store_sync'); SELECT rbucardo.add_sync('store_sync', 'store', ARRAY['main', 'branch1']);
         SELECT rbucardo.remove_db('branch2'); SELECT count(*) FROM rbucardo.change_log",
    );
    assert_eq!(freed, "0");
}

/// A span a fetch listed is kept in shared memory for the next fetch of the same span
/// (src/log/spancache.rs); a trim past its start must make it unusable. Here the span holds
/// only branch1's own sale, which never goes back to branch1: served from a kept list, a
/// fetch from the trimmed position would get an empty batch and carry on past a hole, where
/// it must be told its position is gone. (Checked: with the floor test left out of the
/// cache, the last fetch is served.)
#[test]
fn a_fetch_from_a_trimmed_position_is_refused_even_when_its_span_was_kept() {
    let cluster = start_store("retention_kept_span", Topology::Star);
    let newest = "SELECT max(tick_id) FROM rbucardo.tick";
    // A trim has run (the housekeeper's, every 5 s), so main's floor is known to the cache.
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (91, 'first', 1, 1)");
    wait_for(&cluster, BRANCH2, "main's product on branch2", "SELECT count(*) FROM products WHERE id = 91", "1");
    wait_for(&cluster, MAIN, "the log trimmed", "SELECT count(*) FROM rbucardo.change_log", "0");
    // branch2 away: it holds main's log, so nothing after t0 is trimmed until it is back.
    cluster.link(BRANCH2, MAIN).cut();
    let t0: i64 = one(&cluster, MAIN, newest).parse().unwrap();
    // branch1 sells; main applies it in a tick after t0.
    cluster.node(BRANCH1).sql(DB, "INSERT INTO products (id, name, price, stock) VALUES (2000092, 'sold on branch1', 1, 1)");
    wait_for(&cluster, MAIN, "branch1's sale on main", "SELECT count(*) FROM products WHERE id = 2000092", "1");
    wait_until("the newest tick on main sees the sale", T, || {
        let seen = one(
            &cluster,
            MAIN,
            "SELECT count(*) > 0 AND bool_and(pg_visible_in_snapshot(l.txid, (SELECT snap FROM rbucardo.tick ORDER BY tick_id DESC LIMIT 1)))
               FROM rbucardo.change_log l",
        );
        if seen == "t" { Ok(true) } else { Err(seen) }
    });
    let t1: i64 = one(&cluster, MAIN, newest).parse().unwrap();
    assert!(t1 > t0, "a tick holds the sale on main");
    // A fetch as branch1 from t0 lists span (t0, t1] and keeps it: it holds nothing for
    // branch1, and the fetch cuts no tick (none is needed).
    let fetch_from_t0 = format!("SELECT length(rbucardo.peer_fetch('branch1', {t0}, {}, 1000000))", i64::MAX);
    let mut conn = cluster.node(MAIN).connect(DB);
    let empty = conn.query_one(&fetch_from_t0).expect("the fetch from t0, before the trim");
    assert_eq!(one(&cluster, MAIN, newest), t1.to_string(), "the fetch cut no tick");
    // branch2 back: both branches are past t1, and the next trims drop every tick before it.
    cluster.link(BRANCH2, MAIN).restore();
    wait_for(&cluster, BRANCH2, "branch1's sale on branch2", "SELECT count(*) FROM products WHERE id = 2000092", "1");
    wait_for(&cluster, MAIN, "tick t0 trimmed", &format!("SELECT count(*) FROM rbucardo.tick WHERE tick_id <= {t0}"), "0");
    assert_eq!(one(&cluster, MAIN, newest), t1.to_string(), "no tick since t1: the fetch asks for span (t0, t1] again");
    let err = conn.query_one(&fetch_from_t0).expect_err(&format!("a fetch from a trimmed position must fail (before the trim it got {empty:?} bytes)"));
    assert!(err.contains(&format!("stream position in tick {t0} is older than the change log")), "{err}");
}
