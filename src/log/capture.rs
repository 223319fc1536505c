//! Capture: the row triggers on replicated tables and the per-transaction change buffer.
//!
//! A trigger only converts the row images to text and appends them to a buffer in backend
//! memory; the buffer becomes one change log row (a chunk) when the transaction commits, so a
//! transaction costs one log insert however many rows it touched. Large transactions spill a
//! chunk early. Changes made in a subtransaction that rolls back are dropped from the buffer;
//! a chunk spilled inside a subtransaction is rolled back with it by PostgreSQL itself. Every
//! change carries an ordinal, so the chunks of one transaction merge back into capture order.
//!
//! Apply sessions run with `session_replication_role = replica`, so these triggers stay quiet
//! there; the applier writes the remote chunks to the log itself, under their original origin.

use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::PgTupleDesc;

use crate::base::error::raise;
use crate::base::xact::{LocalSetting, RunAs};
use crate::log::changelog;
use crate::base::wire::{encode_chunk_ref, Chunk, ChunkRef, Op, RelDesc, RowChange, Value};

/// A chunk is spilled to the log once the buffered row images reach this size.
const SPILL_BYTES: usize = 8 << 20;

/// What capture needs to know about a table, kept until its relcache entry is invalidated.
struct CachedRel {
    /// Shared with every transaction that changes the table: a transaction's buffer refers to
    /// it rather than copying it.
    desc: Rc<RelDesc>,
    /// Index into the tuple descriptor of each captured column (dropped and generated
    /// columns are not captured).
    attidx: Vec<usize>,
    /// Output functions of the captured columns, set up once per backend.
    out: UnsafeCell<Vec<pg_sys::FmgrInfo>>,
    /// Room for a deformed row (values and null flags), reused by every row of the table.
    deformed: UnsafeCell<(Vec<pg_sys::Datum>, Vec<bool>)>,
}

#[derive(Default)]
struct TxState {
    active: bool,
    hlc: i64,
    ordinal: u32,
    /// Chunks written so far.
    chunks: i32,
    relations: Vec<Rc<RelDesc>>,
    /// Table oid to its entry in `relations`, with the description it was made from: a table
    /// altered within the transaction gets a new entry for its later rows. A transaction
    /// touches few tables, so a list searched in order beats hashing.
    rel_index: Vec<(u32, u32, Rc<CachedRel>)>,
    /// Buffered changes with the subtransaction that made them.
    pending: Vec<(pg_sys::SubTransactionId, RowChange)>,
    /// Size of the buffered row images.
    bytes: usize,
    /// Of those, the bytes that enclosing subtransactions hold and the last spill could not
    /// write (a chunk written inside a subtransaction is rolled back with it): a spill is due
    /// when the rest reaches SPILL_BYTES.
    held: usize,
    /// Client query strings whose DDL is already recorded: a query string holding several
    /// statements is recorded once.
    ddl_queries: Vec<DdlQuery>,
}

/// A client query string whose DDL is in the buffer.
struct DdlQuery {
    /// The subtransaction that recorded it.
    subid: pg_sys::SubTransactionId,
    key: String,
    /// Ordinal of its change, to attach the shape of the tables it touched.
    ordinal: u32,
    /// Tables its commands touched so far.
    tables: Vec<pg_sys::Oid>,
}

