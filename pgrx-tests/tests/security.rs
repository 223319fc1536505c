//! Security: a hostile peer (someone holding a branch's login) cannot make main apply anything
//! beyond what main's own configuration lets that branch do (src/apply/admit.rs), and the real
//! traffic still converges afterwards.
//!
//! The forger is branch1's login role on main (`branch1`, a member of `rbucardo_peer`, not a
//! superuser): the test creates it, cuts branch1's real link to main so that branch1's worker
//! does not move main's position meanwhile, and calls `rbucardo.peer_push('branch1', ...)`
//! directly on main with batches built by the project's own encoder (src/base/wire.rs, compiled
//! into this test). Every forged batch is well formed and starts at main's position in
//! branch1's stream, so a refusal is about what it asks for and nothing else. In the star main
//! knows the branches as passive peers: by default `ddl = 'limited'` without a `ddl_role`, and
//! `relay = false`.
//!
//! Not covered: a compromised branch serving forged batches through `peer_fetch`. In the star
//! main never pulls from a branch (it has no conninfo for them); the batch would be checked by
//! the same `apply_batch` and admission as a pushed one.

mod common;

#[allow(dead_code)]
#[path = "../../src/base/wire.rs"]
mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster, Conn};
use wire::{decode_batch, encode_batch, encode_chunk, Batch, Chunk, Op, Position, RelDesc, RowChange, Txn, Value, WHOLE_TICK};

const CONVERGE: Duration = Duration::from_secs(120);

/// The text every refusal of a batch from branch1 starts with (src/apply/mod.rs).
const REFUSED: &str = "refused a batch from branch1: ";

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// Node ids as main knows them.
struct Ids {
    main: i32,
    branch1: i32,
    branch2: i32,
}

impl Ids {
    fn read(cluster: &Cluster) -> Ids {
        let id = |sql: &str| -> i32 {
            one(cluster, MAIN, sql).parse().unwrap_or_else(|e| panic!("{sql}: not a node id: {e}"))
        };
        let ids = Ids {
            main: id("SELECT node_id FROM rbucardo.node"),
            branch1: id("SELECT node_id FROM rbucardo.db WHERE name = 'branch1'"),
            branch2: id("SELECT node_id FROM rbucardo.db WHERE name = 'branch2'"),
        };
        // common::setup_node gives node i the id i + 1.
        assert_eq!((ids.main, ids.branch1, ids.branch2), (1, 2, 3), "node ids on main");
        ids
    }
}

// ---------------------------------------------------------------------------
// Forging batches.

/// A description of a table as a capturing node would send it.
fn rel(schema: &str, name: &str, columns: &[&str], key: &[u16]) -> RelDesc {
    RelDesc { schema: schema.into(), name: name.into(), columns: columns.iter().map(|c| c.to_string()).collect(), key: key.to_vec() }
}

/// A row image in text form; `None` is NULL.
fn row(values: &[Option<&str>]) -> Option<Vec<Value>> {
    Some(values.iter().map(|v| v.map(str::to_string)).collect())
}

/// A row change without its ordinal: op, old image, new image.
type Change = (Op, Option<Vec<Value>>, Option<Vec<Value>>);

/// One encoded chunk holding `changes` to the table `rel`.
fn chunk(rel: RelDesc, changes: Vec<Change>) -> Vec<u8> {
    let changes = changes
        .into_iter()
        .enumerate()
        .map(|(i, (op, old, new))| RowChange { ordinal: i as u32 + 1, rel: 0, op, old, new })
        .collect();
    encode_chunk(&Chunk { relations: vec![rel], changes })
}

/// An insert of one user (public.users is in the store herd, shared with branch1).
fn user_insert(id: i64, login: &str) -> Vec<u8> {
    let id = id.to_string();
    chunk(rel("public", "users", &["id", "login", "name"], &[0]), vec![(Op::Insert, None, row(&[Some(&id), Some(login), Some("forged")]))])
}

/// A schema change as src/schema/ddl.rs records it: `[command text, search_path, role]`,
/// recorded in `schema` under the command tag `tag`.
fn ddl(schema: &str, tag: &str, sql: &str, role: &str) -> Vec<u8> {
    chunk(rel(schema, tag, &[], &[]), vec![(Op::Ddl, None, row(&[Some(sql), Some("public"), Some(role)]))])
}

/// A transaction of `origin` at `origin_pos` in that origin's stream; `Forger::send` gives it
/// its position in branch1's stream.
fn txn(origin: i32, origin_pos: Position, chunks: Vec<Vec<u8>>) -> Txn {
    let hlc = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64;
    Txn { origin, origin_pos, hlc, stream_pos: Position::default(), chunks, part: None, to: None, decoded: Default::default() }
}

/// The position just after `pos` in some node's stream (for a plausible origin position).
fn just_after(pos: Position) -> Position {
    if pos.seq == WHOLE_TICK {
        Position { tick: pos.tick + 1, seq: 1 }
    } else {
        Position { tick: pos.tick, seq: pos.seq + 1 }
    }
}

/// Where a forged batch goes in branch1's stream: after main's position there, and before every
/// real transaction branch1 has not shipped yet, so that a forged batch main accepts does not
/// make it skip real ones. Main's position is all of some tick t (or a forged position of tick
/// t + 1); branch1's unshipped transactions are in later ticks with change log seqs from 1 up,
/// so the forged ones take negative seqs of tick t + 1.
struct Plan {
    after: Position,
    slots: Vec<Position>,
}

/// What `peer_push` answered.
#[derive(Debug)]
struct Pushed {
    /// Main's position in branch1's stream before the push.
    after: Position,
    /// Its position after the push (the returned tick and seq).
    at: Position,
    stopped: Option<String>,
}

/// branch1's login on main, pushing forged batches the way branch1's worker pushes real ones.
struct Forger<'a> {
    cluster: &'a Cluster,
    conn: Conn,
    sender: i32,
}

