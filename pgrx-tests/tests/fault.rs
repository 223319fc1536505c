//! Seeded randomized fault test: writers on every node at once while links are cut, stalled
//! and cut mid-batch, nodes are SIGKILLed (also while applying a catch-up, and with a COMMIT in
//! flight) and restarted, and clocks are skewed; after healing, every node must hold the same
//! rows, and exactly what the committed transactions say.
//!
//! One seed drives everything that is chosen: the workload of each node (which operation, which
//! rows, which amounts) and the fault timeline of each cycle (which fault, when, on which link
//! or node, for how long). The plan is printed at the start of every cycle, and a failure names
//! the seed and the command that replays it (`RBUCARDO_FAULT_SEED=<seed>`): the same plan again.
//! The interleaving with the servers' own timing cannot be replayed exactly, so a
//! timing-dependent failure may need a few runs.
//!
//! Per seed and topology (star and mesh): a fresh three-node store cluster (tests/common:
//! main, branch1, branch2), then `RBUCARDO_FAULT_CYCLES` cycles (default 2) of
//!
//! 1. **Workload and faults at once.** One writer thread per node commits transactions on its
//!    own node: sales (an order, its lines, and a stock decrement per line, in one transaction),
//!    stock decrements alone, lines on another node's order (foreign-key children), new users,
//!    updates and deletes of its own rows, drafts created and deleted with their lines, bulk
//!    rows (larger batches; now and then about 10 MB in one transaction, which travels in parts), and now and then DDL (`ADD COLUMN` on products from main; in a
//!    mesh the branches also create and drop indexes). `products.stock` is a delta column on
//!    every node and every node decrements the same products. Meanwhile a fault thread plays
//!    the cycle's timeline: link cuts (one or two links), stalls, cuts after N bytes in either
//!    direction (mid-batch), SIGKILL and start, SIGKILL of a node while it applies a peer's
//!    catch-up, SIGKILL while a COMMIT waits for a synchronous standby that never comes
//!    (committed locally, never acknowledged), clean restarts, clock skew (±30 s to ±1 h), and
//!    "the same login on two nodes": two users with one login committed on two nodes at the
//!    same moment, sometimes with a sale, sometimes with an order whose line follows in the
//!    next transaction (where the user's transaction is parked, the line is parked too: its
//!    parent has not arrived). Faults overlap; one that would touch a link or node another
//!    fault holds is skipped (and says so).
//! 2. **Heal**: every link restored, every node up, skew reset.
//! 3. **Checks.** Each same-login user is, on every node, either there or parked in
//!    `rbucardo.exceptions` (exactly one of the two is there); the test then renames the first
//!    one's login on its own node (the operator's fix), and the parked transactions apply by
//!    themselves. Half the seeds set the login index to `rename` instead
//!    (`set_unique_strategy`): then nothing parks, both users of a pair end on every node, one
//!    with the login and the later one with login~id, and every node holds the same. Then: no exception is left open; every table is identical row by row on every
//!    node, with the same columns and indexes; every row is exactly what the committed
//!    transactions left (each committed insert is there unless a committed delete removed it,
//!    nothing else is, every committed update shows, every committed DDL is there); each
//!    product's stock is its start minus every committed decrement; no conflict is logged on a
//!    row only one node writes, unless a parked transaction touched it; applied counts: on
//!    every node, transactions applied from peers plus transactions parked there equal the
//!    transactions the other nodes committed (none applied twice, none lost); the change logs
//!    drain; the applied counts hold again after the drain.
//!
//! A transaction counts as committed only if its COMMIT succeeded; when the answer to a COMMIT
//! was lost (node killed or restarted), the writer asks the node, once it is back, with
//! `pg_xact_status`.
//!
//! Environment:
//! - `RBUCARDO_FAULT_SEED=<n|0xhex>`: run this seed only (default: three fixed seeds).
//! - `RBUCARDO_FAULT_CYCLES=<n>`: cycles per seed (default 2).
//! - `RBUCARDO_FAULT_SECONDS=<s>`: long run: random seeds (the given seed first, if any), each
//!   on a fresh cluster, until `s` seconds have passed; per topology, and the two topologies
//!   run in parallel. E.g. `RBUCARDO_FAULT_SECONDS=14400 RBUCARDO_FAULT_CYCLES=10`.
//!
//! The default run (3 seeds x 2 cycles x star and mesh) takes under two minutes on two cores.
//! A run during which the extension library is reinstalled is void (its servers die with
//! SIGBUS/SIGILL) and is run again.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use rbucardo_cluster_tests::{poll_every, wait_until, Cluster, Conn, Direction};

/// Seeds of the default (CI) run.
const DEFAULT_SEEDS: [u64; 3] = [0x5eed_f417_0001, 0x5eed_f417_0002, 0x5eed_f417_0003];
const DEFAULT_CYCLES: usize = 2;
/// Products every node sells from; their stock is a delta column.
const PRODUCTS: i64 = 12;
const START_STOCK: i64 = 1_000_000;
/// How long healing may take before the test gives up.
const CONVERGE: Duration = Duration::from_secs(240);
/// How long a writer waits for its node to come back after a kill or restart.
const NODE_BACK: Duration = Duration::from_secs(120);
/// Bulk rows: `repeat(md5(id::text), BULK_REPEAT)`.
const BULK_REPEAT: i64 = 150;
/// Offset of the same-login users in a node's id range (writers' users stay below it).
const DUP_USERS: i64 = 900_000;

// ---------------------------------------------------------------------------------------------
// Configuration and seeds.

struct Config {
    seeds: Vec<u64>,
    cycles: usize,
    /// Long run: keep drawing seeds until then.
    until: Option<Instant>,
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(parse_u64(&value).unwrap_or_else(|| panic!("{name}={value:?} is not a number")))
}

fn config() -> Config {
    let seed = env_u64("RBUCARDO_FAULT_SEED");
    let cycles = env_u64("RBUCARDO_FAULT_CYCLES").map_or(DEFAULT_CYCLES, |c| c.max(1) as usize);
    let until = env_u64("RBUCARDO_FAULT_SECONDS").map(|s| Instant::now() + Duration::from_secs(s));
    let seeds = match (seed, until) {
        (Some(s), _) => vec![s],
        (None, Some(_)) => {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            vec![Rng::new(nanos ^ u64::from(std::process::id())).next()]
        }
        (None, None) => DEFAULT_SEEDS.to_vec(),
    };
    Config { seeds, cycles, until }
}

/// splitmix64: tiny, fast, and the same everywhere.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A generator for one part of the run, independent of how much the others draw.
    fn derive(seed: u64, parts: &[u64]) -> Rng {
        let mut r = Rng::new(seed);
        for &p in parts {
            r = Rng::new(r.next() ^ p.wrapping_mul(0x2545_f491_4f6c_dd1d));
        }
        r
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo <= hi);
        lo + (self.next() % ((hi - lo + 1) as u64)) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize].clone()
    }

    /// An index drawn with the given weights.
    fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut x = self.next() % total;
        for (i, &w) in weights.iter().enumerate() {
            if x < w {
                return i;
            }
            x -= w;
        }
        unreachable!()
    }
}

fn topology_name(t: Topology) -> &'static str {
    match t {
        Topology::Star => "star",
        Topology::Mesh => "mesh",
    }
}

/// The links (from, to) the topology uses: `from` connects to `to` through that proxy.
fn topology_links(t: Topology) -> Vec<(usize, usize)> {
    match t {
        Topology::Star => vec![(BRANCH1, MAIN), (BRANCH2, MAIN)],
        Topology::Mesh => ALL.iter().flat_map(|&i| ALL.iter().filter(move |&&j| j != i).map(move |&j| (i, j))).collect(),
    }
}

fn link_name(link: (usize, usize)) -> String {
    format!("{}->{}", NODE_NAMES[link.0], NODE_NAMES[link.1])
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(non-text panic payload)".to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn fault_star() {
    run_topology(Topology::Star);
}

#[test]
fn fault_mesh() {
    run_topology(Topology::Mesh);
}

fn run_topology(topology: Topology) {
    let cfg = config();
    let started = Instant::now();
    let mut seeds: std::collections::VecDeque<u64> = cfg.seeds.iter().copied().collect();
    let mut ran = Vec::new();
    // Long runs: after the given seed(s), seeds derived from the first one.
    let mut next = Rng::derive(cfg.seeds[0], &[0x5eed]);
    while let Some(seed) = seeds.pop_front() {
        run_with_seed(seed, topology, cfg.cycles);
        ran.push(seed);
        if cfg.until.is_some_and(|until| Instant::now() < until) && seeds.is_empty() {
            seeds.push_back(next.next());
        }
    }
    eprintln!(
        "fault {}: seeds {} passed ({} cycles each) in {:.0}s",
        topology_name(topology),
        ran.iter().map(|s| format!("{s:#x}")).collect::<Vec<_>>().join(", "),
        cfg.cycles,
        started.elapsed().as_secs_f64()
    );
}

/// Runs one seed; any failure is re-raised with the seed and how to replay it.
///
/// A run during which the extension library was reinstalled is void (every server that had the
/// old library loaded dies with SIGBUS or SIGILL): it is run again, up to twice.
fn run_with_seed(seed: u64, topology: Topology, cycles: usize) {
    let test = format!("fault_{}", topology_name(topology));
    let replay = format!(
        "RBUCARDO_FAULT_SEED={seed:#x} RBUCARDO_FAULT_CYCLES={cycles} cargo test --release -p rbucardo-cluster-tests --test fault {test} -- --nocapture"
    );
    for attempt in 1..=3 {
        eprintln!("=== {test}: seed {seed:#x}, {cycles} cycles (replay: {replay})");
        wait_library_stable();
        let library = library_stamp();
        let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| run_seed(seed, topology, cycles, library))) else {
            return;
        };
        let mut message = payload_text(payload.as_ref());
        if library_stamp() != library {
            let note = format!(
                "the extension library {} was replaced during this run; servers that had it loaded \
                 die with SIGBUS or SIGILL (\"terminated by signal 7\" or \"4\" in their logs)",
                library_path().display()
            );
            if attempt < 3 {
                eprintln!("=== {test}: seed {seed:#x}: run void, {note}; running it again");
                continue;
            }
            message += &format!("\nNOTE: {note}. Run again before suspecting rbucardo.");
        }
        eprintln!("=== {test}: FAILED with seed {seed:#x}; replay with: {replay}");
        panic!("{test} failed with seed {seed:#x} (replay: {replay}):\n{message}");
    }
}

/// Panics at once when the library changed since `stamp`: the servers are dying.
fn check_library(stamp: Option<std::time::SystemTime>) {
    if library_stamp() != stamp {
        panic!("the extension library {} was replaced during the run", library_path().display());
    }
}

