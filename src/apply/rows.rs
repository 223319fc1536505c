//! Row operations through the executor, the way PostgreSQL's own logical replication applies
//! rows: find the local row by the replica key's index, then insert, update or delete it with
//! ExecSimpleRelation*. Nothing is parsed or planned per row, which is what makes catching up
//! after a long outage fast. Tables this path cannot serve (local columns the peer does not
//! send, partitioned tables) go through SQL statements instead (see the parent module).

use std::ffi::CString;

use pgrx::prelude::*;

use crate::apply::decide::{Action, Decision};
use crate::base::canonical::CanonicalOutput;
use crate::base::error::raise;
use crate::base::wire::{Op, RelDesc, RowChange, Value};
use crate::base::xact::RunAs;

/// How one remote column becomes a local datum.
struct Column {
    /// 0-based index into the local tuple descriptor.
    att: usize,
    input: pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    typmod: i32,
    /// To compare the local row with the sender's old image in text form.
    output: pg_sys::FmgrInfo,
}

/// What the executor path needs to know about a table, resolved once per batch.
pub struct Layout {
    pub relid: pg_sys::Oid,
    /// The table's owner: rows are written as the owner, in a security-restricted operation,
    /// so that triggers, constraints and index expressions run with its rights, not the
    /// applier's (a superuser).
    owner: pg_sys::Oid,
    key_index: pg_sys::Oid,
    columns: Vec<Column>,
    /// Holds what the columns' input and output functions keep between calls (fn_extra): a
    /// layout outlives its transaction (src/apply/mod.rs keeps resolved tables per session).
    cxt: pg_sys::MemoryContext,
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: the context was made for this layout alone (in `layout`), nothing else
        // points into it once the layout, which owns the FmgrInfos, goes.
        unsafe { pg_sys::MemoryContextDelete(self.cxt) };
    }
}

/// Decides whether a table can be applied through the executor and prepares its layout:
/// every local column (but generated ones) must come from the peer, and the replica key must
/// have its unique index here.
pub fn layout(relid: pg_sys::Oid, desc: &RelDesc) -> Option<Layout> {
    let (kind, key_index) = crate::base::plans::two::<String, pg_sys::Oid>(
        "SELECT c.relkind::text,
                (SELECT i.indexrelid FROM pg_index i
                  WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid AND i.indimmediate
                    AND i.indpred IS NULL AND i.indexprs IS NULL
                    AND (i.indkey::int2[])[0:i.indnkeyatts - 1] =
                        ARRAY(SELECT a.attnum FROM unnest($2::text[]) WITH ORDINALITY k(name, o)
                                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name
                               ORDER BY k.o)::int2[]
                  ORDER BY i.indisprimary DESC LIMIT 1)
           FROM pg_class c WHERE c.oid = $1",
        &[pg_sys::OIDOID, pg_sys::TEXTARRAYOID],
        &[relid.into(), desc.key.iter().map(|&k| desc.columns[k as usize].clone()).collect::<Vec<_>>().into()],
    );
    if kind.as_deref() != Some("r") {
        return None;
    }
    let key_index = key_index?;
    // SAFETY: inside the apply transaction, on the main thread: the relation is closed on every
    // path out of this block and only its descriptor is read while it is open. (Closing with
    // AccessShareLock drops the lock, so the types here can go stale before Target::open.)
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        // Under the caller's context until the layout is complete: an error on the way frees
        // it with that context.
        let cxt = pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"rbucardo table layout".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        );
        let mut columns = Vec::with_capacity(desc.columns.len());
        let mut covered = vec![false; tupdesc.len()];
        for name in &desc.columns {
            let att = tupdesc.iter().position(|a| !a.attisdropped && a.name() == name.as_str());
            let Some(att) = att else {
                pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
                pg_sys::MemoryContextDelete(cxt);
                return None;
            };
            let a = tupdesc.get(att).unwrap();
            let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(a.atttypid, &mut func, &mut ioparam);
            let mut input = pg_sys::FmgrInfo::default();
            pg_sys::fmgr_info_cxt(func, &mut input, cxt);
            let (mut out_func, mut varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo(a.atttypid, &mut out_func, &mut varlena);
            let mut output = pg_sys::FmgrInfo::default();
            pg_sys::fmgr_info_cxt(out_func, &mut output, cxt);
            columns.push(Column { att, input, ioparam, typmod: a.atttypmod, output });
            covered[att] = true;
        }
        let complete = tupdesc.iter().enumerate().all(|(i, a)| covered[i] || a.attisdropped || a.attgenerated != 0);
        let owner = (*(*rel).rd_rel).relowner;
        // The lock stays until commit: the layout (types, input functions) must hold while
        // this batch applies; another session's ALTER TABLE waits for it.
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        // (A layout that is not complete drops here, and its context with it.)
        // A kept layout outlives the transaction.
        pg_sys::MemoryContextSetParent(cxt, pg_sys::TopMemoryContext);
        complete.then_some(Layout { relid, owner, key_index, columns, cxt })
    }
}