thread_local! {
    static RELS: RefCell<HashMap<u32, Rc<CachedRel>>> = RefCell::new(HashMap::new());
    static TX: RefCell<TxState> = RefCell::new(TxState::default());
    static HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// # Safety
///
/// `rel` must be an open relation (the trigger's tg_relation), used inside its transaction on
/// the backend's main thread.
unsafe fn cached_rel(rel: pg_sys::Relation) -> Rc<CachedRel> {
    // SAFETY: `rel` is open (see above), so rd_rel and rd_att are valid. The statement firing
    // the trigger locks the table, so its schema cannot be dropped and get_namespace_name
    // cannot return NULL. The output functions are set up in TopMemoryContext, as long-lived as
    // this backend-wide cache.
    let relid = (*rel).rd_id;
    if let Some(c) = RELS.with(|r| r.borrow().get(&relid.to_u32()).cloned()) {
        return c;
    }
    let form = &*(*rel).rd_rel;
    let schema = CStr::from_ptr(pg_sys::get_namespace_name(form.relnamespace)).to_string_lossy().into_owned();
    let name = CStr::from_ptr(form.relname.data.as_ptr()).to_string_lossy().into_owned();
    let tupdesc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
    let mut columns = Vec::new();
    let mut attidx = Vec::new();
    let mut out = Vec::new();
    for (i, att) in tupdesc.iter().enumerate() {
        if att.attisdropped || att.attgenerated != 0 {
            continue;
        }
        columns.push(CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned());
        attidx.push(i);
        let mut func = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(att.atttypid, &mut func, &mut varlena);
        let mut finfo = pg_sys::FmgrInfo::default();
        pg_sys::fmgr_info_cxt(func, &mut finfo, pg_sys::TopMemoryContext);
        out.push(finfo);
    }
    let key_names = {
        // Whatever the session's search_path, the catalog query means the built-ins.
        let _path = LocalSetting::pinned_search_path();
        crate::base::node::replica_key(relid)
    };
    let Some(key_names) = key_names else {
        crate::base::error::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("table {schema}.{name} has no primary key and no unique index on NOT NULL columns"),
            "rbucardo needs one to identify rows on every node; add a primary key, or remove the table from its herd.",
        );
    };
    let key = key_names
        .iter()
        .map(|k| columns.iter().position(|c| c == k).expect("key column is a captured column") as u16)
        .collect();
    let natts = tupdesc.len();
    let deformed = UnsafeCell::new((vec![pg_sys::Datum::from(0usize); natts], vec![false; natts]));
    let cached = Rc::new(CachedRel { desc: Rc::new(RelDesc { schema, name, columns, key }), attidx, out: UnsafeCell::new(out), deformed });
    RELS.with(|r| r.borrow_mut().insert(relid.to_u32(), cached.clone()));
    cached
}

/// # Safety
///
/// `tupdesc` must be the descriptor `rel` was cached from (the relation's current rd_att) and
/// `tuple` a valid tuple of that relation, alive for the call.
unsafe fn row_values(rel: &CachedRel, tupdesc: pg_sys::TupleDesc, tuple: pg_sys::HeapTuple) -> (Vec<Value>, usize) {
    // SAFETY: by the contract above, heap_deform_tuple fills natts datums from `tuple` (the
    // descriptor `rel` was cached from, so `deformed` has room for natts), and each output
    // function is the one of its column's type. `out` and `deformed` are borrowed mutably only
    // here, and output functions never run capture again, so the borrows are unique.
    let (datums, nulls) = &mut *rel.deformed.get();
    debug_assert_eq!(datums.len(), (*tupdesc).natts as usize);
    pg_sys::heap_deform_tuple(tuple, tupdesc, datums.as_mut_ptr(), nulls.as_mut_ptr());
    let out = &mut *rel.out.get();
    let _canonical = crate::base::canonical::CanonicalOutput::new();
    let mut bytes = 0;
    let values = rel
        .attidx
        .iter()
        .zip(out.iter_mut())
        .map(|(&i, finfo)| {
            if nulls[i] {
                None
            } else {
                let cstr = pg_sys::OutputFunctionCall(finfo, datums[i]);
                let s = CStr::from_ptr(cstr).to_string_lossy().into_owned();
                pg_sys::pfree(cstr.cast());
                bytes += s.len();
                Some(s)
            }
        })
        .collect();
    (values, bytes)
}

