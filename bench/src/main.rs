//! Benchmarks that need several servers: they print figures, each beside a baseline measured in
//! the same run, and assert nothing.
//!
//!   cargo run --release -p rbucardo-bench -- latency [rounds]
//!   cargo run --release -p rbucardo-bench -- catchup [transactions]
//!   cargo run --release -p rbucardo-bench -- merge-catchup [transactions]
//!   cargo run --release -p rbucardo-bench -- fanin [branches] [seconds] [baseline seconds]
//!
//! The extension must be installed (`bash scripts/test.sh` or `cargo pgrx install --release`).

use std::time::{Duration, Instant};

use rbucardo_cluster_tests::{wait_until, Cluster, Conn};

const DB: &str = "bench";

/// main (0) + branches, in a star: each branch connects to main through its link proxy.
fn star(name: &str, branches: usize) -> Cluster {
    let mut names = vec!["main".to_string()];
    names.extend((1..=branches).map(|i| format!("branch{i}")));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let cluster = Cluster::builder(name).node_names(&refs).extra_conf("shared_buffers = 256MB\nmax_wal_size = 4GB\nrbucardo.report_interval = 30").start();
    for (i, n) in names.iter().enumerate() {
        let node = cluster.node(i);
        node.createdb(DB);
        node.sql(DB, "CREATE EXTENSION rbucardo");
        node.sql(DB, "CREATE TABLE item (id bigint PRIMARY KEY, node int NOT NULL, qty int NOT NULL, note text, at timestamptz DEFAULT clock_timestamp())");
        node.sql(DB, &format!("SELECT rbucardo.init_node('{n}', {})", i + 1));
        node.sql(DB, "SELECT rbucardo.add_herd('h'); SELECT rbucardo.add_table('h', 'item')");
    }
    let all: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    for (i, n) in names.iter().enumerate().skip(1) {
        cluster.node(0).sql(DB, &format!("SELECT rbucardo.add_db('{n}')"));
        let conninfo = cluster.link_conninfo(i, 0, DB);
        cluster.node(i).sql(DB, &format!("SELECT rbucardo.add_db('main', '{}')", conninfo.replace('\'', "''")));
        cluster.node(i).sql(DB, &format!("SELECT rbucardo.add_sync('s', 'h', ARRAY['main', '{n}'])"));
    }
    cluster.node(0).sql(DB, &format!("SELECT rbucardo.add_sync('s', 'h', ARRAY[{}])", all.join(", ")));
    cluster
}