/// Where the rows this apply transaction wrote to one table are now: the newest version's
/// TID, by replica key. A batch applies thousands of remote transactions in one local one, and
/// pgbench-like workloads update a few hot rows in each: every version stays until commit, so
/// finding such a row through its index walks a HOT chain that grows with the batch (the top
/// of the catch-up profile). A hint is only trusted when the version it points at is visible
/// now and carries the key; anything else falls back to the index.
///
/// Hints hold only within one (sub)transaction that is never rolled back under them: a version
/// from an undone subtransaction is dead at once, and its line pointer may be pruned and
/// reused. The applier keeps them per pass and starts afresh whenever a pass or a parked
/// transaction is undone; a TRUNCATE or table rewrite (a new relfilenode, or the same file
/// emptied, as TRUNCATE does to a table created or truncated earlier in the transaction) forgets
/// them too. And a version is used only if this transaction wrote it (its xmin).
#[derive(Default)]
pub struct Recent {
    file: pg_sys::Oid,
    /// The highest block a hint points into.
    top_block: u32,
    at: std::collections::HashMap<Vec<Value>, pg_sys::ItemPointerData>,
}

/// Beyond this many rows, over all tables of a pass, the hints start again (bounded memory for
/// large batches of inserts, which are rarely found again).
pub const RECENT_LIMIT: usize = 100_000;