/// Appends one change to the transaction's buffer.
///
/// # Safety
///
/// Called from the trigger: `rel` is its open relation, `old` and `new` NULL or tuples of it
/// valid for the call, inside the triggering transaction on the main thread.
unsafe fn record(rel: pg_sys::Relation, op: Op, old: pg_sys::HeapTuple, new: pg_sys::HeapTuple) {
    // SAFETY: by the contract above; rd_att is read again after cached_rel, which may run SPI
    // (a relcache rebuild keeps `rel` itself valid while it is open).
    ensure_hooks();
    let cached = cached_rel(rel);
    let tupdesc = (*rel).rd_att;
    let (old, ob) = if old.is_null() { (None, 0) } else { let (v, b) = row_values(&cached, tupdesc, old); (Some(v), b) };
    let (new, nb) = if new.is_null() { (None, 0) } else { let (v, b) = row_values(&cached, tupdesc, new); (Some(v), b) };
    let subid = pg_sys::GetCurrentSubTransactionId();
    let relid = (*rel).rd_id.to_u32();
    let spill = TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        if !tx.active {
            tx.active = true;
            tx.hlc = crate::base::clock::now();
        }
        let relno = match tx.rel_index.iter().find(|(r, _, seen)| *r == relid && Rc::ptr_eq(seen, &cached)) {
            Some((_, no, _)) => *no,
            None => {
                let no = tx.relations.len() as u32;
                tx.relations.push(cached.desc.clone());
                tx.rel_index.retain(|(r, _, _)| *r != relid);
                tx.rel_index.push((relid, no, cached.clone()));
                no
            }
        };
        tx.ordinal += 1;
        let ordinal = tx.ordinal;
        tx.pending.push((subid, RowChange { ordinal, rel: relno, op, old, new }));
        tx.bytes += ob + nb + 16;
        tx.bytes - tx.held >= SPILL_BYTES
    });
    if spill {
        flush(false);
    }
}

/// Logs a change the applier itself makes to a local row (a unique rename, see
/// apply/unique.rs) as a transaction of this node's own, as the trigger would have had the
/// applier not run in replica mode. It is written at once, in the current subtransaction (so
/// it is undone with it), as one chunk of its own: every such change is one transaction to
/// the peers. The images are text in `desc`'s column order. Returns the change's clock.
pub fn log_own_update(desc: &RelDesc, old: Vec<Value>, new: Vec<Value>) -> i64 {
    // In a session that captured changes of its own in this transaction (an operator's
    // exception_retry after some DML), the rename joins them: a chunk of its own would end
    // that transaction's group of chunks in the log, and the chunks spilled before it would
    // no longer be read with the rest.
    let joined = TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        if !tx.active {
            return None;
        }
        // SAFETY: reads this backend's transaction state, inside a transaction.
        let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
        let rel = tx.relations.len() as u32;
        tx.relations.push(Rc::new(desc.clone()));
        tx.ordinal += 1;
        let change = RowChange { ordinal: tx.ordinal, rel, op: Op::Update, old: Some(old.clone()), new: Some(new.clone()) };
        tx.bytes += change_size(&change);
        tx.pending.push((subid, change));
        Some(tx.hlc)
    });
    if let Some(hlc) = joined {
        return hlc;
    }
    let hlc = crate::base::clock::now();
    let chunk = Chunk { relations: vec![desc.clone()], changes: vec![RowChange { ordinal: 1, rel: 0, op: Op::Update, old: Some(old), new: Some(new) }] };
    let _owner = RunAs::extension_owner();
    changelog::append(&crate::base::wire::encode_chunk(&chunk), 0, true, None, hlc, None);
    hlc
}

/// Logs a transaction of this node's own that no trigger captured: the changes a repair makes
/// a peer's rows match this node's (src/api/diff.rs), as (table, operation, old, new) in
/// text form in each table's column order. It is one chunk, addressed to the node `only_for`
/// when set. Refused in a transaction that captured changes already (its chunks would be cut
/// in two). Returns the transaction's clock.
pub fn log_own_txn(changes: Vec<(RelDesc, Op, Option<Vec<Value>>, Option<Vec<Value>>)>, only_for: Option<i32>) -> i64 {
    if TX.with(|tx| tx.borrow().active) {
        raise(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "this transaction has captured changes already",
            "Run it in a transaction of its own.",
        );
    }
    let mut relations: Vec<RelDesc> = Vec::new();
    let mut rows = Vec::with_capacity(changes.len());
    for (i, (desc, op, old, new)) in changes.into_iter().enumerate() {
        let rel = match relations.iter().position(|r| r.schema == desc.schema && r.name == desc.name) {
            Some(r) => r,
            None => {
                relations.push(desc);
                relations.len() - 1
            }
        };
        rows.push(RowChange { ordinal: i as u32 + 1, rel: rel as u32, op, old, new });
    }
    let hlc = crate::base::clock::now();
    let chunk = Chunk { relations, changes: rows };
    let _owner = RunAs::extension_owner();
    changelog::append(&crate::base::wire::encode_chunk(&chunk), 0, true, None, hlc, only_for);
    hlc
}

