//! The link client: the calling side of the conversation with one peer (src/runtime/
//! endpoints.rs is the called side). Connects, says hello, pulls the peer's stream and pushes
//! this node's, trades table shapes.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::base::node::{self, Me, Peer};
use crate::base::plans;
use crate::base::pq::{Param, PeerConn};
use crate::base::wire::{decode_batch, encode_batch, Batch, Position};
use crate::base::xact::in_txn;
use crate::log::changelog::BatchSize;
use crate::runtime::endpoints::{record_confirmed, APPLY_BYTES, BATCH_BYTES, MAX_BATCH_BYTES};

/// How long one remote call may take before the link is considered dead.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a report exchange may take: it is monitoring, and must not hold up a round.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the peer's position in this node's stream, as learned from the last push, is
/// trusted without asking again (see `push`).
const POSITION_TRUSTED: Duration = Duration::from_secs(1);
/// How long after a push that left part of what it applied unconfirmed (not yet on the
/// peer's disk) the link asks the peer where it stands, if nothing else was pushed meanwhile.
const CONFIRM_AFTER: Duration = Duration::from_millis(300);
/// A peer that sent no notification is pulled at least this often (`Link::pull_due`).
const PULL_AT_LEAST_EVERY: Duration = Duration::from_secs(2);
/// What a fetch says of the parts of a large transaction this node holds when it holds none.
const NO_PARTS_HELD: (Position, u32) = (Position { tick: 0, seq: 0 }, 0);
/// Bytes a pushed batch holds per second of the link's round trip, at least: the peer applies
/// about 4 MB of changes a second here, so the wait for its answer stays under a fifth of it.
const PUSH_BYTES_PER_RTT_SECOND: f64 = 20e6;

/// A pushed batch holds at most about this much, however slow the link: the hot rows' versions
/// a larger apply transaction piles up cost more than the round trips it saves.
const PUSH_FILL_AT_MOST: usize = 2 << 20;

/// How much a pushed batch holds over a link with round trip `rtt`: the peer applies it in one
/// transaction, so about `APPLY_BYTES`; over a slow link more, up to `PUSH_FILL_AT_MOST` (a
/// store catching up over a WAN would otherwise wait a round trip per 256 KB). Transactions up
/// to `BATCH_BYTES` still travel whole.
fn push_size(rtt: Duration) -> BatchSize {
    let fill = (rtt.as_secs_f64() * PUSH_BYTES_PER_RTT_SECOND) as usize;
    BatchSize { fill: fill.clamp(APPLY_BYTES, PUSH_FILL_AT_MOST), max: BATCH_BYTES }
}
/// How long the position a pull's own apply left the peer's stream at is trusted as the start
/// of the next pull, without reading it again (`Link::applied_to`).
const APPLIED_TO_TRUSTED: Duration = Duration::from_secs(1);

/// One outbound link and what it has learned.
pub struct Link {
    pub peer: Peer,
    pub conn: Option<PeerConn>,
    pub peer_id: i32,
    /// Why a direction of this link is stopped (a schema change of the stream that fails on
    /// the receiving side), as learned in the last round.
    pub stopped: Option<String>,
    /// md5 of the table shape the peer last received from us.
    schema_sent: Option<String>,
    me_name: String,
    /// Where the peer stood in this node's stream after the last push that ended cleanly (no
    /// error, no stop, no part in flight), and when.
    peer_has: Option<(Position, Instant)>,
    /// The count of this database's waking change-log commits (`signals::log_commits_here`)
    /// and the configuration generation, read before the last look at the log from `peer_has`
    /// found nothing for the peer: while both stay the same, nothing the peer may get was
    /// committed since (nor did a new policy make older changes its own), and `push` does not
    /// look again.
    nothing_as_of: Option<(u64, u64)>,
    /// The peer applied more of this node's stream than it reported on disk: the next round
    /// after `CONFIRM_AFTER` asks it where it stands, which confirms the rest.
    unconfirmed: bool,
    /// Whether the peer has `peer_push_flushed` (rbucardo 0.2 on; else `peer_push`).
    push_flushed: bool,
    /// The position this node last confirmed by fetching the peer's stream (`pull_to_end`).
    fetch_confirmed: Option<Position>,
    /// When state reports are next traded with the peer.
    report_next: Option<Instant>,
    /// When this node last pulled the peer's stream to its end, cleanly (`pull_due`).
    pulled_at: Option<Instant>,
    /// The peer told this node (NOTIFY) that its stream has grown since.
    notified: bool,
    /// How much a pushed batch holds: set from the shortest round trip to the peer seen when
    /// this connection was set up (`push_size`).
    push: BatchSize,
    /// Where the last pull's own apply left the peer's stream here, cleanly (nothing stopped,
    /// no part of a large transaction in the batch), with the configuration generation, the
    /// count of batches applied in this database it reached (`signals::Applies`) and when.
    /// While both counts stay the same the next pull within `APPLIED_TO_TRUSTED` starts there,
    /// without a transaction to read the cursor, the parts held and whether the stream is
    /// stopped (a hub's store pulls after every notification, and that read cost a transaction
    /// and three statements per pull). That is safe: the position is on disk (our apply
    /// committed durably); no apply (the peer pushing this stream too, in a mesh) has finished
    /// since, so none moved the cursor beyond it; only a join or a new identity moves a cursor
    /// back, and both change the configuration. A push of the stream still under way, and the
    /// parts and stops, are checked again by the apply (under the stream lock) all the same.
    applied_to: Option<(Position, u64, u64, Instant)>,
}