impl<'a> Forger<'a> {
    /// Creates the login role branch1 on main, cuts branch1's real link to main and waits
    /// until no real push is under way, then connects directly to main as that role.
    fn connect(cluster: &'a Cluster, ids: &Ids) -> Forger<'a> {
        let main = cluster.node(MAIN);
        main.sql(DB, "CREATE ROLE branch1 LOGIN IN ROLE rbucardo_peer");
        cluster.link(BRANCH1, MAIN).cut();
        wait_until("branch1's pushes to main to end", Duration::from_secs(30), || {
            Ok(one(cluster, MAIN, ACTIVE_PUSHES) == "0")
        });
        let conninfo = main.conninfo(DB).replace("user=postgres", "user=branch1");
        let mut conn = Conn::connect(&conninfo).unwrap_or_else(|e| panic!("connecting as branch1: {e}"));
        let who = conn.query_one("SELECT session_user || ' ' || rolsuper FROM pg_roles WHERE rolname = session_user").unwrap();
        assert_eq!(who.as_deref(), Some("branch1 false"), "the forger must have a branch's rights, not a superuser's");
        Forger { cluster, conn, sender: ids.branch1 }
    }

    /// Main's position in branch1's stream.
    fn cursor(&self) -> Position {
        let rows = self.cluster.node(MAIN).query(DB, "SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = 'branch1'");
        let num = |i: usize| -> i64 { rows[0][i].as_deref().unwrap().parse().unwrap() };
        Position { tick: num(0), seq: num(1) }
    }

    /// Stream positions for the next `n` forged transactions (see `Plan`).
    fn plan(&self, n: usize) -> Plan {
        let after = self.cursor();
        let first = if after.seq == WHOLE_TICK {
            Position { tick: after.tick + 1, seq: -1000 }
        } else {
            assert!(
                after.seq < 0,
                "main stands in the middle of tick {} of branch1's stream, at a real transaction: no room for a forged one",
                after.tick
            );
            Position { tick: after.tick, seq: after.seq + 1 }
        };
        assert!(first.seq + (n as i64) < 0, "out of forged positions in tick {}", first.tick);
        Plan { after, slots: (0..n as i64).map(|i| Position { tick: first.tick, seq: first.seq + i }).collect() }
    }

    /// Pushes `txns` at the positions of `plan`, as one batch.
    fn send(&mut self, plan: &Plan, mut txns: Vec<Txn>) -> Pushed {
        assert_eq!(txns.len(), plan.slots.len(), "one planned position per transaction");
        for (t, pos) in txns.iter_mut().zip(&plan.slots) {
            t.stream_pos = *pos;
        }
        let batch = Batch { sender: self.sender, after: plan.after, upto: *plan.slots.last().unwrap(), txns, complete: false };
        let bytes = encode_batch(&batch);
        // Well formed: whatever main refuses, it refuses for what the batch asks.
        decode_batch(&bytes, 64 << 20).unwrap_or_else(|e| panic!("the forged batch does not decode: {e}"));
        let sql = format!("SELECT tick, seq, stopped FROM rbucardo.peer_push('branch1', decode('{}', 'hex'))", to_hex(&bytes));
        let rows = self.conn.query(&sql).unwrap_or_else(|e| panic!("peer_push of a forged batch failed instead of answering: {e}"));
        // Replica mode (no triggers, no foreign-key checks) is for the applier only: the
        // peer's own session must not keep it after the call.
        let role = self.conn.query_one("SELECT current_setting('session_replication_role')").unwrap();
        assert_eq!(role.as_deref(), Some("origin"), "a peer's session kept replica mode after peer_push");
        let num = |i: usize| -> i64 { rows[0][i].as_deref().unwrap().parse().unwrap() };
        Pushed { after: plan.after, at: Position { tick: num(0), seq: num(1) }, stopped: rows[0][2].clone() }
    }

    /// Plans and pushes a batch of one transaction.
    fn send_one(&mut self, make: impl FnOnce(Position) -> Txn) -> Pushed {
        let plan = self.plan(1);
        let t = make(plan.slots[0]);
        self.send(&plan, vec![t])
    }
}

// ---------------------------------------------------------------------------
// What main holds.

/// Everything on main a forged batch could change, by label: the peers and their policies,
/// progress per origin, branch1's stream position, herds, superusers, tables and their owners,
/// ALTER SYSTEM settings, conflicts and exceptions, and the rows of every store table (plus
/// `extra` tables).
#[derive(PartialEq, Eq, Debug)]
struct MainState(BTreeMap<String, String>);

/// Label of branch1's stream position in `MainState`.
const STREAM: &str = "branch1 stream";

impl MainState {
    fn read(cluster: &Cluster, extra: &[&str]) -> MainState {
        let mut parts = vec![
            "SELECT 'peers', string_agg(format('%s conninfo=%s node=%s ddl=%s ddl_role=%s relay=%s', name, conninfo, node_id, ddl, ddl_role, relay), '; ' ORDER BY name) FROM rbucardo.db".to_string(),
            "SELECT 'origin progress', string_agg(format('%s:(%s,%s)', origin, tick, seq), ' ' ORDER BY origin) FROM rbucardo.origin_progress".to_string(),
            format!("SELECT '{STREAM}', format('(%s,%s) applied %s', in_tick, in_seq, applied_in) FROM rbucardo.peer_state WHERE db = 'branch1'"),
            "SELECT 'herds', string_agg(herd || ':' || relid::regclass::text, ' ' ORDER BY herd, relid::regclass::text) FROM rbucardo.herd_table".to_string(),
            "SELECT 'superusers', string_agg(rolname, ' ' ORDER BY rolname) FROM pg_roles WHERE rolsuper".to_string(),
            "SELECT 'tables', string_agg(format('%s.%s:%s', schemaname, tablename, tableowner), ' ' ORDER BY schemaname, tablename)
               FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                .to_string(),
            "SELECT 'functions', count(*)::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'".to_string(),
            "SELECT 'alter system', count(*)::text FROM pg_file_settings WHERE sourcefile LIKE '%postgresql.auto.conf'".to_string(),
            "SELECT 'conflicts', count(*)::text FROM rbucardo.conflicts".to_string(),
            "SELECT 'exceptions', count(*)::text FROM rbucardo.exceptions".to_string(),
        ];
        for table in TABLES.iter().map(|(t, _)| *t).chain(extra.iter().copied()) {
            parts.push(format!(
                "SELECT '{table}', count(*) || ' rows ' || md5(coalesce(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {table} x"
            ));
        }
        let rows = cluster.node(MAIN).query(DB, &parts.join("\nUNION ALL\n"));
        MainState(
            rows.into_iter()
                .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap_or_else(|| "<none>".into())))
                .collect(),
        )
    }

    /// The same state but for branch1's stream position.
    fn without_stream(mut self) -> MainState {
        self.0.remove(STREAM);
        self
    }

    /// Panics naming every label whose value differs from `other`.
    fn assert_same(&self, other: &MainState, what: &str) {
        let diff: Vec<String> = self
            .0
            .iter()
            .filter(|(k, v)| other.0.get(*k) != Some(v))
            .map(|(k, v)| format!("  {k}: before {v:?}, after {:?}", other.0.get(k)))
            .collect();
        assert!(diff.is_empty(), "{what}: main changed:\n{}", diff.join("\n"));
    }
}

