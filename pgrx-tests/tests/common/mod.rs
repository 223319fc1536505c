//! Shared setup for the rbucardo scenario tests: a three-node store cluster
//! (main, branch1, branch2) with the same schema everywhere, wired as a star or
//! a full mesh through the harness's link proxies, plus workloads and the
//! convergence assertions every scenario ends with.
//!
//! Ids never collide between nodes: node `k` only uses ids in
//! `[base(k), base(k) + 1_000_000)` (collision-free sequences come later).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rbucardo_cluster_tests::{poll_every, wait_until, Cluster, Conn, Rows};

pub const DB: &str = "store";
pub const MAIN: usize = 0;
pub const BRANCH1: usize = 1;
pub const BRANCH2: usize = 2;
pub const NODE_NAMES: [&str; 3] = ["main", "branch1", "branch2"];
pub const ALL: [usize; 3] = [MAIN, BRANCH1, BRANCH2];

/// The application schema, created identically on every node before
/// `add_all_tables` (there is no DDL replication yet).
pub const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE users (
    id    int PRIMARY KEY,
    login text UNIQUE NOT NULL,
    name  text
);
CREATE TABLE products (
    id      int PRIMARY KEY,
    name    text,
    price   numeric(10,2),
    stock   int,
    active  boolean,
    weight  double precision,
    tags    text[],
    attrs   jsonb,
    photo   bytea,
    created timestamptz,
    sold_on date,
    sku     uuid,
    mood    mood
);
CREATE TABLE pos_order (
    id      int PRIMARY KEY,
    node    text NOT NULL,
    ref     int,
    total   numeric(12,2),
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pos_order_line (
    id         int PRIMARY KEY,
    order_id   int NOT NULL REFERENCES pos_order (id),
    product_id int,
    qty        int,
    note       text
);
-- Odoo-style many2many table: no primary key, a unique index on NOT NULL columns.
CREATE TABLE product_tag_rel (
    product_id int NOT NULL,
    tag_id     int NOT NULL,
    UNIQUE (product_id, tag_id)
);
-- Written by branch1 only (the TRUNCATE scenario).
CREATE TABLE cash_session (
    id        int PRIMARY KEY,
    opened_by text,
    amount    numeric(12,2)
);
-- Large rows tagged by the transaction that wrote them.
CREATE TABLE bulk (
    id      int PRIMARY KEY,
    tag     int NOT NULL,
    payload text
);
"#;

/// Every replicated table with the columns that order its dump.
pub const TABLES: &[(&str, &str)] = &[
    ("users", "id"),
    ("products", "id"),
    ("pos_order", "id"),
    ("pos_order_line", "id"),
    ("product_tag_rel", "product_id, tag_id"),
    ("cash_session", "id"),
    ("bulk", "id"),
];

/// First id of node `k`'s private id range.
pub fn base(k: usize) -> i64 {
    (k as i64 + 1) * 1_000_000
}

/// A SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// main knows both branches as passive peers; each branch connects to main.
    Star,
    /// every node connects to both others.
    Mesh,
}

/// The peers node `i` knows, with the conninfo it uses to reach them (`None`: passive).
fn peers_of(cluster: &Cluster, topology: Topology, i: usize) -> Vec<(usize, Option<String>)> {
    ALL.iter()
        .copied()
        .filter(|&j| j != i)
        .filter_map(|j| match topology {
            Topology::Mesh => Some((j, Some(cluster.link_conninfo(i, j, DB)))),
            Topology::Star if i == MAIN => Some((j, None)),
            Topology::Star if j == MAIN => Some((j, Some(cluster.link_conninfo(i, j, DB)))),
            Topology::Star => None,
        })
        .collect()
}

/// Starts main, branch1 and branch2 with the store schema, the extension, one
/// herd holding every table and one sync, wired as `topology`; returns once
/// every link has connected.
pub fn start_store(test: &str, topology: Topology) -> Cluster {
    start_store_with(test, topology, "")
}

/// `start_store` with extra postgresql.conf lines on every node.
pub fn start_store_with(test: &str, topology: Topology, extra_conf: &str) -> Cluster {
    let cluster = Cluster::builder(test)
        .node_names(&NODE_NAMES)
        .extra_conf(extra_conf)
        .start();
    set_up_store(&cluster, topology);
    cluster
}