/// What a buffered change counts for the spill threshold.
fn change_size(c: &RowChange) -> usize {
    let row = |r: &Option<Vec<Value>>| r.as_ref().map_or(0, |r| r.iter().map(|v| v.as_ref().map_or(0, String::len)).sum());
    row(&c.old) + row(&c.new) + 16
}

/// Whether the DDL of the client query `key` is already in this transaction's buffer.
pub fn ddl_recorded(key: &str) -> bool {
    TX.with(|tx| tx.borrow().ddl_queries.iter().any(|q| q.key == key))
}

/// Adds `tables` to those touched by the recorded DDL of the client query `key`; returns all of
/// them, or `None` when that DDL is not in the buffer.
pub fn ddl_touched(key: &str, tables: &[pg_sys::Oid]) -> Option<Vec<pg_sys::Oid>> {
    TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        let q = tx.ddl_queries.iter_mut().find(|q| q.key == key)?;
        for t in tables {
            if !q.tables.contains(t) {
                q.tables.push(*t);
            }
        }
        Some(q.tables.clone())
    })
}

/// Attaches to the recorded DDL of the client query `key` the shape of the tables it touched,
/// as they are now (src/ddl.rs), unless that change was already written out.
pub fn set_ddl_shape(key: &str, shape: String) {
    TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        let Some(ordinal) = tx.ddl_queries.iter().find(|q| q.key == key).map(|q| q.ordinal) else { return };
        if let Some((_, ch)) = tx.pending.iter_mut().rev().find(|(_, c)| c.ordinal == ordinal) {
            if let Some(new) = ch.new.as_mut() {
                new.truncate(3);
                new.push(Some(shape));
            }
        }
    })
}

/// Appends a DDL change (src/ddl.rs) to the transaction's buffer, in order with the row
/// changes, and remembers `key` (the client query it came from) so it is recorded once.
/// `role` is the user that ran it: peers run it as that role.
pub fn record_ddl(key: String, schema: &str, tag: &str, sql: String, search_path: String, role: String) {
    ensure_hooks();
    // SAFETY: reads this backend's transaction state; called from the DDL event trigger or
    // replicate_ddl(), inside a transaction on the main thread.
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let spill = TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        if !tx.active {
            tx.active = true;
            tx.hlc = crate::base::clock::now();
        }
        let relno = tx.relations.len() as u32;
        tx.relations.push(Rc::new(RelDesc { schema: schema.to_string(), name: tag.to_string(), columns: Vec::new(), key: Vec::new() }));
        tx.ordinal += 1;
        let ordinal = tx.ordinal;
        tx.bytes += sql.len() + search_path.len() + role.len() + 16;
        tx.pending.push((subid, RowChange { ordinal, rel: relno, op: Op::Ddl, old: None, new: Some(vec![Some(sql), Some(search_path), Some(role)]) }));
        tx.ddl_queries.push(DdlQuery { subid, key, ordinal, tables: Vec::new() });
        tx.bytes - tx.held >= SPILL_BYTES
    });
    if spill {
        flush(false);
    }
}

/// Writes the buffered changes that belong to the current subtransaction (all of them at top
/// level) to the change log as one chunk.
fn flush(is_final: bool) {
    // SAFETY: reads this backend's transaction state.
    flush_from(is_final, unsafe { pg_sys::GetCurrentSubTransactionId() });
}