/// Asserts that main refused the batch whole, for `reason`: nothing of main's state moved (its
/// position in branch1's stream included), and the refusal shows in peer_state and
/// rbucardo.status for the operator.
fn assert_refused(cluster: &Cluster, what: &str, pushed: &Pushed, reason: &str, before: &MainState, extra: &[&str]) {
    let why = pushed
        .stopped
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: main accepted the batch (now at {:?}, was at {:?})", pushed.at, pushed.after));
    assert!(why.starts_with(REFUSED) && why.contains(reason), "{what}: refused, but not for {reason:?}: {why}");
    assert_eq!(pushed.at, pushed.after, "{what}: the refusal moved main's position in branch1's stream");
    before.assert_same(&MainState::read(cluster, extra), what);
    assert_eq!(one(cluster, MAIN, "SELECT refused FROM rbucardo.peer_state WHERE db = 'branch1'"), why, "{what}: peer_state.refused");
    let status = cluster.node(MAIN).query(DB, "SELECT state, last_error FROM rbucardo.status WHERE db = 'branch1'");
    assert_eq!(status, vec![vec![Some("refused".to_string()), Some(why.to_string())]], "{what}: rbucardo.status for branch1");
}

fn assert_not_superuser(cluster: &Cluster, role: &str) {
    assert_eq!(one(cluster, MAIN, &format!("SELECT rolsuper FROM pg_roles WHERE rolname = {}", lit(role))), "f", "{role} became a superuser on main");
}

// ---------------------------------------------------------------------------
// Real traffic.

/// One round of ordinary writes on every node, each in its own id range: five users, and an
/// order with two lines in one transaction.
fn real_traffic(cluster: &Cluster, round: i64) {
    let work = ALL
        .iter()
        .map(|&k| {
            let (b, n) = (base(k) + round * 1000, NODE_NAMES[k]);
            (
                k,
                vec![
                    format!("INSERT INTO users SELECT {b} + i, 'r{round}_{n}_' || i, 'real' FROM generate_series(1, 5) i"),
                    format!(
                        "BEGIN;
                         INSERT INTO pos_order (id, node, ref, total) VALUES ({b}, '{n}', {round}, 9.99);
                         INSERT INTO pos_order_line (id, order_id, qty) VALUES ({b} + 1, {b}, 1), ({b} + 2, {b}, 2);
                         COMMIT;"
                    ),
                ],
            )
        })
        .collect();
    run_concurrently(cluster, work);
}

/// What `rounds` rounds of `real_traffic` leave on every node.
fn real_rows(rounds: i64) -> Expected {
    expected(&[("users", 15 * rounds), ("pos_order", 3 * rounds), ("pos_order_line", 6 * rounds)])
}

/// Restores branch1's link, runs another round of real traffic and waits until main takes
/// branch1's real batches again (its refusal, if any, cleared) and every node converges.
fn real_traffic_converges(cluster: &Cluster, round: i64) {
    cluster.link(BRANCH1, MAIN).restore();
    real_traffic(cluster, round);
    let b = base(BRANCH1) + round * 1000;
    let probe = format!(
        "SELECT concat_ws(' | ', (SELECT count(*) FROM users WHERE id BETWEEN {b} + 1 AND {b} + 5),
                                 (SELECT coalesce(refused, '-') FROM rbucardo.peer_state WHERE db = 'branch1'),
                                 (SELECT state FROM rbucardo.status WHERE db = 'branch1'))"
    );
    wait_until("main to apply branch1's real batches again, its refusal cleared", CONVERGE, || {
        let state = one(cluster, MAIN, &probe);
        if state.starts_with("5 | - | ") && !state.ends_with("refused") {
            Ok(true)
        } else {
            Err(format!("branch1's new rows on main | refusal | status: {state}\n{}", diagnostics(cluster)))
        }
    });
    converge(cluster, &real_rows(round), CONVERGE);
}

// ---------------------------------------------------------------------------
// Tests.

