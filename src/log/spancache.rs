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
//! reader. Rows are not copied here, only where they are: a reader still reads them, and one
//! that finds a row missing (trimmed) reads tick by tick instead, as without an entry.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// Spans kept: a few notifications' worth, each fetched by many stores.
const SLOTS: usize = 16;
/// The most transactions a kept span holds; a larger one is not kept (it is not the case of
/// many stores at the head of the stream this is for).
pub const MAX_TXNS: usize = 48;

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

#[derive(Copy, Clone)]
struct Slot {
    key: Key,
    /// The last tick all of whose transactions are in `txns`.
    through: i64,
    n: usize,
    txns: [Placed; MAX_TXNS],
}

impl Default for Slot {
    fn default() -> Self {
        Slot { key: Key::default(), through: 0, n: 0, txns: [Placed::default(); MAX_TXNS] }
    }
}

/// The kept spans, replaced oldest first.
#[derive(Copy, Clone)]
pub struct SpanCache {
    next: usize,
    slots: [Slot; SLOTS],
}

impl Default for SpanCache {
    fn default() -> Self {
        SpanCache { next: 0, slots: [Slot::default(); SLOTS] }
    }
}

// SAFETY: plain old data (integers), no pointers: valid in any process.
unsafe impl PGRXSharedMemory for SpanCache {}

impl SpanCache {
    fn find(&self, key: &Key) -> Option<(Vec<Placed>, i64)> {
        // A key of database 0 is never kept (no database has oid 0): unused slots match nothing.
        (key.db != 0)
            .then(|| self.slots.iter().find(|s| s.key == *key))
            .flatten()
            .map(|s| (s.txns[..s.n].to_vec(), s.through))
    }

    fn put(&mut self, key: Key, txns: &[Placed], through: i64) {
        if key.db == 0 || txns.len() > MAX_TXNS || self.slots.iter().any(|s| s.key == key) {
            return;
        }
        let slot = &mut self.slots[self.next];
        self.next = (self.next + 1) % SLOTS;
        slot.key = key;
        slot.through = through;
        slot.n = txns.len();
        slot.txns[..txns.len()].copy_from_slice(txns);
    }
}

// SAFETY: no other shared-memory object uses the name "rbucardo_spans" (PgLwLock::new's
// requirement); pgrx initialises it in shared memory at preload (pg_shmem_init! in `init`).
static SPANS: PgLwLock<SpanCache> = unsafe { PgLwLock::new(c"rbucardo_spans") };

/// Reserves the shared memory; called from `_PG_init` at preload time.
pub fn init() {
    pg_shmem_init!(SPANS);
}

/// The kept transactions of span `key`, in stream order, and the last tick they complete.
pub fn lookup(key: &Key) -> Option<(Vec<Placed>, i64)> {
    SPANS.share().find(key)
}

/// Keeps span `key`'s transactions, in stream order, complete through tick `through`. Only for
/// a span whose last tick was committed before the caller's transaction read it.
pub fn keep(key: Key, txns: &[Placed], through: i64) {
    if txns.len() <= MAX_TXNS {
        SPANS.exclusive().put(key, txns, through);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(tick: i64, seq: i64) -> Placed {
        Placed { tick, seq, len: 10, origin: Some(2), via: None, only_for: None }
    }

    #[test]
    fn a_kept_span_is_found_only_by_its_whole_key() {
        let mut c = SpanCache::default();
        let key = Key { db: 5, rel: 16400, lo: 10, hi: 12 };
        c.put(key, &[txn(11, 100), txn(12, 104)], 12);
        assert_eq!(c.find(&key), Some((vec![txn(11, 100), txn(12, 104)], 12)));
        for other in [Key { db: 6, ..key }, Key { rel: 16401, ..key }, Key { lo: 11, ..key }, Key { hi: 13, ..key }] {
            assert_eq!(c.find(&other), None, "{other:?}");
        }
        // An empty span is kept too (nothing for anyone in those ticks).
        let empty = Key { lo: 12, hi: 13, ..key };
        c.put(empty, &[], 13);
        assert_eq!(c.find(&empty), Some((vec![], 13)));
    }

    #[test]
    fn unused_slots_and_oversized_spans_match_nothing() {
        let mut c = SpanCache::default();
        assert_eq!(c.find(&Key::default()), None);
        let big: Vec<Placed> = (0..MAX_TXNS as i64 + 1).map(|i| txn(11, i)).collect();
        let key = Key { db: 5, rel: 1, lo: 10, hi: 11 };
        c.put(key, &big, 11);
        assert_eq!(c.find(&key), None);
    }

    #[test]
    fn the_oldest_span_makes_room_and_a_span_is_kept_once() {
        let mut c = SpanCache::default();
        let key = |lo| Key { db: 5, rel: 1, lo, hi: lo + 1 };
        c.put(key(0), &[txn(1, 1)], 1);
        c.put(key(0), &[txn(1, 2)], 1); // the same span again: the first stays, no slot used
        assert_eq!(c.find(&key(0)).unwrap().0, vec![txn(1, 1)]);
        for lo in 1..SLOTS as i64 {
            c.put(key(lo), &[], lo + 1);
        }
        assert!(c.find(&key(0)).is_some(), "{SLOTS} spans fit");
        c.put(key(SLOTS as i64), &[], 0);
        assert!(c.find(&key(0)).is_none(), "the oldest went first");
        assert!(c.find(&key(1)).is_some());
    }
}