fn count(conn: &mut Conn, sql: &str) -> i64 {
    conn.query_one(sql).expect("query").and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Time from a commit on branch1 until the row is visible on main (one hop) and on branch2
/// (two hops, forwarded by main). Baseline: a local INSERT + SELECT round trip on branch1.
fn latency(rounds: usize) {
    let cluster = star("bench-latency", 2);
    let (mut b1, mut main, mut b2) = (cluster.node(1).connect(DB), cluster.node(0).connect(DB), cluster.node(2).connect(DB));
    wait_until("branches connected", Duration::from_secs(60), || {
        Ok(count(&mut main, "SELECT count(*) FROM rbucardo.peer_state WHERE last_contact IS NOT NULL") == 2)
    });
    let (mut local, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds as i64 {
        let t0 = Instant::now();
        b1.execute(&format!("INSERT INTO item (id, node, qty) VALUES ({i}, 2, 1)")).unwrap();
        local.push(t0.elapsed());
        let probe = format!("SELECT count(*) FROM item WHERE id = {i}");
        let (mut seen_main, mut seen_b2) = (None, None);
        while seen_b2.is_none() || seen_main.is_none() {
            if seen_main.is_none() && count(&mut main, &probe) == 1 {
                seen_main = Some(t0.elapsed());
            }
            if seen_b2.is_none() && count(&mut b2, &probe) == 1 {
                seen_b2 = Some(t0.elapsed());
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "row {i} did not arrive within 60 s");
        }
        one.push(seen_main.unwrap());
        two.push(seen_b2.unwrap());
    }
    for v in [&mut local, &mut one, &mut two] {
        v.sort();
    }
    println!("latency over {rounds} single-row transactions (median / p95):");
    println!("  baseline: local commit on branch1        {:>8.2?} / {:>8.2?}", percentile(&local, 0.5), percentile(&local, 0.95));
    println!("  branch1 -> main                          {:>8.2?} / {:>8.2?}", percentile(&one, 0.5), percentile(&one, 0.95));
    println!("  branch1 -> main -> branch2               {:>8.2?} / {:>8.2?}", percentile(&two, 0.5), percentile(&two, 0.95));
}

/// Catch-up rate after an outage: with branch1's link cut, branch1 commits `txns` transactions
/// of 10 row changes each (7 inserts, 2 updates, 1 delete); the link is restored and the time
/// until main has every row is measured. Baseline: how long branch1 took to commit them.
fn catchup(txns: usize) {
    let cluster = star("bench-catchup", 1);
    let (mut main, mut b1) = (cluster.node(0).connect(DB), cluster.node(1).connect(DB));
    wait_until("branch connected", Duration::from_secs(60), || {
        Ok(count(&mut main, "SELECT count(*) FROM rbucardo.peer_state WHERE last_contact IS NOT NULL") == 1)
    });
    cluster.link(1, 0).cut();
    let t0 = Instant::now();
    b1.execute(&format!(
        "DO $$ BEGIN FOR t IN 0 .. {} LOOP
             INSERT INTO item (id, node, qty, note) SELECT t * 10 + g, 2, g, 'sale ' || t FROM generate_series(0, 6) g;
             UPDATE item SET qty = qty + 1 WHERE id IN (t * 10, t * 10 + 1);
             DELETE FROM item WHERE id = t * 10 + 6;
             COMMIT;
         END LOOP; END $$",
        txns - 1
    ))
    .unwrap();
    let write = t0.elapsed();
    let changes = txns as f64 * 10.0;
    let want = count(&mut b1, "SELECT count(*) FROM item");
    let want_sum = count(&mut b1, "SELECT sum(qty) FROM item");
    let backlog = count(&mut b1, "SELECT pg_total_relation_size('rbucardo.change_log')");
    let applied_before = count(&mut main, "SELECT coalesce(sum(applied_in), 0) FROM rbucardo.peer_state");
    cluster.link(1, 0).restore();
    let t1 = Instant::now();
    // A cheap probe while it runs (counting the table every 50 ms would take CPU from the
    // applier on a small machine); the rows are checked once it is done.
    wait_until("main caught up", Duration::from_secs(1800), || {
        Ok(count(&mut main, "SELECT coalesce(sum(applied_in), 0) FROM rbucardo.peer_state") >= applied_before + txns as i64)
    });
    let catch = t1.elapsed();
    assert_eq!(count(&mut main, "SELECT count(*) FROM item"), want, "rows on main after catching up");
    assert_eq!(count(&mut main, "SELECT sum(qty) FROM item"), want_sum, "quantities on main after catching up");
    println!("catch-up of {txns} transactions ({changes} row changes, change log {:.1} MB):", backlog as f64 / 1e6);
    println!("  baseline: committing them on branch1     {:>8.2?}  ({:>9.0} changes/s)", write, changes / write.as_secs_f64());
    println!("  replicating them to main after restore   {:>8.2?}  ({:>9.0} changes/s)", catch, changes / catch.as_secs_f64());
}

/// The cost of conflicts in a catch-up: branch1, cut off, sells from every row of a stock table
/// (one update of a delta column per transaction) while main sold one of each too, so every
/// transaction branch1 sends merges a delta on main (counted, not logged). Baseline in the same
/// run: the same catch-up where main sold nothing (no conflict at all).
fn merge_catchup(txns: usize) {
    let mut rates = Vec::new();
    for conflicting in [false, true] {
        let cluster = star(if conflicting { "bench-merge" } else { "bench-nomerge" }, 1);
        let (mut main, mut b1) = (cluster.node(0).connect(DB), cluster.node(1).connect(DB));
        for c in [&mut main, &mut b1] {
            c.execute("SELECT rbucardo.set_column_strategy('item', 'qty', 'delta')").unwrap();
        }
        wait_until("branch connected", Duration::from_secs(60), || {
            Ok(count(&mut main, "SELECT count(*) FROM rbucardo.peer_state WHERE last_contact IS NOT NULL") == 1)
        });
        main.execute(&format!("INSERT INTO item (id, node, qty) SELECT g, 1, 1000000 FROM generate_series(0, {}) g", txns - 1)).unwrap();
        wait_until("stock on branch1", Duration::from_secs(600), || Ok(count(&mut b1, "SELECT count(*) FROM item") == txns as i64));
        cluster.link(1, 0).cut();
        if conflicting {
            main.execute("UPDATE item SET qty = qty - 1").unwrap();
        }
        b1.execute(&format!(
            "DO $$ BEGIN FOR t IN 0 .. {} LOOP UPDATE item SET qty = qty - 2 WHERE id = t; COMMIT; END LOOP; END $$",
            txns - 1
        ))
        .unwrap();
        let applied_before = count(&mut main, "SELECT coalesce(sum(applied_in), 0) FROM rbucardo.peer_state");
        cluster.link(1, 0).restore();
        let t0 = Instant::now();
        wait_until("main caught up", Duration::from_secs(1800), || {
            Ok(count(&mut main, "SELECT coalesce(sum(applied_in), 0) FROM rbucardo.peer_state") >= applied_before + txns as i64)
        });
        let took = t0.elapsed();
        let want = txns as i64 * (1_000_000 - 2 - i64::from(conflicting));
        assert_eq!(count(&mut main, "SELECT sum(qty) FROM item"), want, "every sale counted on main");
        let merged = count(&mut main, "SELECT coalesce(sum(conflicts), 0) FROM rbucardo.conflict_stats WHERE outcome = 'column_merge'");
        let logged = count(&mut main, "SELECT count(*) FROM rbucardo.conflicts");
        rates.push((conflicting, took, merged, logged));
    }
    println!("catch-up of {txns} single-row stock transactions:");
    for (conflicting, took, merged, logged) in rates {
        println!(
            "  {:<44} {:>8.2?}  ({:>8.0} txns/s; {merged} merges counted, {logged} logged)",
            if conflicting { "every transaction merges a delta on main" } else { "baseline: no conflict" },
            took,
            txns as f64 / took.as_secs_f64()
        );
    }
}

/// Lag in a star of many stores. main is one server; the branches are databases on a second
/// server, each its own node with its own link to main (one proxy for all). Every node inserts
/// one order per 200 ms over one connection for `seconds`. Each row records its commit time
/// (`at`, set where it was made) and its arrival (`arrived`, set on every node by an ALWAYS
/// trigger), so lag comes from both ends' timestamps, not from polling: one hop is a branch's
/// row on main, two hops a branch's row on another branch. Also main's CPU time (all its
/// processes) per row it received. Runs 2 branches and then `branches`, in one run.
/// `baseline_seconds` runs the 2-branch baseline longer: at the default, its p99 is the 3rd
/// slowest of 300 rows and moves a lot from run to run.
fn fanin(branches: usize, seconds: u64, baseline_seconds: u64) {
    let mut rows = Vec::new();
    for (n, secs) in [(2, baseline_seconds), (branches, seconds)] {
        rows.push((n, fanin_run(n, secs)));
    }
    let baseline = if baseline_seconds == seconds { String::new() } else { format!(" ({baseline_seconds} s with 2 branches)") };
    println!("fan-in: every node inserts one order per 200 ms for {seconds} s{baseline}; lag from commit to arrival (p50 / p99)");
    println!("  branches  orders/s   one hop (branch -> main)   two hops (branch -> main -> branch)   main CPU per received row   branches' CPU per applied row");
    for (n, r) in &rows {
        println!(
            "  {n:>8}  {:>8.1}   {:>9.1} / {:>9.1} ms     {:>9.1} / {:>9.1} ms                {:>7.3} ms                  {:>7.3} ms",
            r.rate, r.one.0, r.one.1, r.two.0, r.two.1, r.cpu_ms_per_row, r.branch_cpu_ms_per_row
        );
    }
    println!("  what the scheduler saw from the warm-up to main's last order (both servers' processes):");
    println!("  branches   machine busy   waited for a core, per ms run");
    for (n, r) in &rows {
        println!("  {n:>8}   {:>11.0} %   {:>13.2} ms", r.busy * 100.0, r.waited_per_ran);
    }
}

struct FanIn {
    rate: f64,
    one: (f64, f64),
    two: (f64, f64),
    cpu_ms_per_row: f64,
    /// The branches' server (all its processes) per row the branches applied from main.
    branch_cpu_ms_per_row: f64,
    /// Share of the machine's CPU time spent busy over the measured load.
    busy: f64,
    /// Time the servers' processes waited, runnable, for a core, per unit of time they ran.
    waited_per_ran: f64,
}

/// Every process of a server (its postmaster and every child): its /proc directory and the
/// fields of its `stat` after the command name (`state` first, so field N of proc(5) is at
/// N - 3).
fn server_procs(postmaster: u32) -> Vec<(std::path::PathBuf, Vec<String>)> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let f: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if pid == postmaster || ppid == postmaster {
            procs.push((entry.path(), f));
        }
    }
    procs
}