/// Row changes beyond what main lets branch1 send are refused whole: a transaction claiming
/// branch2 as its origin (branch1 may speak only for itself), one that would push main's
/// progress for branch2 far ahead, writes to rbucardo's catalog and to pg_authid, and writes to
/// a table of main that is in no herd. A legitimate transaction in the same batch as a
/// forbidden one is refused with it. A transaction claiming main's own origin is dropped as
/// main's own echo. Afterwards (the last forged batch refused) branch1's real stream resumes
/// and all three nodes converge.
#[test]
fn forged_row_changes_are_refused_whole_and_real_traffic_resumes() {
    let cluster = start_store("security_rows", Topology::Star);
    let main = cluster.node(MAIN);
    let ids = Ids::read(&cluster);
    assert_eq!(
        one(&cluster, MAIN, "SELECT concat_ws(' ', ddl, coalesce(ddl_role::text, '-'), relay::text) FROM rbucardo.db WHERE name = 'branch1'"),
        "limited - false",
        "main's default policy for a passive branch"
    );
    // Real traffic first: main then has progress for every origin.
    real_traffic(&cluster, 1);
    converge(&cluster, &real_rows(1), CONVERGE);
    // A table of main only, in a schema with no replicated table.
    main.sql(
        DB,
        "SET rbucardo.replicate_ddl = off;
         CREATE SCHEMA private;
         CREATE TABLE private.secret (id int PRIMARY KEY, v text);
         INSERT INTO private.secret VALUES (1, 'main only');
         CREATE ROLE victim NOLOGIN;",
    );
    assert_eq!(
        one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.herd_table WHERE relid = 'private.secret'::regclass"),
        "0",
        "private.secret must be in no herd"
    );
    let extra = ["private.secret"];
    // Where main stands in an origin's own stream (the start if it applied nothing of it).
    let progress = |origin: i32| -> Position {
        let rows = main.query(DB, &format!("SELECT tick, seq FROM rbucardo.origin_progress WHERE origin = {origin}"));
        rows.first().map_or(Position::START, |r| Position {
            tick: r[0].as_deref().unwrap().parse().unwrap(),
            seq: r[1].as_deref().unwrap().parse().unwrap(),
        })
    };
    let mut forger = Forger::connect(&cluster, &ids);
    let forged_user = |k: usize, n: i64| base(k) + 900_000 + n;
    let user_count = |id: i64| one(&cluster, MAIN, &format!("SELECT count(*) FROM users WHERE id = {id}"));

    // Main's own origin: main never applies its own changes back; the transaction is skipped.
    let before = MainState::read(&cluster, &extra).without_stream();
    let pushed = forger.send_one(|_| txn(ids.main, just_after(progress(ids.main)), vec![user_insert(forged_user(MAIN, 1), "forged_as_main")]));
    assert_eq!(user_count(forged_user(MAIN, 1)), "0", "a transaction claiming main's origin was applied: {pushed:?}");
    before.assert_same(&MainState::read(&cluster, &extra).without_stream(), "a transaction claiming main's origin");
    if let Some(why) = &pushed.stopped {
        assert!(why.starts_with(REFUSED), "a transaction claiming main's origin: {why}");
    }

    // branch2's origin, at the very next position of branch2's stream main would apply.
    let before = MainState::read(&cluster, &extra);
    let b2_progress = progress(ids.branch2);
    let pushed = forger.send_one(|_| txn(ids.branch2, just_after(b2_progress), vec![user_insert(forged_user(BRANCH2, 1), "forged_as_branch2")]));
    let reason = format!("claims origin node {} but branch1 may speak only for itself (node {})", ids.branch2, ids.branch1);
    assert_refused(&cluster, "a transaction claiming branch2's origin", &pushed, &reason, &before, &extra);
    assert_eq!(user_count(forged_user(BRANCH2, 1)), "0");

    // branch2's origin far ahead: if accepted, main would skip branch2's real changes from then on.
    let inflated = Position { tick: 1_000_000, seq: 1 };
    let pushed = forger.send_one(|_| txn(ids.branch2, inflated, vec![user_insert(forged_user(BRANCH2, 2), "inflated")]));
    assert_refused(&cluster, "branch2's origin position pushed to tick 1000000", &pushed, &reason, &before, &extra);
    assert_eq!(progress(ids.branch2), b2_progress, "main's progress for branch2 moved");

    // A batch holds no lock of an origin its sender may not deliver (main's apply of branch2's
    // real stream waits on it), whether refused or let through because its transaction of that
    // origin is applied here already. Each is pushed in a transaction block left open while
    // main's locks are read; branch1's stream lock, which every batch of branch1 takes, shows
    // that the query sees them.
    let pid = forger.conn.query_one("SELECT pg_backend_pid()").unwrap().unwrap();
    let advisory = |key1: i32, key2: i32| {
        one(
            &cluster,
            MAIN,
            &format!("SELECT count(*) FROM pg_locks WHERE pid = {pid} AND locktype = 'advisory' AND classid = {key1} AND objid = {key2} AND objsubid = 2 AND granted"),
        )
    };
    for (what, branch2_at, refused) in [("a forged branch2 transaction", just_after(b2_progress), true), ("a branch2 transaction applied here already", b2_progress, false)] {
        forger.conn.execute("BEGIN").unwrap();
        let plan = forger.plan(2);
        let pushed = forger.send(
            &plan,
            vec![
                txn(ids.branch1, plan.slots[0], vec![user_insert(forged_user(BRANCH1, 5), "in_an_open_block")]),
                txn(ids.branch2, branch2_at, vec![user_insert(forged_user(BRANCH2, 3), "in_an_open_block")]),
            ],
        );
        if refused {
            assert!(pushed.stopped.as_deref().is_some_and(|why| why.contains(&reason)), "a batch with {what}: {pushed:?}");
        } else {
            assert_eq!(pushed.stopped, None, "a batch with {what} is applied (that transaction skipped)");
        }
        assert_eq!(advisory(7262, ids.branch1), "1", "branch1's stream lock, taken by every batch of branch1 (a batch with {what})");
        assert_eq!(advisory(7263, ids.branch2), "0", "a batch of branch1 with {what} holds the lock of branch2's origin");
        forger.conn.execute("ROLLBACK").unwrap();
    }

    // rbucardo's own catalog: a new peer with a conninfo of the attacker's choice. The batch's
    // first transaction is legitimate; it is refused along with the second.
    let plan = forger.plan(2);
    let evil_peer = chunk(
        rel("rbucardo", "db", &["name", "conninfo", "node_id", "ddl", "ddl_role", "relay"], &[0]),
        vec![(Op::Insert, None, row(&[Some("evil"), Some("host=attacker.example dbname=store"), Some("99"), Some("trusted"), None, Some("true")]))],
    );
    let pushed = forger.send(
        &plan,
        vec![
            txn(ids.branch1, plan.slots[0], vec![user_insert(forged_user(BRANCH1, 1), "legit_but_in_bad_company")]),
            txn(ids.branch1, plan.slots[1], vec![evil_peer]),
        ],
    );
    assert_refused(&cluster, "an insert into rbucardo.db", &pushed, "a change to rbucardo.db, which belongs to rbucardo or the system", &before, &extra);
    assert_eq!(user_count(forged_user(BRANCH1, 1)), "0", "the legitimate transaction of a refused batch was applied");

    // A system catalog: make victim a superuser.
    let pushed = forger.send_one(|pos| {
        let authid = rel("pg_catalog", "pg_authid", &["rolname", "rolsuper"], &[0]);
        txn(ids.branch1, pos, vec![chunk(authid, vec![(Op::Update, row(&[Some("victim"), Some("false")]), row(&[Some("victim"), Some("true")]))])])
    });
    assert_refused(&cluster, "an update of pg_catalog.pg_authid", &pushed, "a change to pg_catalog.pg_authid, which belongs to rbucardo or the system", &before, &extra);
    assert_not_superuser(&cluster, "victim");

    // A table of main that is in no herd: update, insert, truncate.
    let secret = || rel("private", "secret", &["id", "v"], &[0]);
    let attempts: Vec<(&str, Vec<u8>)> = vec![
        ("an update of private.secret", chunk(secret(), vec![(Op::Update, row(&[Some("1"), Some("main only")]), row(&[Some("1"), Some("forged")]))])),
        ("an insert into private.secret", chunk(secret(), vec![(Op::Insert, None, row(&[Some("2"), Some("forged")]))])),
        ("a truncate of private.secret", chunk(secret(), vec![(Op::Truncate, None, None)])),
    ];
    for (what, change) in attempts {
        let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![change]));
        assert_refused(&cluster, what, &pushed, "a change to private.secret, which is not in a sync shared with branch1", &before, &extra);
    }
    assert_eq!(one(&cluster, MAIN, "SELECT string_agg(id || ' ' || v, ',') FROM private.secret"), "1 main only");

    // The last batch main saw from branch1 was refused: its real stream must still go through.
    real_traffic_converges(&cluster, 2);
    assert!(progress(ids.branch2) > b2_progress, "main applies branch2's real changes again");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.db"), "2", "main's peers");
    assert_not_superuser(&cluster, "victim");
}

