//! The worker's job: keep every outbound link exchanging, reconnect with backoff when a peer is
//! unreachable, record what happened in `peer_state`, and trim the change log.
//!
//! Nothing here needs a restart after an outage: a dead link is retried every few seconds at
//! most, and the first successful round catches up in large batches.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::base::node::{self as catalog, Me};
use crate::base::pq::{wait_for_activity, PeerError};
use crate::base::xact::in_txn;
use crate::runtime::link::Link;

/// First retry delay after a failed connection; doubles up to MAX_BACKOFF.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest sleep between rounds when nothing wakes the worker (peers without a way to notify
/// us, configuration changes made in another database).
const IDLE_NAP: Duration = Duration::from_secs(2);
/// A stream is busy (`Replicator::busy`) while this node pushes at least this many
/// transactions per second to one peer, measured over `PACE_WINDOW`. A rate, not a round's
/// count: a steady 200/s with a hiccup brings one round many transactions, and spacing rounds
/// then only adds to the lag of what follows.
const BUSY_RATE: f64 = 1000.0;
const PACE_WINDOW: Duration = Duration::from_millis(50);
/// How often table shapes are traded with each outbound peer.
const EXCHANGE_EVERY: Duration = Duration::from_secs(5);

/// `rbucardo.report_interval`: seconds between two state-report exchanges with a peer (for
/// the cluster view). An exchange carries the reports of every node this one knows, and costs
/// the hub about a millisecond per report: with 20 stores trading every 5 s on a busy 2-core
/// hub, each exchange held up its store's round for half a second (docs/performance.md).
pub static REPORT_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(30);

/// Registers the settings of the worker's rounds; called from `_PG_init`.
pub fn init() {
    GucRegistry::define_int_guc(
        c"rbucardo.report_interval",
        c"Seconds between two exchanges of state reports with a peer, for rbucardo.cluster.",
        c"Each link trades reports at this interval, at its own moment within it.",
        &REPORT_INTERVAL,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::default(),
    );
}
/// The configuration is read again when it changes (see `worker::config_generation`), and at
/// least this often (a node's identity check, catalog rows changed by hand).
const CONFIG_MAX_AGE: Duration = Duration::from_secs(10);

/// This node and its peers as last read from the catalog.
struct Config {
    me: Me,
    peers: Vec<catalog::Peer>,
    /// Peers expired here, with why (src/log/retention.rs).
    expired: std::collections::HashMap<String, String>,
    /// The provider this node is joining from (src/runtime/join.rs), while it copies.
    joining: Option<String>,
    generation: u64,
    read_at: Instant,
}

struct LinkSlot {
    link: Option<Link>,
    next_attempt: Instant,
    backoff: Duration,
    /// Last state written to peer_state, so that an idle round writes nothing.
    reported: Option<(String, Option<String>)>,
    reported_at: Instant,
}

/// The links of one database's worker.
#[derive(Default)]
pub struct Replicator {
    links: HashMap<String, LinkSlot>,
    config: Option<Config>,
    last_exchange: Option<Instant>,
    complaint: Option<String>,
    /// Transactions pushed to one peer (the most of any) in the rounds since `pace_since`.
    pushed_in_window: i64,
    pace_since: Option<Instant>,
    busy: bool,
}

fn report(slot: &mut LinkSlot, name: &str, state: &str, error: Option<String>) {
    let now = Instant::now();
    let same = slot.reported.as_ref().is_some_and(|(s, e)| s == state && *e == error);
    if same && now.duration_since(slot.reported_at) < Duration::from_secs(5) {
        return;
    }
    let (n, st, er) = (name.to_string(), state.to_string(), error.clone());
    let _ = in_txn(move || {
        Spi::run_with_args(
            "UPDATE rbucardo.peer_state SET state = $2, last_error = $3,
                    last_contact = CASE WHEN $2 = 'connected' THEN now() ELSE last_contact END
              WHERE db = $1",
            &[n.as_str().into(), st.as_str().into(), er.into()],
        )
    });
    slot.reported = Some((state.to_string(), error));
    slot.reported_at = now;
}

impl Replicator {
    /// This node and its active peers, read from the catalog only when they may have changed:
    /// a round under a steady stream of commits must cost little.
    fn config(&mut self) -> Result<(Me, Vec<catalog::Peer>), String> {
        let generation = crate::base::signals::config_generation();
        if let Some(c) = self.config.as_ref().filter(|c| c.generation == generation && c.read_at.elapsed() < CONFIG_MAX_AGE) {
            return Ok((c.me.clone(), c.peers.clone()));
        }
        self.config = None;
        let (me, peers, expired, joining) = in_txn(|| (catalog::me(), catalog::active_peers(), crate::log::retention::all_expired(), crate::runtime::join::joining()))?;
        let me = me?;
        self.config = Some(Config { me: me.clone(), peers: peers.clone(), expired, joining, generation, read_at: Instant::now() });
        Ok((me, peers))
    }

