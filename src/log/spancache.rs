//! The transactions of a span of ticks, kept in shared memory for the next fetch of the same
//! span. A hub's stores each fetch the stretch of its stream that one notification announced,
//! within milliseconds of each other, and each fetch listed it with three statements and a
//! query of the ticks (changelog.rs, `read_span`): with 20 stores, most of the fetches of a
//! notification list what the first one listed.
//!
//! What a span holds is fixed once its last tick is committed: the transactions visible in
//! that tick's snapshot and not in the first one's, and a tick id is never used twice in one
//! tick table. So an entry is made only from a tick committed before the fetch that lists it
//! (not one that fetch cut, which may still roll back), and is keyed by database, tick table
//! (a re-created extension numbers its ticks again) and the span's first and last tick. What
//! changes per fetch, what goes to which peer and how much fits a batch, is decided by the
//! reader. A span of single-chunk transactions whose rows fit `SLOT_BYTES` (a store's order
//! is a few hundred bytes) is kept with its rows, so that the other stores' fetches read
//! nothing of the log; a larger one is kept as a list, and its readers read the rows they
//! ship, reading tick by tick instead if one is missing (trimmed), as without an entry. Change
//! log rows are never updated, only deleted by a trim, which the floors below account for.
//!
//! A trim deletes the ticks before its floor and the transactions of those up to it; it
//! notes the floor here first (`trimmed`), and a span starting before the floor is neither
//! kept nor found: a fetch from a trimmed position is told so, as without the cache, and a
//! list made while a trim deleted part of it is not kept. A database's spans are only kept
//! once its floor is known here (the housekeeper trims every few seconds); when that is
//! forgotten (its entry taken by another database, a new tick table, `forget` when the whole
//! log is deleted), so are its spans, and a span listed before that (the cache's epoch) is not
//! kept.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::base::signals::my_dboid;
use crate::base::wire::Position;

/// Spans kept: a few notifications' worth, each fetched by many stores.
const SLOTS: usize = 16;
/// The most transactions a kept span holds; a larger one is not kept (it is not the case of
/// many stores at the head of the stream this is for).
pub const MAX_TXNS: usize = 48;
/// The most bytes of rows a kept span holds; one whose rows do not fit is kept as a list only.
pub const SLOT_BYTES: usize = 16 * 1024;

/// One transaction of a span: the tick it belongs to, its final chunk's seq, its size, and
/// what decides which peers it goes to.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    pub tick: i64,
    pub seq: i64,
    pub len: usize,
    pub origin: Option<i32>,
    pub via: Option<i32>,
    pub only_for: Option<i32>,
}

/// Which span: database, tick table, first tick (the one the fetch starts after) and last.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Key {
    pub db: u32,
    pub rel: u32,
    pub lo: i64,
    pub hi: i64,
}

impl Key {
    /// Span `lo + 1 ..= hi` of tick table `rel` in the current database.
    pub fn here(rel: u32, lo: i64, hi: i64) -> Key {
        Key { db: my_dboid(), rel, lo, hi }
    }
}

/// The row of a kept single-chunk transaction: what a reader ships without reading the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    pub txid: i64,
    pub hlc: i64,
    /// Its origin's position, for a forwarded transaction.
    pub origin_pos: Option<Position>,
    pub data: Vec<u8>,
}

/// A kept span: its transactions in stream order, the last tick they complete, and their rows
/// (in the same order) if they were kept too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub txns: Vec<Placed>,
    pub through: i64,
    pub rows: Option<Vec<Row>>,
}

/// Where a kept row is: `Row` without its bytes, which are `data[start..start + len]`.
#[derive(Copy, Clone, Default)]
struct RowAt {
    txid: i64,
    hlc: i64,
    origin_pos: Option<Position>,
    start: usize,
    len: usize,
}

#[derive(Copy, Clone)]
struct Slot {
    key: Key,
    /// The last tick all of whose transactions are in `txns`.
    through: i64,
    n: usize,
    txns: [Placed; MAX_TXNS],
    /// Whether `rows` and `data` hold the rows of `txns`.
    has_rows: bool,
    rows: [RowAt; MAX_TXNS],
    data: [u8; SLOT_BYTES],
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            key: Key::default(),
            through: 0,
            n: 0,
            txns: [Placed::default(); MAX_TXNS],
            has_rows: false,
            rows: [RowAt::default(); MAX_TXNS],
            data: [0; SLOT_BYTES],
        }
    }
}