/// CPU seconds used so far by a server: its postmaster and every child process.
fn server_cpu(postmaster: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    // utime (14) and stime (15).
    let field = |f: &[String], i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    server_procs(postmaster).iter().map(|(_, f)| (field(f, 11) + field(f, 12)) / tick).sum()
}

/// Run and wait times by process (its /proc directory and start time), in nanoseconds.
type ProcTimes = std::collections::HashMap<(std::path::PathBuf, u64), (u64, u64)>;

/// Nanoseconds each process of a server (by pid and start time) has run and waited, runnable,
/// for a core so far (/proc/PID/schedstat). A load that wakes many processes at once waits
/// for a core even on a machine idle on average.
fn server_sched(postmaster: u32) -> ProcTimes {
    let mut procs = std::collections::HashMap::new();
    for (dir, f) in server_procs(postmaster) {
        // starttime (22): a pid reused by a later process is another process.
        let started: u64 = f.get(19).and_then(|v| v.parse().ok()).unwrap_or(0);
        let Ok(sched) = std::fs::read_to_string(dir.join("schedstat")) else { continue };
        let v: Vec<u64> = sched.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if v.len() >= 2 {
            procs.insert((dir, started), (v[0], v[1]));
        }
    }
    procs
}

/// What the processes alive at `to` ran and waited since `from` (all of it for those started
/// since): one that exited in between takes nothing out of the sum.
fn sched_between(from: &ProcTimes, to: &ProcTimes) -> (u64, u64) {
    to.iter().fold((0, 0), |(ran, waited), (k, &(r1, w1))| {
        let (r0, w0) = from.get(k).copied().unwrap_or((0, 0));
        (ran + r1.saturating_sub(r0), waited + w1.saturating_sub(w0))
    })
}