/// `start_store` (a star) with a fourth node, `spare`, started but not set up: a store that
/// joins later.
pub fn start_store_with_spare(test: &str, spare: &str) -> Cluster {
    let cluster = Cluster::builder(test).node_names(&[NODE_NAMES[0], NODE_NAMES[1], NODE_NAMES[2], spare]).start();
    set_up_store(&cluster, Topology::Star);
    cluster
}

/// Sets up main, branch1 and branch2 of a started cluster, wired as `topology`, and waits
/// until every link has connected.
fn set_up_store(cluster: &Cluster, topology: Topology) {
    // Create every link proxy before the threads need them.
    let peers: Vec<_> = ALL.iter().map(|&i| peers_of(cluster, topology, i)).collect();
    std::thread::scope(|scope| {
        for (i, peers) in peers.iter().enumerate() {
            scope.spawn(move || setup_node(cluster, i, peers));
        }
    });
    wait_connected(cluster);
}

fn setup_node(cluster: &Cluster, i: usize, peers: &[(usize, Option<String>)]) {
    let node = cluster.node(i);
    node.createdb(DB);
    node.sql(DB, SCHEMA);
    node.sql(DB, "CREATE EXTENSION rbucardo");
    node.sql(
        DB,
        &format!(
            "SELECT rbucardo.init_node({}, {})",
            lit(NODE_NAMES[i]),
            i + 1
        ),
    );
    for (j, conninfo) in peers {
        let sql = match conninfo {
            Some(c) => format!("SELECT rbucardo.add_db({}, {})", lit(NODE_NAMES[*j]), lit(c)),
            None => format!("SELECT rbucardo.add_db({})", lit(NODE_NAMES[*j])),
        };
        node.sql(DB, &sql);
    }
    let mut dbs = vec![lit(NODE_NAMES[i])];
    dbs.extend(peers.iter().map(|(j, _)| lit(NODE_NAMES[*j])));
    node.sql(
        DB,
        &format!(
            "SELECT rbucardo.add_herd('store');
             SELECT rbucardo.add_all_tables('store', 'public');
             SELECT rbucardo.add_sync('store_sync', 'store', ARRAY[{}]);",
            dbs.join(", ")
        ),
    );
}

/// Waits until every node has met every one of its peers (node ids learned)
/// and sees them all as connected.
pub fn wait_connected(cluster: &Cluster) {
    for &i in &ALL {
        let node = cluster.node(i);
        wait_until(
            &format!("{} to be connected to all its peers", node.name()),
            Duration::from_secs(60),
            || {
                let mut conn = Conn::connect(&node.conninfo(DB))?;
                let rows = conn.query(
                    "SELECT d.name, d.node_id IS NOT NULL, s.state, coalesce(s.last_error, '')
                       FROM rbucardo.db d JOIN rbucardo.peer_state s ON s.db = d.name",
                )?;
                let ready = !rows.is_empty()
                    && rows.iter().all(|r| {
                        r[1].as_deref() == Some("t") && r[2].as_deref() == Some("connected")
                    });
                if ready {
                    Ok(true)
                } else {
                    Err(format!("peers: {rows:?}"))
                }
            },
        );
    }
}

/// A few persistent connections for polling, one per node, reopened after an
/// error (a node may be restarting).
pub struct Probe<'a> {
    cluster: &'a Cluster,
    conns: Vec<Option<Conn>>,
}

impl<'a> Probe<'a> {
    pub fn new(cluster: &'a Cluster) -> Probe<'a> {
        Probe {
            cluster,
            conns: cluster.nodes().iter().map(|_| None).collect(),
        }
    }

    pub fn query(&mut self, i: usize, sql: &str) -> Result<Rows, String> {
        let name = self.cluster.node(i).name().to_string();
        if self.conns[i].is_none() {
            let conn = Conn::connect(&self.cluster.node(i).conninfo(DB))
                .map_err(|e| format!("{name}: {e}"))?;
            self.conns[i] = Some(conn);
        }
        let result = self.conns[i].as_mut().unwrap().query(sql);
        if result.is_err() {
            self.conns[i] = None;
        }
        result.map_err(|e| format!("{name}: {e}\n(query: {})", abbreviate(sql)))
    }

    /// First column of the first row, as an integer (NULL or no row is 0).
    pub fn int(&mut self, i: usize, sql: &str) -> Result<i64, String> {
        let rows = self.query(i, sql)?;
        match rows.first().and_then(|r| r.first()).cloned().flatten() {
            None => Ok(0),
            Some(v) => v
                .parse()
                .map_err(|e| format!("{sql}: not an integer {v:?}: {e}")),
        }
    }
}

/// The start of a (possibly huge) SQL text, for messages.
pub fn abbreviate(sql: &str) -> String {
    let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.len() > 300 {
        let mut end = 300;
        while !flat.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &flat[..end])
    } else {
        flat
    }
}