/// Schema changes from branch1 run only as main allows: at the limited level every statement
/// that could raise privileges or reach outside the database is refused (with or without a
/// ddl_role, whatever role the change claims), and so is a change recorded in a schema branch1
/// shares no table in. With `ddl_role => 'store_ddl'` a harmless CREATE TABLE claiming to be
/// the superuser postgres's runs as store_ddl (the table's owner on main, and on branch2 which
/// gets it from main). Afterwards real traffic converges.
#[test]
fn forged_ddl_runs_only_as_mains_ddl_role() {
    let cluster = start_store("security_ddl", Topology::Star);
    let main = cluster.node(MAIN);
    let ids = Ids::read(&cluster);
    real_traffic(&cluster, 1);
    converge(&cluster, &real_rows(1), CONVERGE);
    // Roles are not replicated: the role for branch1's schema changes exists on every node
    // (branch2 runs what main forwards as the role it ran as on main).
    for i in ALL {
        cluster.node(i).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE ROLE store_ddl NOLOGIN; GRANT CREATE, USAGE ON SCHEMA public TO store_ddl");
    }
    main.sql(DB, "CREATE ROLE victim NOLOGIN");
    let mut forger = Forger::connect(&cluster, &ids);
    let pwned = std::env::temp_dir().join(format!("rbucardo_security_pwned_{}", std::process::id()));
    let refused_at_limited: Vec<(String, &str)> = vec![
        ("CREATE TABLE public.x (id int PRIMARY KEY); ALTER ROLE victim SUPERUSER".into(), "a schema change holding a role command"),
        ("ALTER ROLE victim SUPERUSER".into(), "a schema change holding a role command"),
        ("GRANT pg_read_server_files TO victim".into(), "a schema change holding a role command"),
        ("ALTER SYSTEM SET log_statement = 'all'".into(), "a schema change holding ALTER SYSTEM"),
        (format!("COPY (SELECT 1) TO PROGRAM 'touch {}'", pwned.display()), "a schema change holding COPY ... PROGRAM"),
        ("CREATE EXTENSION IF NOT EXISTS file_fdw".into(), "a schema change holding an extension command"),
        ("CREATE FUNCTION public.evil() RETURNS void LANGUAGE c AS '$libdir/rbucardo', 'evil'".into(), "a function in the untrusted language c"),
        ("SET ROLE postgres; CREATE TABLE public.y (id int PRIMARY KEY)".into(), "a schema change holding SET"),
    ];
    let check_all = |forger: &mut Forger, policy: &str| {
        let before = MainState::read(&cluster, &[]);
        for (sql, reason) in &refused_at_limited {
            let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![ddl("public", "CREATE TABLE", sql, "postgres")]));
            assert_refused(&cluster, &format!("{policy}: DDL {sql:?}"), &pushed, reason, &before, &[]);
        }
        // Recorded in rbucardo's schema, where branch1 shares no table.
        let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![ddl("rbucardo", "CREATE TABLE", "CREATE TABLE rbucardo.evil (id int PRIMARY KEY)", "postgres")]));
        assert_refused(&cluster, &format!("{policy}: DDL in schema rbucardo"), &pushed, "a schema change recorded in schema rbucardo", &before, &[]);
        assert_not_superuser(&cluster, "victim");
        for table in ["public.x", "public.y", "rbucardo.evil"] {
            assert_eq!(one(&cluster, MAIN, &format!("SELECT to_regclass('{table}') IS NULL")), "t", "{policy}: {table} was created on main");
        }
        assert!(!pwned.exists(), "{policy}: COPY ... TO PROGRAM ran on main");
    };

    // The default for a passive branch: limited, no role chosen yet.
    assert_eq!(
        one(&cluster, MAIN, "SELECT concat_ws(' ', ddl, coalesce(ddl_role::text, '-'), relay::text) FROM rbucardo.db WHERE name = 'branch1'"),
        "limited - false"
    );
    check_all(&mut forger, "limited without a role");

    // The operator picks a role of limited rights; a superuser is not accepted as one.
    let superuser_role = main.connect(DB).execute("SELECT rbucardo.set_peer_policy('branch1', ddl_role => 'postgres')");
    assert!(superuser_role.as_ref().is_err_and(|e| e.contains("is too strong") && e.contains("a superuser")), "ddl_role => postgres: {superuser_role:?}");
    main.sql(DB, "SELECT rbucardo.set_peer_policy('branch1', ddl => 'limited', ddl_role => 'store_ddl')");
    check_all(&mut forger, "limited as store_ddl");

    // A harmless schema change claiming the superuser runs as store_ddl.
    let applied_before = one(&cluster, MAIN, "SELECT applied_in FROM rbucardo.peer_state WHERE db = 'branch1'");
    let plan = forger.plan(1);
    let slot = plan.slots[0];
    let create = "CREATE TABLE public.made_by_branch (id int PRIMARY KEY)";
    let pushed = forger.send(&plan, vec![txn(ids.branch1, slot, vec![ddl("public", "CREATE TABLE", create, "postgres")])]);
    assert_eq!(pushed.stopped, None, "a harmless CREATE TABLE was not applied");
    assert_eq!(pushed.at, slot, "main's position in branch1's stream after the applied batch");
    let owner = "SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = 'made_by_branch'";
    assert_eq!(one(&cluster, MAIN, owner), "store_ddl", "the table's owner on main");
    assert_eq!(
        one(&cluster, MAIN, &format!("SELECT format('(%s,%s)', tick, seq) FROM rbucardo.origin_progress WHERE origin = {}", ids.branch1)),
        format!("({},{})", slot.tick, slot.seq),
        "main's progress for branch1"
    );
    assert_eq!(
        one(&cluster, MAIN, "SELECT applied_in FROM rbucardo.peer_state WHERE db = 'branch1'"),
        (applied_before.parse::<i64>().unwrap() + 1).to_string()
    );
    // An applied batch clears the refusal before it.
    assert_eq!(one(&cluster, MAIN, "SELECT refused IS NULL FROM rbucardo.peer_state WHERE db = 'branch1'"), "t");
    assert_eq!(one(&cluster, MAIN, "SELECT state FROM rbucardo.status WHERE db = 'branch1'"), "connected");
    assert_not_superuser(&cluster, "victim");
    // Main forwards it to branch2 as run by store_ddl, not by postgres.
    wait_until("made_by_branch on branch2, owned by store_ddl", CONVERGE, || {
        let got = one(&cluster, BRANCH2, owner);
        if got == "store_ddl" {
            Ok(true)
        } else {
            Err(format!("owner on branch2: {got:?}\n{}", diagnostics(&cluster)))
        }
    });

    // Main keeps a peer's policy between the calls of its session (src/base/kept.rs); a
    // change made in the catalog by hand binds that same session's next call all the same.
    // (A row change first: main's session keeps the policy as it stands after the schema
    // change above.)
    let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![user_insert(9_001, "kept_policy")]));
    assert_eq!(pushed.stopped, None, "a plain insert from branch1 was not applied");
    main.sql(DB, "UPDATE rbucardo.db SET ddl = 'none' WHERE name = 'branch1'");
    let before = MainState::read(&cluster, &[]);
    let create = "CREATE TABLE public.after_none (id int PRIMARY KEY)";
    let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![ddl("public", "CREATE TABLE", create, "postgres")]));
    assert_refused(&cluster, "DDL after ddl was set to none by hand", &pushed, "may send none", &before, &[]);
    main.sql(DB, "UPDATE rbucardo.db SET ddl = 'limited' WHERE name = 'branch1'");
    // Nor does a session keep what it read in a snapshot older than the change: a call that
    // reads the policy (a table digest), in a REPEATABLE READ transaction begun while branch1
    // was limited, made after ddl was set to none.
    forger.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    forger.conn.query_one("SELECT 1").unwrap();
    main.sql(DB, "UPDATE rbucardo.db SET ddl = 'none' WHERE name = 'branch1'");
    forger
        .conn
        .query("SELECT count(*) FROM rbucardo.peer_diff_digest('branch1', 'public', 'users', ARRAY['id', 'login', 'name'], ARRAY['id'], 1)")
        .unwrap();
    forger.conn.execute("COMMIT").unwrap();
    let before = MainState::read(&cluster, &[]);
    let create = "CREATE TABLE public.after_old_snapshot (id int PRIMARY KEY)";
    let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![ddl("public", "CREATE TABLE", create, "postgres")]));
    assert_refused(&cluster, "DDL after a call in a snapshot older than ddl = none", &pushed, "may send none", &before, &[]);
    main.sql(DB, "UPDATE rbucardo.db SET ddl = 'limited' WHERE name = 'branch1'");
    // The row goes again, as the stores' tables are compared below.
    let forged = row(&[Some("9001"), Some("kept_policy"), Some("forged")]);
    let gone = chunk(rel("public", "users", &["id", "login", "name"], &[0]), vec![(Op::Delete, forged, None)]);
    let pushed = forger.send_one(|pos| txn(ids.branch1, pos, vec![gone]));
    assert_eq!(pushed.stopped, None, "a plain delete from branch1 was not applied");

    real_traffic_converges(&cluster, 2);
    assert_not_superuser(&cluster, "victim");
    assert_eq!(one(&cluster, MAIN, owner), "store_ddl");
}

