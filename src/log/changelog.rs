//! The change log: where captured and forwarded transactions wait until every peer has them.
//!
//! Owns the tables `change_log` and `tick`. Writers append chunks; readers cut the log into
//! snapshot-bounded batches with ticks (the technique of PgQ): a transaction belongs to the first
//! tick whose snapshot sees it committed, so a transaction that commits after later-numbered
//! ones were shipped is still shipped, in the next tick. Within a tick, transactions are ordered
//! by the seq of their final chunk, which respects the order of every row they share. A
//! transaction's position `(tick, final seq)` is the same for every reader.

use std::cell::Cell;
use std::collections::HashSet;

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::locks;
use crate::base::plans;
use crate::base::snapshot::Snapshot;
use crate::base::node::PeerPolicy;
use crate::base::wire::{decode_chunk, encode_chunk, Batch, Op, Part, Position, Txn, WHOLE_TICK};
use crate::log::spancache;

/// The newest tick and whether a new one is needed: chunks were written since it, or a
/// transaction that was running at its snapshot has finished since (one listed in the
/// snapshot), or a chunk of a transaction that started after it has committed (one at or past
/// its xmax: its seq can be below `last_seq`, taken before the snapshot). Only chunks count:
/// a transaction that writes no chunk (a peer's fetch recording its progress, the tick's own
/// insert) needs no tick, else every fetch would cut one, with a durable commit. The newest
/// txid is read from the end of its index: an EXISTS over `txid >= xmax` ran, as a kept plan,
/// as a scan of the whole log whenever nothing was new (2-3 ms per round under pgbench).
macro_rules! tick_needed {
    () => {
        "
    SELECT t.tick_id,
           (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rbucardo.change_seq) > t.last_seq
           OR (SELECT l.txid FROM rbucardo.change_log l ORDER BY l.txid DESC LIMIT 1) >= pg_snapshot_xmax(t.snap)
           OR EXISTS (SELECT 1 FROM pg_snapshot_xip(t.snap) x
                       WHERE pg_xact_status(x) IS DISTINCT FROM 'in progress')
      FROM rbucardo.tick t"
    };
}
/// The newest tick, and whether the log needs a newer one.
const LAST_TICK: &str = concat!(tick_needed!(), " ORDER BY t.tick_id DESC LIMIT 1");

thread_local! {
    static AT_COMMIT: Cell<AtCommit> = const { Cell::new(AtCommit { wrote: false, wakes: false, served: None, cut: false }) };
    static WAKE_HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// Where a forwarded transaction comes from: its origin node and position in the origin's
/// stream, and the peer it was received from.
#[derive(Clone, Copy)]
pub struct Source {
    pub origin: i32,
    pub origin_pos: Position,
    pub via: i32,
    /// Whether a peer of this node may want it: only then is this node's worker woken at
    /// commit (to cut a tick and tell listening peers). A store whose only peer is its hub
    /// forwards nothing; waking it for every batch the hub sent made it tell the hub, which
    /// fetched again for nothing: an extra round on both sides per batch.
    pub wakes: bool,
}

/// Writes one chunk of a transaction: `chunk_no` counts the transaction's chunks from 0, the
/// last one is `is_final`. `source` is `None` for changes made on this node; `only_for`
/// addresses the transaction to one node (src/api/diff.rs).
///
/// Every captured transaction and every applied one pays for this insert, so it goes straight
/// to the heap and the indexes (as PostgreSQL writes its own catalogs) instead of through SPI
/// and the executor. The table has no triggers, constraints beyond NOT NULL, or expression
/// indexes, and only the extension writes it.
pub fn append(data: &[u8], chunk_no: i32, is_final: bool, source: Option<Source>, hlc: i64, only_for: Option<i32>) {
    // SAFETY: inside a transaction, on the main thread: the relation is opened and closed here
    // with a lock kept to commit, the tuple is formed from the relation's own descriptor with
    // a datum per column, and CatalogTupleInsert updates the indexes as for a catalog. Columns
    // are matched by name and each datum has its column's type in sql/catalog.sql.
    unsafe {
        // The transaction id must exist before the seq is taken: readers rely on it.
        let txid = pg_sys::GetTopFullTransactionId().value;
        let nsp = pg_sys::get_namespace_oid(c"rbucardo".as_ptr(), false);
        let log = pg_sys::get_relname_relid(c"change_log".as_ptr(), nsp);
        let seq_rel = pg_sys::get_relname_relid(c"change_seq".as_ptr(), nsp);
        if log == pg_sys::InvalidOid || seq_rel == pg_sys::InvalidOid {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                "rbucardo.change_log or rbucardo.change_seq is missing",
                "The extension is damaged: DROP EXTENSION rbucardo CASCADE and create it again.",
            );
        }
        let seq = pgrx::direct_function_call_as_datum(pg_sys::nextval_oid, &[Some(pg_sys::Datum::from(seq_rel))]).expect("nextval");
        let rel = pg_sys::table_open(log, pg_sys::RowExclusiveLock as i32);
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        let data = data.into_datum().expect("a bytea datum");
        for i in 0..natts {
            let att = &*(*tupdesc).attrs.as_ptr().add(i);
            if att.attisdropped {
                continue;
            }
            let value = match std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes() {
                b"seq" => Some(seq),
                b"txid" => Some(pg_sys::Datum::from(txid)),
                b"chunk_no" => Some(pg_sys::Datum::from(chunk_no)),
                b"final" => Some(pg_sys::Datum::from(is_final)),
                b"origin" => source.map(|o| pg_sys::Datum::from(o.origin)),
                b"via" => source.map(|o| pg_sys::Datum::from(o.via)),
                b"origin_tick" => source.map(|o| pg_sys::Datum::from(o.origin_pos.tick)),
                b"origin_seq" => source.map(|o| pg_sys::Datum::from(o.origin_pos.seq)),
                b"hlc" => Some(pg_sys::Datum::from(hlc)),
                b"data" => Some(data),
                b"only_for" => only_for.map(pg_sys::Datum::from),
                _ => None,
            };
            if let Some(v) = value {
                values[i] = v;
                nulls[i] = false;
            }
        }
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::CatalogTupleInsert(rel, tuple);
        pg_sys::heap_freetuple(tuple);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        // Later commands of this transaction (a read of the log, a trim) must see the row.
        pg_sys::CommandCounterIncrement();
    }
    count_at_commit(source.is_none_or(|s| s.wakes));
}

/// After a commit that wrote to the log, count it (`signals::note_log_commit`) and, if peers
/// may want it (`wakes`), wake this database's worker so that it pushes the change and tells
/// listening peers, without polling.
fn count_at_commit(wakes: bool) {
    let before = AT_COMMIT.with(|a| {
        let before = a.get();
        a.set(AtCommit { wrote: true, wakes: before.wakes || wakes, ..before });
        before
    });
    if before.wrote {
        return;
    }
    // A prepared transaction's commit would not be counted (link.rs and `served_tick` rely on
    // the counts to look at the log) nor wake anyone.
    crate::base::xact::refuse_prepare("wrote to rbucardo's change log");
    hook_commit();
}

