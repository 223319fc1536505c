//! DDL replication (invariant 6) on three real nodes (main, branch1, branch2) in a
//! star: schema changes travel in the same ordered stream as the rows, new
//! tables join the herd and get node-disjoint sequences on every node, and
//! nothing needs a manual step.

mod common;

use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{poll_every, wait_until, Cluster};

const CONVERGE: Duration = Duration::from_secs(120);

/// Columns of every table of `public`, as one text per node.
const COLUMNS_SQL: &str = "SELECT string_agg(format('%s.%s %s %s %s', table_name, column_name, data_type,
                                  is_nullable, coalesce(column_default, '-')), E'\\n'
                           ORDER BY table_name, ordinal_position)
                      FROM information_schema.columns WHERE table_schema = 'public'";
const INDEXES_SQL: &str = "SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'";

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// Waits until `sql` gives the same answer on every node (and `want` on main, if given).
fn wait_same(cluster: &Cluster, what: &str, sql: &str) {
    let mut probe = Probe::new(cluster);
    if let Err(state) = poll_every(CONVERGE, Duration::from_millis(250), || {
        let mut answers = Vec::new();
        for i in ALL {
            let rows = probe.query(i, sql)?;
            answers.push(rows.first().and_then(|r| r[0].clone()).unwrap_or_default());
        }
        if answers.iter().all(|a| a == &answers[0]) {
            Ok(true)
        } else {
            Err(format!("{what} differs: {answers:#?}"))
        }
    }) {
        panic!("{state}\n{}", diagnostics(cluster));
    }
}

/// Waits until `table` holds `rows` rows on every node, then compares it row by row.
fn wait_table(cluster: &Cluster, table: &str, key: &str, rows: i64) {
    let mut probe = Probe::new(cluster);
    let sql = format!("SELECT count(*) FROM {table}");
    if let Err(state) = poll_every(CONVERGE, Duration::from_millis(250), || {
        let mut counts = Vec::new();
        for i in ALL {
            counts.push(probe.int(i, &sql)?);
        }
        if counts.iter().all(|&c| c == rows) {
            Ok(true)
        } else {
            Err(format!("{table}: {counts:?} rows (want {rows})"))
        }
    }) {
        panic!("{state}\n{}", diagnostics(cluster));
    }
    cluster.assert_tables_equal(DB, table, key, &ALL);
}

/// These tests let the branches change the schema too: main trusts their schema changes as it
/// trusts its own (the star's default runs none of them until main chooses a role; see
/// security.rs for what the default refuses).
fn start(test: &str) -> Cluster {
    let cluster = start_store(test, Topology::Star);
    cluster.node(MAIN).sql(DB, "SELECT rbucardo.set_peer_policy('branch1', ddl => 'trusted'); SELECT rbucardo.set_peer_policy('branch2', ddl => 'trusted');");
    cluster
}

fn assert_no_errors(cluster: &Cluster) {
    for i in ALL {
        let errors = cluster.node(i).query(DB, "SELECT db, last_error FROM rbucardo.peer_state WHERE last_error IS NOT NULL");
        assert!(errors.is_empty(), "{}: replication errors {errors:?}", NODE_NAMES[i]);
    }
}

// ---------------------------------------------------------------------------
// 1. A module install on main while both branches are offline and selling.