impl Recent {
    fn key(desc: &RelDesc, row: &[Value]) -> Vec<Value> {
        desc.key.iter().map(|&k| row[k as usize].clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Forgets every hint if the table's file is not the one they point into. Once per
    /// target is enough for the length check: a table cannot be truncated while open.
    ///
    /// SAFETY: `rel` is open.
    unsafe fn check_file(&mut self, rel: pg_sys::Relation, length_too: bool) {
        let file = (*rel).rd_node.relNode;
        let shorter = || length_too && !self.at.is_empty() && pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) <= self.top_block;
        if self.file != file || shorter() {
            self.at.clear();
            self.file = file;
            self.top_block = 0;
        }
    }

    fn note(&mut self, key: Vec<Value>, tid: pg_sys::ItemPointerData) {
        let block = ((tid.ip_blkid.bi_hi as u32) << 16) | tid.ip_blkid.bi_lo as u32;
        self.top_block = self.top_block.max(block);
        self.at.insert(key, tid);
    }
}

/// A table opened for row changes: its executor state and three slots. It stays open for a
/// whole pass (its indexes, slots and executor state set up once, not for every run of rows:
/// a pgbench transaction touches four tables); each run of rows to it is a query of its own
/// for AFTER triggers (`begin`, `end`).
pub struct Target {
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    /// Holds the key of the row to find.
    search: *mut pg_sys::TupleTableSlot,
    /// The local row found.
    local: *mut pg_sys::TupleTableSlot,
    /// The row to write.
    remote: *mut pg_sys::TupleTableSlot,
    /// Per-row memory for converted values, reset after every row.
    rowcx: pg_sys::MemoryContext,
    /// The table's owner, whom its AFTER triggers run as at the end of a run.
    owner: pg_sys::Oid,
    /// A run of rows is under way (`begin` was called, `end` not yet).
    running: bool,
}

impl Target {
    /// Opens the table, as PostgreSQL's apply worker does for each change. No run is under
    /// way yet.
    pub fn open(layout: &Layout) -> Target {
        // SAFETY: inside the apply transaction, on the main thread; the same EState, result
        // relation, index and slot setup as create_edata_for_relation in PostgreSQL's apply
        // worker. The Target owns it all until `close` (or its subtransaction aborts).
        unsafe {
            let rel = pg_sys::table_open(layout.relid, pg_sys::RowExclusiveLock as i32);
            let estate = pg_sys::CreateExecutorState();
            // Everything below lives in the executor state's context, freed by `close`: the
            // caller's context lasts the whole batch, and a target is opened per pass and
            // table (PostgreSQL's apply worker allocates it in a per-message context).
            let caller_cxt = pg_sys::MemoryContextSwitchTo((*estate).es_query_cxt);
            let mut rte = pgrx::PgBox::<pg_sys::RangeTblEntry>::alloc_node(pg_sys::NodeTag::T_RangeTblEntry);
            rte.rtekind = pg_sys::RTEKind::RTE_RELATION;
            rte.relid = layout.relid;
            rte.relkind = (*(*rel).rd_rel).relkind;
            rte.rellockmode = pg_sys::AccessShareLock as i32;
            let rtable = pg_sys::lappend(std::ptr::null_mut(), rte.into_pg().cast());
            pg_sys::ExecInitRangeTable(estate, rtable);
            let rri = pgrx::PgBox::<pg_sys::ResultRelInfo>::alloc_node(pg_sys::NodeTag::T_ResultRelInfo).into_pg();
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            pg_sys::ExecOpenIndices(rri, false);
            let table = &mut (*estate).es_tupleTable;
            let search = pg_sys::table_slot_create(rel, table);
            let local = pg_sys::table_slot_create(rel, table);
            let remote = pg_sys::table_slot_create(rel, table);
            pg_sys::MemoryContextSwitchTo(caller_cxt);
            let rowcx = pg_sys::AllocSetContextCreateInternal(
                caller_cxt,
                c"rbucardo apply row".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            Target { rel, estate, rri, search, local, remote, rowcx, owner: layout.owner, running: false }
        }
    }

    /// Starts a run of rows: a query level for the AFTER triggers they queue, and the current
    /// command id (other tables' rows and the log were written since the last run).
    pub fn begin(&mut self) {
        debug_assert!(!self.running);
        // SAFETY: the target is open, inside its transaction; `end` closes the query level.
        unsafe {
            (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
        }
        self.running = true;
    }

    /// Ends the run: fires the AFTER triggers its rows queued, as the table's owner.
    pub fn end(&mut self) {
        let _owner = RunAs::restricted(self.owner);
        self.end_as_owner();
    }

    /// `end`, inside the owner's sandbox.
    fn end_as_owner(&mut self) {
        if !std::mem::replace(&mut self.running, false) {
            return;
        }
        // SAFETY: closes the query level `begin` opened, with this target's executor state
        // (where the triggers find the table's result relation). The slots hold nothing
        // needed after a row, only pins of buffers, which vacuum would wait for all pass long.
        unsafe {
            pg_sys::AfterTriggerEndQuery(self.estate);
            // What the triggers wrote is seen by what comes next (another table's run may
            // look up a row a trigger just changed), as PostgreSQL's apply ends each change.
            pg_sys::CommandCounterIncrement();
            for slot in [self.search, self.local, self.remote, (*self.rri).ri_TrigOldSlot, (*self.rri).ri_TrigNewSlot] {
                if !slot.is_null() {
                    pg_sys::ExecClearTuple(slot);
                }
            }
        }
    }

    /// Checks the hints of this table once the target is open (see [`Recent::check_file`]).
    pub fn check_recent(&self, recent: &mut Recent) {
        // SAFETY: the relation is open for the target's life.
        unsafe { recent.check_file(self.rel, true) }
    }

    /// Ends a run under way and releases the executor state; the lock stays until commit.
    /// Must happen in the (sub)transaction that opened it: one that ends with the table open
    /// would warn of a leaked reference.
    pub fn close(mut self) {
        let _owner = RunAs::restricted(self.owner);
        self.end_as_owner();
        // SAFETY: releases, once (close takes self) and in the apply worker's order, what
        // `open` set up in this still-open transaction; the relation keeps its lock to commit.
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::MemoryContextDelete(self.rowcx);
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }

    /// Fills `slot` with the given remote values (all columns, or only the key's).
    ///
    /// # Safety
    ///
    /// `self` is open (not closed, its transaction or subtransaction still alive), `layout` is
    /// the Layout it was opened with, and `slot` is one of its three slots.
    unsafe fn fill(&self, layout: &Layout, slot: *mut pg_sys::TupleTableSlot, row: &[Value], only: Option<&[u16]>) {
        // SAFETY: the slot has the relation's descriptor, so tts_values/tts_isnull hold natts
        // entries; it is cleared first and stored last, values allocated in rowcx. (Input
        // functions may write fn_extra through `finfo`, made from a shared borrow.)
        pg_sys::ExecClearTuple(slot);
        let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
        let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        nulls.fill(true);
        let old = pg_sys::MemoryContextSwitchTo(self.rowcx);
        let mut convert = |i: usize| {
            let col = &layout.columns[i];
            let finfo = &col.input as *const pg_sys::FmgrInfo as *mut pg_sys::FmgrInfo;
            match &row[i] {
                Some(text) => {
                    let c = CString::new(text.as_str()).unwrap_or_else(|_| {
                        raise(PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, "a replicated value contains a NUL byte", "The peer sent a value PostgreSQL cannot store.")
                    });
                    values[col.att] = pg_sys::InputFunctionCall(finfo, c.as_ptr() as *mut _, col.ioparam, col.typmod);
                    nulls[col.att] = false;
                }
                None => {
                    // Input functions of domains check NOT NULL constraints on NULL too.
                    values[col.att] = pg_sys::InputFunctionCall(finfo, std::ptr::null_mut(), col.ioparam, col.typmod);
                }
            }
        };
        match only {
            Some(keys) => keys.iter().for_each(|&k| convert(k as usize)),
            None => (0..layout.columns.len()).for_each(&mut convert),
        }
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::ExecStoreVirtualTuple(slot);
    }

    /// Finds the local row whose replica key equals the key in `row`, locking it.
    ///
    /// # Safety
    ///
    /// As for `fill`.
    unsafe fn find(&self, layout: &Layout, desc: &RelDesc, row: &[Value], recent: &mut Recent) -> bool {
        recent.check_file(self.rel, false);
        if let Some(&tid) = recent.at.get(&Recent::key(desc, row)) {
            if self.fetch_own(layout, desc, row, tid) {
                return true;
            }
        }
        // SAFETY: see `fill`; key_index is the relation's unique index on the replica key and
        // `search` holds that key, as RelationFindReplTupleByIndex requires.
        self.fill(layout, self.search, row, Some(&desc.key));
        pg_sys::RelationFindReplTupleByIndex(self.rel, layout.key_index, pg_sys::LockTupleMode::LockTupleExclusive, self.search, self.local)
    }

    /// Reads into `local` the version at `tid`, which this transaction wrote, if it is still
    /// the current one and has the key in `row`. It needs no row lock: no other transaction can
    /// see it, let alone change it, before this one commits.
    ///
    /// # Safety
    ///
    /// As for `fill`, and `tid` was written by this transaction in a part of it that was not
    /// rolled back, in the relation's current file (see [`Recent`]).
    unsafe fn fetch_own(&self, layout: &Layout, desc: &RelDesc, row: &[Value], mut tid: pg_sys::ItemPointerData) -> bool {
        // SAFETY: the table AM's own fetch checks the line pointer and the version's
        // visibility to a snapshot taken now (it sees this transaction's earlier commands).
        let fetch = (*(*self.rel).rd_tableam).tuple_fetch_row_version.expect("table AM fetches by TID");
        if !fetch(self.rel, &mut tid, pg_sys::GetLatestSnapshot(), self.local) {
            return false;
        }
        // Only a version of this transaction's own is safe without a lock (a BEFORE trigger
        // that returns a tuple read elsewhere could leave another row's TID in `remote`).
        let mut isnull = false;
        let xmin = pg_sys::slot_getsysattr(self.local, pg_sys::MinTransactionIdAttributeNumber, &mut isnull);
        if isnull || !pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin.value() as u32)) {
            return false;
        }
        pg_sys::slot_getallattrs(self.local);
        let values = std::slice::from_raw_parts((*self.local).tts_values, (*(*self.local).tts_tupleDescriptor).natts as usize);
        let nulls = std::slice::from_raw_parts((*self.local).tts_isnull, values.len());
        let _canonical = CanonicalOutput::new();
        desc.key.iter().all(|&k| {
            let col = &layout.columns[k as usize];
            match &row[k as usize] {
                Some(want) if !nulls[col.att] => {
                    let finfo = &col.output as *const pg_sys::FmgrInfo as *mut pg_sys::FmgrInfo;
                    let cstr = pg_sys::OutputFunctionCall(finfo, values[col.att]);
                    let same = std::ffi::CStr::from_ptr(cstr).to_bytes() == want.as_bytes();
                    pg_sys::pfree(cstr.cast());
                    same
                }
                _ => false,
            }
        })
    }