/// What this backend's commit callback does when the transaction under way commits.
#[derive(Copy, Clone, Default)]
struct AtCommit {
    /// It wrote to the change log: count it.
    wrote: bool,
    /// And peers may want what it wrote: wake the worker.
    wakes: bool,
    /// It saw that tick `.1` of tick table `.0` holds the first `.2` change-log commits
    /// counted (`ensure_tick`): note it for peers' fetches once it is committed.
    served: Option<(u32, i64, u64)>,
    /// It cut a tick, which no other transaction sees before it commits: no span ending there
    /// is kept for others' fetches (spancache.rs).
    cut: bool,
}

/// Registers the commit callback, once per backend (a callback registered per transaction
/// would cost a boxed closure and a list entry for every captured commit).
fn hook_commit() {
    if !WAKE_HOOKED.with(|h| h.replace(true)) {
        // SAFETY: registers a 'static function with the signature PostgreSQL expects, once per
        // backend (WAKE_HOOKED); it stays registered for the life of the process.
        unsafe { pg_sys::RegisterXactCallback(Some(commit_callback), std::ptr::null_mut()) };
    }
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `hook_commit`, at a transaction event on the
/// backend's main thread. The body itself uses no unsafe operation.
#[pg_guard]
unsafe extern "C-unwind" fn commit_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let done = AT_COMMIT.with(|a| a.take());
            if let Some((rel, tick, writes)) = done.served {
                crate::base::signals::note_served_tick(rel, tick, writes);
            }
            if done.wrote {
                crate::base::signals::note_log_commit(done.wakes);
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => AT_COMMIT.with(|a| a.set(AtCommit::default())),
        _ => {}
    }
}

/// The oid of rbucardo.tick (0 if missing).
fn tick_rel() -> u32 {
    // SAFETY: catalog cache lookups inside a transaction.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"rbucardo".as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return 0;
        }
        pg_sys::get_relname_relid(c"tick".as_ptr(), nsp).to_u32()
    }
}

/// Notes, for when this transaction commits, that `tick` holds the first `writes` change-log
/// commits counted (read before the statement that judged it). Only in READ COMMITTED, where
/// that statement's snapshot was taken after the count was read (a REPEATABLE READ snapshot
/// may predate commits counted); not from a subtransaction, which may yet roll back the tick.
/// The note is only a shortcut: where it is not sure, none is made.
fn serve_at_commit(tick: i64, writes: Option<u64>) {
    // SAFETY: reads the backend's transaction state.
    let sure = unsafe { pg_sys::GetCurrentTransactionNestLevel() == 1 && pg_sys::XactIsoLevel == pg_sys::XACT_READ_COMMITTED as i32 };
    let (Some(writes), true) = (writes, sure) else { return };
    let rel = tick_rel();
    if rel == 0 {
        return;
    }
    AT_COMMIT.with(|a| {
        let mut at = a.get();
        at.served = Some(at.served.map_or((rel, tick, writes), |(r, t, w)| if r == rel { (r, t.max(tick), w.max(writes)) } else { (rel, tick, writes) }));
        a.set(at);
    });
    hook_commit();
}

/// The newest tick, making a new one first if the log may hold transactions that no tick
/// covers yet: new chunks were written since the last tick, or a transaction that was running
/// at the last tick has finished since.
pub fn ensure_tick() -> i64 {
    locks::lock_ticks();
    // Counted before the snapshots below: every commit counted so far is visible to them.
    let writes = crate::base::signals::log_writes_here();
    let (last, needed) = plans::two::<i64, bool>(LAST_TICK, &[], &[]);
    let last = last.expect("the tick table always holds a tick");
    if !needed.unwrap_or(false) {
        serve_at_commit(last, writes);
        return last;
    }
    // Read the sequence before the snapshot is taken (two statements, two snapshots): every
    // chunk with a seq at or below last_seq was written by a transaction that either is visible
    // in this snapshot or still running in it.
    // A tick must survive a crash once a reader has seen it: a tick re-created with another
    // snapshot would move transactions across the boundary a peer has already passed.
    crate::base::xact::set_local(c"synchronous_commit", c"local");
    let cur = plans::one::<i64>("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM rbucardo.change_seq", &[], &[]).unwrap_or(0);
    plans::run(
        "INSERT INTO rbucardo.tick (tick_id, snap, last_seq) VALUES ($1, pg_current_snapshot(), $2)",
        &[pg_sys::INT8OID, pg_sys::INT8OID],
        &[(last + 1).into(), cur.into()],
        |_| (),
    );
    AT_COMMIT.with(|a| a.set(AtCommit { cut: true, ..a.get() }));
    hook_commit();
    serve_at_commit(last + 1, writes);
    last + 1
}

/// The newest tick for a peer's fetch: a new one when the log needs one and no one else is
/// cutting one, else the newest there is. (The lock is taken only when a tick is needed: the
/// fetch that takes it holds it to its commit.) Ticks used to be cut under a lock held to the end of
/// the fetch (its durable commit included), so the fetches of many peers at once queued on it
/// one behind the other. Now a fetch that finds the lock taken reads up to the newest tick; it
/// misses nothing for long, since after every commit to the log this node's worker cuts a tick
/// and only then tells listening peers (worker.rs).
///
/// Most fetches need no query for it: the tick cut before the notification they follow holds
/// every change-log commit counted so far (`signals::served_tick`). A commit not counted yet
/// (its callback runs just after it becomes visible) goes out with the next fetch: counted, it
/// is followed by a notification if peers want it. Only in READ COMMITTED, where every query
/// of the fetch sees a committed tick.
pub fn served_tick() -> i64 {
    let writes = crate::base::signals::log_writes_here();
    if let Some(tick) = served_without_query(writes) {
        return tick;
    }
    let (last, needed) = plans::two::<i64, bool>(LAST_TICK, &[], &[]);
    let last = last.expect("the tick table always holds a tick");
    if needed == Some(true) && locks::try_lock_ticks() {
        return ensure_tick();
    }
    if needed == Some(false) {
        serve_at_commit(last, writes);
    }
    last
}

/// `ensure_tick` unless another transaction holds the tick lock (a peer's fetch that is cutting
/// one): then None, and the worker tries again in its next round instead of waiting behind a
/// fetch that may be streaming a large batch over a slow link.
pub fn ensure_tick_nowait() -> Option<i64> {
    locks::try_lock_ticks().then(ensure_tick)
}