impl Slot {
    fn kept(&self) -> Kept {
        let rows = self.has_rows.then(|| {
            self.rows[..self.n]
                .iter()
                .map(|r| Row { txid: r.txid, hlc: r.hlc, origin_pos: r.origin_pos, data: self.data[r.start..r.start + r.len].to_vec() })
                .collect()
        });
        Kept { txns: self.txns[..self.n].to_vec(), through: self.through, rows }
    }
}

/// Trim floors known, one per database that trimmed its log; as many as databases with a
/// worker (signals.rs), though an entry may outlive its database.
const FLOORS: usize = crate::base::signals::MAX_DATABASES;

/// Tick table `rel` of database `db` was trimmed to `tick`: it holds no tick before it, and no
/// transaction of one up to it (or the trim rolled back: a floor may be too high, which
/// only costs kept spans).
#[derive(Copy, Clone, Default)]
struct Floor {
    db: u32,
    rel: u32,
    tick: i64,
}

/// The kept spans, replaced oldest first, and the trim floors.
pub struct SpanCache {
    next: usize,
    slots: [Slot; SLOTS],
    next_floor: usize,
    floors: [Floor; FLOORS],
    /// Bumped whenever a database's spans are forgotten: a span listed before is not kept.
    epoch: u64,
}

impl Default for SpanCache {
    fn default() -> Self {
        SpanCache { next: 0, slots: [Slot::default(); SLOTS], next_floor: 0, floors: [Floor::default(); FLOORS], epoch: 0 }
    }
}

// SAFETY: plain old data (integers), no pointers: valid in any process.
unsafe impl PGRXSharedMemory for SpanCache {}

impl SpanCache {
    /// Whether span `key` may be kept or served: its database's floor is known (an unused
    /// slot, database 0, never is) and the span starts at or past it.
    fn usable(&self, key: &Key) -> bool {
        key.db != 0 && self.floors.iter().any(|f| f.db == key.db && f.rel == key.rel && key.lo >= f.tick)
    }

    fn find(&self, key: &Key) -> Option<&Slot> {
        if !self.usable(key) {
            return None;
        }
        self.slots.iter().find(|s| s.key == *key)
    }

    /// Keeps span `key`; with `rows` (one per transaction, in the same order) when they fit.
    fn put(&mut self, key: Key, txns: &[Placed], through: i64, rows: Option<&[Row]>, epoch: u64) {
        if !self.keepable(&key, epoch) || txns.len() > MAX_TXNS {
            return;
        }
        let rows = rows.filter(|r| r.len() == txns.len() && r.iter().map(|r| r.data.len()).sum::<usize>() <= SLOT_BYTES);
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        slot.key = key;
        slot.through = through;
        slot.n = txns.len();
        slot.txns[..txns.len()].copy_from_slice(txns);
        slot.has_rows = rows.is_some();
        let mut start = 0;
        for (at, r) in slot.rows.iter_mut().zip(rows.unwrap_or_default()) {
            slot.data[start..start + r.data.len()].copy_from_slice(&r.data);
            *at = RowAt { txid: r.txid, hlc: r.hlc, origin_pos: r.origin_pos, start, len: r.data.len() };
            start += r.data.len();
        }
    }

    /// Notes that tick table `rel` of database `db` is trimmed to `floor`. A floor only rises;
    /// a new tick table (a re-created extension) starts again. A database that finds no free
    /// entry takes the oldest, whose database loses its spans. A database's entry is made
    /// afresh only with its spans gone (none are kept without one), so a new floor never
    /// makes an older span usable again.
    fn trimmed(&mut self, db: u32, rel: u32, floor: i64) {
        let i = match self.floors.iter().position(|f| f.db == db) {
            Some(i) if self.floors[i].rel == rel => i,
            Some(i) => {
                self.forget(db);
                i
            }
            None => {
                let i = self.floors.iter().position(|f| f.db == 0).unwrap_or(self.next_floor);
                self.next_floor = (i + 1) % FLOORS;
                let evicted = self.floors[i].db;
                self.forget(evicted);
                i
            }
        };
        let f = &mut self.floors[i];
        let tick = if f.db == db { f.tick.max(floor) } else { floor };
        *f = Floor { db, rel, tick };
    }