impl Link {
    /// Connects, says hello and listens for the peer's change notifications.
    pub fn connect(peer: &Peer, me: &Me) -> Result<Link, String> {
        let conninfo = peer.conninfo.as_deref().unwrap_or_default();
        let mut conn = PeerConn::connect(conninfo, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let rows = conn
            .query("SELECT name, node_id FROM rbucardo.peer_hello($1, $2)", &[Param::Text(&me.name), Param::Text(&me.id.to_string())], CALL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let (name, id) = rows.first().and_then(|r| Some((r.text(0)?, r.i32(1)?))).ok_or("peer_hello returned nothing")?;
        if name != peer.name {
            return Err(format!("the server at this conninfo is node {name}, not {}", peer.name));
        }
        let peer_name = peer.name.clone();
        in_txn(move || node::learn_peer_id(&peer_name, id))?;
        let setup = [
            // The peer applies what this node pushes in this session: READ COMMITTED, whatever
            // its default (apply_batch refuses anything else).
            "SET default_transaction_isolation = 'read committed'",
            // The peer's backend serving this link compiles nothing to machine code: its
            // queries run in milliseconds, JIT would cost 100-200 ms each (src/runtime/worker.rs).
            "SET jit = off",
            // What the peer's push endpoints pin anyway: set for the session, their
            // transactions change no setting (src/runtime/endpoints.rs `push`).
            "SET search_path = pg_catalog, pg_temp",
            "LISTEN rbucardo_changes",
        ];
        // Each is a round trip and next to no work: the shortest is the link's round trip.
        let mut rtt = CALL_TIMEOUT;
        for sql in setup {
            let sent = Instant::now();
            conn.execute(sql, CALL_TIMEOUT).map_err(|e| e.to_string())?;
            rtt = rtt.min(sent.elapsed());
        }
        Ok(Link {
            peer: peer.clone(),
            conn: Some(conn),
            peer_id: id,
            stopped: None,
            schema_sent: None,
            me_name: me.name.clone(),
            peer_has: None,
            unconfirmed: false,
            nothing_as_of: None,
            push_flushed: true,
            fetch_confirmed: None,
            report_next: None,
            pulled_at: None,
            notified: false,
            push: push_size(rtt),
            applied_to: None,
        })
    }

    fn conn(&mut self) -> Result<&mut PeerConn, String> {
        self.conn.as_mut().ok_or_else(|| "not connected".to_string())
    }

    /// Whether the peer told us of changes not pulled yet.
    pub fn notified(&self) -> bool {
        self.notified
    }

    /// Drops the peer's change notifications: while this node joins, it copies instead of
    /// pulling, and a notification left pending would make the worker spin (`wait`).
    pub fn forget_notifications(&mut self) {
        self.take_notifications();
        self.notified = false;
    }

    /// Notes the peer's change notifications received so far.
    pub fn take_notifications(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            self.notified |= !conn.notifications().is_empty();
        }
    }

    /// Whether this round should pull the peer's stream: the peer told us it has grown (it
    /// notifies after each commit to its log that one of its peers may want), the last pull
    /// did not end cleanly, or it is a while since the last one (a peer whose worker is down
    /// notifies nobody). Pulling in every round instead cost a call to the peer and an empty
    /// apply transaction here in every round, and the peer a fetch.
    pub fn pull_due(&mut self) -> bool {
        self.take_notifications();
        self.notified || self.pulled_at.is_none_or(|t| t.elapsed() >= PULL_AT_LEAST_EVERY)
    }

    /// Pulls the peer's stream until it has nothing more, and notes when it got there;
    /// returns transactions applied.
    pub fn pull(&mut self, me: &Me) -> Result<i64, String> {
        // Notifications that arrive from here on come after the fetches below started: they
        // make the next round pull again.
        self.take_notifications();
        self.notified = false;
        self.pulled_at = None;
        let total = self.pull_to_end(me)?;
        if self.stopped.is_none() {
            self.pulled_at = Some(Instant::now());
        }
        Ok(total)
    }

    fn pull_to_end(&mut self, me: &Me) -> Result<i64, String> {
        let mut total = 0;
        loop {
            let (name, peer_id) = (self.peer.name.clone(), self.peer_id);
            let confirmed = self.fetch_confirmed;
            let generation = crate::base::signals::config_generation();
            let applies = crate::base::signals::applies_here();
            let known = self.applied_to.take().filter(|&(_, g, n, at)| g == generation && Some(n) == applies && at.elapsed() < APPLIED_TO_TRUSTED);
            let (after, stopped, held) = match known {
                // Where our own apply left it, committed durably: nothing to flush.
                Some((pos, _, _, _)) => (pos, None, NO_PARTS_HELD),
                None => in_txn(move || {
                    let (t, s) = plans::two::<i64, i64>("SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = $1", &[pg_sys::TEXTOID], &[name.as_str().into()]);
                    let held = crate::apply::parts::resume_point(peer_id).unwrap_or(NO_PARTS_HELD);
                    let after = Position { tick: t.unwrap_or(0), seq: s.unwrap_or(Position::START.seq) };
                    // The fetch confirms `after`, and the peer trims what it confirms. A pull's
                    // own apply commits durably, but in a mesh the peer also pushes this stream,
                    // and a push's commit may not be on disk yet.
                    if confirmed != Some(after) {
                        crate::base::durable::flush_committed();
                    }
                    (after, crate::apply::exceptions::stream_stopped(peer_id), held)
                })?,
            };
            if stopped.is_some() {
                self.stopped = stopped;
                return Ok(total);
            }
            let rows = self
                .conn()?
                .query(
                    "SELECT rbucardo.peer_fetch($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        Param::Text(&me.name),
                        Param::Text(&after.tick.to_string()),
                        Param::Text(&after.seq.to_string()),
                        Param::Text(&BATCH_BYTES.to_string()),
                        Param::Text(&held.0.tick.to_string()),
                        Param::Text(&held.0.seq.to_string()),
                        Param::Text(&held.1.to_string()),
                    ],
                    CALL_TIMEOUT,
                )
                .map_err(|e| e.to_string())?;
            self.fetch_confirmed = Some(after);
            let bytes = rows.first().and_then(|r| r.bytes(0)).ok_or("peer_fetch returned nothing")?;
            let batch = decode_batch(bytes, MAX_BATCH_BYTES).map_err(|e| format!("refused a batch from {}: {e}", self.peer.name))?;
            if batch.txns.is_empty() && batch.upto == after {
                // Nothing new: where our apply left the stream still holds.
                self.applied_to = known;
                return Ok(total);
            }
            let (me_id, name, peer_id) = (me.id, self.peer.name.clone(), self.peer_id);
            // A batch that holds the sender's whole stream ends the pull: asking again at once
            // would cost the sender a fetch for nothing (a hub serves many peers per round).
            let empty = batch.txns.is_empty() || batch.complete;
            let parts = batch.txns.iter().any(|t| t.part.is_some());
            // In slices of APPLY_BYTES, each committed on its own: the fetch stays large (a
            // call per 8 MB over a slow link), the apply transactions small.
            for slice in batch.slices(APPLY_BYTES) {
                let name = name.clone();
                // Only a clean apply leaves a position to start the next pull from.
                let applied = in_txn(move || crate::apply::apply_batch(me_id, &name, peer_id, &slice)).inspect_err(|_| self.applied_to = None)?;
                total += applied.txns;
                if applied.stopped.is_some() {
                    self.applied_to = None;
                    self.stopped = applied.stopped;
                    return Ok(total);
                }
                if let Some(n) = applied.applies.filter(|_| !parts) {
                    self.applied_to = Some((applied.cursor, generation, n, Instant::now()));
                }
            }
            if empty {
                return Ok(total);
            }
        }
    }