/// The tick that will hold every transaction committed so far: the newest tick, or the next
/// one if the log has grown since. Takes no lock, so callers that only wait can use it.
/// While the tick noted for peers' fetches holds every change-log commit counted (as in
/// `served_tick`), that one: nothing else cuts a newer tick until a commit is counted, and a
/// commit whose COMMIT has returned is counted.
pub fn stream_end() -> i64 {
    if let Some(tick) = served_without_query(crate::base::signals::log_writes_here()) {
        return tick;
    }
    let (last, needed) = plans::two::<i64, bool>(LAST_TICK, &[], &[]);
    last.unwrap_or(0) + i64::from(needed.unwrap_or(false))
}

/// The tick noted for peers' fetches, if it holds every change-log commit counted so far
/// (`writes`, just read) and this transaction's statements see it (READ COMMITTED).
fn served_without_query(writes: Option<u64>) -> Option<i64> {
    // SAFETY: reads the backend's isolation level.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_READ_COMMITTED as i32 {
        return None;
    }
    let writes = writes?;
    let (tick, held) = crate::base::signals::served_tick(tick_rel())?;
    (held == writes).then_some(tick)
}

/// One transaction as read from the log: its final chunk, and the seq and size of the chunks
/// it spilled before it (read when it is shipped, whole or a part at a time).
struct LoggedTxn {
    txid: i64,
    only_for: Option<i32>,
    final_seq: i64,
    origin: Option<i32>,
    origin_pos: Option<Position>,
    via: Option<i32>,
    hlc: i64,
    last: Vec<u8>,
    earlier: Vec<(i64, usize)>,
}

impl LoggedTxn {
    /// Number of log chunks, and the size of chunk `i` of them.
    fn chunks(&self) -> usize {
        self.earlier.len() + 1
    }

    fn len(&self, i: usize) -> usize {
        self.earlier.get(i).map_or(self.last.len(), |e| e.1)
    }

    /// Its chunks `range`, read from the log.
    fn read(&self, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
        let seqs: Vec<i64> = range.clone().filter(|&i| i < self.earlier.len()).map(|i| self.earlier[i].0).collect();
        let mut out: Vec<Vec<u8>> = if seqs.is_empty() {
            Vec::new()
        } else {
            Spi::connect(|c| {
                c.select("SELECT data FROM rbucardo.change_log WHERE seq = ANY ($1) ORDER BY seq", None, &[seqs.into()])
                    .expect("reading spilled chunks")
                    .map(|r| r.get::<Vec<u8>>(1).unwrap().unwrap())
                    .collect()
            })
        };
        if range.end == self.chunks() {
            out.push(self.last.clone());
        }
        out
    }

    /// Transaction `p` of a kept span, from its kept row (a single chunk).
    fn kept(p: &spancache::Placed, row: spancache::Row) -> LoggedTxn {
        LoggedTxn {
            txid: row.txid,
            only_for: p.only_for,
            final_seq: p.seq,
            origin: p.origin,
            origin_pos: row.origin_pos,
            via: p.via,
            hlc: row.hlc,
            last: row.data,
            earlier: Vec::new(),
        }
    }
}

/// The columns `logged_txns` reads, in its order.
macro_rules! logged_columns {
    () => {
        "l.txid::text::bigint, l.seq, l.chunk_no, l.origin, l.origin_tick, l.origin_seq, l.via, l.hlc, l.data, l.only_for"
    };
}

/// The transactions of tick `k` whose final chunk comes after `after_seq`, in order, at most
/// `limit` of them and no more than fit in about `budget` bytes (the first always comes). A
/// transaction is identified by its local xid and, for forwarded ones, its origin position:
/// one local apply transaction can hold several remote transactions.
fn read_tick(k: i64, after_seq: i64, limit: i64, budget: usize) -> Vec<LoggedTxn> {
    let previous = plans::run(
        "SELECT last_seq, ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(snap) x),
                pg_snapshot_xmax(snap)::text::bigint
           FROM rbucardo.tick WHERE tick_id = $1 - 1",
        &[pg_sys::INT8OID],
        &[k.into()],
        |t| if t.is_empty() { None } else { t.first().get_three::<i64, Vec<i64>, i64>().ok() },
    );
    let Some((plast, xip, xmax)) = previous else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("stream position in tick {} is older than the change log kept on this node", k - 1),
            "The peer asks for changes this node has already trimmed (was it restored from a backup?). \
             Re-create that peer from a copy of a current node, then give it its own identity with init_node.",
        )
    };
    let (plast, xip, xmax) = (plast.unwrap_or(0), xip.unwrap_or_default(), xmax.unwrap_or(0));
    // A chunk written before the previous tick read last_seq belongs to this tick only if
    // its transaction was running at the previous tick: listed in its snapshot, or at or
    // past its xmax. Both are found by the txid index; everything else by the seq index.
    // The transactions' sizes are read first (octet_length does not fetch a value stored
    // out of line), and only those that fit `budget` are read whole: a batch of a few huge
    // transactions does not read a thousand of them to ship one.
    macro_rules! finals {
        ($running:literal) => {
            concat!(
                "WITH c AS (SELECT l.seq, octet_length(l.data) AS len
                              FROM rbucardo.change_log l
                             WHERE l.final AND l.seq > $2
                               AND (l.seq > $4 OR ",
                $running,
                ")
                               AND pg_visible_in_snapshot(l.txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $1))
                               AND NOT pg_visible_in_snapshot(l.txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $1 - 1))
                             ORDER BY l.seq LIMIT $3),
                      f AS (SELECT c.seq, sum(c.len) OVER (ORDER BY c.seq) - c.len AS before FROM c)
                 SELECT ",
                logged_columns!(),
                "
                   FROM f JOIN rbucardo.change_log l ON l.seq = f.seq
                  WHERE f.before < $7
                  ORDER BY l.seq"
            )
        };
    }
    let finals: &'static str = if xip.is_empty() {
        finals!("l.txid >= $6::text::xid8")
    } else {
        finals!("(l.txid >= $6::text::xid8 OR l.txid = ANY ($5::bigint[]::text[]::xid8[]))")
    };
    let i8 = pg_sys::INT8OID;
    let types = [i8, i8, i8, i8, pg_sys::INT8ARRAYOID, i8, i8];
    let args = [k.into(), after_seq.into(), limit.into(), plast.into(), xip.into(), xmax.into(), (budget.max(1) as i64).into()];
    let (mut out, multi) = plans::run_custom(finals, &types, &args, logged_txns);
    find_spilled(&mut out, multi);
    out
}

