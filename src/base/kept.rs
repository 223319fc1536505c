//! What a backend keeps of the replication configuration (this node, its dbs, syncs and
//! herds) from one call to the next.
//!
//! A hub's backend serving a store answers a fetch every few milliseconds, and reading who
//! the node is and what the peer may do was a fifth of each answer's work (docs/
//! performance.md). What is kept holds while the configuration generation
//! (`signals::tracked_config_generation`) stays the same and no relation cache invalidation
//! arrived since it was read (nor a schema or type changed: policies hold table names, the
//! table shape type names). Every change to
//! `node`, `db`, `sync` or `herd_table` bumps the generation when it commits: the API
//! functions do, and so does a trigger on those tables for changes made by hand
//! (`config_changed`, src/api/catalog.rs); so do the start and end of a join, which change a
//! peer's policy. Nothing is kept by a backend of a database without a registry slot, in a
//! transaction that is not READ COMMITTED (its snapshot may predate a change it has already
//! seen the invalidation of), or while the catalog lacks the trigger (the library of 0.2 on a
//! catalog not yet updated from 0.1).

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

/// # Safety
///
/// As `relcache_changed`, for the schema and type catalog caches.
#[pg_guard]
unsafe extern "C-unwind" fn namespace_changed(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
    INVALIDATIONS.with(|c| c.set(c.get().wrapping_add(1)));
}

fn stamp() -> Option<Stamp> {
    if !REGISTERED.with(|r| r.replace(true)) {
        // SAFETY: registers plain functions once per backend (REGISTERED).
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0usize));
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::NAMESPACEOID as std::ffi::c_int,
                Some(namespace_changed),
                pg_sys::Datum::from(0usize),
            );
            // A type renamed changes the table shape (schema/ddl.rs) of tables using it.
            pg_sys::CacheRegisterSyscacheCallback(
                pg_sys::SysCacheIdentifier::TYPEOID as std::ffi::c_int,
                Some(namespace_changed),
                pg_sys::Datum::from(0usize),
            );
        }
    }
    // SAFETY: reads the current transaction's isolation level, a plain backend global.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_READ_COMMITTED as i32 {
        return None;
    }
    let generation = crate::base::signals::tracked_config_generation()?;
    let stamp = (generation, INVALIDATIONS.with(Cell::get));
    trigger_installed(stamp).then_some(stamp)
}

/// Whether the catalog has the trigger that bumps the generation for changes made by hand:
/// asked once per stamp (an ALTER EXTENSION UPDATE that adds it invalidates).
fn trigger_installed(stamp: Stamp) -> bool {
    thread_local! {
        static CHECKED: Cell<Option<(Stamp, bool)>> = const { Cell::new(None) };
    }
    if let Some((s, found)) = CHECKED.with(Cell::get) {
        if s == stamp {
            return found;
        }
    }
    let found = Spi::get_one::<bool>("SELECT pg_catalog.to_regprocedure('rbucardo.config_changed()') IS NOT NULL").ok().flatten() == Some(true);
    CHECKED.with(|c| c.set(Some((stamp, found))));
    found
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
