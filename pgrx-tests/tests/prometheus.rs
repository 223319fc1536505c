//! Prometheus: the Debian PostgreSQL exporter (prometheus-postgres-exporter 0.11, installed by
//! scripts/setup.sh) with monitoring/postgres-exporter-queries.yaml, scraped while two nodes
//! replicate, are cut apart, meet a conflict, park a transaction and stop a stream on a failing
//! schema change. Every rbucardo series must be there and say what `rbucardo.status` (and the
//! tables behind it) say at the same moment; the alerting rules and the dashboard may use only
//! series the exporter produces; the role of monitoring/monitor-role.sql (not a superuser) must
//! see the same series as postgres.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{lit, DB, SCHEMA};
use rbucardo_cluster_tests::{poll_every, wait_until, Cluster, Conn};

const EXPORTER: &str = "/usr/bin/prometheus-postgres-exporter";
const T: Duration = Duration::from_secs(60);
const MAIN: usize = 0;
const BRANCH1: usize = 1;
const NAMES: [&str; 2] = ["main", "branch1"];

/// The queries file this test checks, from the source tree.
fn queries_file() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/postgres-exporter-queries.yaml");
    path.canonicalize().unwrap_or(path)
}

/// Every `rbucardo_...` metric name a file of monitoring/ mentions.
fn metric_names_in(file: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut names: Vec<String> = text
        .match_indices("rbucardo_")
        .filter(|(i, _)| *i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric())
        .map(|(i, _)| text[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// One sample of the exposition: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus text exposition format (0.0.4): `name{l="v",...} value [timestamp]`.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(|c: char| c == '{' || c == ' ').unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if rest.starts_with('{') {
            let bytes: Vec<char> = rest.chars().collect();
            let mut i = 1;
            loop {
                while i < bytes.len() && (bytes[i] == ',' || bytes[i] == ' ') {
                    i += 1;
                }
                if bytes[i] == '}' {
                    i += 1;
                    break;
                }
                let mut key = String::new();
                while bytes[i] != '=' {
                    key.push(bytes[i]);
                    i += 1;
                }
                i += 2; // ="
                let mut value = String::new();
                while bytes[i] != '"' {
                    if bytes[i] == '\\' {
                        i += 1;
                        value.push(match bytes[i] {
                            'n' => '\n',
                            c => c,
                        });
                    } else {
                        value.push(bytes[i]);
                    }
                    i += 1;
                }
                i += 1;
                labels.insert(key, value);
            }
            let consumed: usize = bytes[..i].iter().map(|c| c.len_utf8()).sum();
            rest = &rest[consumed..];
        }
        let value_text = rest.split_whitespace().next().unwrap_or("");
        let value = match value_text {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|e| panic!("bad sample value in {line:?}: {e}")),
        };
        out.push(Sample { name, labels, value });
    }
    out
}

/// The exporter, running as a child process against one node; killed on drop.
struct Exporter {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Exporter {
    /// Runs the exporter against `node_port` as database role `user`.
    fn start(node_port: u16, user: &str, dir: &Path) -> Exporter {
        assert!(
            Path::new(EXPORTER).exists(),
            "{EXPORTER} is missing: install the Debian package prometheus-postgres-exporter \
             (bash scripts/setup.sh does)"
        );
        let queries = queries_file();
        assert!(queries.exists(), "queries file {} missing", queries.display());
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
            l.local_addr().unwrap().port()
        };
        let log = dir.join(format!("exporter-{port}.log"));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = Command::new(EXPORTER)
            .env(
                "DATA_SOURCE_NAME",
                format!("host=127.0.0.1 port={node_port} user={user} dbname={DB} sslmode=disable connect_timeout=5"),
            )
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--extend.query-path={}", queries.display()))
            .arg("--disable-default-metrics")
            .arg("--disable-settings-metrics")
            .arg("--no-collector.database")
            .arg("--no-collector.bgwriter")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {EXPORTER}: {e}"));
        let mut exporter = Exporter { child, port, log };
        wait_until("the exporter to answer", Duration::from_secs(30), || {
            if let Ok(Some(status)) = exporter.child.try_wait() {
                panic!("the exporter exited with {status}:\n{}", exporter.log_text());
            }
            exporter.scrape().map(|_| true)
        });
        exporter
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET /metrics over a plain HTTP/1.0 connection.
    fn scrape(&self) -> Result<Vec<Sample>, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| format!("connect: {e}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut response = String::new();
        stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP header end")?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(format!("HTTP answer: {head}"));
        }
        Ok(parse_metrics(body))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("exporter log {}:\n{}", self.log.display(), self.log_text());
        }
    }
}