/// The transactions of rows of `logged_columns!`, and which of them (index, txid) spilled
/// earlier chunks.
fn logged_txns(rows: pgrx::spi::SpiTupleTable<'_>) -> (Vec<LoggedTxn>, Vec<(usize, i64)>) {
    let mut out = Vec::new();
    let mut multi = Vec::new();
    for row in rows {
        let origin_pos = match (row.get::<i64>(5).unwrap(), row.get::<i64>(6).unwrap()) {
            (Some(tick), Some(seq)) => Some(Position { tick, seq }),
            _ => None,
        };
        let t = LoggedTxn {
            txid: row.get::<i64>(1).unwrap().unwrap(),
            only_for: row.get::<i32>(10).unwrap(),
            final_seq: row.get::<i64>(2).unwrap().unwrap(),
            origin: row.get::<i32>(4).unwrap(),
            origin_pos,
            via: row.get::<i32>(7).unwrap(),
            hlc: row.get::<i64>(8).unwrap().unwrap(),
            last: row.get::<Vec<u8>>(9).unwrap().unwrap(),
            earlier: Vec::new(),
        };
        if row.get::<i32>(3).unwrap().unwrap_or(0) > 0 {
            multi.push((out.len(), t.txid));
        }
        out.push(t);
    }
    (out, multi)
}

/// Finds the seq and size of the chunks that the transactions `multi` (index in `out`, txid)
/// spilled before their final one (sizes only: octet_length does not fetch a value stored out
/// of line).
fn find_spilled(out: &mut [LoggedTxn], multi: Vec<(usize, i64)>) {
    if multi.is_empty() {
        return;
    }
    Spi::connect(|client| {
        for (i, txid) in multi {
            let t = &out[i];
            let earlier: Vec<(i64, usize)> = client
                .select(
                    // Chunks after the previous final chunk of the same transaction and origin:
                    // one local transaction may hold several.
                    "SELECT seq, octet_length(data) FROM rbucardo.change_log l
                      WHERE l.txid = $1::text::xid8 AND NOT l.final AND l.seq < $2
                        AND l.origin IS NOT DISTINCT FROM $3 AND l.origin_tick IS NOT DISTINCT FROM $4
                        AND l.origin_seq IS NOT DISTINCT FROM $5
                        AND l.seq > coalesce((SELECT max(p.seq) FROM rbucardo.change_log p
                                               WHERE p.txid = l.txid AND p.final AND p.seq < $2
                                                 AND p.origin IS NOT DISTINCT FROM $3 AND p.origin_tick IS NOT DISTINCT FROM $4
                                                 AND p.origin_seq IS NOT DISTINCT FROM $5), -1)
                      ORDER BY l.seq",
                    None,
                    &[txid.into(), t.final_seq.into(), t.origin.into(), t.origin_pos.map(|p| p.tick).into(), t.origin_pos.map(|p| p.seq).into()],
                )
                .expect("reading spilled chunks")
                .map(|r| (r.get::<i64>(1).unwrap().unwrap(), r.get::<i32>(2).unwrap().unwrap_or(0) as usize))
                .collect();
            out[i].earlier = earlier;
        }
    })
}

/// At most this many ticks are read with one query of `read_span`.
const SPAN_TICKS: i64 = 256;
/// A span that reaches the newest tick and whose ticks hold at most this many change-log
/// chunks is read as one near the head of the stream (`read_span`).
const NEAR_HEAD_CHUNKS: i64 = 1000;
/// At most this many transactions are listed by one query of `read_span`.
const SPAN_ROWS: i64 = 2000;

/// What `read_span` found: each transaction with its tick and final seq, read whole (`Some`)
/// or left out because it must not go to the peer (`None`), in stream order; and `through`,
/// the last tick all of whose transactions are listed (`None` when the list stops early, at the
/// budget).
struct Span {
    txns: Vec<(i64, i64, Option<LoggedTxn>)>,
    through: Option<i64>,
}

/// Places the transactions a span listed, `(final seq, txid)` in seq order, in their ticks:
/// each in the first of ticks `lo + 1 ..` whose snapshot sees it (`later` holds their
/// `last_seq` and snapshot, in order; visibility only grows from tick to tick). Returns the
/// tick of each (`None` past the last complete tick) and that last complete tick. The list is
/// complete unless `cut` is the seq it stopped at (a row limit); then tick t is complete if
/// every one of its transactions has a seq at or below that: each committed before tick t + 1
/// read `last_seq` (after tick t's snapshot was taken), so its seq is at most that. `None`
/// when no tick is complete, or a transaction is seen by no tick (never: the query asks the
/// last one).
fn place_in_ticks(lo: i64, later: &[(i64, &Snapshot)], listed: &[(i64, u64)], cut: Option<i64>) -> Option<(Vec<Option<i64>>, i64)> {
    let mut through = lo + later.len() as i64;
    if let Some(s) = cut {
        through = lo + later.iter().take_while(|t| t.0 <= s).count() as i64 - 1;
        if through <= lo {
            return None;
        }
    }
    let mut out = Vec::with_capacity(listed.len());
    for &(_, txid) in listed {
        let i = later.partition_point(|t| !t.1.sees(txid));
        if i == later.len() {
            return None;
        }
        let tick = lo + 1 + i as i64;
        out.push((tick <= through).then_some(tick));
    }
    Some((out, through))
}

/// The transactions of ticks `lo + 1 ..`, up to at most `newest` and `SPAN_TICKS` ticks, listed
/// at once instead of tick by tick: a hub's peers fetch often, and each fetch spans the few
/// ticks cut since the last. The list (`list_span`, or the one kept by an earlier fetch of the
/// same span) holds the transactions committed between the snapshots of tick `lo` and of the
/// last tick of the span, each in the first tick whose snapshot sees it (visibility only grows
/// from tick to tick). Only those that fit `budget` (the first always) and that may go to peer
/// `to` are read whole. `None` when the span has no complete tick within `SPAN_ROWS`
/// transactions, or a listed one is gone (trimmed): the caller reads tick by tick instead.
fn read_span(me: i32, lo: i64, newest: i64, to: i32, budget: usize) -> Option<Span> {
    let hi = newest.min(lo + SPAN_TICKS);
    if hi <= lo {
        return None;
    }
    let key = spancache::Key::here(tick_rel(), lo, hi);
    let spancache::Kept { txns: txns_all, through, rows } = match spancache::lookup(&key) {
        Some(kept) => kept,
        None => list_span(key, newest)?,
    };
    let placed = txns_all.iter().map(|t| {
        (t.tick, t.seq, t.len, not_for(to, t.origin.unwrap_or(me), t.via, t.only_for))
    });
    // Which to read whole: those for the peer, while the bytes before them are within budget.
    let mut txns = Vec::with_capacity(placed.len());
    let mut wanted = Vec::new();
    let mut before = 0usize;
    let mut cut = false;
    for (i, (tick, seq, len, away)) in placed.enumerate() {
        if !away {
            if before >= budget.max(1) {
                cut = true;
                break;
            }
            before += len;
            wanted.push(i);
        }
        txns.push((tick, seq, None));
    }
    if let Some(mut rows) = rows {
        // Kept with the span: nothing to read.
        for i in wanted {
            txns[i].2 = Some(LoggedTxn::kept(&txns_all[i], std::mem::take(&mut rows[i])));
        }
    } else if !wanted.is_empty() {
        let wanted_count = wanted.len();
        let mut by_seq = read_finals(wanted.iter().map(|&i| txns_all[i].seq).collect());
        for (_, seq, slot) in txns.iter_mut() {
            *slot = by_seq.remove(seq);
        }
        if !by_seq.is_empty() || txns.iter().filter(|t| t.2.is_some()).count() != wanted_count {
            return None; // a listed transaction could not be read: read tick by tick instead
        }
    }
    Some(Span { txns, through: (!cut).then_some(through) })
}