/// Writes the buffered changes of subtransactions numbered `from` or later: those of the
/// current subtransaction and of the ones released into it.
fn flush_from(is_final: bool, from: pg_sys::SubTransactionId) {
    let written = TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        let tx = &mut *tx;
        let changes: Vec<&RowChange> = tx.pending.iter().filter(|(s, _)| *s >= from).map(|(_, c)| c).collect();
        let encoded = if changes.is_empty() && !is_final {
            None
        } else {
            let chunk = ChunkRef { relations: tx.relations.iter().map(|r| &**r).collect(), changes };
            Some(encode_chunk_ref(&chunk, tx.bytes + 64 * tx.relations.len() + 64))
        };
        // What stays buffered belongs to enclosing subtransactions: it is written when its
        // own level releases or commits.
        tx.pending.retain(|(s, _)| *s < from);
        tx.bytes = tx.pending.iter().map(|(_, c)| change_size(c)).sum();
        tx.held = tx.bytes;
        let data = encoded?;
        tx.chunks += 1;
        Some((data, tx.chunks - 1, tx.hlc))
    });
    if let Some((data, chunk_no, hlc)) = written {
        // The change log belongs to the extension, not to the user whose transaction this is.
        let _owner = RunAs::extension_owner();
        changelog::append(&data, chunk_no, is_final, None, hlc, None);
    }
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `ensure_hooks`, at a transaction event on the
/// backend's main thread.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let active = TX.with(|tx| tx.borrow().active);
    match event {
        XACT_EVENT_PRE_COMMIT if active => {
            // Portals are closed by now: the log insert needs a snapshot of its own.
            // SAFETY: at PRE_COMMIT the transaction is still open and may write; the snapshot
            // pushed here is popped below, and if flush raises, the abort pops it.
            let pushed = !pg_sys::ActiveSnapshotSet();
            if pushed {
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            }
            flush(true);
            if pushed {
                pg_sys::PopActiveSnapshot();
            }
            TX.with(|tx| *tx.borrow_mut() = TxState::default());
        }
        XACT_EVENT_PRE_PREPARE if active => {
            crate::base::error::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "PREPARE TRANSACTION is not supported on tables replicated by rbucardo",
                "Commit the transaction directly.",
            );
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => TX.with(|tx| *tx.borrow_mut() = TxState::default()),
        _ => {}
    }
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `ensure_hooks`, at a subtransaction event on the
/// backend's main thread. The body itself uses no unsafe operation.
#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => {
            // Every subtransaction with an id at or above the aborted one is inside it.
            TX.with(|tx| {
                let mut tx = tx.borrow_mut();
                tx.pending.retain(|(s, _)| *s < my_subid);
                tx.ddl_queries.retain(|q| q.subid < my_subid);
                tx.bytes = tx.pending.iter().map(|(_, c)| change_size(c)).sum();
                tx.held = tx.held.min(tx.bytes);
            });
        }
        // A savepoint being released (ORMs wrap every statement in one): what it, the
        // savepoints inside it and its released siblings buffered belongs to its parent (every
        // subtransaction numbered after the parent is in the parent's subtree), and is written
        // now if it is large, while this subtransaction can still write and commits into the
        // parent: memory stays bounded.
        pg_sys::SubXactEvent::SUBXACT_EVENT_PRE_COMMIT_SUB => {
            let _ = my_subid;
            let due = TX.with(|tx| {
                let tx = tx.borrow();
                tx.active
                    && tx.bytes >= SPILL_BYTES
                    && tx.pending.iter().filter(|(s, _)| *s > parent).map(|(_, c)| change_size(c)).sum::<usize>() >= SPILL_BYTES
            });
            if due {
                flush_from(false, parent + 1);
            }
        }
        _ => {}
    }
}

/// # Safety
///
/// Only PostgreSQL calls it, as registered by `ensure_hooks`, while processing invalidations on
/// the backend's main thread. The body itself uses no unsafe operation; RELS is never borrowed
/// across a call into PostgreSQL, so try_borrow_mut does not skip an invalidation.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_callback(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    RELS.with(|r| {
        if let Ok(mut r) = r.try_borrow_mut() {
            if relid == pg_sys::InvalidOid {
                r.clear();
            } else {
                r.remove(&relid.to_u32());
            }
        }
    });
}