/// The worker runs as a superuser. A database owner sets the database's search_path to a schema
/// whose `=` on text (used by the worker's own catalog queries) tries to make a role superuser,
/// and the worker is restarted so it picks that setting up. It pins search_path in every
/// transaction: the shadow never runs with its rights, and replication goes on.
#[test]
fn a_database_search_path_does_not_reach_the_worker() {
    let cluster = start_store("security_worker_path", Topology::Star);
    let main = cluster.node(MAIN);
    main.sql(
        DB,
        "CREATE ROLE wk_victim NOLOGIN;
         CREATE SCHEMA wk_evil;
         CREATE TABLE wk_evil.calls (who text, backend text);
         GRANT INSERT ON wk_evil.calls TO PUBLIC;
         -- Acts only inside the worker (this test's own sessions resolve `=` to it too).
         CREATE FUNCTION wk_evil.eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
         DECLARE
             backend text := (SELECT a.backend_type FROM pg_catalog.pg_stat_activity a
                               WHERE a.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid());
         BEGIN
             IF backend OPERATOR(pg_catalog.=) 'rbucardo worker' THEN
                 INSERT INTO wk_evil.calls VALUES (current_user, backend);
                 BEGIN
                     ALTER ROLE wk_victim SUPERUSER;
                 EXCEPTION WHEN others THEN NULL;
                 END;
             END IF;
             RETURN $1 OPERATOR(pg_catalog.=) $2;
         END $$;
         CREATE OPERATOR wk_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = wk_evil.eq);
         ALTER DATABASE store SET search_path = wk_evil, pg_catalog, public;",
    );
    // A new worker session reads the database's settings.
    main.sql(DB, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'rbucardo worker'");
    wait_until("the worker back", Duration::from_secs(60), || {
        Ok(one(&cluster, MAIN, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'rbucardo worker' AND datname = 'store'") == "1")
    });
    for (i, id) in [(MAIN, 1_000_901), (BRANCH1, 2_000_901), (BRANCH2, 3_000_901)] {
        cluster.node(i).sql(DB, &format!("INSERT INTO users (id, login, name) VALUES ({id}, 'wk{id}', 'after the setting')"));
    }
    for i in ALL {
        wait_until("every user everywhere", Duration::from_secs(60), || Ok(one(&cluster, i, "SELECT count(*) FROM users WHERE name = 'after the setting'") == "3"));
    }
    assert_not_superuser(&cluster, "wk_victim");
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM wk_evil.calls"), "0", "the shadowing operator ran inside the worker");
}

/// A compromised branch serves forged batches through `peer_fetch`: in a mesh, main pulls
/// branch1's stream from branch1 itself, and branch1's superuser replaces its `peer_fetch` with
/// one that answers a batch writing a row into main's `rbucardo.db`. Main refuses it whole every
/// time (a WARNING in its log, nothing applied, its position in branch1's stream unmoved), while
/// the real traffic goes on; with the real function back, everything converges.
#[test]
fn a_compromised_branch_serving_forged_batches_is_refused() {
    let cluster = start_store("security_fetch", Topology::Mesh);
    let branch1 = cluster.node(BRANCH1);
    let forged = Batch {
        sender: 2,
        after: Position { tick: 0, seq: WHOLE_TICK },
        upto: Position { tick: 1_000_000, seq: 1 },
        txns: vec![Txn {
            stream_pos: Position { tick: 1_000_000, seq: 1 },
            ..txn(
                2,
                Position { tick: 1_000_000, seq: 1 },
                vec![chunk(
                    rel("rbucardo", "db", &["name", "conninfo", "ddl", "relay"], &[0]),
                    vec![(Op::Insert, None, row(&[Some("evil"), Some("host=evil"), Some("trusted"), Some("true")]))],
                )],
            )
        }],
        complete: true,
    };
    let bytes = encode_batch(&forged);
    assert!(decode_batch(&bytes, 1 << 20).is_ok(), "the forged batch is well formed");
    branch1.sql(
        DB,
        &format!(
            "ALTER FUNCTION rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer) RENAME TO peer_fetch_real;
             CREATE FUNCTION rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer) RETURNS bytea
                 LANGUAGE sql AS $$ SELECT '\\x{}'::bytea $$;
             GRANT EXECUTE ON FUNCTION rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer) TO rbucardo_peer;",
            to_hex(&bytes)
        ),
    );
    let log = cluster.node(MAIN).log_path();
    wait_until("main refusing the forged batch", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.contains("refused a batch from branch1: a change to rbucardo.db, which belongs to rbucardo or the system"))
    });
    // Another peer's traffic goes on meanwhile (branch1's own stream waits: its refusal is what
    // main answers it).
    cluster.node(BRANCH2).sql(DB, "INSERT INTO users (id, login, name) VALUES (3000777, 'during', 'while branch1 is refused')");
    wait_until("branch2's row on main", Duration::from_secs(60), || Ok(one(&cluster, MAIN, "SELECT count(*) FROM users WHERE id = 3000777") == "1"));
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.db WHERE name = 'evil'"), "0", "the forged row reached main's catalog");
    assert_ne!(one(&cluster, MAIN, "SELECT in_tick FROM rbucardo.peer_state WHERE db = 'branch1'"), "1000000", "the forged position was recorded");
    branch1.sql(
        DB,
        "DROP FUNCTION rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer);
         ALTER FUNCTION rbucardo.peer_fetch_real(text, bigint, bigint, integer, bigint, bigint, integer) RENAME TO peer_fetch;",
    );
    real_traffic(&cluster, 1);
    let mut want = real_rows(1);
    *want.get_mut("users").unwrap() += 1;
    converge(&cluster, &want, CONVERGE);
    assert_eq!(one(&cluster, MAIN, "SELECT count(*) FROM rbucardo.db WHERE name = 'evil'"), "0");
}