/// Waits (up to a minute) until the library has not been written for 15 seconds: an install
/// in progress.
fn wait_library_stable() {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let age = library_stamp().and_then(|t| t.elapsed().ok()).unwrap_or(Duration::MAX);
        if age > Duration::from_secs(15) {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The installed extension library (next to the binaries the harness runs).
fn library_path() -> std::path::PathBuf {
    let bin = std::env::var_os("RBUCARDO_PG_BIN").map_or_else(|| "/usr/lib/postgresql/15/bin".into(), std::path::PathBuf::from);
    bin.join("../lib/rbucardo.so")
}

/// When the library was last written: a reinstall during a run kills its servers.
fn library_stamp() -> Option<std::time::SystemTime> {
    std::fs::metadata(library_path()).and_then(|m| m.modified()).ok()
}

fn run_seed(seed: u64, topology: Topology, cycles: usize, library: Option<std::time::SystemTime>) {
    let started = Instant::now();
    let name = format!("fault_{}_{:x}", topology_name(topology), seed & 0xffff_ffff);
    // A synchronous standby that never connects: a session that asks for synchronous_commit =
    // on then waits in COMMIT, committed locally but not acknowledged (KillInDoubt). Everything
    // else, rbucardo included, commits with `local` and never waits.
    let cluster = start_store_with(&name, topology, "synchronous_standby_names = 'nobody'\nsynchronous_commit = local");
    let mut world = World::new(seed, topology, library);
    world.setup(&cluster);
    eprintln!("[{}] cluster up and seeded in {:.1}s", world.tag(), started.elapsed().as_secs_f64());
    for cycle in 0..cycles {
        world.cycle(&cluster, cycle);
    }
    eprintln!("[{}] all {cycles} cycles passed in {:.1}s", world.tag(), started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// What the committed transactions left: the model the nodes are checked against.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Order {
    reference: i64,
    total_cents: i64,
    draft: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Line {
    order_id: i64,
    product_id: i64,
    qty: i64,
    note: String,
}

/// One node's own rows (ids in its range) as its committed transactions left them.
#[derive(Default, Debug)]
struct NodeModel {
    users: BTreeMap<i64, (String, String)>,
    orders: BTreeMap<i64, Order>,
    lines: BTreeMap<i64, Line>,
    /// bulk id -> tag; a bulk insert's ids by tag.
    bulk: BTreeMap<i64, i64>,
    bulk_tags: BTreeMap<i64, Vec<i64>>,
    next_user: i64,
    next_order: i64,
    next_line: i64,
    next_bulk: i64,
    next_tag: i64,
    next_ddl: i64,
    /// Committed decrements, per product.
    sold: BTreeMap<i64, i64>,
    /// Prices this node's committed transactions set, per product (every node sets prices of
    /// the same products: under `latest`, one of them wins everywhere).
    prices: BTreeMap<i64, BTreeSet<String>>,
    next_price: i64,
    /// The last marker of a writer transaction (see `mark`).
    next_marker: i64,
    /// Transactions committed here that wrote something (each replicates as one transaction).
    committed: i64,
    /// Columns added to products (name, default), indexes created and not dropped.
    columns: Vec<(String, i64)>,
    indexes: BTreeSet<String>,
    stats: Stats,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    committed: i64,
    failed: i64,
    /// COMMIT answers lost; resolved with pg_xact_status (committed, not committed).
    in_doubt: (i64, i64),
    reconnects: i64,
    /// Per operation: (committed, not committed).
    ops: BTreeMap<&'static str, (i64, i64)>,
}

/// A change to the model, applied once its transaction is known to have committed.
#[derive(Clone, Debug)]
enum Effect {
    InsUser(i64, String, String),
    UpdUser(i64, String),
    DelUser(i64),
    InsOrder(i64, Order),
    UpdOrder(i64, i64),
    DelOrder(i64),
    InsLine(i64, Line),
    UpdLine(i64, i64),
    DelLine(i64),
    InsBulk(i64, Vec<i64>),
    DelBulk(i64),
    Sold(i64, i64),
    Price(i64, String),
    AddColumn(String, i64),
    AddIndex(String),
    DropIndex(String),
    /// A sale order other nodes may now reference.
    Sale(i64),
}

impl NodeModel {
    fn new(k: usize) -> NodeModel {
        let b = base(k);
        NodeModel {
            next_user: b + 1,
            next_order: b + 1,
            next_line: b + 1,
            next_bulk: b + 1,
            next_tag: b + 1,
            next_price: b + 1,
            ..Default::default()
        }
    }

    fn apply(&mut self, effects: &[Effect], sales: &mut Vec<i64>) {
        for e in effects {
            match e.clone() {
                Effect::InsUser(id, login, name) => {
                    self.users.insert(id, (login, name));
                }
                Effect::UpdUser(id, name) => self.users.get_mut(&id).expect("model: update of a missing user").1 = name,
                Effect::DelUser(id) => {
                    self.users.remove(&id).expect("model: delete of a missing user");
                }
                Effect::InsOrder(id, o) => {
                    self.orders.insert(id, o);
                }
                Effect::UpdOrder(id, total) => self.orders.get_mut(&id).expect("model: update of a missing order").total_cents = total,
                Effect::DelOrder(id) => {
                    self.orders.remove(&id).expect("model: delete of a missing order");
                    self.lines.retain(|_, l| l.order_id != id);
                }
                Effect::InsLine(id, l) => {
                    self.lines.insert(id, l);
                }
                Effect::UpdLine(id, qty) => self.lines.get_mut(&id).expect("model: update of a missing line").qty = qty,
                Effect::DelLine(id) => {
                    self.lines.remove(&id).expect("model: delete of a missing line");
                }
                Effect::InsBulk(tag, ids) => {
                    for &id in &ids {
                        self.bulk.insert(id, tag);
                    }
                    self.bulk_tags.insert(tag, ids);
                }
                Effect::DelBulk(tag) => {
                    for id in self.bulk_tags.remove(&tag).expect("model: delete of a missing bulk tag") {
                        self.bulk.remove(&id);
                    }
                }
                Effect::Sold(p, q) => *self.sold.entry(p).or_default() += q,
                Effect::Price(p, price) => {
                    self.prices.entry(p).or_default().insert(price);
                }
                Effect::AddColumn(c, d) => self.columns.push((c, d)),
                Effect::AddIndex(i) => {
                    self.indexes.insert(i);
                }
                Effect::DropIndex(i) => {
                    self.indexes.remove(&i);
                }
                Effect::Sale(id) => sales.push(id),
            }
        }
    }
}

/// Two users with one login, committed on two nodes at the same moment.
#[derive(Clone, Debug)]
struct Dup {
    login: String,
    /// (node, user id, committed)
    sides: [(usize, i64, bool); 2],
}

// ---------------------------------------------------------------------------------------------
// The run: a cluster, its model, its cycles.

struct World {
    seed: u64,
    topology: Topology,
    models: Vec<NodeModel>,
    /// Committed sale orders per node (other nodes add lines to them; those of earlier cycles
    /// are on every node).
    sales: Vec<Vec<i64>>,
    /// Same-login users, by id: (login, name) as they should end.
    dup_users: BTreeMap<i64, (String, String)>,
    dup_count: i64,
    /// Whether the login index renames the later of two same-login users (drawn per seed)
    /// rather than parking it.
    rename: bool,
    cycle: Option<usize>,
    /// The extension library's stamp when the run started (see `check_library`).
    library: Option<std::time::SystemTime>,
}

impl World {
    fn new(seed: u64, topology: Topology, library: Option<std::time::SystemTime>) -> World {
        World {
            library,
            seed,
            topology,
            models: ALL.iter().map(|&k| NodeModel::new(k)).collect(),
            sales: vec![Vec::new(); 3],
            dup_users: BTreeMap::new(),
            dup_count: 0,
            rename: Rng::derive(seed, &[topology as u64, 0x7e4a]).chance(50),
            cycle: None,
        }
    }

    fn tag(&self) -> String {
        match self.cycle {
            Some(c) => format!("seed {:#x} {} cycle {c}", self.seed, topology_name(self.topology)),
            None => format!("seed {:#x} {}", self.seed, topology_name(self.topology)),
        }
    }

    /// Delta strategy for stock on every node, then main's products, seen everywhere.
    fn setup(&mut self, cluster: &Cluster) {
        for i in ALL {
            cluster.node(i).sql(DB, "SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')");
            cluster.node(i).sql(DB, MARKERS);
            if self.rename {
                cluster.node(i).sql(DB, "SELECT rbucardo.set_unique_strategy('users_login_key', 'rename')");
            }
        }
        eprintln!("[{}] same-login users: {}", self.tag(), if self.rename { "the later one renamed" } else { "parked, then renamed by the operator" });
        cluster.node(MAIN).sql(
            DB,
            &format!(
                "INSERT INTO products (id, name, price, stock)
                 SELECT p, 'product ' || p, p * 1.5, {START_STOCK} FROM generate_series(1, {PRODUCTS}) p"
            ),
        );
        self.models[MAIN].committed += 1;
        let mut probe = Probe::new(cluster);
        for i in ALL {
            wait_until(&format!("{}: products on {}", self.tag(), NODE_NAMES[i]), Duration::from_secs(60), || {
                Ok(probe.int(i, "SELECT count(*) FROM products")? == PRODUCTS)
            });
        }
        self.check_applied_counts(cluster);
    }

    fn committed(&self) -> [i64; 3] {
        [self.models[0].committed, self.models[1].committed, self.models[2].committed]
    }

    fn cycle(&mut self, cluster: &Cluster, cycle: usize) {
        self.cycle = Some(cycle);
        let tag = self.tag();
        let started = Instant::now();
        let (plan, aftershock) = plan_faults(self.seed, self.topology, cycle, &mut self.dup_count);
        eprintln!("[{tag}] fault plan ({} events over {}ms):", plan.len(), plan.last().map_or(0, |e| e.at_ms));
        for e in &plan {
            eprintln!("[{tag}]   +{:>5}ms  {}", e.at_ms, e.action.describe());
        }
        if let Some(a) = aftershock {
            eprintln!(
                "[{tag}]   after healing and the same-login fix: SIGKILL {} {}ms later, start it {}ms after that",
                NODE_NAMES[a.node], a.after_ms, a.down_ms
            );
        }
        eprintln!(
            "[{tag}] workload: one writer per node until the plan has played, operations drawn from the seed \
             (weights: {}); DDL {}",
            OPS.iter().map(|(name, w)| format!("{name} {w}")).collect::<Vec<_>>().join(", "),
            if self.topology == Topology::Mesh { "on main (ADD COLUMN) and on the branches (CREATE/DROP INDEX)" } else { "on main (ADD COLUMN)" }
        );

        // 1. Writers and faults at once.
        let stop = AtomicBool::new(false);
        let holds = [AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false)];
        let shared_sales: Mutex<Vec<Vec<i64>>> = Mutex::new(self.sales.clone());
        let (seed, topology, library) = (self.seed, self.topology, self.library);
        let (faulter, stats) = std::thread::scope(|scope| {
            let mut writers = Vec::new();
            for (k, model) in self.models.iter_mut().enumerate() {
                let (stop, shared_sales, tag, holds) = (&stop, &shared_sales, tag.clone(), &holds);
                let ddl = k == MAIN || topology == Topology::Mesh;
                writers.push(scope.spawn(move || {
                    let mut w = Writer {
                        k,
                        cluster,
                        conn: None,
                        rng: Rng::derive(seed, &[topology as u64, cycle as u64, 100 + k as u64]),
                        tag,
                        ddl,
                        ddl_this_cycle: 0,
                        holds,
                        library,
                    };
                    let before = model.stats.clone();
                    // A writer that panics stops the others too.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| w.run(model, stop, shared_sales)));
                    if let Err(p) = result {
                        stop.store(true, Ordering::SeqCst);
                        std::panic::resume_unwind(p);
                    }
                    model.stats.since(&before)
                }));
            }
            let faults = {
                let (stop, tag, holds) = (&stop, tag.clone(), &holds);
                scope.spawn(move || {
                    let mut f = Faulter::new(cluster, topology, tag, holds);
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| f.play(&plan, stop)));
                    stop.store(true, Ordering::SeqCst);
                    match result {
                        Ok(()) => f,
                        Err(p) => std::panic::resume_unwind(p),
                    }
                })
            };
            let faults = faults.join();
            stop.store(true, Ordering::SeqCst);
            let stats: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
            let faults = faults.unwrap_or_else(|p| std::panic::resume_unwind(p));
            let stats: Vec<Stats> = stats.into_iter().map(|s| s.unwrap_or_else(|p| std::panic::resume_unwind(p))).collect();
            (faults, stats)
        });
        let wrote = started.elapsed();
        self.sales = shared_sales.into_inner().unwrap();
        let mut faulter = faulter;
        for (k, effects) in std::mem::take(&mut faulter.effects) {
            self.models[k].committed += 1;
            self.models[k].apply(&effects, &mut self.sales[k]);
        }
        eprintln!(
            "[{tag}] workload and faults done in {:.1}s; writers: {}",
            wrote.as_secs_f64(),
            stats
                .iter()
                .enumerate()
                .map(|(k, s)| format!(
                    "{} {} committed, {} not, {} COMMITs in doubt ({} of them committed), {} reconnects",
                    NODE_NAMES[k],
                    s.committed,
                    s.failed,
                    s.in_doubt.0 + s.in_doubt.1,
                    s.in_doubt.0,
                    s.reconnects
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        for (k, s) in stats.iter().enumerate() {
            eprintln!(
                "[{tag}]   {} committed/not per operation: {}",
                NODE_NAMES[k],
                s.ops.iter().map(|(op, (c, f))| format!("{op} {c}/{f}")).collect::<Vec<_>>().join(", ")
            );
        }
        eprintln!("[{tag}] faults executed: {}", faulter.executed.join("; "));

        // 2. Heal.
        faulter.heal();
        let healed = Instant::now();

        // 3. Same-login users: each there or parked on every node; then the operator's rename.
        let dups = std::mem::take(&mut faulter.dups);
        self.resolve_dups(cluster, &dups);
        if let Some(a) = aftershock {
            std::thread::sleep(Duration::from_millis(a.after_ms));
            cluster.node(a.node).kill9();
            std::thread::sleep(Duration::from_millis(a.down_ms));
            cluster.node(a.node).start();
            eprintln!("[{tag}] after healing: SIGKILLed {} and started it again", NODE_NAMES[a.node]);
        }

        // 4. Convergence and the checks.
        self.converge(cluster);
        let converged = healed.elapsed();
        self.check_rows(cluster);
        self.check_conflicts(cluster);
        self.check_applied_counts(cluster);
        wait_change_log_drained(cluster, Duration::from_secs(120));
        self.check_applied_counts(cluster);
        eprintln!(
            "[{tag}] PASSED: converged {:.1}s after healing; cycle took {:.1}s; transactions committed so far per node {:?}; {}",
            converged.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            self.committed(),
            self.summary(cluster)
        );
    }

    /// The same login committed on two nodes: on every node one of the two users is there and
    /// the other is parked in rbucardo.exceptions (a user committed alone is just a user). Then
    /// the first one's login is renamed on its own node, as an operator would, which lets the
    /// parked transactions apply by themselves.
    fn resolve_dups(&mut self, cluster: &Cluster, dups: &[Dup]) {
        let tag = self.tag();
        let mut pairs = Vec::new();
        for dup in dups {
            for &(k, id, committed) in &dup.sides {
                if committed {
                    self.dup_users.insert(id, (dup.login.clone(), format!("same login, made on {}", NODE_NAMES[k])));
                }
            }
            if dup.sides.iter().all(|s| s.2) {
                pairs.push(dup.clone());
            }
        }
        if pairs.is_empty() {
            return;
        }
        let ids: Vec<String> = pairs.iter().flat_map(|d| d.sides.iter().map(|s| s.1.to_string())).collect();
        let ids = ids.join(", ");
        if self.rename {
            return self.renamed_dups(cluster, &pairs, &ids);
        }
        let present_sql = format!("SELECT coalesce(string_agg(id::text, ' '), '') FROM users WHERE id IN ({ids})");
        let parked_sql = format!(
            "SELECT coalesce(string_agg(DISTINCT key->>'id', ' '), '') FROM rbucardo.exception_rows
              WHERE tbl = 'public.users' AND op = 'insert' AND (key->>'id')::bigint IN ({ids})"
        );
        let mut probe = Probe::new(cluster);
        let mut last = Vec::new();
        let result = poll_every(CONVERGE, Duration::from_millis(250), || {
            check_library(self.library);
            let mut state = Vec::new();
            let mut missing = Vec::new();
            for i in ALL {
                let present: BTreeSet<i64> = words(&probe.query(i, &present_sql)?);
                let parked: BTreeSet<i64> = words(&probe.query(i, &parked_sql)?);
                for d in &pairs {
                    for s in &d.sides {
                        if !present.contains(&s.1) && !parked.contains(&s.1) {
                            missing.push(format!("{}: user {} ({})", NODE_NAMES[i], s.1, d.login));
                        }
                    }
                }
                state.push((i, present, parked));
            }
            last = state;
            if missing.is_empty() {
                Ok(true)
            } else {
                Err(format!("neither there nor parked: {}", missing.join(", ")))
            }
        });
        if let Err(why) = result {
            panic!(
                "{tag}: same-login users not accounted for on every node within {CONVERGE:?}: {why}\n{}\n{}",
                open_exceptions(cluster),
                diagnostics(cluster)
            );
        }
        for d in &pairs {
            let mut seen = Vec::new();
            for (i, present, parked) in &last {
                let here: Vec<i64> = d.sides.iter().map(|s| s.1).filter(|id| present.contains(id)).collect();
                let held: Vec<i64> = d.sides.iter().map(|s| s.1).filter(|id| parked.contains(id)).collect();
                assert_eq!(
                    here.len(),
                    1,
                    "{tag}: login {} is unique, yet {} holds users {here:?} of it (parked: {held:?})",
                    d.login,
                    NODE_NAMES[*i]
                );
                // A node keeps its own user; the other one's transaction is parked there.
                for &(k, id, _) in &d.sides {
                    if k == *i {
                        assert!(present.contains(&id), "{tag}: {} lost its own user {id} ({})", NODE_NAMES[k], d.login);
                    }
                }
                seen.push(format!("{} has {:?}, parked {:?}", NODE_NAMES[*i], here, held));
            }
            eprintln!("[{tag}] same login {:?} (users {} on {}, {} on {}): {}", d.login, d.sides[0].1, NODE_NAMES[d.sides[0].0], d.sides[1].1, NODE_NAMES[d.sides[1].0], seen.join("; "));
        }
        for d in &pairs {
            let (a, id, _) = d.sides[0];
            let renamed = format!("{}.renamed", d.login);
            cluster.node(a).sql(DB, &format!("UPDATE users SET login = {} WHERE id = {id}", lit(&renamed)));
            self.models[a].committed += 1;
            self.dup_users.get_mut(&id).unwrap().0 = renamed;
        }
    }

    /// With the login index on `rename`: both users of each pair end on every node, one with
    /// the login and the other with login~id; which one is the nodes' choice (the later by
    /// clock), and `check_rows` then checks every node made the same.
    fn renamed_dups(&mut self, cluster: &Cluster, pairs: &[Dup], ids: &str) {
        let tag = self.tag();
        let sql = format!("SELECT id, login FROM users WHERE id IN ({ids}) ORDER BY id");
        let mut probe = Probe::new(cluster);
        let result = poll_every(CONVERGE, Duration::from_millis(250), || {
            check_library(self.library);
            let got: Vec<usize> = ALL.iter().map(|&i| probe.query(i, &sql).map(|r| r.len())).collect::<Result<_, _>>()?;
            if got.iter().all(|&n| n == pairs.len() * 2) { Ok(true) } else { Err(format!("same-login users per node: {got:?} of {}", pairs.len() * 2)) }
        });
        if let Err(why) = result {
            panic!("{tag}: same-login users not all there within {CONVERGE:?}: {why}\n{}\n{}", open_exceptions(cluster), diagnostics(cluster));
        }
        let logins: BTreeMap<i64, String> = probe
            .query(MAIN, &sql)
            .unwrap_or_else(|e| panic!("{tag}: {e}"))
            .into_iter()
            .map(|r| (r[0].as_deref().unwrap().parse().unwrap(), r[1].clone().unwrap_or_default()))
            .collect();
        for d in pairs {
            let kept: Vec<i64> = d.sides.iter().map(|s| s.1).filter(|id| logins[id] == d.login).collect();
            let renamed: Vec<i64> = d.sides.iter().map(|s| s.1).filter(|id| logins[id] == format!("{}~{id}", d.login)).collect();
            assert!(kept.len() == 1 && renamed.len() == 1, "{tag}: login {}: main holds {logins:?}", d.login);
            eprintln!("[{tag}] same login {:?}: user {} keeps it, user {} renamed", d.login, kept[0], renamed[0]);
            self.dup_users.get_mut(&renamed[0]).unwrap().0 = logins[&renamed[0]].clone();
        }
    }

    /// Each product's stock: its start minus every committed decrement.
    fn expected_stock(&self) -> BTreeMap<i64, String> {
        (1..=PRODUCTS)
            .map(|p| {
                let sold: i64 = self.models.iter().map(|m| m.sold.get(&p).copied().unwrap_or(0)).sum();
                (p, (START_STOCK - sold).to_string())
            })
            .collect()
    }

    /// Waits until every table has the same content on every node and no exception is open.
    ///
    /// Gives up early when the nodes differ while nothing is left to replicate (no change log
    /// row, no open exception) and nothing has moved for `SETTLED`: a divergence for good.
    fn converge(&self, cluster: &Cluster) {
        const SETTLED: Duration = Duration::from_secs(45);
        let sql = format!(
            "SELECT {}, (SELECT count(*) FROM rbucardo.change_log), (SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL)",
            TABLES
                .iter()
                .map(|(t, key)| format!("(SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY {key}), '')) FROM {t} t)"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut probe = Probe::new(cluster);
        let mut last: Option<(Vec<Vec<Option<String>>>, Instant)> = None;
        let result = poll_every(CONVERGE, Duration::from_millis(500), || {
            check_library(self.library);
            let mut states = Vec::new();
            for i in ALL {
                let rows = probe.query(i, &sql)?;
                states.push(rows.into_iter().next().ok_or("no row")?);
            }
            let n = TABLES.len();
            let logs: Vec<String> = states.iter().map(|s| s[n].clone().unwrap_or_default()).collect();
            let open: Vec<String> = states.iter().map(|s| s[n + 1].clone().unwrap_or_default()).collect();
            let differing: Vec<&str> = TABLES
                .iter()
                .enumerate()
                .filter(|(n, _)| states.iter().any(|s| s[*n] != states[0][*n]))
                .map(|(_, (t, _))| *t)
                .collect();
            if differing.is_empty() && open.iter().all(|o| o == "0") {
                return Ok(true);
            }
            let why = format!("tables differing: {differing:?}; change log rows per node: {logs:?}; open exceptions per node: {open:?}");
            match &last {
                Some((seen, since)) if *seen == states => {
                    if since.elapsed() >= SETTLED && logs.iter().chain(&open).all(|c| c == "0") {
                        panic!("{}", self.divergence(cluster, &format!("the nodes differ for good (nothing left to replicate, nothing moved for {SETTLED:?}): {why}")));
                    }
                }
                _ => last = Some((states, Instant::now())),
            }
            Err(why)
        });
        if let Err(state) = result {
            panic!("{}", self.divergence(cluster, &format!("no convergence within {CONVERGE:?} after healing: {state}")));
        }
    }

    /// What differs between the nodes, the conflicts they logged on those rows, what the
    /// model expects, and each node's replication state.
    fn divergence(&self, cluster: &Cluster, what: &str) -> String {
        let mut diffs = String::new();
        for (table, key) in TABLES {
            if let Some(d) = table_diff(cluster, table, key) {
                diffs += &format!("table {table}:\n{d}");
                if *key == "id" {
                    diffs += &conflicts_on_differing_rows(cluster, table);
                }
            }
        }
        let stock: Vec<String> = self.expected_stock().iter().map(|(p, s)| format!("{p}: {s}")).collect();
        format!(
            "{}: {what}\n{diffs}stock the committed transactions leave (product: stock): {}\n{}\n{}",
            self.tag(),
            stock.join(", "),
            open_exceptions(cluster),
            diagnostics(cluster)
        )
    }

    /// Row by row equality, then every row against what the committed transactions left.
    fn check_rows(&self, cluster: &Cluster) {
        let tag = self.tag();
        for (table, key) in TABLES {
            if let Err(e) = std::panic::catch_unwind(AssertUnwindSafe(|| cluster.assert_tables_equal(DB, table, key, &ALL))) {
                panic!("{tag}: {}", payload_text(e.as_ref()));
            }
        }
        // One schema everywhere, with every committed DDL in it.
        for (what, sql) in [("columns", COLUMNS_SQL), ("indexes", INDEXES_SQL)] {
            let answers: Vec<String> = ALL.iter().map(|&i| cluster.node(i).query_one(DB, sql).unwrap_or_default()).collect();
            assert!(answers.iter().all(|a| a == &answers[0]), "{tag}: {what} differ between nodes:\n{answers:#?}");
        }
        let columns = cluster.node(MAIN).query_one(DB, COLUMNS_SQL).unwrap_or_default();
        for (col, default) in &self.models[MAIN].columns {
            let want = format!("products.{col} integer YES {default}");
            assert!(columns.lines().any(|l| l == want), "{tag}: committed DDL missing: {want:?} not in\n{columns}");
        }
        let want_indexes: BTreeSet<String> = self.models.iter().flat_map(|m| m.indexes.iter().cloned()).collect();
        let have_indexes: BTreeSet<String> = words_text(
            &cluster
                .node(MAIN)
                .query_one(DB, "SELECT coalesce(string_agg(indexname, ' '), '') FROM pg_indexes WHERE schemaname = 'public' AND indexname LIKE 'fault_ix%'")
                .unwrap_or_default(),
        );
        assert_eq!(have_indexes, want_indexes, "{tag}: indexes made by committed DDL");

        // Every row as the committed transactions left it: each committed insert is there
        // (unless a committed delete removed it), nothing else is.
        let mut users: BTreeMap<i64, String> = BTreeMap::new();
        let mut orders = BTreeMap::new();
        let mut lines = BTreeMap::new();
        let mut bulk = BTreeMap::new();
        for (k, m) in self.models.iter().enumerate() {
            for (id, (login, name)) in &m.users {
                users.insert(*id, format!("{login}|{name}"));
            }
            for (id, o) in &m.orders {
                orders.insert(*id, format!("{}|{}|{}", NODE_NAMES[k], o.reference, cents(o.total_cents)));
            }
            for (id, l) in &m.lines {
                lines.insert(*id, format!("{}|{}|{}|{}", l.order_id, l.product_id, l.qty, l.note));
            }
            for (id, tag) in &m.bulk {
                bulk.insert(*id, format!("{tag}|{}", 32 * BULK_REPEAT));
            }
        }
        for (id, (login, name)) in &self.dup_users {
            users.insert(*id, format!("{login}|{name}"));
        }
        let stock = self.expected_stock();
        let main = cluster.node(MAIN);
        // Each product's price is its first one or one a committed transaction set.
        for row in main.query(DB, "SELECT id, price::text FROM products ORDER BY id") {
            let (p, price): (i64, String) = (row[0].as_deref().unwrap().parse().unwrap(), row[1].clone().unwrap_or_default());
            let first = cents(p * 150);
            let set: Vec<&String> = self.models.iter().filter_map(|m| m.prices.get(&p)).flatten().collect();
            assert!(
                price == first || set.contains(&&price),
                "{tag}: product {p} has price {price}, which no committed transaction set (first {first}, committed {set:?})"
            );
        }
        let checks: [(&str, &str, &BTreeMap<i64, String>); 5] = [
            ("users", "SELECT id, concat_ws('|', login, name) FROM users", &users),
            ("pos_order", "SELECT id, concat_ws('|', node, ref, total) FROM pos_order", &orders),
            ("pos_order_line", "SELECT id, concat_ws('|', order_id, product_id, qty, note) FROM pos_order_line", &lines),
            ("bulk", "SELECT id, concat_ws('|', tag, length(payload)) FROM bulk", &bulk),
            ("products (stock = start - committed decrements)", "SELECT id, stock::text FROM products", &stock),
        ];
        for (what, sql, want) in checks {
            let have: BTreeMap<i64, String> = main
                .query(DB, sql)
                .into_iter()
                .map(|r| (r[0].as_deref().unwrap().parse().unwrap(), r[1].clone().unwrap_or_default()))
                .collect();
            if let Some(diff) = model_diff(&have, want) {
                panic!("{tag}: {what} on every node differs from what the committed transactions left:\n{diff}");
            }
        }
        for (t, _) in TABLES {
            if !["users", "products", "pos_order", "pos_order_line", "bulk"].contains(t) {
                assert_eq!(main.query_one(DB, &format!("SELECT count(*) FROM {t}")).as_deref(), Some("0"), "{tag}: {t} is written by nobody");
            }
        }
    }

    /// Rows that only one node writes never meet a conflict, unless a transaction that touched
    /// them was parked on that node (later changes then find the row missing or older): a
    /// conflict elsewhere means a change applied twice or out of order.
    fn check_conflicts(&self, cluster: &Cluster) {
        let tag = self.tag();
        // Same-login users meet as unique collisions when the login index renames.
        let dups = lit(&self.dup_users.keys().map(|id| id.to_string()).collect::<Vec<_>>().join(","));
        for i in ALL {
            let odd = cluster.node(i).query(
                DB,
                &format!("WITH parked AS (SELECT DISTINCT c.tbl, c.key->>'id' AS id
                                   FROM rbucardo.exceptions e CROSS JOIN LATERAL rbucardo.exception_changes(e.id) c
                                  WHERE c.key IS NOT NULL)
                 SELECT c.id, c.tbl, c.key::text, c.kind, c.rule, c.winner, c.local_version::text, c.remote_version::text, c.remote_origin
                   FROM rbucardo.conflicts c
                  WHERE c.tbl <> 'public.products'
                    AND NOT (c.kind = 'unique_collision' AND c.key->>'id' = ANY (string_to_array({dups}, ',')))
                    AND NOT EXISTS (SELECT 1 FROM parked p WHERE p.tbl = c.tbl AND p.id = c.key->>'id')
                  ORDER BY c.id LIMIT 20"),
            );
            assert!(
                odd.is_empty(),
                "{tag}: {} logged conflicts on rows only one node writes (and no parked transaction touched): {odd:#?}",
                NODE_NAMES[i]
            );
        }
    }

    /// On every node: transactions applied from peers plus those parked there equal the
    /// transactions the other nodes committed: none applied twice, none lost. A node that
    /// renamed a row of its own on a unique collision committed that rename as a transaction
    /// of its own (logged as a collision the incoming row won).
    fn check_applied_counts(&self, cluster: &Cluster) {
        let tag = self.tag();
        let mut committed = self.committed();
        let mut probe = Probe::new(cluster);
        for i in ALL {
            committed[i] += probe
                .int(i, "SELECT count(*) FROM rbucardo.conflicts WHERE kind = 'unique_collision' AND winner = 'remote'")
                .unwrap_or_else(|e| panic!("{tag}: {e}"));
        }
        let count = |probe: &mut Probe, i: usize| -> Result<(i64, i64), String> {
            let applied = applied_txns(probe, i)?;
            let parked = probe.int(i, "SELECT count(*) FROM rbucardo.exceptions WHERE kind = 'constraint'")?;
            Ok((applied, parked))
        };
        for i in ALL {
            let want: i64 = ALL.iter().filter(|&&j| j != i).map(|&j| committed[j]).sum();
            let _ = poll_every(Duration::from_secs(30), Duration::from_millis(200), || {
                check_library(self.library);
                let (applied, parked) = count(&mut probe, i)?;
                Ok(applied + parked >= want)
            });
            let (applied, parked) = count(&mut probe, i).unwrap_or_else(|e| panic!("{tag}: {e}"));
            assert_eq!(
                applied + parked,
                want,
                "{tag}: {} applied {applied} remote transactions and parked {parked}, but the other nodes committed {want} \
                 (committed per node: {committed:?})\n{}",
                NODE_NAMES[i],
                diagnostics(cluster)
            );
        }
    }

    fn summary(&self, cluster: &Cluster) -> String {
        ALL.iter()
            .map(|&i| {
                let node = cluster.node(i);
                // Newer builds count conflicts (rbucardo.conflict_counts) and log only some.
                let counted = node.query_one(DB, "SELECT to_regclass('rbucardo.conflict_counts') IS NOT NULL").as_deref() == Some("t");
                let conflicts = node
                    .query_one(
                        DB,
                        if counted {
                            "SELECT coalesce(string_agg(n || ' ' || what, ', '), 'none') FROM
                               (SELECT sum(n) n, split_part(tbl, '.', 2) || ' ' || kind || '/' || outcome AS what
                                  FROM rbucardo.conflict_counts GROUP BY 2 ORDER BY 2) x"
                        } else {
                            "SELECT coalesce(string_agg(n || ' ' || what, ', '), 'none') FROM
                               (SELECT count(*) n, split_part(tbl, '.', 2) || ' ' || kind || '/' || winner AS what
                                  FROM rbucardo.conflicts GROUP BY 2 ORDER BY 2) x"
                        },
                    )
                    .unwrap_or_default();
                let parked = node
                    .query_one(
                        DB,
                        "SELECT coalesce(string_agg(n || ' ' || why, ', '), 'none') FROM
                           (SELECT count(*) n, CASE WHEN reason LIKE '%duplicate key%' THEN 'unique' WHEN reason LIKE '%foreign key%' THEN 'fk' ELSE kind END
                                               || '/' || coalesce(resolution, 'open') AS why
                              FROM rbucardo.exceptions GROUP BY 2 ORDER BY 2) x",
                    )
                    .unwrap_or_default();
                format!("{}: conflicts [{conflicts}], exceptions [{parked}]", NODE_NAMES[i])
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

const COLUMNS_SQL: &str = "SELECT string_agg(format('%s.%s %s %s %s', table_name, column_name, data_type,
                                  is_nullable, coalesce(column_default, '-')), E'\\n'
                           ORDER BY table_name, ordinal_position)
                      FROM information_schema.columns WHERE table_schema = 'public'";
const INDEXES_SQL: &str = "SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'";

fn cents(c: i64) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

/// The integers of a one-cell answer holding space-separated numbers.
fn words(rows: &[Vec<Option<String>>]) -> BTreeSet<i64> {
    rows.first()
        .and_then(|r| r[0].as_deref())
        .unwrap_or("")
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect()
}

fn words_text(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// What differs between a table's rows and the model's (both keyed by id), or `None`.
fn model_diff(have: &BTreeMap<i64, String>, want: &BTreeMap<i64, String>) -> Option<String> {
    let missing: Vec<String> = want.iter().filter(|(k, _)| !have.contains_key(k)).map(|(k, v)| format!("{k} ({v})")).collect();
    let extra: Vec<String> = have.iter().filter(|(k, _)| !want.contains_key(k)).map(|(k, v)| format!("{k} ({v})")).collect();
    let wrong: Vec<String> = want
        .iter()
        .filter_map(|(k, v)| have.get(k).filter(|h| *h != v).map(|h| format!("{k}: is {h}, committed {v}")))
        .collect();
    if missing.is_empty() && extra.is_empty() && wrong.is_empty() {
        return None;
    }
    let show = |v: &[String]| v.iter().take(15).cloned().collect::<Vec<_>>().join("\n    ");
    Some(format!(
        "  {} rows, {} committed\n  {} committed rows missing:\n    {}\n  {} rows nobody committed:\n    {}\n  {} rows with other values:\n    {}",
        have.len(),
        want.len(),
        missing.len(),
        show(&missing),
        extra.len(),
        show(&extra),
        wrong.len(),
        show(&wrong)
    ))
}

/// Rows of `table` that not every node has, per node (at most 10 each).
fn table_diff(cluster: &Cluster, table: &str, key: &str) -> Option<String> {
    let dumps: Vec<Vec<String>> = ALL.iter().map(|&i| cluster.node(i).dump_table(DB, table, key)).collect();
    if dumps.iter().all(|d| d == &dumps[0]) {
        return None;
    }
    let everywhere: BTreeSet<&String> = dumps[0].iter().filter(|r| dumps.iter().all(|d| d.contains(r))).collect();
    let mut out = String::new();
    for (i, d) in dumps.iter().enumerate() {
        let only: Vec<&String> = d.iter().filter(|r| !everywhere.contains(r)).collect();
        out += &format!("  {}: {} rows, {} not on every node\n", NODE_NAMES[i], d.len(), only.len());
        for r in only.iter().take(10) {
            out += &format!("    {}\n", abbreviate(r));
        }
    }
    Some(out)
}

/// The conflicts each node logged on the rows of `table` (keyed by `id`) that differ between
/// the nodes: which versions met, with which clocks, and who won.
fn conflicts_on_differing_rows(cluster: &Cluster, table: &str) -> String {
    let rows: Vec<BTreeMap<String, String>> = ALL
        .iter()
        .map(|&i| {
            cluster
                .node(i)
                .query(DB, &format!("SELECT id::text, md5(t::text) FROM {table} t"))
                .into_iter()
                .map(|r| (r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default()))
                .collect()
        })
        .collect();
    let ids: BTreeSet<&String> = rows.iter().flat_map(|r| r.keys()).filter(|id| rows.iter().any(|r| r.get(*id) != rows[0].get(*id))).take(10).collect();
    if ids.is_empty() {
        return String::new();
    }
    let list = ids.iter().map(|id| lit(id)).collect::<Vec<_>>().join(", ");
    let mut out = String::from(
        "  conflicts logged on those rows (key | kind | columns that differ: local/remote | local origin/clock | remote origin/clock | rule | winner):\n",
    );
    for i in ALL {
        for r in cluster.node(i).query(
            DB,
            &format!(
                "SELECT concat_ws(' | ', key->>'id', kind,
                                  (SELECT string_agg(k || '=' || coalesce(local_version->>k, 'NULL') || '/' || coalesce(remote_version->>k, 'NULL'), ' ')
                                     FROM jsonb_object_keys(coalesce(local_version, remote_version)) k
                                    WHERE local_version->k IS DISTINCT FROM remote_version->k),
                                  local_origin || '/' || local_hlc, remote_origin || '/' || remote_hlc, rule, winner)
                   FROM rbucardo.conflicts WHERE tbl = 'public.{table}' AND key->>'id' IN ({list}) ORDER BY id"
            ),
        ) {
            out += &format!("    {}: {}\n", NODE_NAMES[i], r[0].clone().unwrap_or_default());
        }
    }
    out
}

/// Every node's open exceptions, for failure messages.
fn open_exceptions(cluster: &Cluster) -> String {
    let mut out = String::new();
    for i in ALL {
        match Conn::connect(&cluster.node(i).conninfo(DB)).and_then(|mut c| {
            c.query(
                "SELECT e.id, e.kind, e.origin, e.via, e.retries, left(e.reason, 200),
                        (SELECT string_agg(c.op || ' ' || c.tbl || ' ' || coalesce(c.key::text, ''), '; ' ORDER BY c.ordinal)
                           FROM rbucardo.exception_changes(e.id) c)
                   FROM rbucardo.exceptions e WHERE e.resolved_at IS NULL ORDER BY e.id",
            )
        }) {
            Ok(rows) => {
                out += &format!("--- {} open exceptions: {}\n", NODE_NAMES[i], rows.len());
                for r in rows.iter().take(20) {
                    let cells: Vec<String> = r.iter().map(|c| c.clone().unwrap_or_else(|| "NULL".into())).collect();
                    out += &format!("  {}\n", abbreviate(&cells.join(" | ")));
                }
            }
            Err(e) => out += &format!("--- {}: {e}\n", NODE_NAMES[i]),
        }
    }
    out
}

impl Stats {
    fn since(&self, before: &Stats) -> Stats {
        Stats {
            committed: self.committed - before.committed,
            failed: self.failed - before.failed,
            in_doubt: (self.in_doubt.0 - before.in_doubt.0, self.in_doubt.1 - before.in_doubt.1),
            reconnects: self.reconnects - before.reconnects,
            ops: self
                .ops
                .iter()
                .map(|(op, (c, f))| {
                    let (bc, bf) = before.ops.get(op).copied().unwrap_or_default();
                    (*op, (c - bc, f - bf))
                })
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writers: one per node, on a direct connection to its node (the application's own link).

/// Operations and their weights.
const OPS: [(&str, u64); 15] = [
    ("sale", 22),
    ("decrement", 14),
    ("reprice", 5),
    ("new users", 10),
    ("update users", 10),
    ("delete user", 5),
    ("update order", 8),
    ("delete line", 5),
    ("draft", 5),
    ("delete draft", 4),
    ("line on another node's order", 7),
    ("bulk", 4),
    ("huge bulk", 1),
    ("delete bulk", 3),
    ("ddl", 2),
];
/// DDL transactions per writer and cycle, at most.
const DDL_PER_CYCLE: usize = 2;
/// Columns main adds to products in one run, at most.
const MAX_COLUMNS: usize = 40;

struct Writer<'a> {
    k: usize,
    cluster: &'a Cluster,
    conn: Option<Conn>,
    rng: Rng,
    tag: String,
    /// Whether this node writes DDL.
    ddl: bool,
    ddl_this_cycle: usize,
    /// Set by the fault thread: make the next COMMIT wait for the standby.
    holds: &'a [AtomicBool; 3],
    library: Option<std::time::SystemTime>,
}

impl Writer<'_> {
    fn run(&mut self, model: &mut NodeModel, stop: &AtomicBool, sales: &Mutex<Vec<Vec<i64>>>) {
        while !stop.load(Ordering::SeqCst) {
            let (op, sql, effects) = self.next_txn(model, sales);
            model.next_marker += 1;
            let committed = self.execute(&sql, model.next_marker, &mut model.stats);
            let counts = model.stats.ops.entry(op).or_default();
            if committed {
                counts.0 += 1;
                model.committed += 1;
                model.stats.committed += 1;
                let mut sales = sales.lock().unwrap();
                model.apply(&effects, &mut sales[self.k]);
            } else {
                counts.1 += 1;
                model.stats.failed += 1;
            }
            std::thread::sleep(Duration::from_millis(self.rng.range(5, 60) as u64));
        }
        self.conn = None;
    }

    fn node_name(&self) -> &'static str {
        NODE_NAMES[self.k]
    }

    /// The writer's connection, waiting for the node to come back if it is down.
    fn connection(&mut self, stats: &mut Stats) -> &mut Conn {
        if self.conn.is_none() {
            let node = self.cluster.node(self.k);
            let deadline = Instant::now() + NODE_BACK;
            loop {
                match Conn::connect(&node.conninfo(DB)) {
                    Ok(mut c) => {
                        let _ = c.execute("SET statement_timeout = '30s'; SET lock_timeout = '10s'");
                        self.conn = Some(c);
                        break;
                    }
                    Err(_) if library_stamp() != self.library => check_library(self.library),
                    Err(e) if Instant::now() > deadline => {
                        panic!("{}: writer on {}: node not back within {NODE_BACK:?}: {e}", self.tag, node.name())
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
            stats.reconnects += 1;
        }
        self.conn.as_mut().unwrap()
    }

    /// Runs one transaction; true if it committed. A COMMIT whose answer was lost is resolved
    /// with pg_xact_status once the node answers again.
    fn execute(&mut self, body: &str, marker: i64, stats: &mut Stats) -> bool {
        let k = self.k;
        let holds = self.holds;
        let conn = self.connection(stats);
        // Read once connected: a flag raised before a kill must not hold a COMMIT after it.
        let hold = if holds[k].load(Ordering::SeqCst) { "SET LOCAL synchronous_commit = on; " } else { "" };
        let sql = format!("BEGIN; {hold}{}; {body}; SELECT pg_current_xact_id()::text", mark(marker));
        let xid = match conn.query_one(&sql) {
            Ok(Some(xid)) => xid,
            Ok(None) => panic!("{}: no xid", self.tag),
            Err(_) => {
                // Not committed: COMMIT was never sent.
                if conn.execute("ROLLBACK").is_err() {
                    self.conn = None;
                }
                return false;
            }
        };
        if conn.execute("COMMIT").is_ok() {
            return true;
        }
        self.conn = None;
        loop {
            let conn = self.connection(stats);
            match in_doubt(conn, marker, &xid) {
                Ok((committed, status)) => {
                    eprintln!(
                        "[{}] {}: COMMIT of transaction {marker} (xid {xid}) in doubt: {}; pg_xact_status says {status}{}",
                        self.tag,
                        self.node_name(),
                        if committed { "committed" } else { "not committed" },
                        if (status == "committed") != committed { " (the xid was handed out again after the crash)" } else { "" }
                    );
                    if committed {
                        stats.in_doubt.0 += 1;
                    } else {
                        stats.in_doubt.1 += 1;
                    }
                    return committed;
                }
                Err(_) => self.conn = None,
            }
        }
    }

    /// The next transaction: its SQL and what it does to the model if it commits.
    fn next_txn(&mut self, m: &mut NodeModel, sales: &Mutex<Vec<Vec<i64>>>) -> (&'static str, String, Vec<Effect>) {
        loop {
            let op = OPS[self.rng.weighted(&OPS.map(|(_, w)| w))].0;
            if let Some((sql, effects)) = self.build(op, m, sales) {
                return (op, sql, effects);
            }
        }
    }

    fn products(&mut self, n: i64, max_qty: i64) -> BTreeMap<i64, i64> {
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let p = self.rng.range(1, PRODUCTS);
            let q = self.rng.range(1, max_qty);
            *out.entry(p).or_default() += q;
        }
        out
    }

    /// Stock decrements, ordered by product, with their effects.
    fn decrements(sold: &BTreeMap<i64, i64>, sql: &mut Vec<String>, effects: &mut Vec<Effect>) {
        for (&p, &q) in sold {
            sql.push(format!("UPDATE products SET stock = stock - {q} WHERE id = {p}"));
            effects.push(Effect::Sold(p, q));
        }
    }

    fn pick_key<V>(&mut self, map: &BTreeMap<i64, V>, filter: impl Fn(&V) -> bool) -> Option<i64> {
        let keys: Vec<i64> = map.iter().filter(|(_, v)| filter(v)).map(|(k, _)| *k).collect();
        (!keys.is_empty()).then(|| self.rng.pick(&keys))
    }

    fn build(&mut self, op: &str, m: &mut NodeModel, sales: &Mutex<Vec<Vec<i64>>>) -> Option<(String, Vec<Effect>)> {
        let k = self.k;
        let name = NODE_NAMES[k];
        let mut sql = Vec::new();
        let mut fx = Vec::new();
        match op {
            "sale" => {
                let o = m.next_order;
                m.next_order += 1;
                let reference = m.next_tag;
                m.next_tag += 1;
                let n = self.rng.range(1, 4);
                let mut values = Vec::new();
                let mut sold = BTreeMap::new();
                let mut total = 0;
                for _ in 0..n {
                    let (id, p, q) = (m.next_line, self.rng.range(1, PRODUCTS), self.rng.range(1, 5));
                    m.next_line += 1;
                    values.push(format!("({id}, {o}, {p}, {q}, 'sale')"));
                    fx.push(Effect::InsLine(id, Line { order_id: o, product_id: p, qty: q, note: "sale".into() }));
                    *sold.entry(p).or_default() += q;
                    total += q * 100;
                }
                sql.push(format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({o}, '{name}', {reference}, {})", cents(total)));
                sql.push(format!("INSERT INTO pos_order_line (id, order_id, product_id, qty, note) VALUES {}", values.join(", ")));
                fx.insert(0, Effect::InsOrder(o, Order { reference, total_cents: total, draft: false }));
                Self::decrements(&sold, &mut sql, &mut fx);
                fx.push(Effect::Sale(o));
            }
            "decrement" => {
                let n = self.rng.range(1, 3);
                let sold = self.products(n, 9);
                Self::decrements(&sold, &mut sql, &mut fx);
            }
            "reprice" => {
                // A price no other transaction sets: the one every node ends with names its
                // transaction. Sometimes with a sale of the same product (a merge with deltas).
                let p = self.rng.range(1, PRODUCTS);
                let price = format!("{}.00", m.next_price);
                m.next_price += 1;
                sql.push(format!("UPDATE products SET price = {price} WHERE id = {p}"));
                fx.push(Effect::Price(p, price));
                if self.rng.chance(50) {
                    Self::decrements(&BTreeMap::from([(p, self.rng.range(1, 3))]), &mut sql, &mut fx);
                }
            }
            "new users" => {
                for _ in 0..self.rng.range(1, 3) {
                    let id = m.next_user;
                    m.next_user += 1;
                    let (login, uname) = (format!("w{k}_{id}"), format!("user {id}"));
                    sql.push(format!("INSERT INTO users (id, login, name) VALUES ({id}, '{login}', '{uname}')"));
                    fx.push(Effect::InsUser(id, login, uname));
                }
            }
            "update users" => {
                let mut done = BTreeSet::new();
                for _ in 0..self.rng.range(1, 3) {
                    let id = self.pick_key(&m.users, |_| true)?;
                    if done.insert(id) {
                        let uname = format!("user {id} r{}", self.rng.range(1, 99_999));
                        sql.push(format!("UPDATE users SET name = '{uname}' WHERE id = {id}"));
                        fx.push(Effect::UpdUser(id, uname));
                    }
                }
            }
            "delete user" => {
                let id = self.pick_key(&m.users, |_| true)?;
                sql.push(format!("DELETE FROM users WHERE id = {id}"));
                fx.push(Effect::DelUser(id));
            }
            "update order" => {
                let o = self.pick_key(&m.orders, |_| true)?;
                let total = self.rng.range(1, 500) * 100 + self.rng.range(0, 99);
                sql.push(format!("UPDATE pos_order SET total = {} WHERE id = {o}", cents(total)));
                fx.push(Effect::UpdOrder(o, total));
                if let Some(l) = self.pick_key(&m.lines, |_| true) {
                    let qty = self.rng.range(1, 50);
                    sql.push(format!("UPDATE pos_order_line SET qty = {qty} WHERE id = {l}"));
                    fx.push(Effect::UpdLine(l, qty));
                }
            }
            "delete line" => {
                let l = self.pick_key(&m.lines, |_| true)?;
                sql.push(format!("DELETE FROM pos_order_line WHERE id = {l}"));
                fx.push(Effect::DelLine(l));
            }
            "draft" => {
                let o = m.next_order;
                m.next_order += 1;
                let reference = -m.next_tag;
                m.next_tag += 1;
                sql.push(format!("INSERT INTO pos_order (id, node, ref, total) VALUES ({o}, '{name}', {reference}, 0)"));
                fx.push(Effect::InsOrder(o, Order { reference, total_cents: 0, draft: true }));
                let mut values = Vec::new();
                for _ in 0..2 {
                    let (id, p, q) = (m.next_line, self.rng.range(1, PRODUCTS), self.rng.range(1, 5));
                    m.next_line += 1;
                    values.push(format!("({id}, {o}, {p}, {q}, 'draft')"));
                    fx.push(Effect::InsLine(id, Line { order_id: o, product_id: p, qty: q, note: "draft".into() }));
                }
                sql.push(format!("INSERT INTO pos_order_line (id, order_id, product_id, qty, note) VALUES {}", values.join(", ")));
            }
            "delete draft" => {
                let o = self.pick_key(&m.orders, |o| o.draft)?;
                sql.push(format!("DELETE FROM pos_order_line WHERE order_id = {o}"));
                sql.push(format!("DELETE FROM pos_order WHERE id = {o}"));
                fx.push(Effect::DelOrder(o));
            }
            "line on another node's order" => {
                let others: Vec<i64> = {
                    let sales = sales.lock().unwrap();
                    ALL.iter().filter(|&&j| j != k).flat_map(|&j| sales[j].iter().copied()).collect()
                };
                if others.is_empty() {
                    return None;
                }
                let o = self.rng.pick(&others);
                let (id, p, q) = (m.next_line, self.rng.range(1, PRODUCTS), self.rng.range(1, 5));
                m.next_line += 1;
                let note = format!("added on {name}");
                sql.push(format!("INSERT INTO pos_order_line (id, order_id, product_id, qty, note) VALUES ({id}, {o}, {p}, {q}, '{note}')"));
                fx.push(Effect::InsLine(id, Line { order_id: o, product_id: p, qty: q, note }));
                Self::decrements(&BTreeMap::from([(p, q)]), &mut sql, &mut fx);
            }
            "bulk" | "huge bulk" => {
                let tag = m.next_tag;
                m.next_tag += 1;
                // A huge one (about 10 MB) is larger than a batch: it travels in parts.
                let n = if op == "bulk" { self.rng.range(3, 12) } else { self.rng.range(2000, 2600) };
                let first = m.next_bulk;
                m.next_bulk += n;
                let last = first + n - 1;
                sql.push(format!("INSERT INTO bulk SELECT g, {tag}, repeat(md5(g::text), {BULK_REPEAT}) FROM generate_series({first}, {last}) g"));
                fx.push(Effect::InsBulk(tag, (first..=last).collect()));
            }
            "delete bulk" => {
                let tags: Vec<i64> = m.bulk_tags.keys().copied().collect();
                if tags.is_empty() {
                    return None;
                }
                let tag = self.rng.pick(&tags);
                let ids = &m.bulk_tags[&tag];
                sql.push(format!("DELETE FROM bulk WHERE id BETWEEN {} AND {}", ids[0], ids[ids.len() - 1]));
                fx.push(Effect::DelBulk(tag));
            }
            "ddl" => {
                if !self.ddl || self.ddl_this_cycle >= DDL_PER_CYCLE {
                    return None;
                }
                self.ddl_this_cycle += 1;
                let n = m.next_ddl;
                m.next_ddl += 1;
                // Columns stay far below PostgreSQL's 1600 (dropped ones count too): past
                // MAX_COLUMNS, main changes indexes as the branches of a mesh do.
                if k == MAIN && m.columns.len() < MAX_COLUMNS {
                    let col = format!("fx{n}");
                    sql.push(format!("ALTER TABLE products ADD COLUMN {col} integer DEFAULT {n}"));
                    fx.push(Effect::AddColumn(col, n));
                } else if !m.indexes.is_empty() && self.rng.chance(50) {
                    let ix = m.indexes.iter().next().unwrap().clone();
                    sql.push(format!("DROP INDEX {ix}"));
                    fx.push(Effect::DropIndex(ix));
                } else {
                    let ix = format!("fault_ix_{k}_{n}");
                    sql.push(format!("CREATE INDEX {ix} ON pos_order (ref)"));
                    fx.push(Effect::AddIndex(ix));
                }
            }
            other => unreachable!("{other}"),
        }
        if sql.is_empty() {
            return None;
        }
        Some((sql.join(";\n"), fx))
    }
}

// ---------------------------------------------------------------------------------------------
// Faults: a timeline drawn from the seed, played while the writers run.

#[derive(Clone, Debug)]
enum Action {
    Cut { id: usize, links: Vec<(usize, usize)> },
    Stall { id: usize, links: Vec<(usize, usize)> },
    CutAfter { id: usize, link: (usize, usize), bytes: u64, direction: Direction },
    Restore { id: usize, links: Vec<(usize, usize)> },
    Kill { id: usize, node: usize },
    Start { id: usize, node: usize },
    Restart { node: usize },
    /// Cut `link` for a while so its sender builds a backlog, restore it, and SIGKILL the
    /// receiving node `link.1` while it applies the catch-up; start it after `down_ms`.
    KillMidApply { link: (usize, usize), backlog_ms: u64, down_ms: u64 },
    Skew { node: usize, secs: i64 },
    /// Two users with one login, committed on two nodes at once.
    SameLogin { login: String, sides: [Side; 2] },
    /// Makes the next COMMIT on `node` wait (for a synchronous standby that never comes),
    /// committed locally but not acknowledged, and SIGKILLs the node then; start after `down_ms`.
    KillInDoubt { node: usize, down_ms: u64 },
}

/// One node's transaction of a same-login pair.
#[derive(Clone, Copy, Debug)]
struct Side {
    node: usize,
    /// The user's id; also the id of its order and of that order's line.
    id: i64,
    /// Also sells (product, qty) in the same transaction.
    sale: Option<(i64, i64)>,
    /// Also creates an order in the same transaction, and a line on it in the next one: where
    /// the user's transaction is parked, the line arrives before its order and is parked too.
    order: bool,
}

impl Side {
    fn describe(&self) -> String {
        format!(
            "user {} on {}{}{}",
            self.id,
            NODE_NAMES[self.node],
            self.sale.map_or(String::new(), |(p, q)| format!(", sells {q} of product {p}")),
            if self.order { ", with an order, then a line on it" } else { "" }
        )
    }
}

impl Action {
    fn describe(&self) -> String {
        let links = |l: &[(usize, usize)]| l.iter().map(|&x| link_name(x)).collect::<Vec<_>>().join(" ");
        match self {
            Action::Cut { id, links: l } => format!("#{id} cut {}", links(l)),
            Action::Stall { id, links: l } => format!("#{id} stall {}", links(l)),
            Action::CutAfter { id, link, bytes, direction } => format!("#{id} cut {} after {bytes} bytes {direction:?}", link_name(*link)),
            Action::Restore { id, links: l } => format!("#{id} restore {}", links(l)),
            Action::Kill { id, node } => format!("#{id} SIGKILL {}", NODE_NAMES[*node]),
            Action::Start { id, node } => format!("#{id} start {}", NODE_NAMES[*node]),
            Action::Restart { node } => format!("restart {}", NODE_NAMES[*node]),
            Action::KillMidApply { link, backlog_ms, down_ms } => format!(
                "cut {} for {backlog_ms}ms, restore, SIGKILL {} while it applies the catch-up, start it {down_ms}ms later",
                link_name(*link),
                NODE_NAMES[link.1]
            ),
            Action::Skew { node, secs } => format!("clock skew {secs:+}s on {}", NODE_NAMES[*node]),
            Action::SameLogin { login, sides } => format!("same login {login:?}: {} / {}", sides[0].describe(), sides[1].describe()),
            Action::KillInDoubt { node, down_ms } => format!(
                "hold the next COMMIT on {0} unacknowledged, SIGKILL {0} while it waits, start it {down_ms}ms later",
                NODE_NAMES[*node]
            ),
        }
    }
}

struct Event {
    at_ms: u64,
    action: Action,
}

/// A SIGKILL after healing, while the nodes catch up and retry parked transactions.
#[derive(Clone, Copy, Debug)]
struct Aftershock {
    node: usize,
    after_ms: u64,
    down_ms: u64,
}

/// The fault timeline of one cycle, and whether a node is killed again after healing.
fn plan_faults(seed: u64, topology: Topology, cycle: usize, dup_count: &mut i64) -> (Vec<Event>, Option<Aftershock>) {
    let mut rng = Rng::derive(seed, &[topology as u64, cycle as u64, 1]);
    let links = topology_links(topology);
    let span = rng.range(5_000, 9_000);
    let mut events: Vec<(i64, Action)> = Vec::new();
    let faults = rng.range(3, 6) as usize;
    for id in 0..faults {
        let at = rng.range(0, span - 1_000);
        // Cut, stall, cut after N bytes, kill, kill mid-apply, kill with a COMMIT in doubt,
        // restart, skew.
        match rng.weighted(&[3, 2, 3, 2, 2, 2, 1, 1]) {
            0 => {
                let mut cut = vec![rng.pick(&links)];
                if rng.chance(40) {
                    let other = rng.pick(&links);
                    if !cut.contains(&other) {
                        cut.push(other);
                    }
                }
                let hold = rng.range(300, 3_000);
                events.push((at, Action::Cut { id, links: cut.clone() }));
                events.push((at + hold, Action::Restore { id, links: cut }));
            }
            1 => {
                let link = vec![rng.pick(&links)];
                let hold = rng.range(300, 2_500);
                events.push((at, Action::Stall { id, links: link.clone() }));
                events.push((at + hold, Action::Restore { id, links: link }));
            }
            2 => {
                let link = rng.pick(&links);
                let bytes = match rng.weighted(&[1, 2, 2]) {
                    0 => rng.range(100, 5_000),
                    1 => rng.range(5_000, 100_000),
                    _ => rng.range(100_000, 800_000),
                } as u64;
                let direction = if rng.chance(50) { Direction::ServerToClient } else { Direction::ClientToServer };
                let hold = rng.range(500, 3_000);
                events.push((at, Action::CutAfter { id, link, bytes, direction }));
                events.push((at + hold, Action::Restore { id, links: vec![link] }));
            }
            3 => {
                let node = rng.pick(&ALL);
                let down = rng.range(200, 2_500);
                events.push((at, Action::Kill { id, node }));
                events.push((at + down, Action::Start { id, node }));
            }
            4 => {
                let link = rng.pick(&links);
                let (backlog_ms, down_ms) = (rng.range(800, 2_500) as u64, rng.range(200, 1_500) as u64);
                events.push((at, Action::KillMidApply { link, backlog_ms, down_ms }));
            }
            5 => events.push((at, Action::KillInDoubt { node: rng.pick(&ALL), down_ms: rng.range(200, 1_500) as u64 })),
            6 => events.push((at, Action::Restart { node: rng.pick(&ALL) })),
            _ => {
                let secs = rng.range(30, 3_600) * if rng.chance(50) { 1 } else { -1 };
                events.push((at, Action::Skew { node: rng.pick(&ALL), secs }));
            }
        }
    }
    for _ in 0..rng.range(1, 2) {
        let at = rng.range(0, span - 500);
        let a = rng.pick(&ALL);
        let b = rng.pick(&ALL.iter().copied().filter(|&x| x != a).collect::<Vec<_>>());
        let n = *dup_count;
        *dup_count += 1;
        let login = format!("same_{seed:x}_{n}");
        let side = |node: usize, rng: &mut Rng| Side {
            node,
            id: base(node) + DUP_USERS + n,
            sale: rng.chance(50).then(|| (rng.range(1, PRODUCTS), rng.range(1, 5))),
            order: rng.chance(50),
        };
        let sides = [side(a, &mut rng), side(b, &mut rng)];
        events.push((at, Action::SameLogin { login, sides }));
    }
    let aftershock = rng.chance(40).then(|| Aftershock {
        node: rng.pick(&ALL),
        after_ms: rng.range(0, 1_500) as u64,
        down_ms: rng.range(200, 1_500) as u64,
    });
    events.sort_by_key(|(at, _)| *at);
    (events.into_iter().map(|(at, action)| Event { at_ms: at as u64, action }).collect(), aftershock)
}

/// Plays a fault timeline, keeping track of what is broken so that overlapping faults never
/// undo each other early, and heals everything at the end.
struct Faulter<'a> {
    cluster: &'a Cluster,
    topology: Topology,
    tag: String,
    started: Instant,
    /// The fault currently holding each link.
    links: BTreeMap<(usize, usize), usize>,
    /// The fault that killed each node that is down.
    down: [Option<usize>; 3],
    skewed: BTreeSet<usize>,
    executed: Vec<String>,
    /// Same-login transactions: what each committed one did, by node.
    effects: Vec<(usize, Vec<Effect>)>,
    dups: Vec<Dup>,
    /// Per node: the writer's next COMMIT waits for the standby (see `KillInDoubt`).
    holds: &'a [AtomicBool; 3],
}

impl<'a> Faulter<'a> {
    fn new(cluster: &'a Cluster, topology: Topology, tag: String, holds: &'a [AtomicBool; 3]) -> Faulter<'a> {
        Faulter {
            holds,
            cluster,
            topology,
            tag,
            started: Instant::now(),
            links: BTreeMap::new(),
            down: [None; 3],
            skewed: BTreeSet::new(),
            executed: Vec::new(),
            effects: Vec::new(),
            dups: Vec::new(),
        }
    }

    fn note(&mut self, what: String) {
        let at = self.started.elapsed().as_millis();
        eprintln!("[{}]   at {at:>5}ms: {what}", self.tag);
        self.executed.push(format!("+{at}ms {what}"));
    }

    fn play(&mut self, plan: &[Event], stop: &AtomicBool) {
        for event in plan {
            if stop.load(Ordering::SeqCst) {
                // A writer failed: no point in going on.
                return;
            }
            let due = self.started + Duration::from_millis(event.at_ms);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            self.act(&event.action);
        }
        // Let the writers run on a healthy cluster for a moment before they stop.
        std::thread::sleep(Duration::from_millis(300));
    }

    fn is_up(&self, node: usize) -> bool {
        self.down[node].is_none()
    }

    fn act(&mut self, action: &Action) {
        let c = self.cluster;
        match action {
            Action::Cut { id, links } | Action::Stall { id, links } => {
                let free: Vec<(usize, usize)> = links.iter().copied().filter(|l| !self.links.contains_key(l)).collect();
                for &l in &free {
                    if matches!(action, Action::Cut { .. }) {
                        c.link(l.0, l.1).cut();
                    } else {
                        c.link(l.0, l.1).stall();
                    }
                    self.links.insert(l, *id);
                }
                if free.is_empty() {
                    self.note(format!("{} (skipped: links already faulted)", action.describe()));
                } else {
                    self.note(action.describe());
                }
            }
            Action::CutAfter { id, link, bytes, direction } => {
                if self.links.contains_key(link) {
                    return self.note(format!("{} (skipped: link already faulted)", action.describe()));
                }
                c.link(link.0, link.1).cut_after_bytes(*bytes, *direction);
                self.links.insert(*link, *id);
                self.note(action.describe());
            }
            Action::Restore { id, links } => {
                for l in links {
                    if self.links.get(l) == Some(id) {
                        let proxy = c.link(l.0, l.1);
                        let moved = (proxy.bytes_forwarded(Direction::ClientToServer), proxy.bytes_forwarded(Direction::ServerToClient));
                        proxy.restore();
                        self.links.remove(l);
                        self.note(format!("#{id} restore {} (forwarded so far: {} up, {} down)", link_name(*l), moved.0, moved.1));
                    }
                }
            }
            Action::Kill { id, node } => {
                if !self.is_up(*node) {
                    return self.note(format!("{} (skipped: down already)", action.describe()));
                }
                c.node(*node).kill9();
                self.down[*node] = Some(*id);
                self.note(action.describe());
            }
            Action::Start { id, node } => {
                if self.down[*node] == Some(*id) {
                    c.node(*node).start();
                    self.down[*node] = None;
                    self.note(action.describe());
                }
            }
            Action::Restart { node } => {
                if !self.is_up(*node) {
                    return self.note(format!("{} (skipped: down)", action.describe()));
                }
                c.node(*node).restart();
                self.note(action.describe());
            }
            Action::KillMidApply { link, backlog_ms, down_ms } => {
                let (from, to) = *link;
                if !self.is_up(from) || !self.is_up(to) || self.links.contains_key(link) {
                    return self.note(format!("{} (skipped: a node is down or the link is faulted)", action.describe()));
                }
                let proxy = c.link(from, to);
                // In a mesh the receiver reaches the sender by its own link too: hold that one
                // until after the kill, so the catch-up comes as pushes from `from`.
                let reverse = (to, from);
                let hold_reverse = self.topology == Topology::Mesh && !self.links.contains_key(&reverse);
                proxy.cut();
                if hold_reverse {
                    c.link(to, from).cut();
                }
                std::thread::sleep(Duration::from_millis(*backlog_ms));
                let mut probe = Conn::connect(&c.node(to).conninfo(DB)).ok();
                proxy.restore();
                let waited = Instant::now();
                let mut caught = false;
                while waited.elapsed() < Duration::from_secs(5) {
                    let active = probe.as_mut().and_then(|p| p.query_one(ACTIVE_PUSHES).ok().flatten());
                    if active.is_some_and(|n| n != "0") {
                        caught = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                drop(probe);
                c.node(to).kill9();
                let when = if caught {
                    format!("killed {} mid-apply ({}ms after the restore)", NODE_NAMES[to], waited.elapsed().as_millis())
                } else {
                    format!("killed {} (no push seen in 5s)", NODE_NAMES[to])
                };
                std::thread::sleep(Duration::from_millis(*down_ms));
                c.node(to).start();
                if hold_reverse {
                    c.link(to, from).restore();
                }
                self.note(format!("{}: {when}", action.describe()));
            }
            Action::Skew { node, secs } => {
                if !self.is_up(*node) {
                    return self.note(format!("{} (skipped: down)", action.describe()));
                }
                set_skew(c, *node, *secs);
                self.skewed.insert(*node);
                self.note(action.describe());
            }
            Action::KillInDoubt { node, down_ms } => {
                if !self.is_up(*node) {
                    return self.note(format!("{} (skipped: down)", action.describe()));
                }
                let mut probe = Conn::connect(&c.node(*node).conninfo(DB)).ok();
                self.holds[*node].store(true, Ordering::SeqCst);
                let waited = Instant::now();
                let mut caught = false;
                while waited.elapsed() < Duration::from_secs(3) {
                    let waiting = probe.as_mut().and_then(|p| p.query_one(SYNC_REP_WAITERS).ok().flatten());
                    if waiting.is_some_and(|n| n != "0") {
                        caught = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                drop(probe);
                c.node(*node).kill9();
                self.holds[*node].store(false, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(*down_ms));
                c.node(*node).start();
                // A writer that read the flag just before the kill may wait again: release it.
                release_waiters(c, *node);
                let what = if caught { "killed with a COMMIT waiting" } else { "killed (no COMMIT caught waiting in 3s)" };
                self.note(format!("{}: {what}", action.describe()));
            }
            Action::SameLogin { login, sides } => {
                if !sides.iter().all(|s| self.is_up(s.node)) {
                    return self.note(format!("{} (skipped: a node is down)", action.describe()));
                }
                self.same_login(login, sides);
            }
        }
    }

    /// Both inserts run before either commits, so neither node can see the other's user
    /// yet: both commit, and each one's transaction breaks the unique login on the other node.
    fn same_login(&mut self, login: &str, sides: &[Side; 2]) {
        let mut open = Vec::new();
        for side in sides {
            let (k, id) = (side.node, side.id);
            let mut conn = Conn::connect(&self.cluster.node(k).conninfo(DB)).unwrap_or_else(|e| panic!("{}: {e}", self.tag));
            let mut sql = format!(
                "BEGIN; {}; INSERT INTO users (id, login, name) VALUES ({id}, {}, 'same login, made on {}')",
                mark(-2 * id),
                lit(login),
                NODE_NAMES[k]
            );
            let mut effects = vec![];
            if let Some((p, q)) = side.sale {
                sql += &format!("; UPDATE products SET stock = stock - {q} WHERE id = {p}");
                effects.push(Effect::Sold(p, q));
            }
            if side.order {
                sql += &format!("; INSERT INTO pos_order (id, node, ref, total) VALUES ({id}, '{}', 0, 0)", NODE_NAMES[k]);
                effects.push(Effect::InsOrder(id, Order { reference: 0, total_cents: 0, draft: false }));
                effects.push(Effect::Sale(id));
            }
            // It can fail like any transaction (a deadlock with a schema change being applied):
            // then that side did not commit, and the other one is just a user.
            match conn.query_one(&format!("{sql}; SELECT pg_current_xact_id()::text")) {
                Ok(xid) => open.push(Some((side, conn, xid.unwrap(), effects))),
                Err(e) => {
                    self.note(format!("same login {login:?} on {} failed before its commit: {e}", NODE_NAMES[k]));
                    open.push(None);
                }
            }
        }
        let mut committed = [false; 2];
        for (n, (side, conn, xid, effects)) in open.iter_mut().enumerate().filter_map(|(n, o)| Some((n, o.as_mut()?))) {
            committed[n] = conn.execute("COMMIT").is_ok() || {
                let mut conn = self.cluster.node(side.node).connect(DB);
                in_doubt(&mut conn, -2 * side.id, xid).unwrap_or_else(|e| panic!("{}: {e}", self.tag)).0
            };
            if committed[n] {
                self.effects.push((side.node, std::mem::take(effects)));
            }
        }
        // The line on the new order, in a transaction of its own.
        for (n, side) in sides.iter().enumerate() {
            if side.order && committed[n] {
                let note = "after the same login".to_string();
                // It can fail like any transaction (a deadlock with a schema change being
                // applied, a node killed): then it did not commit, unless its marker says so.
                let mut conn = self.cluster.node(side.node).connect(DB);
                let sql = format!(
                    "BEGIN; {1}; INSERT INTO pos_order_line (id, order_id, product_id, qty, note) VALUES ({0}, {0}, 1, 1, '{note}');
                     UPDATE products SET stock = stock - 1 WHERE id = 1; COMMIT;",
                    side.id,
                    mark(-2 * side.id - 1)
                );
                let done = conn.execute(&sql).is_ok() || {
                    let mut conn = self.cluster.node(side.node).connect(DB);
                    conn.query_one(&format!("SELECT count(*) FROM fault_local.committed WHERE txn = {}", -2 * side.id - 1)).ok().flatten().as_deref() == Some("1")
                };
                if !done {
                    self.note(format!("the line after same login {login:?} on {} did not commit", NODE_NAMES[side.node]));
                    continue;
                }
                self.effects.push((
                    side.node,
                    vec![Effect::InsLine(side.id, Line { order_id: side.id, product_id: 1, qty: 1, note }), Effect::Sold(1, 1)],
                ));
            }
        }
        let dup = Dup { login: login.to_string(), sides: [(sides[0].node, sides[0].id, committed[0]), (sides[1].node, sides[1].id, committed[1])] };
        self.note(format!("{} (committed: {committed:?})", Action::SameLogin { login: login.to_string(), sides: *sides }.describe()));
        self.dups.push(dup);
    }

    /// Every link restored, every node up, no skew.
    fn heal(&mut self) {
        for (from, to) in topology_links(self.topology) {
            self.cluster.link(from, to).restore();
        }
        self.links.clear();
        for i in ALL {
            if self.cluster.node(i).postmaster_pid().is_none() {
                self.cluster.node(i).start();
            }
            self.down[i] = None;
        }
        for i in ALL {
            self.holds[i].store(false, Ordering::SeqCst);
            release_waiters(self.cluster, i);
        }
        for node in std::mem::take(&mut self.skewed) {
            set_skew(self.cluster, node, 0);
        }
        eprintln!("[{}] healed: links restored, nodes up, clock skew reset", self.tag);
    }
}

/// Every test transaction also inserts its marker into a local table (in a schema no herd
/// holds: never captured, never replicated), so that whether a COMMIT whose answer was lost
/// committed can be read on the node once it is back. (`pg_xact_status` cannot tell: an xid
/// none of whose WAL reached the disk before a SIGKILL is handed out again after recovery.)
const MARKERS: &str = "SET rbucardo.replicate_ddl = off;
                       CREATE SCHEMA fault_local;
                       CREATE TABLE fault_local.committed (txn bigint PRIMARY KEY)";

fn mark(marker: i64) -> String {
    format!("INSERT INTO fault_local.committed VALUES ({marker})")
}

/// Whether the transaction with `marker` committed, and what pg_xact_status says of its xid.
fn in_doubt(conn: &mut Conn, marker: i64, xid: &str) -> Result<(bool, String), String> {
    let committed = conn.query_one(&format!("SELECT count(*) FROM fault_local.committed WHERE txn = {marker}"))?;
    let status = conn.query_one(&format!("SELECT pg_xact_status('{xid}'::xid8)"))?;
    Ok((committed.as_deref() == Some("1"), status.unwrap_or_else(|| "NULL".into())))
}

/// Backends whose COMMIT waits for the synchronous standby that never comes.
const SYNC_REP_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";

/// Lets every COMMIT that waits for the standby on `node` finish (it is committed locally).
fn release_waiters(cluster: &Cluster, node: usize) {
    std::thread::sleep(Duration::from_millis(100));
    cluster.node(node).sql(DB, "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
}

fn set_skew(cluster: &Cluster, node: usize, secs: i64) {
    let n = cluster.node(node);
    if secs == 0 {
        n.sql("postgres", "ALTER SYSTEM RESET rbucardo.clock_skew");
    } else {
        n.sql("postgres", &format!("ALTER SYSTEM SET rbucardo.clock_skew = {secs}"));
    }
    n.sql("postgres", "SELECT pg_reload_conf()");
    wait_until(&format!("clock skew {secs} on {}", n.name()), Duration::from_secs(10), || {
        Ok(Conn::connect(&n.conninfo(DB))?.query_one("SHOW rbucardo.clock_skew")?.as_deref() == Some(secs.to_string().as_str()))
    });
}