/// The machine's (busy, total) CPU time so far, from /proc/stat (idle and iowait are not busy).
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn fanin_run(branches: usize, seconds: u64) -> FanIn {
    let statements = std::env::var_os("FANIN_STATEMENTS").is_some() && branches > 2;
    let cluster = Cluster::builder(&format!("bench-fanin-{branches}"))
        .node_names(&["main", "stores"])
        .extra_conf("shared_buffers = 128MB\nmax_worker_processes = 128\nmax_connections = 200\ntrack_functions = all\nrbucardo.report_interval = 30")
        // For development: FANIN_STATEMENTS=1 loads pg_stat_statements and prints each
        // server's costliest statements (parse, plan and run) after the larger run.
        .extra_conf(if statements { "shared_preload_libraries = 'rbucardo, pg_stat_statements'\npg_stat_statements.track = all\npg_stat_statements.track_planning = on" } else { "" })
        .start();
    let names: Vec<String> = std::iter::once("main".to_string()).chain((1..=branches).map(|i| format!("b{i}"))).collect();
    // (server, database) of each rbucardo node.
    let place = |k: usize| if k == 0 { (0, DB.to_string()) } else { (1, names[k].clone()) };
    let schema = "CREATE TABLE item (id bigint PRIMARY KEY, node int NOT NULL, qty int NOT NULL, note text,
                                     at timestamptz NOT NULL, arrived timestamptz);
                  CREATE FUNCTION arrived() RETURNS trigger LANGUAGE plpgsql AS
                    $$ BEGIN NEW.arrived := clock_timestamp(); RETURN NEW; END $$;
                  CREATE TRIGGER arrived BEFORE INSERT ON item FOR EACH ROW EXECUTE FUNCTION arrived();
                  ALTER TABLE item ENABLE ALWAYS TRIGGER arrived;";
    for (k, name) in names.iter().enumerate() {
        let (server, db) = place(k);
        let node = cluster.node(server);
        node.createdb(&db);
        node.sql(&db, "CREATE EXTENSION rbucardo");
        node.sql(&db, schema);
        node.sql(&db, &format!("SELECT rbucardo.init_node('{name}', {})", k + 1));
        node.sql(&db, "SELECT rbucardo.add_herd('h'); SELECT rbucardo.add_table('h', 'item')");
        if k > 0 {
            cluster.node(0).sql(DB, &format!("SELECT rbucardo.add_db('{name}')"));
            let conninfo = cluster.link_conninfo(1, 0, DB);
            node.sql(&db, &format!("SELECT rbucardo.add_db('main', '{}')", conninfo.replace('\'', "''")));
            node.sql(&db, &format!("SELECT rbucardo.add_sync('s', 'h', ARRAY['main', '{name}'])"));
        }
    }
    let all: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
    cluster.node(0).sql(DB, &format!("SELECT rbucardo.add_sync('s', 'h', ARRAY[{}])", all.join(", ")));
    let mut main = cluster.node(0).connect(DB);
    wait_until("every branch connected", Duration::from_secs(120), || {
        Ok(count(&mut main, "SELECT count(*) FROM rbucardo.peer_state WHERE last_contact IS NOT NULL") == branches as i64)
    });
    let postmaster = cluster.node(0).postmaster_pid().expect("main runs");
    let branch_postmaster = cluster.node(1).postmaster_pid().expect("the branches' server runs");
    // The first WARMUP_ORDERS of each node (2 s) are not measured: every link's first calls
    // plan their statements and fill its caches, and with 20 stores starting at once that took
    // up to 600 ms on this machine, which was then most of the 20-branch p99.
    const WARMUP_ORDERS: i64 = 10;
    let per_node = (seconds * 5) as i64;
    let cpu0_at_warm = std::sync::Mutex::new(None);
    // The scheduler's view from the end of the warm-up (as the CPU figures) to main's last
    // order: the wait for every order to arrive after it is not load.
    let sched_now = || {
        let mut procs = server_sched(postmaster);
        procs.extend(server_sched(branch_postmaster));
        (procs, machine_cpu())
    };
    let sched_end = std::sync::Mutex::new(None);
    let t0 = Instant::now();
    // For development: FANIN_PERF=prefix records a system-wide profile of the load phase of
    // the larger run (PREFIX.data) and the servers' process titles (PREFIX.ps), to map pids.
    let perf = std::env::var("FANIN_PERF").ok().filter(|_| branches > 2).map(|prefix| {
        let child = std::process::Command::new("perf")
            .args(["record", "-a", "-g", "-F", "999", "-o", &format!("{prefix}.data")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf record");
        (prefix, child)
    });
    std::thread::scope(|scope| {
        if let Some((prefix, _)) = &perf {
            scope.spawn(move || {
                std::thread::sleep(Duration::from_secs(seconds / 2));
                let ps = std::process::Command::new("ps").args(["-eo", "pid,args"]).output().expect("ps");
                std::fs::write(format!("{prefix}.ps"), ps.stdout).expect("writing the process list");
            });
        }
        for k in 0..names.len() {
            let (server, db) = place(k);
            let cluster = &cluster;
            let cpu0 = &cpu0_at_warm;
            let (sched_now, sched_end) = (&sched_now, &sched_end);
            scope.spawn(move || {
                let mut conn = cluster.node(server).connect(&db);
                let start = Instant::now();
                for i in 0..per_node + WARMUP_ORDERS {
                    let due = start + Duration::from_millis(200 * i as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    conn.execute(&format!("INSERT INTO item (id, node, qty, note, at) VALUES ({}, {k}, 1, 'order', clock_timestamp())", k as i64 * 10_000_000 + i))
                        .unwrap();
                    if k == 0 && i + 1 == WARMUP_ORDERS {
                        *cpu0.lock().unwrap() = Some((server_cpu(postmaster), server_cpu(branch_postmaster), sched_now()));
                    }
                    if k == 0 && i + 1 == per_node + WARMUP_ORDERS {
                        *sched_end.lock().unwrap() = Some(sched_now());
                    }
                }
            });
        }
    });
    if let Some((_, mut child)) = perf {
        // SAFETY: a plain signal to the child we started; perf writes its file on SIGINT.
        unsafe { libc_kill(child.id() as i32, 2) };
        let _ = child.wait();
    }
    let total = (per_node + WARMUP_ORDERS) * names.len() as i64;
    for k in 0..names.len() {
        let (server, db) = place(k);
        let mut conn = cluster.node(server).connect(&db);
        wait_until(&format!("every order on {}", names[k]), Duration::from_secs(600), || Ok(count(&mut conn, "SELECT count(*) FROM item") == total));
    }
    let elapsed = t0.elapsed();
    let (cpu0, branch_cpu0, sched0) = cpu0_at_warm.into_inner().unwrap().expect("main's warm-up ended");
    let sched1 = sched_end.into_inner().unwrap().expect("main's last order");
    let cpu = server_cpu(postmaster) - cpu0;
    let branch_cpu = server_cpu(branch_postmaster) - branch_cpu0;
    if statements {
        for (server, db) in [place(0), place(1)] {
            let mut conn = cluster.node(server).connect(&db);
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").expect("pg_stat_statements");
            let top = conn
                .query(
                    "SELECT format('%8s calls %6s plans %9s ms plan %9s ms run  %s', sum(calls), sum(plans), round(sum(total_plan_time)),
                                   round(sum(total_exec_time)), left(regexp_replace(query, '\\s+', ' ', 'g'), 150))
                       FROM pg_stat_statements GROUP BY query ORDER BY sum(total_plan_time + total_exec_time) DESC LIMIT 30",
                )
                .expect("statements");
            println!("  costliest statements on server {server}:");
            for r in top {
                println!("    {}", r[0].clone().unwrap_or_default());
            }
        }
    }
    let lags = |conn: &mut Conn, sql: &str| -> Vec<f64> {
        conn.query(sql).expect("lags").into_iter().filter_map(|r| r[0].as_deref()?.parse().ok()).collect()
    };
    let mut one = lags(&mut main, &format!("SELECT extract(epoch FROM arrived - at) * 1000 FROM item WHERE node <> 0 AND id % 10000000 >= {WARMUP_ORDERS}"));
    // For development: FANIN_LAGDUMP=1 prints the larger run's slowest one-hop rows, with when
    // they were made: whether slow rows come together (a stall on main) or from one store.
    if std::env::var_os("FANIN_LAGDUMP").is_some() && branches > 2 {
        let worst = main
            .query(&format!(
                "SELECT format('  node %2s at +%7s s  lag %7s ms', node, round(extract(epoch FROM at - min(at) OVER ())::numeric, 3),
                               round((extract(epoch FROM arrived - at) * 1000)::numeric, 1))
                   FROM item WHERE node <> 0 AND id % 10000000 >= {WARMUP_ORDERS} ORDER BY arrived - at DESC LIMIT 25"
            ))
            .expect("slowest rows");
        for r in worst {
            println!("{}", r[0].clone().unwrap_or_default());
        }
    }
    let mut two = Vec::new();
    for k in 1..names.len() {
        let (server, db) = place(k);
        let mut conn = cluster.node(server).connect(&db);
        two.extend(lags(&mut conn, &format!("SELECT extract(epoch FROM arrived - at) * 1000 FROM item WHERE node NOT IN (0, {k}) AND id % 10000000 >= {WARMUP_ORDERS}")));
    }
    let pct = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return (0.0, 0.0);
        }
        let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
        (at(0.5), at(0.99))
    };
    let received = per_node * branches as i64;
    let calls = main
        .query("SELECT funcname || ' ' || calls FROM pg_stat_user_functions WHERE schemaname = 'rbucardo' AND funcname LIKE 'peer_%' ORDER BY 1")
        .expect("function stats");
    let calls: Vec<String> = calls.into_iter().filter_map(|r| r[0].clone()).collect();
    println!("  ({branches} branches: main served {} over {:.0} s)", calls.join(", "), elapsed.as_secs_f64());
    // Each branch applies every other node's orders: main's and the other branches'.
    let applied = per_node * (branches * branches) as i64;
    FanIn {
        rate: total as f64 / elapsed.as_secs_f64(),
        one: pct(&mut one),
        two: pct(&mut two),
        cpu_ms_per_row: cpu * 1000.0 / received as f64,
        branch_cpu_ms_per_row: branch_cpu * 1000.0 / applied as f64,
        busy: sched1.1 .0.saturating_sub(sched0.1 .0) as f64 / sched1.1 .1.saturating_sub(sched0.1 .1).max(1) as f64,
        waited_per_ran: {
            let (ran, waited) = sched_between(&sched0.0, &sched1.0);
            waited as f64 / ran.max(1) as f64
        },
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = |default| args.get(2).and_then(|s| s.parse().ok()).unwrap_or(default);
    match args.get(1).map(String::as_str) {
        Some("latency") => latency(n(200)),
        Some("catchup") => catchup(n(20_000)),
        Some("merge-catchup") => merge_catchup(n(20_000)),
        Some("fanin") => {
            let seconds = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(30);
            fanin(n(20), seconds, args.get(4).and_then(|s| s.parse().ok()).unwrap_or(seconds))
        }
        _ => {
            eprintln!("usage: rbucardo-bench latency [rounds] | catchup [transactions] | merge-catchup [transactions] | fanin [branches] [seconds] [baseline seconds]");
            std::process::exit(2);
        }
    }
}