    /// Forgets database `db`'s floor and spans: nothing is kept for it until its next trim.
    fn forget(&mut self, db: u32) {
        self.epoch += 1;
        for f in self.floors.iter_mut().filter(|f| f.db == db) {
            *f = Floor::default();
        }
        // In place: a slot is most of 20 kB, and unused ones are forgotten with database 0.
        for s in self.slots.iter_mut().filter(|s| s.key.db == db) {
            s.key = Key::default();
            s.n = 0;
            s.has_rows = false;
        }
    }

    /// Whether span `key`, listed since `epoch`, would be kept now.
    fn keepable(&self, key: &Key, epoch: u64) -> bool {
        epoch == self.epoch && self.usable(key) && !self.slots.iter().any(|s| s.key == *key)
    }
}

// SAFETY: no other shared-memory object uses the name "rbucardo_spans" (PgLwLock::new's
// requirement); pgrx initialises it in shared memory at preload (pg_shmem_init! in `init`).
static SPANS: PgLwLock<SpanCache> = unsafe { PgLwLock::new(c"rbucardo_spans") };

/// Reserves the shared memory; called from `_PG_init` at preload time.
pub fn init() {
    pg_shmem_init!(SPANS);
}

/// Span `key` as kept: its transactions in stream order, the last tick they complete, and
/// their rows if those were kept.
pub fn lookup(key: &Key) -> Option<Kept> {
    SPANS.share().find(key).map(Slot::kept)
}

/// Notes, before a trim of the current database's tick table `rel` deletes anything, that
/// it trims to tick `floor` (see the module's comment).
pub fn trimmed(rel: u32, floor: i64) {
    SPANS.exclusive().trimmed(my_dboid(), rel, floor);
}

/// Forgets the current database's spans, before its whole change log is deleted: none is kept
/// again until its next trim. Called again when the deleting transaction commits: a trim may
/// have noted a floor meanwhile, and a fetch that still saw the old log may have kept a span
/// (with its rows) after it.
pub fn forget() {
    SPANS.exclusive().forget(my_dboid());
    pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Commit, || SPANS.exclusive().forget(my_dboid()));
}

/// The cache's epoch, read before a span is listed and handed to `keep`: a span listed before
/// some database's spans were forgotten is not kept.
pub fn epoch() -> u64 {
    SPANS.share().epoch
}

/// Whether span `key`, listed since `epoch`, would be kept now (its rows are read to be kept
/// only then).
pub fn keepable(key: &Key, epoch: u64) -> bool {
    SPANS.share().keepable(key, epoch)
}