/// The transactions whose final chunks have seqs `seqs`, by that seq, as far as they are still
/// in the log.
fn read_finals(seqs: Vec<i64>) -> std::collections::HashMap<i64, LoggedTxn> {
    // In any order: each is placed by its seq (a sort here was a tenth of the span's reading
    // near the head).
    let (mut read, multi) = plans::run(
        concat!("SELECT ", logged_columns!(), " FROM rbucardo.change_log l WHERE l.seq = ANY ($1)"),
        &[pg_sys::INT8ARRAYOID],
        &[seqs.into()],
        logged_txns,
    );
    find_spilled(&mut read, multi);
    read.into_iter().map(|t| (t.final_seq, t)).collect()
}

/// Lists the transactions of span `key` (ticks `lo + 1 ..= hi`) in stream order, and the last
/// tick they complete. Keeps the list for other fetches of the span (spancache.rs) near the
/// head of the stream, where a hub's stores fetch the same spans, if its last tick was not cut
/// by this transaction.
fn list_span(key: spancache::Key, newest: i64) -> Option<spancache::Kept> {
    let (lo, hi) = (key.lo, key.hi);
    // Before the first statement: a span listed from a log deleted since is not kept.
    let epoch = spancache::epoch();
    let i8 = pg_sys::INT8OID;
    let ticks: Vec<(i64, i64, Snapshot)> = plans::run(
        "SELECT tick_id, last_seq, snap::text FROM rbucardo.tick WHERE tick_id BETWEEN $1 AND $2 ORDER BY tick_id",
        &[i8, i8],
        &[lo.into(), hi.into()],
        |rows| {
            rows.filter_map(|r| Some((r.get::<i64>(1).ok()??, r.get::<i64>(2).ok()?.unwrap_or(0), Snapshot::parse(&r.get::<String>(3).ok()??)?)))
                .collect()
        },
    );
    // Ticks are numbered without gaps; anything else (tick lo trimmed) is read_tick's to report.
    if ticks.len() as i64 != hi - lo + 1 || ticks[0].0 != lo {
        return None;
    }
    let (plast, first) = (ticks[0].1, &ticks[0].2);
    let last = &ticks[ticks.len() - 1].2;
    // Near the head of the stream (a hub's stores, fetching every few milliseconds: a span of
    // a few chunks) with plain statements whose plans are kept; far behind it (a catch-up),
    // with one statement planned for its arguments.
    let near_head = hi == newest && ticks[ticks.len() - 1].1 - plast <= NEAR_HEAD_CHUNKS;
    let (listed, cut) = if near_head { list_near_head(plast, first, last) } else { list_far(lo, hi, plast, first) };
    let later: Vec<(i64, &Snapshot)> = ticks[1..].iter().map(|t| (t.1, &t.2)).collect();
    let keys: Vec<(i64, u64)> = listed.iter().map(|l| (l.0, l.1 as u64)).collect();
    let (ticks_of, through) = place_in_ticks(lo, &later, &keys, cut)?;
    let mut placed: Vec<spancache::Placed> = listed
        .into_iter()
        .zip(ticks_of)
        .filter_map(|((seq, _, len, origin, via, only_for), tick)| Some(spancache::Placed { tick: tick?, seq, len, origin, via, only_for }))
        .collect();
    placed.sort_unstable_by_key(|p| (p.tick, p.seq));
    let mut rows = None;
    // Only in READ COMMITTED, whose statements see what committed before the epoch was read
    // (an older snapshot could see a log deleted since).
    // SAFETY: reads the backend's transaction state.
    let fresh = unsafe { pg_sys::XactIsoLevel } == pg_sys::XACT_READ_COMMITTED as i32;
    if near_head && fresh && !AT_COMMIT.with(|a| a.get().cut) && placed.len() <= spancache::MAX_TXNS && spancache::keepable(&key, epoch) {
        // Its rows too, if they fit: then no other fetch of the span reads the log.
        if placed.iter().map(|p| p.len).sum::<usize>() <= spancache::SLOT_BYTES {
            rows = kept_rows(&placed);
        }
        spancache::keep(key, &placed, through, rows.as_deref(), epoch);
    }
    Some(spancache::Kept { txns: placed, through, rows })
}

/// The rows of the transactions `placed`, in the same order, if each is one chunk still in the
/// log.
fn kept_rows(placed: &[spancache::Placed]) -> Option<Vec<spancache::Row>> {
    let mut by_seq = read_finals(placed.iter().map(|p| p.seq).collect());
    placed
        .iter()
        .map(|p| {
            let t = by_seq.remove(&p.seq).filter(|t| t.earlier.is_empty())?;
            Some(spancache::Row { txid: t.txid, hlc: t.hlc, origin_pos: t.origin_pos, data: t.last })
        })
        .collect()
}

/// A transaction `read_span` lists: final seq, txid, bytes, origin, via, only_for.
type Listed = (i64, i64, usize, Option<i32>, Option<i32>, Option<i32>);

/// The columns of `Listed`, from a change-log row `l`.
macro_rules! listed_columns {
    () => {
        "l.seq, l.txid::text::bigint, octet_length(l.data), l.origin, l.via, l.only_for"
    };
}

/// The rows of a statement selecting `listed_columns!`.
fn listed_rows(rows: pgrx::spi::SpiTupleTable<'_>) -> Vec<Listed> {
    rows.map(|r| {
        (
            r.get::<i64>(1).unwrap().unwrap(),
            r.get::<i64>(2).unwrap().unwrap(),
            r.get::<i32>(3).unwrap().unwrap_or(0) as usize,
            r.get::<i32>(4).unwrap(),
            r.get::<i32>(5).unwrap(),
            r.get::<i32>(6).unwrap(),
        )
    })
    .collect()
}