/// The samples named `name` whose labels include every one of `want`.
fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The one value of `name` with `labels`, or why there is not exactly one.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Result<f64, String> {
    match find(samples, name, labels).as_slice() {
        [one] => Ok(one.value),
        [] => Err(format!("no series {name}{labels:?}")),
        many => Err(format!("{} series {name}{labels:?}: {many:?}", many.len())),
    }
}

/// `name{labels}` must equal `want`; the difference is reported, not panicked, so that the
/// caller can poll until the scrape and the SQL saw the same moment.
fn expect(samples: &[Sample], name: &str, labels: &[(&str, &str)], want: f64, off: &mut Vec<String>) {
    match value(samples, name, labels) {
        Ok(v) if v == want => {}
        Ok(v) => off.push(format!("{name}{labels:?} = {v}, SQL says {want}")),
        Err(e) => off.push(e),
    }
}

fn num(v: &Option<String>) -> f64 {
    v.as_deref().unwrap_or("0").parse().expect("a number from SQL")
}

/// Scrapes, reads rbucardo.status and the tables behind the other metrics on `node`, and
/// compares: `Err` lists what differs (the next poll may see the same moment on both sides).
fn compare(exporter: &Exporter, conn: &mut Conn, node: &str) -> Result<Vec<Sample>, String> {
    let samples = exporter.scrape()?;
    let mut off = Vec::new();
    // The exporter reached the server, loaded the file, and no query failed.
    expect(&samples, "pg_up", &[], 1.0, &mut off);
    expect(&samples, "pg_exporter_user_queries_load_error", &[], 0.0, &mut off);
    expect(&samples, "pg_exporter_last_scrape_error", &[], 0.0, &mut off);
    let status = conn.query("SELECT sync, db, state, pending_out, applied_in, exceptions FROM rbucardo.status ORDER BY 1, 2")?;
    if status.is_empty() {
        return Err("rbucardo.status is empty".into());
    }
    for row in &status {
        let (sync, db, state) = (row[0].as_deref().unwrap(), row[1].as_deref().unwrap(), row[2].as_deref().unwrap());
        let l = [("node", node), ("sync", sync), ("db", db)];
        expect(&samples, "rbucardo_peer_up", &l, f64::from(u8::from(state == "connected")), &mut off);
        expect(&samples, "rbucardo_peer_pending_out", &l, num(&row[3]), &mut off);
        expect(&samples, "rbucardo_peer_exceptions", &l, num(&row[5]), &mut off);
        expect(&samples, "rbucardo_peer_stopped", &l, f64::from(u8::from(state == "stopped")), &mut off);
        expect(&samples, "rbucardo_peer_paused", &l, f64::from(u8::from(state == "paused")), &mut off);
        for s in ["connected", "disconnected", "error", "refused", "stopped", "paused"] {
            let l = [("node", node), ("sync", sync), ("db", db), ("state", s)];
            expect(&samples, "rbucardo_status_in_state", &l, f64::from(u8::from(state == s)), &mut off);
        }
        expect(&samples, "rbucardo_link_applied_total", &[("node", node), ("db", db)], num(&row[4]), &mut off);
    }
    // Open exceptions by peer and kind, from the table.
    let exceptions = conn.query(
        "SELECT d.name, k.kind, (SELECT count(*) FROM rbucardo.exceptions e
                                  WHERE e.via = d.node_id AND e.kind = k.kind AND e.resolved_at IS NULL)
           FROM rbucardo.db d CROSS JOIN (VALUES ('constraint'), ('ddl')) k(kind)",
    )?;
    for row in &exceptions {
        let l = [("node", node), ("db", row[0].as_deref().unwrap()), ("kind", row[1].as_deref().unwrap())];
        expect(&samples, "rbucardo_exceptions_open", &l, num(&row[2]), &mut off);
    }
    // Conflicts, each count of conflict_stats as a counter.
    let conflicts = conn.query("SELECT tbl, kind, outcome, logged::text, conflicts FROM rbucardo.conflict_stats")?;
    for row in &conflicts {
        let l = [
            ("node", node),
            ("tbl", row[0].as_deref().unwrap()),
            ("kind", row[1].as_deref().unwrap()),
            ("outcome", row[2].as_deref().unwrap()),
            ("logged", row[3].as_deref().unwrap()),
        ];
        expect(&samples, "rbucardo_conflicts_total", &l, num(&row[4]), &mut off);
    }
    if find(&samples, "rbucardo_conflicts_total", &[]).len() != conflicts.len() {
        off.push(format!("{} conflict series for {} conflict_stats rows", find(&samples, "rbucardo_conflicts_total", &[]).len(), conflicts.len()));
    }
    // Replicated sequences by state.
    let sequences = conn.query(
        "SELECT k.state, (SELECT count(*) FROM rbucardo.sequences s WHERE s.state = k.state)
           FROM (VALUES ('ok'), ('colliding'), ('near exhaustion')) k(state)",
    )?;
    for row in &sequences {
        expect(&samples, "rbucardo_sequences_count", &[("node", node), ("state", row[0].as_deref().unwrap())], num(&row[1]), &mut off);
    }
    // The change log.
    let log = conn.query(
        "SELECT count(*), count(*) FILTER (WHERE final),
                (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rbucardo.change_seq)
           FROM rbucardo.change_log",
    )?;
    expect(&samples, "rbucardo_changelog_rows", &[("node", node)], num(&log[0][0]), &mut off);
    expect(&samples, "rbucardo_changelog_transactions", &[("node", node)], num(&log[0][1]), &mut off);
    expect(&samples, "rbucardo_changelog_written_total", &[("node", node)], num(&log[0][2]), &mut off);
    if off.is_empty() {
        Ok(samples)
    } else {
        Err(off.join("\n"))
    }
}