/// Keeps span `key`'s transactions, in stream order, complete through tick `through`, and
/// their rows (same order, single-chunk transactions only) if given and they fit. Only for a
/// span whose last tick was committed before the caller's transaction read it.
pub fn keep(key: Key, txns: &[Placed], through: i64, rows: Option<&[Row]>, epoch: u64) {
    if txns.len() <= MAX_TXNS {
        SPANS.exclusive().put(key, txns, through, rows, epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(tick: i64, seq: i64) -> Placed {
        Placed { tick, seq, len: 10, origin: Some(2), via: None, only_for: None }
    }

    fn found(c: &SpanCache, key: &Key) -> Option<(Vec<Placed>, i64)> {
        c.find(key).map(|s| (s.txns[..s.n].to_vec(), s.through))
    }

    fn row(txid: i64, bytes: usize) -> Row {
        Row { txid, hlc: txid * 10, origin_pos: (txid % 2 == 0).then_some(Position { tick: txid, seq: txid + 1 }), data: vec![txid as u8; bytes] }
    }

    #[test]
    fn rows_are_kept_with_their_span_only_when_they_fit() {
        let mut c = SpanCache::default();
        c.trimmed(5, 1, 0);
        let key = |lo| Key { db: 5, rel: 1, lo, hi: lo + 1 };
        let txns = [txn(1, 1), txn(1, 2), txn(1, 3)];
        let rows = vec![row(7, 100), row(8, 0), row(9, 300)];
        c.put(key(0), &txns, 1, Some(&rows), c.epoch);
        assert_eq!(c.find(&key(0)).unwrap().kept(), Kept { txns: txns.to_vec(), through: 1, rows: Some(rows.clone()) });
        // Too many bytes, or not one row per transaction: the list is kept, not the rows.
        let big = vec![row(7, SLOT_BYTES - 299), row(8, 0), row(9, 300)];
        c.put(key(1), &txns, 2, Some(&big), c.epoch);
        assert_eq!(c.find(&key(1)).unwrap().kept(), Kept { txns: txns.to_vec(), through: 2, rows: None });
        c.put(key(2), &txns, 3, Some(&rows[..2]), c.epoch);
        assert_eq!(c.find(&key(2)).unwrap().kept().rows, None);
        // Exactly full fits; a slot reused for a span without rows does not keep the old ones.
        let full = vec![row(7, SLOT_BYTES - 300), row(8, 0), row(9, 300)];
        c.put(key(3), &txns, 4, Some(&full), c.epoch);
        assert_eq!(c.find(&key(3)).unwrap().kept().rows, Some(full));
        for lo in 4..4 + SLOTS as i64 {
            c.put(key(lo), &txns, lo + 1, None, c.epoch);
        }
        assert!(c.slots.iter().all(|s| !s.has_rows));
        assert_eq!(c.find(&key(4 + SLOTS as i64 - 1)).unwrap().kept().rows, None);
    }

    #[test]
    fn a_span_listed_before_its_database_was_forgotten_is_not_kept() {
        let mut c = SpanCache::default();
        c.trimmed(5, 1, 0);
        let key = Key { db: 5, rel: 1, lo: 0, hi: 1 };
        let listed_at = c.epoch;
        assert!(c.keepable(&key, listed_at));
        // init_node deletes the log (forgets before, and again at commit); a trim notes a
        // floor in between; the fetch that listed the old log keeps nothing.
        c.forget(5);
        c.trimmed(5, 1, 0);
        assert!(!c.keepable(&key, listed_at));
        c.put(key, &[txn(1, 1)], 1, Some(&[row(1, 10)]), listed_at);
        assert!(c.find(&key).is_none());
        // Listed afresh, it is kept; once kept, it is not kept twice.
        let now = c.epoch;
        c.put(key, &[txn(1, 1)], 1, Some(&[row(1, 10)]), now);
        assert_eq!(c.find(&key).unwrap().kept().rows, Some(vec![row(1, 10)]));
        assert!(!c.keepable(&key, now));
    }

    #[test]
    fn a_kept_span_is_found_only_by_its_whole_key() {
        let mut c = SpanCache::default();
        let key = Key { db: 5, rel: 16400, lo: 10, hi: 12 };
        c.trimmed(5, 16400, 0);
        c.trimmed(6, 16400, 0);
        c.trimmed(7, 16401, 0);
        c.put(key, &[txn(11, 100), txn(12, 104)], 12, None, c.epoch);
        assert_eq!(found(&c, &key), Some((vec![txn(11, 100), txn(12, 104)], 12)));
        for other in [Key { db: 6, ..key }, Key { rel: 16401, ..key }, Key { lo: 11, ..key }, Key { hi: 13, ..key }] {
            assert_eq!(found(&c, &other), None, "{other:?}");
        }
        // An empty span is kept too (nothing for anyone in those ticks).
        let empty = Key { lo: 12, hi: 13, ..key };
        c.put(empty, &[], 13, None, c.epoch);
        assert_eq!(found(&c, &empty), Some((vec![], 13)));
    }

    #[test]
    fn unused_slots_and_oversized_spans_match_nothing() {
        let mut c = SpanCache::default();
        assert!(c.find(&Key::default()).is_none());
        c.trimmed(5, 1, 0);
        let big: Vec<Placed> = (0..MAX_TXNS as i64 + 1).map(|i| txn(11, i)).collect();
        let key = Key { db: 5, rel: 1, lo: 10, hi: 11 };
        c.put(key, &big, 11, None, c.epoch);
        assert!(c.find(&key).is_none());
    }

    #[test]
    fn the_oldest_span_makes_room_and_a_span_is_kept_once() {
        let mut c = SpanCache::default();
        c.trimmed(5, 1, 0);
        let key = |lo| Key { db: 5, rel: 1, lo, hi: lo + 1 };
        c.put(key(0), &[txn(1, 1)], 1, None, c.epoch);
        c.put(key(0), &[txn(1, 2)], 1, None, c.epoch); // the same span again: the first stays, no slot used
        assert_eq!(found(&c, &key(0)).unwrap().0, vec![txn(1, 1)]);
        for lo in 1..SLOTS as i64 {
            c.put(key(lo), &[], lo + 1, None, c.epoch);
        }
        assert!(c.find(&key(0)).is_some(), "{SLOTS} spans fit");
        c.put(key(SLOTS as i64), &[], 0, None, c.epoch);
        assert!(c.find(&key(0)).is_none(), "the oldest went first");
        assert!(c.find(&key(1)).is_some());
    }
    #[test]
    fn nothing_is_kept_or_found_before_the_trim_floor_or_without_one() {
        let mut c = SpanCache::default();
        let key = |lo| Key { db: 5, rel: 1, lo, hi: lo + 2 };
        c.put(key(10), &[txn(11, 1)], 12, None, c.epoch);
        assert!(c.find(&key(10)).is_none(), "no floor known yet: nothing kept");
        c.trimmed(5, 1, 3);
        c.put(key(10), &[txn(11, 1)], 12, None, c.epoch);
        c.put(key(2), &[txn(3, 1)], 4, None, c.epoch);
        assert!(c.find(&key(10)).is_some());
        assert!(c.find(&key(2)).is_none(), "starts before the floor: not kept");
        // A trim to 11: the span from 10 lost tick 11's transactions; it is no longer served.
        c.trimmed(5, 1, 11);
        assert!(c.find(&key(10)).is_none());
        c.put(key(10), &[], 12, None, c.epoch);
        assert!(c.find(&key(10)).is_none(), "nor kept again");
        // A floor only rises; a re-created tick table (another oid) starts again.
        c.trimmed(5, 1, 4);
        assert!(c.find(&key(10)).is_none());
        c.trimmed(5, 2, 0);
        assert!(c.find(&key(10)).is_none(), "the old table's spans are not the new one's");
        let new = Key { rel: 2, ..key(0) };
        c.put(new, &[], 2, None, c.epoch);
        assert!(c.find(&new).is_some());
    }

    #[test]
    fn a_database_whose_floor_is_pushed_out_keeps_nothing_until_its_next_trim() {
        let mut c = SpanCache::default();
        c.trimmed(1, 1, 0);
        let key = Key { db: 1, rel: 1, lo: 0, hi: 1 };
        c.put(key, &[], 1, None, c.epoch);
        for db in 2..=FLOORS as u32 + 1 {
            c.trimmed(db, 1, 0);
        }
        assert!(c.find(&key).is_none());
        c.trimmed(1, 1, 0);
        assert!(c.find(&key).is_none(), "its spans went with its entry");
        c.put(key, &[], 1, None, c.epoch);
        assert!(c.find(&key).is_some(), "and are kept again once its floor is known");
    }

    #[test]
    fn a_span_left_below_the_floor_does_not_come_back() {
        let mut c = SpanCache::default();
        let key = Key { db: 1, rel: 1, lo: 5, hi: 6 };
        c.trimmed(1, 1, 0);
        c.put(key, &[], 6, None, c.epoch);
        c.trimmed(1, 1, 8);
        assert!(c.find(&key).is_none());
        // Pushed out by other databases, then back with a low floor: the old span stays gone.
        for db in 2..=FLOORS as u32 + 1 {
            c.trimmed(db, 1, 0);
        }
        c.trimmed(1, 1, 0);
        assert!(c.find(&key).is_none());
        // A new tick table, or the whole log forgotten, drops the spans too.
        c.put(key, &[], 6, None, c.epoch);
        c.trimmed(1, 2, 0);
        c.trimmed(1, 1, 0);
        assert!(c.find(&key).is_none());
        c.put(key, &[], 6, None, c.epoch);
        c.forget(1);
        assert!(c.find(&key).is_none());
        c.put(key, &[], 6, None, c.epoch);
        assert!(c.find(&key).is_none(), "nothing kept until the next trim");
    }
}