    /// Asks the peer where it stands in this node's stream and reads the batch from there;
    /// None when the peer's stream is stopped (then `stopped` says why).
    fn batch_from_peer_position(&mut self, me: &Me) -> Result<Option<Batch>, String> {
        let rows = self
            .conn()?
            .query("SELECT tick, seq, stopped, held_tick, held_seq, held_chunks FROM rbucardo.peer_position($1)", &[Param::Text(&me.name)], CALL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let pos = rows.first().and_then(|r| Some(Position { tick: r.i64(0)?, seq: r.i64(1)? })).ok_or("peer_position returned nothing")?;
        // The parts of a large transaction the peer holds already.
        let held = rows
            .first()
            .and_then(|r| Some((Position { tick: r.i64(3)?, seq: r.i64(4)? }, r.i64(5)?)))
            .filter(|(_, n)| *n > 0)
            .map(|(p, n)| (p, n as u32));
        // peer_position answers with what is on disk there.
        self.unconfirmed = false;
        let (me_id, name, peer_id) = (me.id, self.peer.name.clone(), self.peer_id);
        if let Some(why) = rows.first().and_then(|r| r.text(2)) {
            in_txn(move || record_confirmed(&name, pos))?;
            self.stopped = Some(format!("{} stopped applying this node's stream: {why}", self.peer.name));
            return Ok(None);
        }
        let size = self.push;
        let batch = in_txn(move || {
            record_confirmed(&name, pos);
            let policy = node::peer_policy(&name);
            crate::log::changelog::read_batch(me_id, pos, peer_id, size, &policy, held, crate::log::changelog::ensure_tick())
        })?;
        Ok(Some(batch))
    }

    /// Trades table shapes with the peer (for validate_schema); sends ours only when it changed
    /// since the peer last acknowledged it.
    pub fn exchange_schema(&mut self) -> Result<(), String> {
        // Every few seconds: try the flushed push again (its peer may have been updated).
        self.push_flushed = true;
        let (md5, shape) = in_txn(crate::schema::ddl::my_shape)?;
        let send = (self.schema_sent.as_deref() != Some(md5.as_str())).then(|| shape.0.to_string());
        let name = self.peer.name.clone();
        let known = in_txn(move || crate::schema::ddl::peer_shape_md5(&name))?;
        let me = self.me_name.clone();
        let rows = self
            .conn()?
            .query(
                "SELECT md5, shape::text FROM rbucardo.peer_schema($1, $2::jsonb, $3)",
                &[Param::Text(&me), send.as_deref().map_or(Param::Null, Param::Text), known.as_deref().map_or(Param::Null, Param::Text)],
                CALL_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
        self.schema_sent = Some(md5);
        if let Some(theirs) = rows.first().and_then(|r| r.text(1)) {
            let shape: serde_json::Value = serde_json::from_str(&theirs).map_err(|e| format!("peer_schema returned bad JSON: {e}"))?;
            let name = self.peer.name.clone();
            in_txn(move || crate::schema::ddl::store_peer_shape(&name, pgrx::JsonB(shape)))?;
        }
        Ok(())
    }

    /// Whether a state-report exchange is due: the first a few seconds after connecting, at
    /// this link's own offset (from its peer's name: the links of a hub then trade at
    /// different moments, not all at once), then every `every`.
    pub fn report_due(&mut self, every: Duration) -> bool {
        let now = Instant::now();
        let offset = Duration::from_millis(crc32fast::hash(self.peer.name.as_bytes()) as u64 % 5_000);
        let next = *self.report_next.get_or_insert(now + offset);
        if now < next {
            return false;
        }
        self.report_next = Some(now + every);
        true
    }

    /// Trades state reports with the peer, for the rbucardo.cluster view.
    pub fn exchange_reports(&mut self) -> Result<(), String> {
        let name = self.peer.name.clone();
        let mine = in_txn(move || crate::api::cluster::reports_for(&name))?;
        let me = self.me_name.clone();
        let rows = self
            .conn()?
            .query("SELECT rbucardo.peer_report($1, $2)", &[Param::Text(&me), Param::Text(&mine)], REPORT_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let theirs = rows.first().and_then(|r| r.text(0)).ok_or("peer_report returned nothing")?.to_string();
        let name = self.peer.name.clone();
        in_txn(move || crate::api::cluster::store(&name, &theirs))?
    }

    /// How long until this link should ask the peer what it has on disk (the rest of its last
    /// push): the worker sleeps no longer than that.
    pub fn confirm_due_in(&self) -> Option<Duration> {
        let (_, at) = self.peer_has?;
        self.unconfirmed.then(|| CONFIRM_AFTER.saturating_sub(at.elapsed()))
    }

    /// Whether the connection is gone or unusable (a timeout, a hang-up): the round drops the
    /// link and connects again after the backoff.
    pub fn is_broken(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.is_broken())
    }

    /// Asks the peer where it stands at the next push instead of trusting the last push's
    /// answer: the peer then also confirms what it had not flushed yet (`wait_for_sync` waits
    /// for confirmations).
    pub fn distrust(&mut self) {
        self.peer_has = None;
    }

    /// Pushes this node's stream to the peer until it has everything; returns the
    /// transactions sent.
    /// While the peer applies one batch, the next is read from the change log, so catching up
    /// after an outage keeps both nodes busy.
    pub fn push(&mut self, me: &Me) -> Result<i64, String> {
        // A round woken by the peer's notification usually has nothing of ours to send. Where
        // the peer stood after our last clean push is trusted for a moment: the round reads
        // from there, asks the peer nothing when nothing for it was committed here since, and
        // sends what was without asking where the peer stands first (a hub serving many stores
        // is not asked once per store and round). A batch that would only move the peer's
        // cursor past changes it does not get waits for the next full push. A wrong guess
        // costs nothing: the peer skips what it has, and refuses a batch that starts past its
        // cursor, after which the next round asks.
        let mut trusted = None;
        // Read before the log is: a commit counted after this is looked for next time.
        let commits = (crate::base::signals::log_commits_here(), crate::base::signals::config_generation());
        let nothing_as_of = self.nothing_as_of.take();
        if let Some((pos, at)) = self.peer_has.take().filter(|(_, at)| at.elapsed() < POSITION_TRUSTED) {
            // A store's rounds follow its hub's notifications, and most of them have nothing of
            // the store's own to send: without a commit since the last look, nothing is looked
            // up. (Applied transactions that no peer but their sender and origin may want do
            // not count, src/log/changelog.rs; they are not for this peer either.)
            let confirm_due = self.unconfirmed && at.elapsed() >= CONFIRM_AFTER;
            if nothing_as_of == Some(commits) && !confirm_due {
                self.peer_has = Some((pos, at));
                self.nothing_as_of = nothing_as_of;
                return Ok(0);
            }
            let (me_id, peer_id, name) = (me.id, self.peer_id, self.peer.name.clone());
            let size = self.push;
            let batch = in_txn(move || {
                // In a mesh the peer also pulls this stream: start from what it confirmed by
                // fetching, when that is further.
                let (t, s) = plans::two::<i64, i64>("SELECT out_tick, out_seq FROM rbucardo.peer_state WHERE db = $1", &[pg_sys::TEXTOID], &[name.as_str().into()]);
                let fetched = Position { tick: t.unwrap_or(0), seq: s.unwrap_or(0) };
                let pos = pos.max(fetched);
                let newest = crate::log::changelog::ensure_tick();
                crate::log::changelog::read_batch(me_id, pos, peer_id, size, &node::peer_policy(&name), None, newest)
            })?;
            // Nothing to send: done, unless the peer has more than it confirmed and a moment
            // passed (its WAL is on disk by now): then ask it, which confirms the rest.
            if batch.txns.is_empty() && !confirm_due {
                self.peer_has = Some((pos, at));
                self.nothing_as_of = Some(commits);
                return Ok(0);
            }
            // A large transaction's parts go from where the peer says it holds them.
            if !batch.txns.is_empty() && batch.txns.iter().all(|t| t.part.is_none()) {
                trusted = Some(batch);
            }
        }
        self.push_batches(me, trusted)
    }

    /// Pushes this node's stream, from `first` (read from a trusted position), else from where
    /// the peer says it stands.
    fn push_batches(&mut self, me: &Me, mut first: Option<Batch>) -> Result<i64, String> {
        let mut sent = 0;
        'from_the_peer: loop {
            let mut batch = match first.take() {
                Some(batch) => batch,
                None => match self.batch_from_peer_position(me)? {
                    Some(batch) => batch,
                    None => return Ok(sent),
                },
            };
            if batch.txns.is_empty() && batch.upto == batch.after {
                self.peer_has = Some((batch.after, Instant::now()));
                return Ok(sent);
            }
            let me_id = me.id;
            let peer_id = self.peer_id;
            loop {
                let empty = batch.txns.is_empty();
                let txns = batch.txns.len() as i64;
                // Only a batch cut short by its size (a backlog) is followed at once by the
                // next, read while the peer applies this one. A batch that holds everything
                // there was ends the push: what commits meanwhile goes with the next round,
                // which the worker spaces out when rounds come full (worker.rs). Pushing it
                // at once had a live stream sent three transactions at a time, and each
                // push's fixed cost on both sides was most of what replication cost.
                let backlog = !batch.complete;
                let bytes = encode_batch(&batch);
                let flushed_push = self.push_flushed;
                let sql = if flushed_push {
                    "SELECT tick, seq, stopped, flushed_tick, flushed_seq FROM rbucardo.peer_push_flushed($1, $2)"
                } else {
                    "SELECT tick, seq, stopped FROM rbucardo.peer_push($1, $2)"
                };
                match self.conn()?.send(sql, &[Param::Text(&me.name), Param::Bytes(&bytes)], CALL_TIMEOUT) {
                    Ok(()) => {}
                    // Preparing it failed: the peer's catalog has no peer_push_flushed (a
                    // library newer than its extension, before ALTER EXTENSION UPDATE). Push
                    // with peer_push, which commits durably, until the next table-shape
                    // exchange tries again (`exchange_schema`).
                    Err(e) if flushed_push && e.is_sqlstate("42883") => {
                        self.push_flushed = false;
                        continue 'from_the_peer;
                    }
                    Err(e) => return Err(e.to_string()),
                }
                drop(bytes);
                // The peer ends at batch.upto unless it stops short; read on from there.
                let upto = batch.upto;
                let name = self.peer.name.clone();
                // After a part that more follow, the next part.
                let held = batch.txns.last().and_then(|t| t.part.filter(|p| p.more).map(|p| (t.stream_pos, p.end)));
                let size = self.push;
                let next = (!empty && backlog).then(|| in_txn(move || {
                    let newest = crate::log::changelog::ensure_tick();
                    crate::log::changelog::read_batch(me_id, upto, peer_id, size, &node::peer_policy(&name), held, newest)
                }));
                let rows = self.conn()?.receive(CALL_TIMEOUT).map_err(|e| e.to_string())?;
                let done = rows.first().and_then(|r| Some(Position { tick: r.i64(0)?, seq: r.i64(1)? })).ok_or("peer_push returned nothing")?;
                // What the peer has on disk, which is all this node may trim: peer_push's
                // answer is on disk (it commits durably before the answer is complete).
                let flushed = if flushed_push { rows.first().and_then(|r| Some(Position { tick: r.i64(3)?, seq: r.i64(4)? })) } else { Some(done) };
                self.unconfirmed = flushed != Some(done);
                if let Some(flushed) = flushed {
                    let name = self.peer.name.clone();
                    in_txn(move || record_confirmed(&name, flushed))?;
                }
                sent += txns;
                if let Some(why) = rows.first().and_then(|r| r.text(2)) {
                    self.stopped = Some(format!("{} stopped applying this node's stream: {why}", self.peer.name));
                    return Ok(sent);
                }
                let Some(next) = next else {
                    self.peer_has = (done == upto && held.is_none()).then(|| (done, Instant::now()));
                    return Ok(sent);
                };
                let next = next?;
                if done != upto {
                    continue 'from_the_peer;
                }
                // Nothing more to apply there: a batch that would only move the peer's cursor
                // waits for the next full push.
                if next.txns.is_empty() {
                    self.peer_has = held.is_none().then(|| (done, Instant::now()));
                    return Ok(sent);
                }
                batch = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Near the peer a push is one apply transaction's worth; over a WAN enough that the round
    /// trip costs little beside the apply; never more than a batch.
    #[test]
    fn a_push_fills_more_over_a_slower_link() {
        let fill = |ms: u64| push_size(Duration::from_millis(ms)).fill;
        assert_eq!(fill(0), APPLY_BYTES);
        assert_eq!(fill(5), APPLY_BYTES);
        assert_eq!(fill(50), 1_000_000);
        assert!(fill(100) > fill(50));
        assert_eq!(fill(1000), PUSH_FILL_AT_MOST);
        assert_eq!(push_size(CALL_TIMEOUT).max, BATCH_BYTES);
    }
}
