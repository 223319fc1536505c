//! Off Bucardo: a real Bucardo 5 configuration (Debian's `bucardo` package, installed by
//! scripts/setup.sh with postgresql-plperl-15 and libdbd-pg-perl), made with the `bucardo`
//! command as an operator would, is imported with `rbucardo.import_bucardo`: first as a dry run
//! (the statements, nothing changed), then for real on both nodes, which then replicate the
//! imported tables both ways and nothing else. The Bucardo daemon is never started.
//!
//! Bucardo's setup: its configuration database `bucardo` on node 0 (`bucardo install --batch`),
//! dbs `shop_a` (node 0, database shop), `shop_b` (node 1, database shop) and `shop_c` (node 0,
//! database shop_c, a one-way target); relgroup `shop` (every table of schema public, and the
//! sequence `docno`); relgroup `audit` (schema audit); sync `shop_sync` = shop_a:source,
//! shop_b:source, shop_c:target with the database list `shop_b shop_a` as conflict strategy;
//! sync `audit_push` = shop_a:source, shop_c:target (one-way); table `public.notes` with its own
//! strategy `bucardo_abort`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::lit;
use rbucardo_cluster_tests::{wait_until, Cluster, Conn};

const DB: &str = "shop";
const T: Duration = Duration::from_secs(60);
const NAMES: [&str; 2] = ["shop_a", "shop_b"];

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2));
CREATE TABLE notes (id serial PRIMARY KEY, body text);
CREATE SEQUENCE docno;
CREATE SCHEMA audit;
CREATE TABLE audit.log (id int PRIMARY KEY, what text);
";