    /// Whether this node has an active peer (or has not read its configuration yet).
    pub fn has_peers(&self) -> bool {
        self.config.as_ref().is_none_or(|c| !c.peers.is_empty())
    }

    /// How many peers may be listening for this node's change notifications, as of the last
    /// round: those that connect here (no conninfo). A peer this node connects to is pushed
    /// to by this node's own rounds, which cut the tick they need themselves.
    pub fn listeners(&self) -> usize {
        // Before the first round, assume one may be.
        self.config.as_ref().map_or(1, |c| c.peers.iter().filter(|p| p.conninfo.is_none()).count())
    }

    /// Whether a stream is busy: this node pushed at least `BUSY_RATE` transactions per
    /// second to one peer in the last full `PACE_WINDOW`. The worker then spaces its rounds
    /// out (worker.rs). A stream that went quiet (no round for two windows) is not.
    pub fn busy(&self) -> bool {
        self.busy && self.pace_since.is_some_and(|t| t.elapsed() < 2 * PACE_WINDOW)
    }

    /// Counts a round's pushes (the most to one peer) towards the current window.
    fn pace(&mut self, pushed: i64) {
        let since = *self.pace_since.get_or_insert_with(Instant::now);
        self.pushed_in_window += pushed;
        let elapsed = since.elapsed();
        if elapsed >= PACE_WINDOW {
            self.busy = self.pushed_in_window as f64 / elapsed.as_secs_f64() >= BUSY_RATE;
            self.pushed_in_window = 0;
            self.pace_since = Some(Instant::now());
        }
    }

    /// One round over every active outbound peer. Returns how long the worker may sleep.
    pub fn round(&mut self, pull_all: bool) -> Duration {
        let (me, peers) = match self.config() {
            Ok(config) => config,
            Err(why) => {
                if self.complaint.as_ref() != Some(&why) {
                    log!("rbucardo worker: not replicating: {why}");
                    self.complaint = Some(why);
                }
                self.links.clear();
                return IDLE_NAP;
            }
        };
        self.complaint = None;
        self.links.retain(|name, _| peers.iter().any(|p| &p.name == name && p.conninfo.is_some()));
        let mut nap = IDLE_NAP;
        let mut pushed_most = 0;
        let joining = self.config.as_ref().and_then(|c| c.joining.clone());
        for peer in peers.iter().filter(|p| p.conninfo.is_some()) {
            // While this node joins, only its provider is talked to, and only to copy.
            if joining.as_ref().is_some_and(|j| *j != peer.name) {
                continue;
            }
            let slot = self.links.entry(peer.name.clone()).or_insert_with(|| LinkSlot {
                link: None,
                next_attempt: Instant::now(),
                backoff: MIN_BACKOFF,
                reported: None,
                reported_at: Instant::now(),
            });
            if slot.link.is_none() {
                if Instant::now() < slot.next_attempt {
                    nap = nap.min(slot.next_attempt - Instant::now());
                    continue;
                }
                match Link::connect(peer, &me) {
                    Ok(link) => {
                        slot.link = Some(link);
                        slot.backoff = MIN_BACKOFF;
                    }
                    Err(e) => {
                        slot.next_attempt = Instant::now() + slot.backoff;
                        nap = nap.min(slot.backoff);
                        slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
                        report(slot, &peer.name, "disconnected", Some(e));
                        continue;
                    }
                }
            }
            let link = slot.link.as_mut().unwrap();
            link.stopped = None;
            if joining.is_some() {
                report(slot, &peer.name, "joining", None);
                let link = slot.link.as_mut().unwrap();
                link.forget_notifications();
                let Some(conn) = link.conn.as_mut() else { continue };
                match crate::runtime::join::step(&me, peer, conn) {
                    Ok(_) => {
                        // Joined: read the configuration again and replicate at once.
                        self.config = None;
                        nap = Duration::ZERO;
                        report(slot, &peer.name, "connected", None);
                    }
                    Err(e) => {
                        if conn.is_broken() {
                            slot.link = None;
                        }
                        slot.next_attempt = Instant::now() + MAX_BACKOFF;
                        nap = nap.min(MAX_BACKOFF);
                        report(slot, &peer.name, "joining", Some(e));
                    }
                }
                continue;
            }
            let expired = self.config.as_ref().and_then(|c| c.expired.get(&peer.name).cloned());
            let result = exchange(link, &me, expired, pull_all);
            if let Some(due) = link.confirm_due_in() {
                nap = nap.min(due);
            }
            match result {
                Ok(pushed) => match link.stopped.clone() {
                    // A stopped stream is retried every few seconds (src/exceptions.rs).
                    Some(why) => {
                        nap = nap.min(Duration::from_secs(crate::apply::exceptions::DDL_RETRY_EVERY as u64));
                        report(slot, &peer.name, "stopped", Some(why));
                    }
                    None => {
                        pushed_most = pushed_most.max(pushed);
                        report(slot, &peer.name, "connected", None)
                    }
                },
                Err(e) => {
                    let broken = link.is_broken();
                    if broken {
                        slot.link = None;
                        slot.next_attempt = Instant::now() + slot.backoff;
                        nap = nap.min(slot.backoff);
                        report(slot, &peer.name, "disconnected", Some(e));
                    } else {
                        nap = nap.min(MAX_BACKOFF);
                        report(slot, &peer.name, "error", Some(e));
                    }
                }
            }
        }
        // Every few seconds: table shapes for validate_schema and state reports for the
        // cluster view (both cheap: the report was made by the housekeeper). Everything else
        // that is not replication (trim, retention, retries, pruning) runs in the housekeeper
        // (src/runtime/housekeeper.rs), so that it never holds up a round.
        if self.last_exchange.is_none_or(|t| t.elapsed() >= EXCHANGE_EVERY) {
            self.last_exchange = Some(Instant::now());
            let mut slow = Slow::default();
            let report_every = Duration::from_secs(REPORT_INTERVAL.get().max(1) as u64);
            for (name, slot) in self.links.iter_mut() {
                if let Some(link) = slot.link.as_mut() {
                    if let Err(e) = slow.time("table shapes", || link.exchange_schema()) {
                        log!("rbucardo worker: exchanging table shapes with {name} failed: {e}");
                    }
                    if link.report_due(report_every) {
                        if let Err(e) = slow.time("reports", || link.exchange_reports()) {
                            log!("rbucardo worker: exchanging state reports with {name} failed: {e}");
                        }
                    }
                }
            }
            slow.report("rbucardo worker: slow exchanges between rounds");
        }
        self.pace(pushed_most);
        nap
    }