/// The transactions committed between snapshot `first` (of the tick that read `plast`) and
/// snapshot `last`, in seq order, near the head of the stream; with the seq at which the list
/// was cut by its row limit, if it was (every transaction below last's xmax with a final seq
/// up to there is listed). A transaction not visible in `first` either wrote its final chunk
/// after `plast`, or was running then: listed in `first` or at or past its xmax (and, to be
/// visible in `last`, below last's xmax). Each side is read through its own index by a
/// statement with a kept plan (`seq + 0` keeps the running ones off the seq index, whose range
/// `<= plast` is the whole kept log), and visibility is decided here: the one statement of
/// `list_far`, planned for every fetch, was a third of a hub's work with 20 stores. The xmax
/// side is a range for its plan's sake: a generic plan takes an open-ended comparison with an
/// unknown bound for a third of the table, a range for a small part of it.
fn list_near_head(plast: i64, first: &Snapshot, last: &Snapshot) -> (Vec<Listed>, Option<i64>) {
    let i8 = pg_sys::INT8OID;
    let mut listed = plans::run(
        concat!(
            "SELECT ", listed_columns!(), " FROM rbucardo.change_log l
              WHERE l.final AND l.seq + 0 <= $1 AND l.txid >= $2::text::xid8 AND l.txid < $3::text::xid8"
        ),
        &[i8, i8, i8],
        &[plast.into(), (first.xmax() as i64).into(), (last.xmax() as i64).into()],
        listed_rows,
    );
    if !first.running().is_empty() {
        let xip: Vec<i64> = first.running().iter().map(|&x| x as i64).collect();
        listed.extend(plans::run(
            concat!(
                "SELECT ", listed_columns!(), " FROM rbucardo.change_log l
                  WHERE l.final AND l.seq + 0 <= $1 AND l.txid = ANY ($2::bigint[]::text[]::xid8[])"
            ),
            &[i8, pg_sys::INT8ARRAYOID],
            &[plast.into(), xip.into()],
            listed_rows,
        ));
    }
    listed.sort_unstable_by_key(|l| l.0);
    // (Below last's xmax: the transactions that committed after it, a heavy stream's, would
    // fill the limit and cut the span short.)
    let after = plans::run(
        concat!(
            "SELECT ", listed_columns!(), " FROM rbucardo.change_log l
              WHERE l.final AND l.seq > $1 AND l.txid < $3::text::xid8 ORDER BY l.seq LIMIT $2"
        ),
        &[i8, i8, i8],
        &[plast.into(), SPAN_ROWS.into(), (last.xmax() as i64).into()],
        listed_rows,
    );
    let cut = (after.len() as i64 >= SPAN_ROWS).then(|| after[after.len() - 1].0);
    listed.extend(after);
    listed.retain(|l| last.sees(l.1 as u64) && !first.sees(l.1 as u64));
    (listed, cut)
}

/// `list_near_head`'s list, far behind the head (a catch-up), with one statement planned for
/// its arguments: tick `lo`'s seq bound is then the smaller side of the running ones (their
/// txid alone, `>= xmax`, is the whole backlog: a catch-up 25 % slower). The two sides are
/// read apart and merged in seq order up to the limit: written as one OR, the planner walked
/// the log's key from its start (for the ORDER BY), filtering every row of the ticks not yet
/// trimmed (about 1 ms per round under pgbench).
fn list_far(lo: i64, hi: i64, plast: i64, first: &Snapshot) -> (Vec<Listed>, Option<i64>) {
    macro_rules! listed {
        ($running:literal) => {
            concat!(
                "SELECT c.seq, c.txid::text::bigint, c.len, c.origin, c.via, c.only_for
                   FROM (SELECT l.seq, l.txid, octet_length(l.data) AS len, l.origin, l.via, l.only_for
                           FROM rbucardo.change_log l
                          WHERE l.final AND l.seq > $3
                         UNION ALL
                         SELECT l.seq, l.txid, octet_length(l.data), l.origin, l.via, l.only_for
                           FROM rbucardo.change_log l
                          WHERE l.final AND l.seq <= $3 AND ",
                $running,
                ") c
                  WHERE pg_visible_in_snapshot(c.txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $2))
                    AND NOT pg_visible_in_snapshot(c.txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $1))
                  ORDER BY c.seq LIMIT $6"
            )
        };
    }
    let i8 = pg_sys::INT8OID;
    let xip: Vec<i64> = first.running().iter().map(|&x| x as i64).collect();
    let sql: &'static str = if xip.is_empty() {
        listed!("l.txid >= $5::text::xid8")
    } else {
        listed!("(l.txid >= $5::text::xid8 OR l.txid = ANY ($4::bigint[]::text[]::xid8[]))")
    };
    let args = [lo.into(), hi.into(), plast.into(), xip.into(), (first.xmax() as i64).into(), SPAN_ROWS.into()];
    let listed = plans::run_custom(sql, &[i8, i8, i8, pg_sys::INT8ARRAYOID, i8, i8], &args, listed_rows);
    let cut = (listed.len() as i64 >= SPAN_ROWS).then(|| listed[listed.len() - 1].0);
    (listed, cut)
}

/// How much a batch holds: transactions are added while it holds less than about `fill`
/// bytes; one larger than `max` travels in parts of about `max`, each alone in its batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchSize {
    pub fill: usize,
    pub max: usize,
}

/// Reads this node's stream after `after` into a batch of about `size` for the peer `to`,
/// leaving out what originates there or was received from there, and changes to tables not
/// in a sync shared with it (`policy`). `resume` is where the
/// peer's parts of the next one end, when it holds some: (that transaction's position, the
/// number of its chunks it has). It reads up to tick `newest_tick` (`ensure_tick` or
/// `served_tick`).
pub fn read_batch(me: i32, after: Position, to: i32, size: BatchSize, policy: &PeerPolicy, resume: Option<(Position, u32)>, newest_tick: i64) -> Batch {
    let mut b = Builder { me, to, size, policy, resume, pos: after, txns: Vec::new(), bytes: 0 };
    let mut complete = false;
    'ticks: loop {
        let (k, from_seq) = if b.pos.seq == WHOLE_TICK { (b.pos.tick + 1, -1) } else { (b.pos.tick, b.pos.seq) };
        if k > newest_tick {
            complete = true;
            break;
        }
        // From a tick's start, several ticks at once; within a tick (after a batch that ended
        // in it) tick by tick, whose query starts at the seq reached.
        let span = if from_seq == -1 { read_span(me, k - 1, newest_tick, to, size.fill.saturating_sub(b.bytes)) } else { None };
        if let Some(span) = span {
            for (tick, seq, t) in span.txns {
                let at = Position { tick, seq };
                match t {
                    Some(t) => {
                        if !b.offer(at, t) {
                            break 'ticks;
                        }
                    }
                    None => b.pos = at, // not for this peer
                }
            }
            if let Some(through) = span.through {
                b.pos = Position::whole(through);
            }
            continue;
        }
        let mut seq = from_seq;
        loop {
            let part = read_tick(k, seq, 1000, size.fill.saturating_sub(b.bytes));
            if part.is_empty() {
                break;
            }
            for t in part {
                seq = t.final_seq;
                if !b.offer(Position { tick: k, seq }, t) {
                    break 'ticks;
                }
            }
        }
        b.pos = Position::whole(k);
    }
    Batch { sender: me, after, upto: b.pos, txns: b.txns, complete }
}