/// Runs each node's list of transactions (one SQL text each) at the same time,
/// one thread and one connection per node.
pub fn run_concurrently(cluster: &Cluster, work: Vec<(usize, Vec<String>)>) {
    std::thread::scope(|scope| {
        for (i, txns) in work {
            let node = cluster.node(i);
            scope.spawn(move || {
                let mut conn = node.connect(DB);
                for sql in &txns {
                    if let Err(e) = conn.execute(sql) {
                        panic!("{}: workload transaction failed: {e}\n{}", node.name(), abbreviate(sql));
                    }
                }
            });
        }
    });
}

/// Runs transactions one after the other on one node.
pub fn run_on(cluster: &Cluster, i: usize, txns: &[String]) {
    run_concurrently(cluster, vec![(i, txns.to_vec())]);
}

/// Expected row count per table (tables not listed must be empty).
pub type Expected = BTreeMap<&'static str, i64>;

pub fn expected(counts: &[(&'static str, i64)]) -> Expected {
    let mut e: Expected = TABLES.iter().map(|(t, _)| (*t, 0)).collect();
    for (t, n) in counts {
        assert!(e.contains_key(t), "unknown table {t}");
        *e.get_mut(t).unwrap() += n;
    }
    e
}

fn counts_sql() -> String {
    let cols: Vec<String> = TABLES
        .iter()
        .map(|(t, _)| format!("(SELECT count(*) FROM {t})"))
        .collect();
    format!("SELECT {}", cols.join(", "))
}

fn counts(probe: &mut Probe, i: usize) -> Result<Expected, String> {
    let rows = probe.query(i, &counts_sql())?;
    let row = rows.first().ok_or("no row")?;
    Ok(TABLES
        .iter()
        .zip(row)
        .map(|((t, _), v)| (*t, v.as_deref().unwrap_or("0").parse().unwrap_or(-1)))
        .collect())
}

fn digest(probe: &mut Probe, i: usize, table: &str, key: &str) -> Result<String, String> {
    let sql = format!(
        "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY {key}), '')) FROM {table} t"
    );
    Ok(probe
        .query(i, &sql)?
        .first()
        .and_then(|r| r[0].clone())
        .unwrap_or_default())
}

/// One convergence check: every node has exactly the expected counts and the
/// same content digest for every table. `Err` describes what is still off.
fn converged(probe: &mut Probe, nodes: &[usize], want: &Expected) -> Result<bool, String> {
    let mut off = Vec::new();
    for &i in nodes {
        let have = counts(probe, i)?;
        if &have != want {
            let diff: Vec<String> = want
                .iter()
                .filter(|(t, n)| have.get(*t) != Some(n))
                .map(|(t, n)| format!("{t} {} (want {n})", have[t]))
                .collect();
            off.push(format!("{}: {}", NODE_NAMES[i], diff.join(", ")));
        }
    }
    if !off.is_empty() {
        return Err(format!("counts: {}", off.join("; ")));
    }
    for (table, key) in TABLES {
        let mut digests = Vec::new();
        for &i in nodes {
            digests.push(digest(probe, i, table, key)?);
        }
        if digests.iter().any(|d| d != &digests[0]) {
            return Err(format!("counts match but {table} differs: {digests:?}"));
        }
    }
    Ok(true)
}

/// Waits until every table holds the same rows on all three nodes, in the
/// numbers `want` says, then checks them row by row. Returns the time it took.
/// On timeout, panics with each node's replication state.
pub fn converge(cluster: &Cluster, want: &Expected, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut probe = Probe::new(cluster);
    if let Err(state) = poll_every(timeout, Duration::from_millis(250), || {
        converged(&mut probe, &ALL, want)
    }) {
        panic!(
            "no convergence within {timeout:?}: {state}\n{}",
            diagnostics(cluster)
        );
    }
    let took = start.elapsed();
    for (table, key) in TABLES {
        cluster.assert_tables_equal(DB, table, key, &ALL);
    }
    // These workloads never touch the same row on two nodes: a conflict here would mean the
    // applier misread its own data (old images compared in the wrong text form, duplicates).
    for i in ALL {
        let conflicts = cluster.node(i).query(DB, "SELECT kind || ' ' || tbl || ' ' || key::text FROM rbucardo.conflicts");
        assert!(conflicts.is_empty(), "{} logged conflicts for a workload without any: {conflicts:?}", NODE_NAMES[i]);
    }
    took
}

/// Each node's peer_state, change log size and origin progress, for failure messages.
pub fn diagnostics(cluster: &Cluster) -> String {
    let mut out = String::new();
    for node in cluster.nodes() {
        out += &format!("--- {} ---\n", node.name());
        let mut conn = match Conn::connect(&node.conninfo(DB)) {
            Ok(c) => c,
            Err(e) => {
                out += &format!("  cannot connect: {e}\n");
                continue;
            }
        };
        for sql in [
            "SELECT db, in_tick, in_seq, out_tick, out_seq, applied_in, state, last_error FROM rbucardo.peer_state ORDER BY db",
            "SELECT 'change_log rows', count(*), min(seq), max(seq) FROM rbucardo.change_log",
            "SELECT 'ticks', count(*), min(tick_id), max(tick_id) FROM rbucardo.tick",
            "SELECT 'origin_progress', origin, tick, seq FROM rbucardo.origin_progress ORDER BY origin",
            "SELECT 'activity', backend_type, application_name, state, left(query, 80) FROM pg_stat_activity WHERE datname = 'store' AND pid <> pg_backend_pid()",
        ] {
            match conn.query(sql) {
                Ok(rows) => {
                    for row in rows {
                        let cells: Vec<String> = row
                            .into_iter()
                            .map(|c| c.unwrap_or_else(|| "NULL".into()))
                            .collect();
                        out += &format!("  {}\n", cells.join(" | "));
                    }
                }
                Err(e) => out += &format!("  {sql}: {e}\n"),
            }
        }
    }
    out
}

/// Sum of `peer_state.applied_in` on node `i`: remote transactions applied there.
pub fn applied_txns(probe: &mut Probe, i: usize) -> Result<i64, String> {
    probe.int(i, "SELECT coalesce(sum(applied_in), 0) FROM rbucardo.peer_state")
}

/// Exactly once: node `i` applied exactly the transactions committed on the
/// other nodes, `committed[j]` being the number committed on node `j`. A
/// transaction applied twice (reaching a node by two paths) shows up here even
/// when upserts hide it in the table contents.
pub fn assert_applied_exactly_once(cluster: &Cluster, committed: [i64; 3]) {
    let mut probe = Probe::new(cluster);
    for &i in &ALL {
        let want: i64 = ALL.iter().filter(|&&j| j != i).map(|&j| committed[j]).sum();
        // The counter commits with the rows; still, a transaction whose effect
        // was already there (none in these workloads) could trail: wait for
        // the count to be reached, then require it not to be exceeded.
        let _ = poll_every(Duration::from_secs(30), Duration::from_millis(100), || {
            Ok(applied_txns(&mut probe, i)? >= want)
        });
        let got = applied_txns(&mut probe, i).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got,
            want,
            "{} applied {got} remote transactions, but the other nodes committed {want} \
             (committed per node: {committed:?})\n{}",
            NODE_NAMES[i],
            diagnostics(cluster)
        );
    }
}

/// Waits until `rbucardo.change_log` is empty on every node: every change was
/// confirmed by every peer and trimmed, and nothing keeps circulating.
pub fn wait_change_log_drained(cluster: &Cluster, timeout: Duration) {
    let mut probe = Probe::new(cluster);
    if let Err(state) = poll_every(timeout, Duration::from_millis(250), || {
        let mut left = Vec::new();
        for &i in &ALL {
            let n = probe.int(i, "SELECT count(*) FROM rbucardo.change_log")?;
            if n != 0 {
                left.push(format!("{}: {n}", NODE_NAMES[i]));
            }
        }
        if left.is_empty() {
            Ok(true)
        } else {
            Err(format!("change_log rows left: {}", left.join(", ")))
        }
    }) {
        panic!(
            "change_log did not drain within {timeout:?}: {state}\n{}",
            diagnostics(cluster)
        );
    }
}

/// The mixed application workload of node `k`: one SQL text per transaction,
/// each writing at least one row of a replicated table. Covers inserts,
/// updates, deletes, primary key changes, every value type, NULLs, a value
/// over 1 MB, several changes to one row in one transaction, a rolled-back
/// savepoint, and an order with its lines in one transaction.
pub fn mixed_workload(k: usize) -> Vec<String> {
    let b = base(k);
    let n = NODE_NAMES[k];
    let mut txns = vec![
        format!(
            "INSERT INTO users (id, login, name)
             SELECT {b} + i, 'n{k}_u' || i, 'User ' || i || ' of {n}' FROM generate_series(1, 200) i"
        ),
        format!(
            r#"INSERT INTO products (id, name, price, stock, active, weight, tags, attrs, photo, created, sold_on, sku, mood)
             SELECT {b} + i,
                    E'Prod\u00fcct \u00ab' || i || E'\u00bb ''quoted'' "dq" back\\slash tab\there\nnewline \u2603 {n}',
                    (i * 1.25 + 0.01)::numeric(10,2),
                    i * 3 - 150,
                    i % 2 = 0,
                    i / 7.0::float8,
                    ARRAY['t' || i, 'with,comma', 'with "quote"', NULL, '{{braces}}'],
                    jsonb_build_object('i', i, 'node', '{n}', 'nested', jsonb_build_object('a', ARRAY[1, 2, 3], 'n', NULL), 'txt', E'\u00e9"\\'),
                    decode(md5(i::text || '{n}'), 'hex') || '\x00ff00'::bytea,
                    timestamptz '2024-01-01 10:00:00+00' + i * interval '67 minutes 0.123456 seconds',
                    date '2024-02-29' + i,
                    md5(({b} + i)::text)::uuid,
                    (ARRAY['sad', 'ok', 'happy']::mood[])[i % 3 + 1]
               FROM generate_series(1, 100) i"#
        ),
        format!("INSERT INTO products (id) SELECT {b} + 100 + i FROM generate_series(1, 10) i"),
        // Over 1 MB: a 1.6 MB bytea and a 1.2 MB multi-byte text in one row.
        format!(
            "INSERT INTO products (id, name, photo, attrs)
             SELECT {b} + 200, repeat(E'\\u03a9{k}', 600000), decode(string_agg(md5(g::text || '{n}'), '' ORDER BY g), 'hex'),
                    jsonb_build_object('big', true)
               FROM generate_series(1, 100000) g"
        ),
    ];
    let mut orders: Vec<String> = (1..=50)
        .map(|o| {
            format!(
                "BEGIN;
                 INSERT INTO pos_order (id, node, ref, total) VALUES ({b} + {o}, '{n}', {o}, {o} * 10.5);
                 INSERT INTO pos_order_line (id, order_id, product_id, qty, note)
                 SELECT {b} + {o} * 10 + l, {b} + {o}, {b} + l, l, CASE WHEN l = 2 THEN NULL ELSE 'line ' || l END
                   FROM generate_series(1, 3) l;
                 COMMIT;"
            )
        })
        .collect();
    let changes = vec![
        format!("UPDATE users SET name = name || ' v2' WHERE id BETWEEN {b} + 1 AND {b} + 50"),
        format!(
            r#"UPDATE products SET price = price * 2, stock = stock - 1, active = NOT active, tags = tags || 'upd'::text,
                   attrs = attrs || '{{"upd": true}}', weight = weight / 3
             WHERE id BETWEEN {b} + 1 AND {b} + 20"#
        ),
        format!(
            "UPDATE products SET attrs = NULL, tags = NULL, photo = NULL, sku = NULL, mood = NULL
             WHERE id BETWEEN {b} + 21 AND {b} + 25"
        ),
        format!(
            "UPDATE products SET name = 'was null', mood = 'happy', created = '2000-01-01 00:00:00+00',
                   sold_on = 'infinity', price = 'NaN', weight = '-Infinity', tags = '{{}}', attrs = '[]'
             WHERE id = {b} + 101"
        ),
        format!("UPDATE products SET photo = photo || '\\x00ff'::bytea, name = name || '!' WHERE id = {b} + 200"),
        format!("DELETE FROM pos_order_line WHERE id IN (SELECT {b} + o * 10 + 3 FROM generate_series(1, 10) o)"),
        format!("DELETE FROM users WHERE id BETWEEN {b} + 181 AND {b} + 200"),
        // Primary key changes.
        format!("UPDATE users SET id = id + 500000 WHERE id BETWEEN {b} + 1 AND {b} + 5"),
        format!(
            "BEGIN;
             UPDATE users SET id = {b} + 600000 WHERE id = {b} + 10;
             INSERT INTO users VALUES ({b} + 10, 'n{k}_u10_new', 'reinserted under the old key');
             COMMIT;"
        ),
        format!("UPDATE pos_order_line SET id = id + 5000 WHERE order_id = {b} + 1"),
        // One row changed several times in one transaction.
        format!(
            "BEGIN;
             UPDATE users SET name = 'first' WHERE id = {b} + 20;
             UPDATE users SET name = 'second' WHERE id = {b} + 20;
             UPDATE users SET login = 'n{k}_renamed' WHERE id = {b} + 20;
             COMMIT;"
        ),
        format!(
            "BEGIN;
             INSERT INTO users VALUES ({b} + 400, 'n{k}_tmp', 'inserted and deleted');
             DELETE FROM users WHERE id = {b} + 400;
             INSERT INTO users VALUES ({b} + 401, 'n{k}_u401', 'kept');
             COMMIT;"
        ),
        // A rolled-back savepoint: its row must not travel.
        format!(
            "BEGIN;
             INSERT INTO users VALUES ({b} + 300, 'n{k}_u300', 'before savepoint');
             SAVEPOINT s;
             INSERT INTO users VALUES ({b} + 301, 'n{k}_u301', 'rolled back');
             ROLLBACK TO SAVEPOINT s;
             INSERT INTO users VALUES ({b} + 302, 'n{k}_u302', 'after savepoint');
             COMMIT;"
        ),
        format!("INSERT INTO product_tag_rel SELECT {b} + i, j FROM generate_series(1, 30) i, generate_series(1, 3) j"),
        format!("DELETE FROM product_tag_rel WHERE tag_id = 3 AND product_id > {b} AND product_id <= {b} + 10"),
        format!("UPDATE product_tag_rel SET tag_id = 5 WHERE product_id = {b} + 11 AND tag_id = 2"),
    ];
    // Interleave the changes with the orders so that all kinds of traffic mix.
    let mut rest = orders.split_off(10);
    txns.append(&mut orders);
    for (i, change) in changes.into_iter().enumerate() {
        txns.push(change);
        let take = rest.len().min(if i % 2 == 0 { 3 } else { 2 });
        txns.extend(rest.drain(..take));
    }
    txns.append(&mut rest);
    // An order deleted with its lines, once every order exists.
    txns.push(format!(
        "BEGIN;
         DELETE FROM pos_order_line WHERE order_id = {b} + 50;
         DELETE FROM pos_order WHERE id = {b} + 50;
         COMMIT;"
    ));
    txns
}

/// What one node's `mixed_workload` leaves in its id range.
pub const MIXED_ROWS: &[(&str, i64)] = &[
    ("users", 184),
    ("products", 111),
    ("pos_order", 49),
    ("pos_order_line", 137),
    ("product_tag_rel", 80),
];

/// Checks, on the node that ran it, that `mixed_workload(k)` left exactly
/// `MIXED_ROWS` in node k's id range (guards the test's own arithmetic).
pub fn assert_mixed_rows_on_writer(cluster: &Cluster, k: usize) {
    let b = base(k);
    let node = cluster.node(k);
    for (table, want) in MIXED_ROWS {
        let col = if *table == "product_tag_rel" { "product_id" } else { "id" };
        let got = node
            .query_one(
                DB,
                &format!("SELECT count(*) FROM {table} WHERE {col} >= {b} AND {col} < {b} + 1000000"),
            )
            .unwrap();
        assert_eq!(got, want.to_string(), "{}: {table} rows written by the workload", node.name());
    }
}

/// Counts of all three nodes' `mixed_workload`, plus `extra`.
pub fn mixed_expected(extra: &[(&'static str, i64)]) -> Expected {
    let mut counts: Vec<(&'static str, i64)> = MIXED_ROWS.iter().map(|(t, n)| (*t, n * 3)).collect();
    counts.extend_from_slice(extra);
    expected(&counts)
}

/// Number of active `peer_push` calls on node `i` (other than the probe's own query).
pub const ACTIVE_PUSHES: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE query LIKE '%peer_push%' AND state = 'active' AND pid <> pg_backend_pid()";

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string (as returned by `encode(.., 'hex')`).
pub fn from_hex(hex: &str) -> Vec<u8> {
    let hex = hex.trim();
    assert!(hex.len() % 2 == 0, "odd hex length");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// CRC-32 (IEEE 802.3), as crc32fast computes it, to forge well-framed batches.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Deterministic pseudo-random bytes (xorshift), for garbage batches.
pub fn pseudo_random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}