/// Row clocks outlive the change log, per column. Main loads 120,000 products (more clocks than
/// a trim holds at once: it keeps them in parts), then sets a new price on two rows far apart.
/// Both branches take it all and main trims it: on main, only the kept clocks are left of
/// those changes, one per loaded row. branch1 then sends changes made before main's new prices (a branch
/// cut off for a while, or a peer replaying an old version), under `latest`:
/// - its older prices lose to main's, by the kept price clocks;
/// - its stock on the same row wins: the stock's kept clock is the load's, older than branch1's;
/// - a row only loaded takes branch1's change whole.
/// Without kept clocks main would take branch1's prices; with one clock per row it would keep
/// its stock too.
#[test]
fn kept_row_clocks_judge_older_changes_after_the_trim() {
    let cluster = start_store("security_kept_clocks", Topology::Star);
    let main = cluster.node(MAIN);
    let ids = Ids::read(&cluster);
    main.sql(DB, "INSERT INTO products (id, name, price, stock) SELECT g, 'bulk ' || g, 1.00, 1 FROM generate_series(10001, 130000) g");
    main.sql(DB, "UPDATE products SET price = 20.00 WHERE id IN (10001, 129999)");
    for i in [BRANCH1, BRANCH2] {
        wait_until("main's prices on the branch", CONVERGE, || {
            Ok(one(&cluster, i, "SELECT count(*) || ' ' || sum(price) FROM products WHERE id BETWEEN 10001 AND 130000") == "120000 120038.00")
        });
    }
    let clock = |id: i32, col: &str| -> String {
        one(&cluster, MAIN, &format!("SELECT hlc || ' ' || origin FROM rbucardo.row_clock WHERE relid = 'products'::regclass AND key = '{{\"id\":\"{id}\"}}' AND col = '{col}'"))
    };
    wait_until("main's log trimmed, every clock kept", CONVERGE, || {
        let state = one(
            &cluster,
            MAIN,
            "SELECT (SELECT count(*) FROM rbucardo.change_log) || ' log rows, '
                 || (SELECT count(*) FROM rbucardo.row_clock WHERE relid = 'products'::regclass AND col = '*') || ' row clocks, '
                 || (SELECT count(*) FROM rbucardo.row_clock WHERE relid = 'products'::regclass AND col = 'price') || ' price clocks'",
        );
        if state == "0 log rows, 120000 row clocks, 2 price clocks" { Ok(true) } else { Err(state) }
    });
    let hlc = |kept: &str| -> i64 {
        let (h, origin) = kept.split_once(' ').unwrap();
        assert_eq!(origin, ids.main.to_string(), "main's own change");
        h.parse().unwrap()
    };
    let (loaded, priced_1, priced_2) = (hlc(&clock(10001, "*")), hlc(&clock(10001, "price")), hlc(&clock(129999, "price")));
    assert!(loaded < priced_1 && loaded < priced_2, "the load came before the prices");
    assert_eq!(clock(10001, "stock"), "", "nobody changed a stock");

    let mut forger = Forger::connect(&cluster, &ids);
    let progress = one(&cluster, MAIN, &format!("SELECT tick || ' ' || seq FROM rbucardo.origin_progress WHERE origin = {}", ids.branch1));
    let mut at = progress.split_once(' ').map_or(Position::START, |(t, s)| Position { tick: t.parse().unwrap(), seq: s.parse().unwrap() });
    let columns = ["id", "name", "price", "stock", "active", "weight", "tags", "attrs", "photo", "created", "sold_on", "sku", "mood"];
    let image = |id: i32, price: &str, stock: &str| -> Option<Vec<Value>> {
        let (id, name) = (id.to_string(), format!("bulk {id}"));
        let mut v: Vec<Option<&str>> = vec![Some(&id), Some(&name), Some(price), Some(stock)];
        v.resize(columns.len(), None);
        row(&v)
    };
    let products = || rel("public", "products", &columns, &[0]);
    // Each change in its own transaction, with its own clock: just before main's price, or
    // (10002, only loaded) just after the load.
    let mut plan = forger.plan(3);
    let mut txns = vec![];
    for (id, hlc, old, new) in [
        (10001, priced_1 - 1, ("1.00", "1"), ("22.00", "5")),
        (129999, priced_2 - 1, ("1.00", "1"), ("22.00", "1")),
        (10002, loaded + 1, ("1.00", "1"), ("23.00", "7")),
    ] {
        at = just_after(at);
        let mut t = txn(ids.branch1, at, vec![chunk(products(), vec![(Op::Update, image(id, old.0, old.1), image(id, new.0, new.1))])]);
        t.hlc = hlc;
        txns.push(t);
    }
    plan.slots.truncate(txns.len());
    let pushed = forger.send(&plan, txns);
    assert!(pushed.stopped.is_none(), "main refused branch1's old changes: {pushed:?}");
    assert_eq!(
        one(&cluster, MAIN, "SELECT string_agg(concat_ws(' ', id, price, stock), ', ' ORDER BY id) FROM products WHERE id IN (10001, 10002, 129999)"),
        "10001 20.00 5, 10002 23.00 7, 129999 20.00 1",
        "main's newer prices stay, branch1's newer stock and whole row are taken"
    );
    assert_eq!(
        one(&cluster, MAIN, "SELECT string_agg(concat_ws(' ', key->>'id', local_version->>'price', remote_version->>'price', winner), ', ' ORDER BY (key->>'id')::int) FROM rbucardo.conflicts"),
        "10001 20.00 22.00 local, 129999 20.00 22.00 local",
        "the conflict log: each keeps the price that lost"
    );
}