    /// Notes where the version just written from `remote` is, by its key.
    ///
    /// # Safety
    ///
    /// As for `fill`; `remote` was invalidated before the write (a BEFORE trigger may skip it).
    unsafe fn note_written(&self, desc: &RelDesc, row: &[Value], recent: &mut Recent) {
        let tid = (*self.remote).tts_tid;
        if tid.ip_posid != 0 {
            recent.note(Recent::key(desc, row), tid);
        }
    }

    /// # Safety
    ///
    /// As for `fill`.
    unsafe fn forget_written(&self) {
        (*self.remote).tts_tid = pg_sys::ItemPointerData::default();
    }

    /// # Safety
    ///
    /// As for `fill`.
    unsafe fn step_done(&self) {
        // SAFETY: see `fill`. Resetting rowcx leaves only stale datums in slots that are cleared
        // before their next use (inserted and updated slots were materialised).
        pg_sys::MemoryContextReset(self.rowcx);
        // What the executor evaluated for the row (constraints, index expressions, triggers'
        // calls): ModifyTable resets it per row too, and the state lives for the pass.
        let per_tuple = (*self.estate).es_per_tuple_exprcontext;
        if !per_tuple.is_null() {
            pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
        }
        pg_sys::CommandCounterIncrement();
        (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
    }

    /// Sets up `epq` as the apply worker does around a simple update or delete. What it
    /// allocates goes in the row's context: it is not freed by EvalPlanQualEnd, and the
    /// caller's context lasts the pass.
    ///
    /// # Safety
    ///
    /// As for `fill`.
    unsafe fn epq_init(&self, epq: &mut pg_sys::EPQState) {
        let old = pg_sys::MemoryContextSwitchTo(self.rowcx);
        pg_sys::EvalPlanQualInit(epq, self.estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
        pg_sys::MemoryContextSwitchTo(old);
    }

    /// # Safety
    ///
    /// As for `fill`, and `find` must just have returned true (`local` holds the locked row).
    unsafe fn update_found(&self, layout: &Layout, new: &[Value]) {
        // SAFETY: see `fill`; the EPQ state is set up and ended here as the apply worker does
        // around ExecSimpleRelationUpdate.
        self.fill(layout, self.remote, new, None);
        let mut epq = pg_sys::EPQState::default();
        self.epq_init(&mut epq);
        epq.origslot = self.remote;
        pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, &mut epq, self.local, self.remote);
        pg_sys::EvalPlanQualEnd(&mut epq);
    }

    /// The local row found by `find`, in the canonical text form the sender used.
    ///
    /// # Safety
    ///
    /// As for `fill`, and `find` must just have returned true.
    unsafe fn local_text(&self, layout: &Layout) -> Vec<Value> {
        // SAFETY: see `fill`; `local` holds the found row, deformed in full by slot_getallattrs,
        // so natts values and nulls are valid; each cstring is copied before pfree. (Same
        // fn_extra caveat as in `fill`.)
        pg_sys::slot_getallattrs(self.local);
        let natts = (*(*self.local).tts_tupleDescriptor).natts as usize;
        let values = std::slice::from_raw_parts((*self.local).tts_values, natts);
        let nulls = std::slice::from_raw_parts((*self.local).tts_isnull, natts);
        let _canonical = CanonicalOutput::new();
        layout
            .columns
            .iter()
            .map(|col| {
                if nulls[col.att] {
                    return None;
                }
                let finfo = &col.output as *const pg_sys::FmgrInfo as *mut pg_sys::FmgrInfo;
                let cstr = pg_sys::OutputFunctionCall(finfo, values[col.att]);
                let text = std::ffi::CStr::from_ptr(cstr).to_string_lossy().into_owned();
                pg_sys::pfree(cstr.cast());
                Some(text)
            })
            .collect()
    }

    fn insert_or_overwrite(&self, layout: &Layout, desc: &RelDesc, new: &[Value], recent: &mut Recent) {
        // SAFETY: called only from `change`, whose caller pairs this open Target with its
        // Layout; update_found runs only when find returned true.
        unsafe {
            self.forget_written();
            if self.find(layout, desc, new, recent) {
                self.update_found(layout, new);
            } else {
                self.fill(layout, self.remote, new, None);
                pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, self.remote);
            }
            self.note_written(desc, new, recent);
            self.step_done();
        }
    }