/// Whether a transaction of `origin`, received from `via` and addressed to `only_for`, is not
/// for peer `to`: nothing goes back where it came from, nor to a node it is not addressed to.
fn not_for(to: i32, origin: i32, via: Option<i32>, only_for: Option<i32>) -> bool {
    origin == to || via == Some(to) || only_for.is_some_and(|n| n != to)
}

/// A batch being filled, transaction by transaction in stream order (`read_batch`).
struct Builder<'a> {
    me: i32,
    to: i32,
    size: BatchSize,
    policy: &'a PeerPolicy,
    resume: Option<(Position, u32)>,
    /// Where the batch ends so far.
    pos: Position,
    txns: Vec<Txn>,
    bytes: usize,
}

impl Builder<'_> {
    /// Takes transaction `t` at position `at` into the batch, or leaves it out if it is not for
    /// this peer; false when the batch is full and ends before `t` (or with a part of it).
    fn offer(&mut self, at: Position, t: LoggedTxn) -> bool {
        let n = t.chunks();
        let size: usize = (0..n).map(|i| t.len(i)).sum();
        let start = match self.resume {
            Some((p, have)) if p == at => (have as usize).min(n - 1),
            _ => 0,
        };
        let whole = start == 0 && size <= self.size.max;
        if !self.txns.is_empty() && (!whole || self.bytes + size > self.size.fill) {
            return false;
        }
        let origin = t.origin.unwrap_or(self.me);
        let origin_pos = t.origin_pos.unwrap_or(at);
        if not_for(self.to, origin, t.via, t.only_for) {
            self.pos = at;
            return true;
        }
        // A joining peer's copies may hold the transaction already, for some tables.
        let held = self.policy.join.as_ref().map(|j| j.holds(at.tick, t.txid as u64)).unwrap_or_default();
        if whole {
            self.pos = at;
            if let Some(chunks) = shared_part(t.read(0..n), self.policy, &held) {
                self.bytes += size;
                self.txns.push(Txn { origin, origin_pos, hlc: t.hlc, stream_pos: at, chunks, part: None, to: t.only_for, decoded: Default::default() });
            }
            return true;
        }
        // Too large for one batch: the next part, alone. Until its last part, the batch ends
        // before it.
        let mut end = start + 1;
        let mut part_bytes = t.len(start);
        while end < n && part_bytes + t.len(end) <= self.size.max {
            part_bytes += t.len(end);
            end += 1;
        }
        let more = end < n;
        let chunks = shared_part(t.read(start..end), self.policy, &held).unwrap_or_default();
        let part = Some(Part { start: start as u32, end: end as u32, more });
        self.txns.push(Txn { origin, origin_pos, hlc: t.hlc, stream_pos: at, chunks, part, to: t.only_for, decoded: Default::default() });
        if !more {
            self.pos = at;
        }
        false
    }
}