/// Polls `compare` until the scrape and SQL agree and `also` holds on the samples.
fn agree(
    what: &str,
    exporter: &Exporter,
    cluster: &Cluster,
    i: usize,
    mut also: impl FnMut(&[Sample]) -> Result<bool, String>,
) -> Vec<Sample> {
    let mut conn = cluster.node(i).connect(DB);
    let mut last = Vec::new();
    if let Err(e) = poll_every(T, Duration::from_millis(250), || {
        let samples = compare(exporter, &mut conn, NAMES[i])?;
        let ok = also(&samples)?;
        last = samples;
        Ok(ok)
    }) {
        let status = cluster.node(i).query(DB, "SELECT * FROM rbucardo.status");
        panic!("{what}: the exporter and SQL on {} never agreed within {T:?}:\n{e}\nstatus: {status:?}", NAMES[i]);
    }
    last
}

/// main and branch1 with the store schema; branch1 connects to main through a link proxy (main
/// knows branch1 as passive), one sync over every table.
fn start_pair(test: &str) -> Cluster {
    let cluster = Cluster::builder(test).node_names(&NAMES).start();
    let link = cluster.link_conninfo(BRANCH1, MAIN, DB);
    for i in [MAIN, BRANCH1] {
        let node = cluster.node(i);
        node.createdb(DB);
        node.sql(DB, SCHEMA);
        // A replicated sequence, for rbucardo.sequences.
        node.sql(DB, "CREATE TABLE ticket (id serial PRIMARY KEY, note text)");
        node.sql(DB, "CREATE EXTENSION rbucardo");
        node.sql(DB, &format!("SELECT rbucardo.init_node({}, {})", lit(NAMES[i]), i + 1));
        let add_peer = if i == MAIN {
            "SELECT rbucardo.add_db('branch1')".to_string()
        } else {
            format!("SELECT rbucardo.add_db('main', {})", lit(&link))
        };
        node.sql(DB, &add_peer);
        node.sql(
            DB,
            "SELECT rbucardo.add_herd('store');
             SELECT rbucardo.add_all_tables('store', 'public');
             SELECT rbucardo.add_sync('store_sync', 'store', ARRAY['main', 'branch1']);",
        );
    }
    for i in [MAIN, BRANCH1] {
        wait_until(&format!("{} connected to its peer", NAMES[i]), T, || {
            let state = cluster.node(i).query_one(DB, "SELECT string_agg(state, ',') FROM rbucardo.status");
            if state.as_deref() == Some("connected") {
                Ok(true)
            } else {
                Err(format!("{state:?}"))
            }
        });
    }
    cluster
}

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