/// A row whose key's JSON text is too long for `row_clock`'s index (hex with control characters
/// between, each escaped in six bytes) has its clocks kept under a digest when its changes are
/// trimmed, and the `latest` rule finds them there: an older change to its column loses.
/// Before, keeping the clock failed, and with it every trim after.
#[test]
fn a_clock_kept_under_a_digest_judges_an_older_change() {
    let cluster = start_store("security_digest_clock", Topology::Star);
    let main = cluster.node(MAIN);
    let ids = Ids::read(&cluster);
    main.sql(DB, "CREATE TABLE long_keys (k text PRIMARY KEY, v int)");
    wait_until("long_keys on branch1", CONVERGE, || Ok(one(&cluster, BRANCH1, "SELECT count(*) FROM pg_tables WHERE tablename = 'long_keys'") == "1"));
    let long_key = "(SELECT string_agg(md5(i::text) || chr(1 + i % 7), '' ORDER BY i) FROM generate_series(1, 78) i)";
    cluster.node(BRANCH1).sql(DB, &format!("INSERT INTO long_keys VALUES ({long_key}, 1)"));
    cluster.node(BRANCH1).sql(DB, "UPDATE long_keys SET v = 2");
    let kept = "FROM rbucardo.row_clock WHERE relid = 'long_keys'::regclass AND key LIKE 'sha256:%' AND col = 'v'";
    wait_until("branch1's v on main, trimmed, its clock kept", CONVERGE, || {
        let state = one(
            &cluster,
            MAIN,
            &format!("SELECT (SELECT coalesce(sum(v), 0) FROM long_keys) || ' / ' || (SELECT count(*) FROM rbucardo.change_log) || ' log rows / ' || (SELECT count(*) {kept}) || ' kept'"),
        );
        if state == "2 / 0 log rows / 1 kept" { Ok(true) } else { Err(state) }
    });
    let (h, origin) = one(&cluster, MAIN, &format!("SELECT hlc || ' ' || origin {kept}")).split_once(' ').map(|(h, o)| (h.parse::<i64>().unwrap(), o.to_string())).unwrap();
    assert_eq!(origin, ids.branch1.to_string(), "branch1's change");
    let k = main.query(DB, "SELECT k FROM long_keys")[0][0].clone();
    assert!(k.as_ref().is_some_and(|k| k.len() == 78 * 33), "the long key read back whole");

    let mut forger = Forger::connect(&cluster, &ids);
    let pushed = forger.send_one(|at| {
        let image = |v: &str| Some(vec![k.clone(), Some(v.to_string())]);
        let mut t = txn(ids.branch1, at, vec![chunk(rel("public", "long_keys", &["k", "v"], &[0]), vec![(Op::Update, image("1"), image("9"))])]);
        t.hlc = h - 1;
        t
    });
    assert!(pushed.stopped.is_none(), "main refused the older change: {pushed:?}");
    assert_eq!(one(&cluster, MAIN, "SELECT v FROM long_keys"), "2", "the newer v stays");
    assert_eq!(
        one(&cluster, MAIN, "SELECT concat_ws(' ', local_version->>'v', remote_version->>'v', winner) FROM rbucardo.conflicts WHERE tbl = 'public.long_keys'"),
        "2 9 local",
        "the conflict log keeps the v that lost"
    );
}