/// The part of a transaction's chunks that the peer with `policy` shares: row changes of the
/// tables of the syncs shared with it, and of tables this node no longer knows by the name they
/// were captured under (renamed or dropped since: the receiver decides, and refuses them
/// visibly if it does not share them, rather than this node dropping them unseen); schema
/// changes recorded in a schema of those tables, or made with replicate_ddl. `None` when nothing is left. Chunks are
/// decoded only when the peer does not share every table. Row changes of the tables in `held`
/// are left out too: the peer's copy of them holds the transaction already.
fn shared_part(chunks: Vec<Vec<u8>>, policy: &PeerPolicy, held: &HashSet<(String, String)>) -> Option<Vec<Vec<u8>>> {
    if policy.shares_all && held.is_empty() {
        return Some(chunks);
    }
    let mut out = Vec::with_capacity(chunks.len());
    for bytes in chunks {
        let Ok(mut chunk) = decode_chunk(&bytes) else {
            out.push(bytes); // the receiver refuses it, visibly
            continue;
        };
        let before = chunk.changes.len();
        let relations = chunk.relations.clone();
        chunk.changes.retain(|c| {
            let rel = &relations[c.rel as usize];
            let name = (rel.schema.clone(), rel.name.clone());
            if c.op == Op::Ddl {
                rel.name == "replicate_ddl" || policy.schemas.contains(&rel.schema)
            } else {
                !held.contains(&name) && (policy.tables.contains(&name) || !policy.replicated.contains(&name))
            }
        });
        match chunk.changes.len() {
            0 => {}
            n if n == before => out.push(bytes),
            _ => out.push(encode_chunk(&chunk)),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The first schema change the peer with `policy` would be sent among the transactions
/// committed after tick `tick` (its command text), if any: a joining node's copies may not
/// match the tables such a change touched (src/runtime/join.rs).
pub fn schema_change_since(tick: i64, policy: &PeerPolicy) -> Option<String> {
    Spi::connect(|c| {
        let rows = c
            .select(
                "SELECT data FROM rbucardo.change_log
                  WHERE NOT pg_visible_in_snapshot(txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $1))
                  ORDER BY seq",
                None,
                &[tick.into()],
            )
            .expect("reading the log");
        for row in rows {
            let Some(bytes) = row.get::<Vec<u8>>(1).ok().flatten() else { continue };
            let Ok(chunk) = decode_chunk(&bytes) else { continue };
            for ch in chunk.changes.iter().filter(|ch| ch.op == Op::Ddl) {
                let rel = &chunk.relations[ch.rel as usize];
                if rel.name == "replicate_ddl" || policy.schemas.contains(&rel.schema) {
                    let command = ch.new.as_ref().and_then(|n| n.first().cloned().flatten()).unwrap_or_default();
                    return Some(command);
                }
            }
        }
        None
    })
}

/// Deletes what every peer has confirmed: the transactions of every tick up to the oldest
/// tick all peers have completely. Every peer known here holds the log, in a sync or not (a
/// sync removed and added again while a peer is offline must not lose it anything), until
/// `remove_db`, or until it expires (src/log/retention.rs). Ticks older than that one are
/// dropped too; it stays as the lower bound of the next tick.
///
/// With `budget`, it stops after about that many log rows (whole ticks, at least one), so
/// that one trim after a burst is a short transaction (the housekeeper trims in steps, see
/// src/runtime/housekeeper.rs); it returns whether more is left to trim.
pub fn trim(me: i32, budget: Option<i64>) -> (i64, bool) {
    // An expired peer (src/log/retention.rs) no longer holds the log back; when every peer
    // has expired, nobody needs the log up to the newest tick.
    let floor = if crate::log::retention::ready() {
        Spi::get_one::<i64>(
            "SELECT CASE WHEN bool_and(p.expired_at IS NOT NULL) THEN (SELECT max(tick_id) FROM rbucardo.tick)
                         ELSE min(rbucardo.complete_tick(out_tick, out_seq)) FILTER (WHERE p.expired_at IS NULL) END
               FROM rbucardo.peer_state p",
        )
    } else {
        Spi::get_one::<i64>("SELECT min(rbucardo.complete_tick(out_tick, out_seq)) FROM rbucardo.peer_state p")
    };
    let Some(floor) = floor.expect("reading peer confirmations").filter(|&f| f > 0) else {
        // Nothing to trim (a peer has confirmed nothing yet): the oldest tick kept is the
        // floor the span cache needs to keep this database's spans (spancache.rs).
        if let Ok(Some(oldest)) = Spi::get_one::<i64>("SELECT min(tick_id) FROM rbucardo.tick") {
            spancache::trimmed(tick_rel(), oldest);
        }
        return (0, false);
    };
    // A step: the newest tick up to the floor within the budget's count of log rows past the
    // oldest tick kept (the previous step's floor), else the tick right after it. Always past
    // the oldest tick, so every step makes progress.
    let reach = floor;
    let floor = match budget {
        None => floor,
        Some(rows) => Spi::get_one_with_args::<i64>(
            "WITH o AS (SELECT tick_id, last_seq FROM rbucardo.tick ORDER BY tick_id LIMIT 1)
             SELECT coalesce((SELECT max(t.tick_id) FROM rbucardo.tick t, o WHERE t.tick_id > o.tick_id AND t.tick_id <= $1 AND t.last_seq <= o.last_seq + $2),
                             (SELECT min(t.tick_id) FROM rbucardo.tick t, o WHERE t.tick_id > o.tick_id AND t.tick_id <= $1),
                             $1)",
            &[floor.into(), rows.into()],
        )
        .ok()
        .flatten()
        .map_or(floor, |step| step.min(floor)),
    };
    let more = floor < reach;
    spancache::trimmed(tick_rel(), floor);
    // What the floor tick's snapshot sees. Every such transaction is below the snapshot's xmax:
    // said too, so that a step reads the log from its start up to the floor through the txid
    // index, rather than the whole log (a catch-up of a long outage trims in hundreds of steps).
    const TRIMMED: &str = "txid < (SELECT pg_snapshot_xmax(snap) FROM rbucardo.tick WHERE tick_id = $1)
                           AND pg_visible_in_snapshot(txid, (SELECT snap FROM rbucardo.tick WHERE tick_id = $1))";
    crate::log::clocks::keep_row_clocks(me, TRIMMED, &[floor.into()]);
    let deleted = Spi::connect_mut(|client| {
        let n = client
            .update(
                &format!("DELETE FROM rbucardo.change_log WHERE {TRIMMED}"),
                None,
                &[floor.into()],
            )
            .expect("trimming the change log")
            .len();
        client.update("DELETE FROM rbucardo.tick WHERE tick_id < $1", None, &[floor.into()]).expect("trimming ticks");
        n as i64
    });
    (deleted, more)
}

#[cfg(test)]
mod tests {
    use super::place_in_ticks;
    use crate::base::snapshot::Snapshot;

    fn snap(text: &str) -> Snapshot {
        Snapshot::parse(text).unwrap()
    }

    /// A transaction served from a kept span carries what reading its row would: the row's
    /// txid, clock, origin position and bytes, and the list's origin, via and addressee.
    #[test]
    fn a_kept_row_makes_the_transaction_its_log_row_would() {
        use super::{spancache, LoggedTxn, Position};
        let p = spancache::Placed { tick: 7, seq: 41, len: 3, origin: Some(2), via: Some(3), only_for: Some(4) };
        let row = spancache::Row { txid: 900, hlc: 1234, origin_pos: Some(Position { tick: 5, seq: 6 }), data: vec![1, 2, 3] };
        let t = LoggedTxn::kept(&p, row);
        assert_eq!((t.txid, t.hlc, t.final_seq, t.last.as_slice()), (900, 1234, 41, &[1u8, 2, 3][..]));
        assert_eq!((t.origin, t.via, t.only_for), (Some(2), Some(3), Some(4)));
        assert_eq!(t.origin_pos, Some(Position { tick: 5, seq: 6 }));
        assert_eq!((t.chunks(), t.len(0)), (1, 3), "one chunk, the kept one");
        let local = LoggedTxn::kept(&spancache::Placed { origin: None, via: None, only_for: None, ..p }, spancache::Row { origin_pos: None, ..Default::default() });
        assert_eq!((local.origin, local.origin_pos, local.via, local.only_for), (None, None, None, None));
    }

    #[test]
    fn a_span_places_each_transaction_in_the_first_tick_that_sees_it() {
        // Tick 11 sees 100..104 but not 102 (running); tick 12 sees 102 and 105; tick 13, 106.
        let (t11, t12, t13) = (snap("102:105:102"), snap("106:106:"), snap("107:107:"));
        let later = [(20, &t11), (25, &t12), (30, &t13)];
        // 102 wrote its final chunk early (seq 18) but committed after tick 11.
        let listed = [(15, 100), (16, 101), (18, 102), (21, 103), (26, 105), (27, 106)];
        let (ticks, through) = place_in_ticks(10, &later, &listed, None).unwrap();
        assert_eq!(ticks, vec![Some(11), Some(11), Some(12), Some(11), Some(12), Some(13)]);
        assert_eq!(through, 13);
    }

    #[test]
    fn a_cut_list_keeps_only_the_ticks_it_holds_completely() {
        let (t11, t12, t13) = (snap("102:105:102"), snap("106:106:"), snap("107:107:"));
        let later = [(20, &t11), (25, &t12), (30, &t13)];
        // Cut at seq 26: tick 11 is complete (tick 12 read last_seq 25 <= 26), tick 12 may
        // still hold a transaction with a seq up to 30, so it is left for the next read.
        let listed = [(15, 100), (16, 101), (18, 102), (21, 103), (26, 105)];
        let (ticks, through) = place_in_ticks(10, &later, &listed, Some(26)).unwrap();
        assert_eq!(through, 11);
        assert_eq!(ticks, vec![Some(11), Some(11), None, Some(11), None]);
        // Cut before tick 12's last_seq: no tick is complete, read tick by tick instead.
        assert!(place_in_ticks(10, &later, &listed[..3], Some(18)).is_none());
    }

    #[test]
    fn a_transaction_no_tick_sees_is_refused() {
        let t11 = snap("102:105:102");
        assert!(place_in_ticks(10, &[(20, &t11)], &[(15, 102)], None).is_none());
    }
}