#[test]
fn exporter_metrics_match_rbucardo_status() {
    let cluster = start_pair("prometheus");
    // Something replicated both ways first.
    cluster.node(MAIN).sql(DB, "INSERT INTO products (id, name, price, stock) SELECT g, 'p' || g, 1.00, 100 FROM generate_series(1, 5) g");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO pos_order (id, node, total) VALUES (2000001, 'branch1', 10)");
    for i in [MAIN, BRANCH1] {
        wait_until("the first rows on both nodes", T, || {
            Ok(one(&cluster, i, "SELECT (SELECT count(*) FROM products) || ' ' || (SELECT count(*) FROM pos_order)") == "5 1")
        });
    }
    let exporter = Exporter::start(cluster.node(BRANCH1).port(), "postgres", cluster.dir());

    // Connected and caught up.
    let samples = agree("connected", &exporter, &cluster, BRANCH1, |s| {
        Ok(value(s, "rbucardo_peer_pending_out", &[("db", "main")])? == 0.0
            && value(s, "rbucardo_peer_up", &[("db", "main")])? == 1.0
            && value(s, "rbucardo_link_applied_total", &[("db", "main")])? >= 1.0)
    });
    assert_eq!(value(&samples, "rbucardo_link_lag_seconds", &[("db", "main")]).unwrap(), 0.0, "nothing pending, no lag");
    let since = value(&samples, "rbucardo_link_seconds_since_contact", &[("db", "main")]).unwrap();
    assert!((0.0..30.0).contains(&since), "seconds since contact while connected: {since}");
    // Every query of the file produced series (a query that fails only logs on the exporter).
    for name in [
        "rbucardo_status_in_state",
        "rbucardo_peer_up",
        "rbucardo_link_held_rows",
        "rbucardo_link_held_oldest_age_seconds",
        "rbucardo_link_last_contact_timestamp_seconds",
        "rbucardo_link_incoming_parts",
        "rbucardo_link_refused",
        "rbucardo_exceptions_open",
        "rbucardo_exceptions_oldest_age_seconds",
        "rbucardo_changelog_bytes",
        "rbucardo_changelog_oldest_age_seconds",
        "rbucardo_changelog_ticks",
        "rbucardo_sequences_count",
    ] {
        assert!(!find(&samples, name, &[("node", "branch1")]).is_empty(), "no {name} series");
    }
    assert!(value(&samples, "rbucardo_changelog_bytes", &[]).unwrap() > 0.0);
    assert_eq!(value(&samples, "rbucardo_sequences_count", &[("state", "ok")]).unwrap(), 1.0, "ticket_id_seq");
    assert!(!exporter.log_text().contains("level=error"), "exporter logged errors:\n{}", exporter.log_text());

    // The link is cut: both nodes keep selling, branch1 holds its transactions for main.
    cluster.link(BRANCH1, MAIN).cut();
    wait_until("branch1 to see main disconnected", T, || {
        Ok(one(&cluster, BRANCH1, "SELECT state FROM rbucardo.status") == "disconnected")
    });
    let before_writes = Instant::now();
    // The same login on both nodes (unique, not the key): each parks the other's transaction.
    cluster.node(BRANCH1).sql(DB, "INSERT INTO users (id, login, name) VALUES (2000001, 'ana', 'Ana of branch1')");
    let after_first = Instant::now();
    cluster.node(MAIN).sql(DB, "INSERT INTO users (id, login, name) VALUES (1000001, 'ana', 'Ana of main')");
    // The same price changed on both: a conflict on each.
    cluster.node(MAIN).sql(DB, "UPDATE products SET price = 2.00 WHERE id = 1");
    cluster.node(BRANCH1).sql(DB, "UPDATE products SET price = 3.00 WHERE id = 1");
    cluster.node(BRANCH1).sql(DB, "INSERT INTO pos_order (id, node, total) VALUES (2000002, 'branch1', 20)");
    let samples = agree("cut", &exporter, &cluster, BRANCH1, |s| {
        Ok(value(s, "rbucardo_status_in_state", &[("db", "main"), ("state", "disconnected")])? == 1.0
            && value(s, "rbucardo_peer_pending_out", &[("db", "main")])? == 3.0)
    });
    let elapsed = (before_writes.elapsed().as_secs_f64(), after_first.elapsed().as_secs_f64());
    let lag = value(&samples, "rbucardo_link_lag_seconds", &[("db", "main")]).unwrap();
    assert!(
        lag >= elapsed.1 - 2.0 && lag <= elapsed.0 + 2.0,
        "lag {lag} s, but the oldest pending transaction was written {:.1}-{:.1} s before the scrape",
        elapsed.1,
        elapsed.0
    );
    let held = value(&samples, "rbucardo_link_held_rows", &[("db", "main")]).unwrap();
    assert!(held >= 3.0, "main holds {held} change-log rows here");
    assert!(value(&samples, "rbucardo_link_held_oldest_age_seconds", &[("db", "main")]).unwrap() >= lag);
    assert_eq!(value(&samples, "rbucardo_peer_up", &[("db", "main")]).unwrap(), 0.0);
    assert!(value(&samples, "rbucardo_changelog_oldest_age_seconds", &[]).unwrap() >= lag);

    // The link returns: everything goes through except the parked ana, and the conflict on
    // product 1 is counted.
    cluster.link(BRANCH1, MAIN).restore();
    // (The lag comes from another of the exporter's queries than pending_out, a moment later:
    // a transaction made in between shows in one only. Seen once: pending_out 0, lag 0.5 s.)
    let samples = agree("restored", &exporter, &cluster, BRANCH1, |s| {
        Ok(value(s, "rbucardo_peer_up", &[("db", "main")])? == 1.0
            && value(s, "rbucardo_peer_pending_out", &[("db", "main")])? == 0.0
            && value(s, "rbucardo_link_lag_seconds", &[("db", "main")])? == 0.0
            && value(s, "rbucardo_peer_exceptions", &[("db", "main")])? == 1.0
            && !find(s, "rbucardo_conflicts_total", &[("tbl", "public.products"), ("kind", "update_differs")]).is_empty())
    });
    assert_eq!(value(&samples, "rbucardo_exceptions_open", &[("db", "main"), ("kind", "constraint")]).unwrap(), 1.0);
    assert!(value(&samples, "rbucardo_exceptions_oldest_age_seconds", &[("db", "main"), ("kind", "constraint")]).unwrap() >= 0.0);
    assert_eq!(value(&samples, "rbucardo_link_lag_seconds", &[("db", "main")]).unwrap(), 0.0);
    let conflicts: f64 = find(&samples, "rbucardo_conflicts_total", &[]).iter().map(|s| s.value).sum();
    assert!(conflicts >= 1.0, "conflicts counted: {conflicts}");
    // A schema change from main fails on branch1 (a local view uses the column): the stream
    // from main stops there, and the metrics say so.
    cluster.node(BRANCH1).sql(DB, "SET rbucardo.replicate_ddl = off; CREATE VIEW price_report AS SELECT id, price FROM products");
    cluster.node(MAIN).sql(DB, "ALTER TABLE products ALTER COLUMN price TYPE numeric(12,3)");
    let samples = agree("stopped", &exporter, &cluster, BRANCH1, |s| {
        Ok(value(s, "rbucardo_peer_stopped", &[("db", "main")])? == 1.0
            && value(s, "rbucardo_exceptions_open", &[("db", "main"), ("kind", "ddl")])? == 1.0)
    });
    assert_eq!(value(&samples, "rbucardo_status_in_state", &[("db", "main"), ("state", "stopped")]).unwrap(), 1.0);
    assert_eq!(value(&samples, "rbucardo_peer_up", &[("db", "main")]).unwrap(), 0.0);
    assert_eq!(value(&samples, "rbucardo_peer_exceptions", &[("db", "main")]).unwrap(), 2.0, "the parked ana and the schema change");
    // The alerting rules and the dashboard use only metrics the exporter produces (now that
    // every kind of series, conflicts included, exists).
    for file in ["prometheus-alerts.yaml", "grafana-dashboard.json"] {
        let names = metric_names_in(file);
        assert!(names.len() >= 5, "{file}: only {names:?}");
        for name in names {
            assert!(!find(&samples, &name, &[]).is_empty(), "{file} uses {name}, which the exporter does not produce");
        }
    }

    // The same series through a role that is not a superuser (monitoring/monitor-role.sql).
    let grants = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/monitor-role.sql"))
        .expect("read monitoring/monitor-role.sql");
    cluster.node(BRANCH1).sql(DB, &grants);
    assert_eq!(one(&cluster, BRANCH1, "SELECT rolsuper FROM pg_roles WHERE rolname = 'prometheus'"), "f");
    let limited = Exporter::start(cluster.node(BRANCH1).port(), "prometheus", cluster.dir());
    let limited_samples = agree("through the monitoring role", &limited, &cluster, BRANCH1, |_| Ok(true));
    let series = |s: &[Sample]| {
        let mut names: Vec<String> = s.iter().filter(|s| s.name.starts_with("rbucardo_")).map(|s| format!("{}{:?}", s.name, s.labels)).collect();
        names.sort();
        names
    };
    assert_eq!(series(&limited_samples), series(&samples), "the monitoring role sees other series than postgres");
    assert!(!limited.log_text().contains("level=error"), "exporter logged errors:\n{}", limited.log_text());

    if std::env::var_os("RBUCARDO_SHOW_METRICS").is_some() {
        for s in samples.iter().filter(|s| s.name.starts_with("rbucardo_")) {
            eprintln!("{} {:?} {}", s.name, s.labels, s.value);
        }
    }
    assert!(!exporter.log_text().contains("level=error"), "exporter logged errors:\n{}", exporter.log_text());
}