    /// Applies one row change: finds the local row by the change's key (the new key for an
    /// insert, the old one otherwise), lets `decide` compare it with what the sender saw, and
    /// writes what it decided. Returns the decision.
    /// `recent`: where this transaction's earlier writes to the table are (see [`Recent`]).
    pub fn change(&self, layout: &Layout, desc: &RelDesc, ch: &RowChange, recent: &mut Recent, decide: impl FnOnce(Option<&[Value]>) -> Decision) -> Decision {
        let probe = if ch.op == Op::Insert { ch.new.as_deref() } else { ch.old.as_deref() }.expect("row change with its key image");
        // SAFETY: the slots, executor state and relation were set up by `open` for this table
        // (`layout`), and are used on the backend's main thread inside the apply transaction.
        unsafe {
            let owner = RunAs::restricted(layout.owner);
            let found = self.find(layout, desc, probe, recent);
            let local = found.then(|| self.local_text(layout));
            // The decision reads and writes rbucardo's own tables: it runs as the applier,
            // after the owner's sandbox is gone (nothing the owner's code set reaches it).
            drop(owner);
            let decision = decide(local.as_deref());
            let _owner = RunAs::restricted(layout.owner);
            self.forget_written();
            match &decision.action {
                Action::Nothing | Action::Abort(_) => {}
                Action::Write(row) if found => {
                    self.update_found(layout, row);
                    self.note_written(desc, row, recent);
                }
                // Nothing has this key here: a plain insert.
                Action::Write(row) if ch.op == Op::Insert => {
                    self.fill(layout, self.remote, row, None);
                    pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, self.remote);
                    self.note_written(desc, row, recent);
                }
                // An update whose row is gone here: the row it writes may have another key.
                Action::Write(row) => {
                    self.step_done();
                    self.insert_or_overwrite(layout, desc, row, recent);
                    return decision;
                }
                Action::Delete if found => {
                    let mut epq = pg_sys::EPQState::default();
                    self.epq_init(&mut epq);
                    pg_sys::ExecSimpleRelationDelete(self.rri, self.estate, &mut epq, self.local);
                    pg_sys::EvalPlanQualEnd(&mut epq);
                    recent.at.remove(&Recent::key(desc, probe));
                }
                Action::Delete => {}
            }
            self.step_done();
            decision
        }
    }
}
