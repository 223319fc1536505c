//! What a backend keeps of the replication configuration (this node, its dbs, syncs and
//! herds) from one call to the next.
//!
//! A hub's backend serving a store answers a fetch every few milliseconds, and reading who
//! the node is and what the peer may do was a fifth of each answer's work (docs/
//! performance.md). What is kept holds while the configuration generation
//! (`signals::tracked_config_generation`) stays the same and no relation cache invalidation
//! arrived since it was read. Every change to `node`, `db`, `sync` or `herd_table` bumps the
//! generation when it commits: the API functions do, and so does a trigger on those tables
//! for changes made by hand (sql/catalog.sql); so do the start and end of a join, which
//! change a peer's policy. A backend of a database without a registry slot keeps nothing.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// What the kept values were read under: the configuration generation and this backend's
/// count of relation cache invalidations.
type Stamp = (u64, u64);

thread_local! {
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `stamp`, while processing invalidations on the
/// backend's main thread. The body itself uses no unsafe operation.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    INVALIDATIONS.with(|c| c.set(c.get().wrapping_add(1)));
}

fn stamp() -> Option<Stamp> {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers a plain function once per backend (REGISTERED).
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0usize)) };
    }
    let generation = crate::base::signals::tracked_config_generation()?;
    Some((generation, INVALIDATIONS.with(Cell::get)))
}

/// Values read from the configuration, by key, each with the stamp it was read under.
pub struct Kept<T>(RefCell<HashMap<String, (Stamp, T)>>);

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept(RefCell::new(HashMap::new()))
    }
}

impl<T: Clone> Kept<T> {
    /// The value kept for `key` if the configuration did not change since it was read, else
    /// `read()`, kept if nothing changed while it ran.
    pub fn get_or(&self, key: &str, read: impl FnOnce() -> T) -> T {
        let Some(before) = stamp() else { return read() };
        if let Some((s, v)) = self.0.borrow().get(key) {
            if *s == before {
                return v.clone();
            }
        }
        let value = read();
        if stamp() == Some(before) {
            let mut kept = self.0.borrow_mut();
            // Stale entries of other keys go with the first read under a new stamp.
            kept.retain(|_, (s, _)| *s == before);
            kept.insert(key.to_string(), (before, value.clone()));
        }
        value
    }
}