    /// Sleeps until the latch is set, a peer notifies us, or `nap` passes. A notification that
    /// libpq already read during the last round (while waiting for a query result) no longer
    /// makes the socket readable, so those are checked first.
    pub fn wait(&mut self, nap: Duration) -> Result<(), PeerError> {
        let mut pending = false;
        for link in self.links.values_mut().filter_map(|s| s.link.as_mut()) {
            link.take_notifications();
            pending |= link.notified();
        }
        if pending {
            return Ok(());
        }
        let conns: Vec<_> = self.links.values().filter_map(|s| s.link.as_ref()?.conn.as_ref()).collect();
        wait_for_activity(&conns, nap)
    }
}

/// Steps that took long, logged: a stall in replication lag can then be told apart from a
/// slow peer.
#[derive(Default)]
pub struct Slow(Vec<(&'static str, Duration)>);

impl Slow {
    /// A step of housekeeping longer than this is logged.
    const LONG: Duration = Duration::from_millis(100);

    pub fn time<R>(&mut self, what: &'static str, f: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let r = f();
        self.0.push((what, start.elapsed()));
        r
    }

    pub fn report(&self, what: &str) {
        if self.0.iter().any(|(_, d)| *d >= Self::LONG) {
            let parts: Vec<String> = self.0.iter().map(|(w, d)| format!("{w} {} ms", d.as_millis())).collect();
            log!("{what}: {}", parts.join(", "));
        }
    }
}

/// One round with one peer; `expired` says why this node no longer sends it its stream.
/// Returns the transactions pushed.
fn exchange(link: &mut Link, me: &Me, expired: Option<String>, pull_all: bool) -> Result<i64, String> {
    // What this node made goes first: a store's round is mostly woken by its hub, and an order
    // committed meanwhile would otherwise wait for the whole pull. A push with nothing new
    // costs nothing (`Link::push`). Each direction goes on when the other fails.
    // A peer this node expired (it must rejoin, src/log/retention.rs) gets nothing more from
    // it; what the peer made while away still comes in below.
    let pushed = match &expired {
        Some(why) => Err(format!("{} must rejoin: {why}", link.peer.name)),
        None => {
            if pull_all {
                link.distrust();
            }
            link.push(me)
        }
    };
    let lost = |link: &Link, why: Option<String>| Err(format!("lost the connection to {}{}", link.peer.name, why.map_or(String::new(), |e| format!(": {e}"))));
    if link.is_broken() {
        return lost(link, pushed.err());
    }
    // The push's stop is set aside: a pull that sees one takes its own stream for stopped and
    // would pull again in every round (`Link::pull`).
    let push_stop = link.stopped.take();
    let pulled = if pull_all || link.pull_due() { link.pull(me) } else { Ok(0) };
    link.stopped = push_stop.or(link.stopped.take());
    pulled?;
    // A hang-up noticed while looking for notifications leaves a pull that was not due Ok.
    if link.is_broken() {
        return lost(link, None);
    }
    pushed
}