/// Fails with what to do when Bucardo or PL/Perl is missing: this test installs nothing.
fn require_bucardo() {
    let missing: Vec<&str> = [
        ("/usr/bin/bucardo", "bucardo"),
        ("/usr/share/bucardo/bucardo.schema", "bucardo"),
        ("/usr/lib/postgresql/15/lib/plperl.so", "postgresql-plperl-15"),
    ]
    .iter()
    .filter(|(path, _)| !Path::new(path).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    assert!(
        missing.is_empty(),
        "Bucardo is not installed (missing Debian packages: {}): run `bash scripts/setup.sh`, which installs bucardo, postgresql-plperl-15 and libdbd-pg-perl",
        missing.join(", ")
    );
}

/// The `bucardo` command against the configuration database on `port`, with its own HOME (its
/// install appends the new role's password to ~/.pgpass). Panics with its output on failure.
fn bucardo(home: &Path, port: u16, args: &[&str]) -> String {
    let port = port.to_string();
    let conn: [&str; 8] = ["--dbhost", "127.0.0.1", "--dbport", &port, "--dbuser", "bucardo", "--dbname", "bucardo"];
    let mut cmd = Command::new("/usr/bin/bucardo");
    if args.first() == Some(&"install") {
        cmd.args(["install", "--batch", "--dbhost", "127.0.0.1", "--dbport", &port, "--dbuser", "postgres", "--dbname", "postgres"]);
    } else {
        cmd.args(conn).args(args);
    }
    let out = cmd
        .env("HOME", home)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .current_dir(home)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bucardo: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bucardo {args:?} failed ({}):\n{text}", out.status);
    text
}

/// The rows of `import_bucardo` as (action, sql, note).
fn import(conn: &mut Conn, bucardo_conninfo: &str, dry_run: bool, this_db: &str) -> Vec<(String, Option<String>, String)> {
    let sql = format!(
        "SELECT action, sql, note FROM rbucardo.import_bucardo({}, {dry_run}, {}) ORDER BY step",
        lit(bucardo_conninfo),
        lit(this_db)
    );
    conn.query(&sql)
        .unwrap_or_else(|e| panic!("{this_db}: import failed: {e}"))
        .into_iter()
        .map(|r| (r[0].clone().unwrap_or_default(), r[1].clone(), r[2].clone().unwrap_or_default()))
        .collect()
}

fn statements(rows: &[(String, Option<String>, String)]) -> Vec<String> {
    rows.iter().filter_map(|r| r.1.clone()).collect()
}

fn skipped(rows: &[(String, Option<String>, String)]) -> Vec<String> {
    rows.iter().filter(|r| r.0 == "skipped").map(|r| r.2.clone()).collect()
}

#[test]
fn a_real_bucardo_configuration_imports_and_replicates_both_ways() {
    require_bucardo();
    let cluster = Cluster::start_named("bucardo_import", &NAMES);
    let (a, b) = (cluster.node(0), cluster.node(1));
    for node in [a, b] {
        node.createdb(DB);
        node.sql(DB, SCHEMA);
    }
    a.createdb("shop_c");
    a.sql("shop_c", SCHEMA);

    // Bucardo, as an operator sets it up (the daemon is never started).
    let home = cluster.dir().join("bucardo-home");
    std::fs::create_dir_all(&home).unwrap();
    let p0 = a.port();
    let out = bucardo(&home, p0, &["install"]);
    assert!(out.contains("Installation is now complete"), "{out}");
    let (pa, pb) = (a.port().to_string(), b.port().to_string());
    bucardo(&home, p0, &["add", "db", "shop_a", "dbname=shop", "host=127.0.0.1", &format!("port={pa}"), "user=postgres"]);
    bucardo(&home, p0, &["add", "db", "shop_b", "dbname=shop", "host=127.0.0.1", &format!("port={pb}"), "user=postgres", "conn=sslmode=disable"]);
    bucardo(&home, p0, &["add", "db", "shop_c", "dbname=shop_c", "host=127.0.0.1", &format!("port={pa}"), "user=postgres"]);
    bucardo(&home, p0, &["add", "all", "tables", "db=shop_a", "relgroup=shop", "--schema=public"]);
    bucardo(&home, p0, &["add", "sequence", "public.docno", "db=shop_a", "relgroup=shop"]);
    bucardo(&home, p0, &["add", "all", "tables", "db=shop_a", "relgroup=audit", "--schema=audit"]);
    bucardo(&home, p0, &["add", "sync", "shop_sync", "relgroup=shop", "dbs=shop_a:source,shop_b:source,shop_c:target"]);
    bucardo(&home, p0, &["add", "sync", "audit_push", "relgroup=audit", "dbs=shop_a:source,shop_c:target"]);
    bucardo(&home, p0, &["update", "sync", "shop_sync", "conflict_strategy=shop_b,shop_a"]);
    bucardo(&home, p0, &["update", "table", "public.notes", "conflict_strategy=bucardo_abort"]);
    let listed = bucardo(&home, p0, &["list", "syncs"]);
    assert!(listed.contains("shop_a:source shop_b:source shop_c:target"), "{listed}");
    let bconn = format!("host=127.0.0.1 port={p0} dbname=bucardo user=bucardo");

    for node in [a, b] {
        node.sql(DB, "CREATE EXTENSION rbucardo");
    }

    // Only a superuser may import.
    // (Given the schema, so that the function's own check answers.)
    a.sql(DB, "CREATE ROLE plain LOGIN; GRANT USAGE ON SCHEMA rbucardo TO plain");
    let mut plain = Conn::connect(&format!("host=127.0.0.1 port={p0} user=plain dbname={DB}")).unwrap();
    let err = plain.query(&format!("SELECT * FROM rbucardo.import_bucardo({})", lit(&bconn))).unwrap_err();
    assert!(err.contains("only a superuser may import"), "{err}");

    // Bad input: an unreachable server, a database that is not Bucardo's, an unknown db name.
    let mut ca = a.connect(DB);
    let err = ca.query("SELECT * FROM rbucardo.import_bucardo('host=127.0.0.1 port=1 dbname=bucardo connect_timeout=2', true, 'shop_a')").unwrap_err();
    assert!(err.contains("cannot reach the Bucardo database"), "{err}");
    let err = ca.query(&format!("SELECT * FROM rbucardo.import_bucardo({}, true, 'shop_a')", lit(&a.conninfo(DB)))).unwrap_err();
    assert!(err.contains("is not a Bucardo configuration database"), "{err}");
    let err = ca.query(&format!("SELECT * FROM rbucardo.import_bucardo({}, true, 'nowhere')", lit(&bconn))).unwrap_err();
    assert!(err.contains("Bucardo has no db named \"nowhere\""), "{err}");
    let err = ca.query(&format!("SELECT * FROM rbucardo.import_bucardo({})", lit(&bconn))).unwrap_err();
    assert!(err.contains("which of Bucardo's dbs is this node"), "{err}");

    // Dry run: the statements, and nothing changed.
    let dry = import(&mut ca, &bconn, true, "shop_a");
    let want_a = vec![
        "SELECT rbucardo.init_node('shop_a', 1)".to_string(),
        format!("SELECT rbucardo.add_db('shop_b', 'host=127.0.0.1 port={pb} dbname=shop sslmode=disable user=postgres')"),
        "SELECT rbucardo.set_peer_policy('shop_b', ddl => 'limited')".to_string(),
        "SELECT rbucardo.add_herd('shop')".to_string(),
        "SELECT rbucardo.add_table('shop', 'public.items'::regclass)".to_string(),
        "SELECT rbucardo.add_table('shop', 'public.notes'::regclass)".to_string(),
        "SELECT rbucardo.add_sequence('shop', 'public.docno'::regclass)".to_string(),
        "SELECT rbucardo.add_sync('shop_sync', 'shop', ARRAY['shop_a', 'shop_b'], 'shop_b,shop_a')".to_string(),
        "SELECT rbucardo.set_table_strategy('public.notes'::regclass, 'abort')".to_string(),
    ];
    assert_eq!(statements(&dry), want_a, "{dry:#?}");
    let notes = skipped(&dry);
    for expect in ["db shop_c:", "relgroup audit:", "sync audit_push: this node is its only source", "sync shop_sync: db shop_c left out: it is a target"] {
        assert!(notes.iter().any(|n| n.starts_with(expect)), "no skipped row starting {expect:?}: {notes:#?}");
    }
    assert_eq!(a.query_one(DB, "SELECT count(*) FROM rbucardo.node").as_deref(), Some("0"));
    assert_eq!(a.query_one(DB, "SELECT count(*) FROM rbucardo.db").as_deref(), Some("0"));
    assert_eq!(a.query_one(DB, "SELECT count(*) FROM rbucardo.herd").as_deref(), Some("0"));

    // All or nothing: in a database without the tables, the failing add_table undoes init_node
    // and add_db too.
    a.createdb("empty");
    a.sql("empty", "CREATE EXTENSION rbucardo");
    let mut ce = a.connect("empty");
    let err = ce.query(&format!("SELECT * FROM rbucardo.import_bucardo({}, false, 'shop_a')", lit(&bconn))).unwrap_err();
    assert!(err.contains("public.items"), "{err}");
    assert_eq!(a.query_one("empty", "SELECT (SELECT count(*) FROM rbucardo.node) + (SELECT count(*) FROM rbucardo.db)").as_deref(), Some("0"));
    let dry_empty = import(&mut ce, &bconn, true, "shop_a");
    assert!(dry_empty.iter().any(|r| r.0 == "add_table" && r.2.contains("does not exist on this node")), "{dry_empty:#?}");

    // For real, on both nodes; the rows returned are the statements run.
    let real_a = import(&mut ca, &bconn, false, "shop_a");
    assert_eq!(statements(&real_a), want_a);
    let mut cb = b.connect(DB);
    let real_b = import(&mut cb, &bconn, false, "shop_b");
    assert_eq!(
        statements(&real_b),
        vec![
            "SELECT rbucardo.init_node('shop_b', 2)".to_string(),
            format!("SELECT rbucardo.add_db('shop_a', 'host=127.0.0.1 port={pa} dbname=shop user=postgres')"),
            "SELECT rbucardo.set_peer_policy('shop_a', ddl => 'limited')".to_string(),
            "SELECT rbucardo.add_herd('shop')".to_string(),
            "SELECT rbucardo.add_table('shop', 'public.items'::regclass)".to_string(),
            "SELECT rbucardo.add_table('shop', 'public.notes'::regclass)".to_string(),
            "SELECT rbucardo.add_sequence('shop', 'public.docno'::regclass)".to_string(),
            "SELECT rbucardo.add_sync('shop_sync', 'shop', ARRAY['shop_a', 'shop_b'], 'shop_b,shop_a')".to_string(),
            "SELECT rbucardo.set_table_strategy('public.notes'::regclass, 'abort')".to_string(),
        ]
    );
    // shop_b is no member of audit_push at all.
    assert!(skipped(&real_b).iter().any(|n| n.starts_with("sync audit_push: this node (shop_b) is not one of its dbs")), "{real_b:#?}");

    // The catalog on each node says the same as Bucardo: same tables, same directions.
    for (i, node) in [a, b].into_iter().enumerate() {
        let me = NAMES[i];
        let other = NAMES[1 - i];
        assert_eq!(node.query_one(DB, "SELECT name || ':' || node_id FROM rbucardo.node"), Some(format!("{me}:{}", i + 1)));
        assert_eq!(node.query_one(DB, "SELECT string_agg(name, ',' ORDER BY name) FROM rbucardo.db"), Some(other.to_string()));
        assert_eq!(
            node.query_one(DB, "SELECT string_agg(herd || ':' || relid::regclass::text, ',' ORDER BY relid::regclass::text) FROM rbucardo.herd_table"),
            Some("shop:items,shop:notes".to_string())
        );
        assert_eq!(
            node.query_one(DB, "SELECT string_agg(name || ':' || herd || ':' || array_to_string(dbs, '+') || ':' || conflict_strategy || ':' || paused, ',') FROM rbucardo.sync"),
            Some("shop_sync:shop:shop_a+shop_b:shop_b,shop_a:false".to_string())
        );
        assert_eq!(
            node.query_one(DB, "SELECT string_agg(relid::regclass::text || ':' || strategy, ',') FROM rbucardo.table_option WHERE strategy IS NOT NULL"),
            Some("notes:abort".to_string())
        );
        assert_eq!(
            node.query_one(DB, "SELECT string_agg(sequence::text || ':' || strategy, ',' ORDER BY sequence::text) FROM rbucardo.sequences"),
            Some("docno:interleave,notes_id_seq:interleave".to_string())
        );
    }

    // The two nodes meet and replicate the imported tables both ways; audit.log stays local.
    for node in [a, b] {
        wait_until(&format!("{} to meet its peer", node.name()), T, || {
            let mut c = Conn::connect(&node.conninfo(DB))?;
            let rows = c.query("SELECT d.node_id IS NOT NULL, s.state, coalesce(s.last_error, '') FROM rbucardo.db d JOIN rbucardo.peer_state s ON s.db = d.name")?;
            if rows.len() == 1 && rows[0][0].as_deref() == Some("t") && rows[0][1].as_deref() == Some("connected") {
                Ok(true)
            } else {
                Err(format!("{rows:?}"))
            }
        });
    }
    a.sql(DB, "INSERT INTO audit.log VALUES (1, 'local only'); INSERT INTO items VALUES (1, 'from a', 1.50)");
    b.sql(DB, "INSERT INTO items VALUES (2, 'from b', 2.50); INSERT INTO notes (body) VALUES ('note from b')");
    for (node, want) in [(a, "1:from a,2:from b"), (b, "1:from a,2:from b")] {
        wait_until(&format!("items on {}", node.name()), T, || {
            let got = Conn::connect(&node.conninfo(DB))?.query_one("SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM items")?;
            if got.as_deref() == Some(want) { Ok(true) } else { Err(format!("{got:?}")) }
        });
    }
    wait_until("note from b on shop_a", T, || {
        let got = Conn::connect(&a.conninfo(DB))?.query_one("SELECT count(*) FROM notes WHERE body = 'note from b'")?;
        if got.as_deref() == Some("1") { Ok(true) } else { Err(format!("{got:?}")) }
    });
    assert_eq!(b.query_one(DB, "SELECT count(*) FROM audit.log").as_deref(), Some("0"), "audit.log is in no imported sync");

    // Importing again finds the node, peer, herd and sync in place and keeps them.
    let again = import(&mut ca, &bconn, true, "shop_a");
    assert!(
        statements(&again).iter().all(|s| !["init_node", "add_db", "add_herd", "add_sync"].iter().any(|f| s.contains(f))),
        "{again:#?}"
    );
    assert_eq!(again.iter().filter(|r| r.0 == "exists").count(), 4, "{again:#?}");
}