#[test]
fn d1_module_install_while_branches_are_offline_converges_without_manual_steps() {
    let cluster = start("d1_module_install");
    for k in ALL {
        let b = base(k);
        run_on(&cluster, k, &[format!(
            "INSERT INTO users SELECT {b} + i, 'u{k}_' || i, 'user' FROM generate_series(1, 20) i;
             INSERT INTO products (id, name, price) SELECT {b} + i, 'p' || i, i FROM generate_series(1, 20) i"
        )]);
    }
    wait_table(&cluster, "users", "id", 60);
    wait_table(&cluster, "products", "id", 60);

    cluster.link(BRANCH1, MAIN).cut();
    cluster.link(BRANCH2, MAIN).cut();

    // The module install: one transaction of separate statements, as an ORM runs it, with
    // rows written between the schema changes.
    let mut conn = cluster.node(MAIN).connect(DB);
    for sql in [
        "BEGIN",
        "CREATE TABLE loyalty_card (id serial PRIMARY KEY, code text NOT NULL UNIQUE,
                                    user_id int REFERENCES users (id))",
        "CREATE TABLE loyalty_point (id serial PRIMARY KEY,
                                     card_id int NOT NULL REFERENCES loyalty_card (id) ON DELETE CASCADE,
                                     points int NOT NULL DEFAULT 0)",
        "CREATE TABLE loyalty_reward (id serial PRIMARY KEY, card_id int NOT NULL REFERENCES loyalty_card (id),
                                      label text NOT NULL)",
        "CREATE SEQUENCE loyalty_code_seq",
        "INSERT INTO loyalty_card (code, user_id) SELECT 'main-' || i, 1000000 + i FROM generate_series(1, 5) i",
        "ALTER TABLE products ADD COLUMN barcode text DEFAULT 'none'",
        "CREATE INDEX products_barcode_idx ON products (barcode)",
        "UPDATE products SET barcode = 'main-' || id WHERE id <= 1000005",
        "INSERT INTO loyalty_point (card_id, points) SELECT id, 10 FROM loyalty_card",
        "INSERT INTO loyalty_reward (card_id, label) SELECT id, 'welcome ' || nextval('loyalty_code_seq') FROM loyalty_card",
        "COMMIT",
    ] {
        conn.execute(sql).unwrap_or_else(|e| panic!("main: {e}\n{sql}"));
    }
    // Meanwhile the branches keep selling on the old schema.
    for k in [BRANCH1, BRANCH2] {
        let b = base(k);
        run_on(&cluster, k, &[
            format!("INSERT INTO products (id, name, price) SELECT {b} + 100 + i, 'offline' || i, i FROM generate_series(1, 10) i"),
            format!("UPDATE products SET price = price + 1 WHERE id BETWEEN {b} + 1 AND {b} + 5"),
            format!("INSERT INTO users SELECT {b} + 100 + i, 'off{k}_' || i, 'offline' FROM generate_series(1, 5) i"),
        ]);
    }
    // Nothing reached the branches yet.
    for k in [BRANCH1, BRANCH2] {
        assert_eq!(one(&cluster, k, "SELECT count(*) FROM pg_class WHERE relname = 'loyalty_card'"), "0");
    }

    cluster.link(BRANCH1, MAIN).restore();
    cluster.link(BRANCH2, MAIN).restore();

    wait_same(&cluster, "columns", COLUMNS_SQL);
    wait_same(&cluster, "indexes", INDEXES_SQL);
    let columns = one(&cluster, MAIN, COLUMNS_SQL);
    assert!(columns.contains("products.barcode text YES 'none'::text"), "{columns}");
    assert!(columns.contains("loyalty_point.points integer NO 0"), "{columns}");
    wait_table(&cluster, "users", "id", 70);
    wait_table(&cluster, "products", "id", 80);
    wait_table(&cluster, "loyalty_card", "id", 5);
    wait_table(&cluster, "loyalty_point", "id", 5);
    wait_table(&cluster, "loyalty_reward", "id", 5);
    // Offline rows got the new column's default everywhere; main's updates arrived.
    for i in ALL {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM products WHERE barcode = 'none'"), "75", "{}", NODE_NAMES[i]);
    }
    // The new tables joined the herd on every node, their sequences are node-disjoint.
    for i in ALL {
        let herd = one(&cluster, i, "SELECT string_agg(relid::regclass::text, ',' ORDER BY relid::regclass::text)
                                       FROM rbucardo.herd_table WHERE relid::regclass::text LIKE 'loyalty%'");
        assert_eq!(herd, "loyalty_card,loyalty_point,loyalty_reward", "{}", NODE_NAMES[i]);
        let seqs = one(&cluster, i, "SELECT string_agg(sequence::text || ' ' || state, ',' ORDER BY sequence::text)
                                       FROM rbucardo.sequences WHERE sequence::text LIKE 'loyalty%'");
        assert_eq!(
            seqs,
            "loyalty_card_id_seq ok,loyalty_code_seq ok,loyalty_point_id_seq ok,loyalty_reward_id_seq ok",
            "{}",
            NODE_NAMES[i]
        );
    }
    assert_no_errors(&cluster);

    // Every node now writes into the new tables (default ids) and the new column.
    for k in ALL {
        let b = base(k);
        run_on(&cluster, k, &[
            format!(
                "INSERT INTO loyalty_card (code, user_id) SELECT '{}2-' || i, {b} + i FROM generate_series(1, 10) i",
                NODE_NAMES[k]
            ),
            format!(
                "INSERT INTO loyalty_point (card_id, points)
                 SELECT id, 5 FROM loyalty_card WHERE code LIKE '{}2-%'",
                NODE_NAMES[k]
            ),
            format!(
                "INSERT INTO loyalty_reward (card_id, label)
                 SELECT id, 'code ' || nextval('loyalty_code_seq') FROM loyalty_card WHERE code LIKE '{}2-%'",
                NODE_NAMES[k]
            ),
            format!("UPDATE products SET barcode = '{}-' || id WHERE id BETWEEN {b} + 101 AND {b} + 103", NODE_NAMES[k]),
        ]);
    }
    wait_table(&cluster, "loyalty_card", "id", 35);
    wait_table(&cluster, "loyalty_point", "id", 35);
    wait_table(&cluster, "loyalty_reward", "id", 35);
    // The standalone sequence handed out node-disjoint codes: no label twice.
    assert_eq!(one(&cluster, MAIN, "SELECT count(DISTINCT label) FROM loyalty_reward WHERE label LIKE 'code %'"), "30");
    wait_same(&cluster, "products", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM products p");
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    cluster.assert_tables_equal(DB, "users", "id", &ALL);
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM products WHERE barcode LIKE 'branch%'"), "6");
    assert_no_errors(&cluster);
}

// ---------------------------------------------------------------------------
// 2. One query string with several statements replicates once, in order.

#[test]
fn d2_multi_statement_query_string_replicates_once_and_in_order() {
    let cluster = start("d2_multi_statement");
    cluster.node(MAIN).sql(
        DB,
        "CREATE TABLE ms_a (id int PRIMARY KEY, v text);
         INSERT INTO ms_a VALUES (1, 'before the column');
         CREATE TABLE ms_b (id int PRIMARY KEY, a_id int REFERENCES ms_a);
         ALTER TABLE ms_a ADD COLUMN extra int DEFAULT 7;
         INSERT INTO ms_a VALUES (2, 'after the column', 8);
         INSERT INTO ms_b VALUES (1, 2)",
    );
    // Again, in an explicit transaction inside the string.
    cluster.node(MAIN).sql(
        DB,
        "BEGIN; ALTER TABLE ms_b ADD COLUMN note text; UPDATE ms_b SET note = 'noted'; CREATE INDEX ms_b_note ON ms_b (note); COMMIT;",
    );
    wait_same(&cluster, "columns", COLUMNS_SQL);
    wait_same(&cluster, "indexes", INDEXES_SQL);
    wait_table(&cluster, "ms_a", "id", 2);
    wait_table(&cluster, "ms_b", "id", 1);
    for i in ALL {
        assert_eq!(one(&cluster, i, "SELECT string_agg(format('%s %s', id, extra), ',' ORDER BY id) FROM ms_a"), "1 7,2 8");
        assert_eq!(one(&cluster, i, "SELECT note FROM ms_b"), "noted");
    }
    // A command applied twice would have failed ("already exists") and stopped the stream.
    assert_no_errors(&cluster);
    // Branch writes into the new tables come back.
    run_on(&cluster, BRANCH2, &["INSERT INTO ms_a (id, v) VALUES (3, 'from branch2')".to_string()]);
    wait_table(&cluster, "ms_a", "id", 3);

    // The other kinds of objects an ORM creates: types, functions, views, constraints,
    // comments; made on a branch this time.
    cluster.node(BRANCH1).sql(
        DB,
        "CREATE TYPE ms_state AS ENUM ('draft', 'done');
         ALTER TABLE ms_a ADD COLUMN state ms_state NOT NULL DEFAULT 'draft';
         ALTER TABLE ms_a ADD CONSTRAINT ms_a_extra_positive CHECK (extra > 0);
         CREATE FUNCTION ms_label(ms_a) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT $1.v || ' (' || $1.state || ')' $$;
         CREATE VIEW ms_a_labels AS SELECT id, ms_label(a) AS label FROM ms_a a;
         COMMENT ON TABLE ms_a IS 'made by d2';
         UPDATE ms_a SET state = 'done' WHERE id = 1",
    );
    let objects = "SELECT concat_ws('|',
            (SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'ms_state'::regtype),
            (SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint WHERE conrelid = 'ms_a'::regclass),
            obj_description('ms_a'::regclass, 'pg_class'),
            (SELECT string_agg(label, ',' ORDER BY id) FROM ms_a_labels))";
    for i in ALL {
        wait_until(&format!("new objects on {}", NODE_NAMES[i]), CONVERGE, || {
            let got = cluster.node(i).connect(DB).query_one(objects).map_err(|e| e.to_string())?.unwrap_or_default();
            let want = "draft,done|ms_a_extra_positive,ms_a_pkey|made by d2|before the column (done),after the column (draft),from branch2 (draft)";
            if got == want { Ok(true) } else { Err(got) }
        });
    }
    wait_same(&cluster, "columns", COLUMNS_SQL);
    assert_no_errors(&cluster);
}

// ---------------------------------------------------------------------------
// 3. DROP and RENAME replicate; temporary and local-only changes do not; a
//    replicated command that fails stops the stream, visibly, until fixed.

#[test]
fn d3_drop_rename_temp_local_only_and_failing_ddl() {
    let cluster = start("d3_drop_rename");
    cluster.node(MAIN).sql(
        DB,
        "CREATE TABLE r1 (id int PRIMARY KEY, v text);
         CREATE TABLE gone (id int PRIMARY KEY);
         INSERT INTO r1 VALUES (1, 'x');
         INSERT INTO gone VALUES (1)",
    );
    wait_table(&cluster, "r1", "id", 1);
    wait_table(&cluster, "gone", "id", 1);

    cluster.node(MAIN).sql(DB, "ALTER TABLE r1 RENAME TO renamed");
    cluster.node(MAIN).sql(DB, "ALTER TABLE renamed RENAME COLUMN v TO label");
    cluster.node(MAIN).sql(DB, "DROP TABLE gone");
    cluster.node(MAIN).sql(DB, "CREATE TEMP TABLE scratch (id int PRIMARY KEY); INSERT INTO scratch VALUES (1)");
    // Local only.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE TABLE branch_only (id int PRIMARY KEY)");
    cluster.node(MAIN).sql(DB, "INSERT INTO renamed VALUES (2, 'y')");
    wait_table(&cluster, "renamed", "id", 2);
    wait_same(&cluster, "renamed columns", "SELECT string_agg(column_name, ',' ORDER BY ordinal_position)
                                             FROM information_schema.columns WHERE table_name = 'renamed'");
    assert_eq!(one(&cluster, BRANCH2, "SELECT string_agg(column_name, ',' ORDER BY ordinal_position)
                                        FROM information_schema.columns WHERE table_name = 'renamed'"), "id,label");
    for i in ALL {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM pg_class WHERE relname IN ('gone', 'r1', 'scratch')"), "0", "{}", NODE_NAMES[i]);
        assert_eq!(
            one(&cluster, i, "SELECT count(*) FROM rbucardo.herd_table t LEFT JOIN pg_class c ON c.oid = t.relid WHERE c.oid IS NULL"),
            "0",
            "{}: dropped tables left in the herd",
            NODE_NAMES[i]
        );
    }
    for i in [MAIN, BRANCH2] {
        assert_eq!(one(&cluster, i, "SELECT count(*) FROM pg_class WHERE relname = 'branch_only'"), "0");
    }
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM rbucardo.herd_table WHERE relid::regclass::text = 'branch_only'"), "0");
    assert_no_errors(&cluster);

    // branch1 made a table of its own; main now creates one with the same name.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE TABLE clash (id int PRIMARY KEY, local text)");
    cluster.node(MAIN).sql(DB, "CREATE TABLE clash (id int PRIMARY KEY, v text); INSERT INTO clash VALUES (1, 'main')");
    cluster.node(MAIN).sql(DB, "INSERT INTO renamed VALUES (3, 'behind the clash')");
    wait_until("branch1 to report the failing DDL", CONVERGE, || {
        let err = one(&cluster, BRANCH1, "SELECT coalesce(last_error, '') FROM rbucardo.status WHERE db = 'main'");
        if err.contains("replicated DDL") && err.contains("CREATE TABLE clash") && err.contains("already exists") {
            Ok(true)
        } else {
            Err(format!("status of main on branch1: {err:?}"))
        }
    });
    // Nothing after it was applied on branch1; branch2 is not held up.
    wait_table_on(&cluster, BRANCH2, "renamed", 3);
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM renamed"), "2");
    // The fix: make room, and the stream resumes by itself.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; DROP TABLE clash");
    wait_table(&cluster, "renamed", "id", 3);
    wait_table(&cluster, "clash", "id", 1);
    wait_until("branch1's error to clear", CONVERGE, || {
        let err = one(&cluster, BRANCH1, "SELECT coalesce(last_error, '') FROM rbucardo.status WHERE db = 'main'");
        if err.is_empty() { Ok(true) } else { Err(err) }
    });

    // DDL outside the replicated schemas stays local, unless run through replicate_ddl().
    cluster.node(BRANCH2).sql(DB, "CREATE SCHEMA scratch_b2; CREATE TABLE scratch_b2.t (id int PRIMARY KEY)");
    cluster.node(BRANCH2).sql(
        DB,
        "SELECT rbucardo.replicate_ddl('CREATE SCHEMA reports; CREATE TABLE reports.daily (day date PRIMARY KEY, total numeric)')",
    );
    cluster.node(BRANCH2).sql(DB, "INSERT INTO renamed VALUES (4, 'after replicate_ddl')");
    wait_table(&cluster, "renamed", "id", 4);
    for i in ALL {
        let want = if i == BRANCH2 { "reports.daily,scratch_b2.t" } else { "reports.daily" };
        assert_eq!(
            one(&cluster, i, "SELECT string_agg(oid::regclass::text, ',' ORDER BY oid::regclass::text) FROM pg_class
                               WHERE relnamespace::regnamespace::text IN ('reports', 'scratch_b2') AND relkind = 'r'"),
            want,
            "{}",
            NODE_NAMES[i]
        );
    }
    let refused = cluster.node(MAIN).connect(DB).execute("SELECT rbucardo.replicate_ddl('SELECT 1')");
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("no schema change")), "{refused:?}");
    assert_no_errors(&cluster);
}

fn wait_table_on(cluster: &Cluster, i: usize, table: &str, rows: i64) {
    let sql = format!("SELECT count(*) FROM {table}");
    wait_until(&format!("{table} on {}", NODE_NAMES[i]), CONVERGE, || {
        let n: i64 = cluster.node(i).query_one(DB, &sql).and_then(|v| v.parse().ok()).unwrap_or(-1);
        if n == rows { Ok(true) } else { Err(format!("{n} rows")) }
    });
}

/// Polls `sql` on node `i` until it returns `want`.
fn wait_value(cluster: &Cluster, i: usize, what: &str, sql: &str, want: &str) {
    wait_until(&format!("{what} on {}", NODE_NAMES[i]), CONVERGE, || {
        let got = one(cluster, i, sql);
        if got == want { Ok(true) } else { Err(format!("{got:?}, want {want:?}")) }
    });
}

const OPEN_DDL_EXCEPTIONS: &str = "SELECT count(*) FROM rbucardo.exceptions WHERE kind = 'ddl' AND resolved_at IS NULL";

// ---------------------------------------------------------------------------
// 4. A DDL that cannot apply on a peer stops that stream, before any later row,
//    with a clear status; retry after a fix, or skip the command, resumes it.

#[test]
fn d4_failing_ddl_stops_the_stream_until_retried_or_skipped() {
    let cluster = start("d4_failing_ddl");
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price) SELECT 1000000 + i, 'p' || i, i FROM generate_series(1, 10) i");
    wait_table(&cluster, "products", "id", 10);
    // branch1 has a local report view on the price column: main's type change cannot run there.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE VIEW price_report AS SELECT id, price FROM products");
    let mut conn = cluster.node(MAIN).connect(DB);
    for sql in [
        "BEGIN",
        "INSERT INTO products (id, name, price) VALUES (1000011, 'before the change', 1)",
        "ALTER TABLE products ALTER COLUMN price TYPE numeric(12,3)",
        "INSERT INTO products (id, name, price) VALUES (1000012, 'after the change', 1.125)",
        "COMMIT",
    ] {
        conn.execute(sql).unwrap_or_else(|e| panic!("main: {e}\n{sql}"));
    }
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price) VALUES (1000013, 'a later transaction', 2)");
    // branch2 has it all; branch1 stopped at the schema change, with a clear status.
    wait_table_on(&cluster, BRANCH2, "products", 13);
    wait_value(&cluster, BRANCH1, "stopped stream", "SELECT state FROM rbucardo.status WHERE db = 'main'", "stopped");
    let status = one(&cluster, BRANCH1, "SELECT last_error FROM rbucardo.status WHERE db = 'main'");
    assert!(status.contains("ALTER TABLE products ALTER COLUMN price TYPE numeric(12,3)") && status.contains("price_report"), "{status}");
    let exception = one(&cluster, BRANCH1, "SELECT concat_ws('|', kind, origin, command) FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    assert_eq!(exception, "ddl|1|ALTER TABLE products ALTER COLUMN price TYPE numeric(12,3)");
    // Nothing of that transaction nor of any later one was applied on branch1 ...
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM products"), "10");
    // ... while branch1's own changes still reach everyone.
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users VALUES (2000001, 'b1', 'from the stopped branch')");
    wait_table_on(&cluster, MAIN, "users", 1);
    wait_table_on(&cluster, BRANCH2, "users", 1);
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM products"), "10");
    // Retrying without a fix fails again and changes nothing.
    let id = one(&cluster, BRANCH1, "SELECT id FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    assert_eq!(one(&cluster, BRANCH1, &format!("SELECT rbucardo.exception_retry({id})")), "f");
    assert_eq!(one(&cluster, BRANCH1, "SELECT count(*) FROM products"), "10");
    // A stopped schema change cannot be discarded (its rows would be lost).
    let refused = cluster.node(BRANCH1).connect(DB).execute(&format!("SELECT rbucardo.exception_discard({id})"));
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("cannot be discarded")), "{refused:?}");

    // The fix: drop the view; an operator's retry applies it at once, and the stream goes on.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; DROP VIEW price_report");
    // (The automatic retry every 5 s may get there first; then the exception is no longer open.)
    match cluster.node(BRANCH1).connect(DB).query_one(&format!("SELECT rbucardo.exception_retry({id})")) {
        Ok(answer) => assert_eq!(answer.as_deref(), Some("t")),
        Err(e) => assert!(e.contains(&format!("no open exception {id}")), "{e}"),
    }
    wait_table(&cluster, "products", "id", 13);
    wait_value(&cluster, BRANCH1, "resumed stream", "SELECT state FROM rbucardo.status WHERE db = 'main'", "connected");
    assert_eq!(one(&cluster, BRANCH1, &format!("SELECT resolution FROM rbucardo.exceptions WHERE id = {id}")), "applied");
    assert_eq!(one(&cluster, BRANCH1, "SELECT price FROM products WHERE id = 1000012"), "1.125");

    // Again, and this time the operator skips the command: the rows of its transaction apply,
    // the schemas differ (validate_schema says how) until fixed by hand.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE VIEW name_report AS SELECT id, name FROM products");
    cluster.node(MAIN).sql(DB, "ALTER TABLE products ALTER COLUMN name TYPE varchar(200); INSERT INTO products (id, name) VALUES (1000014, 'with the skip')");
    wait_table_on(&cluster, BRANCH2, "products", 14);
    wait_value(&cluster, BRANCH1, "second stop", OPEN_DDL_EXCEPTIONS, "1");
    let id = one(&cluster, BRANCH1, "SELECT id FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    let skipped = one(&cluster, BRANCH1, &format!("SELECT rbucardo.exception_skip({id})"));
    assert!(skipped.contains("skipped"), "{skipped}");
    wait_table(&cluster, "products", "id", 14);
    assert_eq!(one(&cluster, BRANCH1, &format!("SELECT resolution FROM rbucardo.exceptions WHERE id = {id}")), "skipped");
    let diff = "SELECT string_agg(concat_ws(' ', db, table_name, column_name, here, there), ',') FROM rbucardo.validate_schema('store_sync')";
    wait_value(&cluster, BRANCH1, "schema difference", diff, "main public.products name text character varying(200)");
    wait_value(&cluster, MAIN, "schema difference", diff, "branch1 public.products name character varying(200) text");
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; DROP VIEW name_report; ALTER TABLE products ALTER COLUMN name TYPE varchar(200)");
    for i in ALL {
        wait_value(&cluster, i, "schemas agree", &diff.replace("string_agg(concat_ws(' ', db, table_name, column_name, here, there), ',')", "count(*)"), "0");
    }
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET name = 'renamed on branch1' WHERE id = 1000014");
    wait_same(&cluster, "products", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM products p");
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    assert_no_errors(&cluster);
}

// ---------------------------------------------------------------------------
// 5. The same column added on two nodes while apart: identical schemas and data.

#[test]
fn d5_same_column_added_on_two_nodes_while_apart() {
    let cluster = start("d5_same_column");
    for k in ALL {
        let b = base(k);
        run_on(&cluster, k, &[format!("INSERT INTO products (id, name, price) SELECT {b} + i, 'p' || i, i FROM generate_series(1, 5) i")]);
    }
    wait_table(&cluster, "products", "id", 15);

    cluster.link(BRANCH1, MAIN).cut();
    for k in [MAIN, BRANCH1] {
        let b = base(k);
        run_on(&cluster, k, &[
            "ALTER TABLE products ADD COLUMN note text".to_string(),
            format!("UPDATE products SET note = '{}' WHERE id BETWEEN {b} + 1 AND {b} + 3", NODE_NAMES[k]),
        ]);
    }
    // branch2 writes the new column as soon as main's change reaches it.
    wait_value(&cluster, BRANCH2, "main's column", "SELECT count(*) FROM information_schema.columns WHERE table_name = 'products' AND column_name = 'note'", "1");
    run_on(&cluster, BRANCH2, &[format!("UPDATE products SET note = 'branch2' WHERE id = {} + 1", base(BRANCH2))]);
    cluster.link(BRANCH1, MAIN).restore();

    wait_same(&cluster, "columns", COLUMNS_SQL);
    wait_same(&cluster, "products", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM products p");
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    assert_eq!(one(&cluster, MAIN, "SELECT string_agg(DISTINCT note, ',' ORDER BY note) FROM products"), "branch1,branch2,main");
    assert_eq!(one(&cluster, MAIN, "SELECT count(note) FROM products"), "7");
    for i in ALL {
        assert_eq!(one(&cluster, i, OPEN_DDL_EXCEPTIONS), "0", "{}", NODE_NAMES[i]);
    }
    assert_no_errors(&cluster);

    // Now the same name with different types: both directions stop with the difference named,
    // validate_schema shows it, and a fix by hand plus a skip brings them together.
    cluster.link(BRANCH1, MAIN).cut();
    cluster.node(MAIN).sql(DB, "ALTER TABLE products ADD COLUMN size int");
    cluster.node(BRANCH1).sql(DB, "ALTER TABLE products ADD COLUMN size text");
    cluster.node(BRANCH1).sql(DB, &format!("UPDATE products SET size = '42' WHERE id = {} + 1", base(BRANCH1)));
    cluster.link(BRANCH1, MAIN).restore();
    for i in [MAIN, BRANCH1] {
        wait_value(&cluster, i, "stopped on the type clash", OPEN_DDL_EXCEPTIONS, "1");
        let reason = one(&cluster, i, "SELECT reason FROM rbucardo.exceptions WHERE resolved_at IS NULL");
        assert!(reason.contains("already exists") && reason.contains("differs") && reason.contains("size"), "{reason}");
    }
    let diff = "SELECT string_agg(concat_ws(' ', db, table_name, column_name, here, there), ',') FROM rbucardo.validate_schema('store_sync')";
    wait_value(&cluster, MAIN, "schema difference", diff, "branch1 public.products size integer text");
    // branch1 takes main's type; main skips branch1's command (its row then applies).
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; ALTER TABLE products ALTER COLUMN size TYPE int USING size::int");
    let id = one(&cluster, MAIN, "SELECT id FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    cluster.node(MAIN).sql(DB, &format!("SELECT rbucardo.exception_skip({id})"));
    for i in ALL {
        wait_value(&cluster, i, "no stopped stream", OPEN_DDL_EXCEPTIONS, "0");
    }
    wait_same(&cluster, "columns", COLUMNS_SQL);
    wait_same(&cluster, "products", "SELECT md5(string_agg(p::text, ',' ORDER BY id)) FROM products p");
    cluster.assert_tables_equal(DB, "products", "id", &ALL);
    assert_eq!(one(&cluster, BRANCH2, &format!("SELECT size FROM products WHERE id = {} + 1", base(BRANCH1))), "42");
    for i in ALL {
        wait_value(&cluster, i, "schemas agree", &diff.replace("string_agg(concat_ws(' ', db, table_name, column_name, here, there), ',')", "count(*)"), "0");
    }
    assert_no_errors(&cluster);
}

// ---------------------------------------------------------------------------
// 6. A replicated command runs on the peers as the role that ran it on its origin: objects
//    get the same owner, and a role missing on a peer stops that stream until it exists.

#[test]
fn d6_ddl_runs_as_its_author_on_every_node() {
    let cluster = start("d6_ddl_role");
    // Odoo's role exists on main and branch1 only; it may create tables in public.
    for i in [MAIN, BRANCH1] {
        cluster.node(i).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE ROLE odoo; GRANT CREATE, USAGE ON SCHEMA public TO odoo");
    }
    cluster.node(MAIN).sql(
        DB,
        "SET ROLE odoo;
         CREATE TABLE odoo_module (id serial PRIMARY KEY, name text NOT NULL);
         INSERT INTO odoo_module (name) VALUES ('point_of_sale')",
    );
    let owner = "SELECT tableowner FROM pg_tables WHERE tablename = 'odoo_module'";
    wait_value(&cluster, BRANCH1, "odoo's table", owner, "odoo");
    wait_table_on(&cluster, BRANCH1, "odoo_module", 1);
    assert_eq!(one(&cluster, MAIN, owner), "odoo");
    // branch2 has no such role: its stream from main stops there, naming the role.
    wait_value(&cluster, BRANCH2, "stopped stream", "SELECT state FROM rbucardo.status WHERE db = 'main'", "stopped");
    let reason = one(&cluster, BRANCH2, "SELECT reason FROM rbucardo.exceptions WHERE resolved_at IS NULL");
    assert!(reason.contains("role \"odoo\"") && reason.contains("does not exist here"), "{reason}");
    assert_eq!(one(&cluster, BRANCH2, "SELECT count(*) FROM pg_tables WHERE tablename = 'odoo_module'"), "0");
    // Creating the role is the fix; the automatic retry picks it up.
    cluster.node(BRANCH2).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE ROLE odoo; GRANT CREATE, USAGE ON SCHEMA public TO odoo");
    wait_value(&cluster, BRANCH2, "odoo's table", owner, "odoo");
    wait_table(&cluster, "odoo_module", "id", 1);
    wait_value(&cluster, BRANCH2, "resumed stream", OPEN_DDL_EXCEPTIONS, "0");
    // A role may not do on a peer what it may not do here: replicate_ddl runs as its caller.
    let refused = cluster.node(MAIN).connect(DB).execute("SET ROLE odoo; SELECT rbucardo.replicate_ddl('ALTER ROLE odoo SUPERUSER')");
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("permission denied")), "{refused:?}");
    // Branches write the new table with their own ids.
    run_on(&cluster, BRANCH2, &["INSERT INTO odoo_module (name) VALUES ('from branch2')".to_string()]);
    wait_table(&cluster, "odoo_module", "id", 2);
    assert_no_errors(&cluster);
}
