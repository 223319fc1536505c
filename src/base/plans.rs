//! Statements that run on every replication round or every peer call, prepared once per
//! backend. A hub serving many stores runs these thousands of times a second; parsing and
//! planning each one again was most of its CPU (a profile of 20 stores showed the parser and
//! planner on top). PostgreSQL's plan cache revalidates a kept plan when a table it uses
//! changes, so a kept plan never runs against a stale schema.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiTupleTable};

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs `sql` (prepared on first use, with parameter types `types`) with `args`, and hands the
/// result to `f`, with a generic plan: one made once for any arguments. These are lookups by
/// key in small tables and catalogs, whose plans do not depend on the values; left to itself
/// the plan cache kept planning many of them again for every call (their generic cost
/// estimate is no lower than a custom one), which was a third of a hub's CPU with 20 stores.
pub fn run<R>(sql: &'static str, types: &[pg_sys::Oid], args: &[DatumWithOid], f: impl FnOnce(SpiTupleTable<'_>) -> R) -> R {
    let _mode = PlanMode::set(pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN);
    execute(sql, types, args, f)
}

/// `run`, for a statement whose best plan depends on its arguments (a range of the change
/// log that may be tiny or hold a day's backlog): the plan cache decides, as for any
/// prepared statement.
pub fn run_custom<R>(sql: &'static str, types: &[pg_sys::Oid], args: &[DatumWithOid], f: impl FnOnce(SpiTupleTable<'_>) -> R) -> R {
    execute(sql, types, args, f)
}

/// plan_cache_mode for the statements run while it lives; the session's value comes back on
/// drop, also when the statement raises an error (pgrx unwinds through it).
struct PlanMode(std::ffi::c_int);

impl PlanMode {
    fn set(mode: pg_sys::PlanCacheMode::Type) -> PlanMode {
        // SAFETY: a plain GUC variable of this backend, read by the plan cache when a kept
        // statement runs; we are on the backend's only thread.
        unsafe {
            let old = pg_sys::plan_cache_mode;
            pg_sys::plan_cache_mode = mode as std::ffi::c_int;
            PlanMode(old)
        }
    }
}

impl Drop for PlanMode {
    fn drop(&mut self) {
        // SAFETY: as in `set`.
        unsafe { pg_sys::plan_cache_mode = self.0 };
    }
}

fn execute<R>(sql: &'static str, types: &[pg_sys::Oid], args: &[DatumWithOid], f: impl FnOnce(SpiTupleTable<'_>) -> R) -> R {
    Spi::connect_mut(|client| {
        let plan = match PLANS.with(|p| p.borrow_mut().remove(sql)) {
            Some(plan) => plan,
            None => {
                let types: Vec<PgOid> = types.iter().map(|&t| PgOid::from(t)).collect();
                client.prepare_mut(sql, &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep()
            }
        };
        let result = client.update(&plan, None, args).unwrap_or_else(|e| panic!("{sql}: {e}"));
        PLANS.with(|p| p.borrow_mut().insert(sql, plan));
        f(result)
    })
}

/// The first column of the first row of `sql`, if any.
pub fn one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(sql: &'static str, types: &[pg_sys::Oid], args: &[DatumWithOid]) -> Option<T> {
    run(sql, types, args, |t| if t.is_empty() { None } else { t.first().get_one::<T>().ok().flatten() })
}

/// The first two columns of the first row of `sql` (both None when it returns no row).
pub fn two<A, B>(sql: &'static str, types: &[pg_sys::Oid], args: &[DatumWithOid]) -> (Option<A>, Option<B>)
where
    A: pgrx::datum::FromDatum + pgrx::datum::IntoDatum,
    B: pgrx::datum::FromDatum + pgrx::datum::IntoDatum,
{
    run(sql, types, args, |t| if t.is_empty() { (None, None) } else { t.first().get_two::<A, B>().unwrap_or((None, None)) })
}