fn ensure_hooks() {
    if HOOKED.with(|h| h.replace(true)) {
        return;
    }
    // SAFETY: registers 'static functions with the signatures PostgreSQL expects, once per
    // backend (HOOKED); they stay registered for the life of the process.
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_callback), pg_sys::Datum::from(0usize));
    }
}

/// V1 call info for the trigger function, as PG_FUNCTION_INFO_V1 would declare it.
// SAFETY: the exported name is the one fmgr looks up for `rbucardo_capture` and clashes with
// no other symbol; the signature is the C one PG_FUNCTION_INFO_V1 declares.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_rbucardo_capture() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The capture trigger: AFTER INSERT/UPDATE/DELETE FOR EACH ROW and AFTER TRUNCATE FOR EACH
/// STATEMENT on every replicated table.
///
/// # Safety
///
/// Only fmgr calls it (as `rbucardo.capture()`), with a valid `fcinfo`.
#[pg_guard]
// SAFETY: `rbucardo_capture` is the C symbol named in the CREATE FUNCTION below and clashes
// with no other; the signature is that of a V1 C function.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn rbucardo_capture(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is valid (see above); context is NULL or a Node, of which only the tag is
    // read until the CALLED_AS_TRIGGER check below passes. Then its relation and tuples are
    // those of the event being fired (tuples NULL where it has none), valid for this call.
    let td = (*fcinfo).context as *mut pg_sys::TriggerData;
    if td.is_null() || (*td).type_ != pg_sys::NodeTag::T_TriggerData {
        crate::base::error::raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "rbucardo.capture() must be called as a trigger",
            "It is attached to tables by rbucardo.add_table(); do not call it directly.",
        );
    }
    let ev = (*td).tg_event;
    let rel = (*td).tg_relation;
    let null = std::ptr::null_mut();
    match ev & pg_sys::TRIGGER_EVENT_OPMASK {
        pg_sys::TRIGGER_EVENT_INSERT => record(rel, Op::Insert, null, (*td).tg_trigtuple),
        pg_sys::TRIGGER_EVENT_UPDATE => record(rel, Op::Update, (*td).tg_trigtuple, (*td).tg_newtuple),
        pg_sys::TRIGGER_EVENT_DELETE => record(rel, Op::Delete, (*td).tg_trigtuple, null),
        _ => record(rel, Op::Truncate, null, null),
    }
    pg_sys::Datum::from(0usize)
}

pgrx::extension_sql!(
    "CREATE FUNCTION rbucardo.capture() RETURNS trigger LANGUAGE c AS 'MODULE_PATHNAME', 'rbucardo_capture';
     COMMENT ON FUNCTION rbucardo.capture() IS 'rbucardo capture trigger; attached by add_table()';",
    name = "capture_trigger_function",
    requires = ["catalog"]
);

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// An ORM wraps every statement in a savepoint and releases it: the changes of released
    /// savepoints must reach the log once they are large, not stay in backend memory until
    /// commit.
    #[pg_test]
    fn released_savepoints_spill_to_the_log() {
        Spi::run(
            "CREATE TABLE cap_sp (id int PRIMARY KEY, pad text);
             SELECT rbucardo.add_herd('cap_sp_h');
             SELECT rbucardo.add_table('cap_sp_h', 'cap_sp');",
        )
        .unwrap();
        for k in 0..24 {
            crate::base::xact::subtransaction(|| {
                Spi::run(&format!("INSERT INTO cap_sp SELECT g, repeat('x', 1000) FROM generate_series({}, {}) g", k * 500, k * 500 + 499)).unwrap();
            })
            .unwrap();
        }
        // 12 MB of row images in 24 released savepoints: at least one 8 MB spill, written
        // when a savepoint was released, holding the changes of all of them so far.
        let spilled = Spi::get_one::<i64>("SELECT coalesce(sum(length(data)), 0)::bigint FROM rbucardo.change_log WHERE txid = pg_current_xact_id()").unwrap().unwrap();
        assert!(spilled >= 4 << 20, "only {spilled} bytes of released savepoints reached the log");
    }
}
