//! Row operations through the executor, the way PostgreSQL's own logical replication applies
//! rows: find the local row by the replica key's index, then insert, update or delete it with
//! ExecSimpleRelation*. Nothing is parsed or planned per row, which is what makes catching up
//! after a long outage fast. Tables this path cannot serve (local columns the peer does not
//! send, partitioned tables) go through SQL statements instead (see the parent module).

use std::ffi::CString;

use pgrx::prelude::*;

use crate::conflicts::{self, Clocks, Conflict, Kind, Rule};
use crate::encoding::{RelDesc, Value};
use crate::error::raise;

/// The remote transaction a row change belongs to, for the conflict log.
#[derive(Clone, Copy)]
pub struct Origin {
    pub node: i32,
    pub hlc: i64,
}

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
    key_index: pg_sys::Oid,
    columns: Vec<Column>,
    rule: Rule,
    table: String,
    /// Column-level merge of non-overlapping changes (on unless turned off for the table).
    merge: bool,
    /// Delta columns, in the remote column order.
    delta: Vec<bool>,
}

/// Decides whether a table can be applied through the executor and prepares its layout:
/// every local column (but generated ones) must come from the peer, and the replica key must
/// have its unique index here.
pub fn layout(relid: pg_sys::Oid, desc: &RelDesc) -> Option<Layout> {
    let (kind, key_index) = Spi::get_two_with_args::<String, pg_sys::Oid>(
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
        &[relid.into(), desc.key.iter().map(|&k| desc.columns[k as usize].clone()).collect::<Vec<_>>().into()],
    )
    .ok()?;
    if kind.as_deref() != Some("r") {
        return None;
    }
    let key_index = key_index?;
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let tupdesc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let mut columns = Vec::with_capacity(desc.columns.len());
        let mut covered = vec![false; tupdesc.len()];
        for name in &desc.columns {
            let att = tupdesc.iter().position(|a| !a.attisdropped && a.name() == name.as_str());
            let Some(att) = att else {
                pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
                return None;
            };
            let a = tupdesc.get(att).unwrap();
            let (mut func, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(a.atttypid, &mut func, &mut ioparam);
            let mut input = pg_sys::FmgrInfo::default();
            pg_sys::fmgr_info(func, &mut input);
            let (mut out_func, mut varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo(a.atttypid, &mut out_func, &mut varlena);
            let mut output = pg_sys::FmgrInfo::default();
            pg_sys::fmgr_info(out_func, &mut output);
            columns.push(Column { att, input, ioparam, typmod: a.atttypmod, output });
            covered[att] = true;
        }
        let complete = tupdesc.iter().enumerate().all(|(i, a)| covered[i] || a.attisdropped || a.attgenerated != 0);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        let table = format!("{}.{}", pgrx::spi::quote_identifier(&desc.schema), pgrx::spi::quote_identifier(&desc.name));
        complete.then(|| {
            let (merge, delta) = conflicts::column_rules(relid, desc);
            Layout { relid, key_index, columns, rule: Rule::for_table(relid), table, merge, delta }
        })
    }
}

/// A table opened for a run of row changes: its executor state and three slots.
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
}

impl Target {
    /// Opens the table, as PostgreSQL's apply worker does for each change.
    pub fn open(layout: &Layout) -> Target {
        unsafe {
            let rel = pg_sys::table_open(layout.relid, pg_sys::RowExclusiveLock as i32);
            let estate = pg_sys::CreateExecutorState();
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
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
            pg_sys::ExecOpenIndices(rri, false);
            let table = &mut (*estate).es_tupleTable;
            let search = pg_sys::table_slot_create(rel, table);
            let local = pg_sys::table_slot_create(rel, table);
            let remote = pg_sys::table_slot_create(rel, table);
            let rowcx = pg_sys::AllocSetContextCreateInternal(
                pg_sys::CurrentMemoryContext,
                c"rbucardo apply row".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            Target { rel, estate, rri, search, local, remote, rowcx }
        }
    }

    /// Fires queued AFTER triggers and releases the executor state; the lock stays until commit.
    pub fn close(self) {
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::AfterTriggerEndQuery(self.estate);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::MemoryContextDelete(self.rowcx);
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }

    /// Fills `slot` with the given remote values (all columns, or only the key's).
    unsafe fn fill(&self, layout: &Layout, slot: *mut pg_sys::TupleTableSlot, row: &[Value], only: Option<&[u16]>) {
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
    unsafe fn find(&self, layout: &Layout, desc: &RelDesc, row: &[Value]) -> bool {
        self.fill(layout, self.search, row, Some(&desc.key));
        pg_sys::RelationFindReplTupleByIndex(self.rel, layout.key_index, pg_sys::LockTupleMode::LockTupleExclusive, self.search, self.local)
    }

    unsafe fn step_done(&self) {
        pg_sys::MemoryContextReset(self.rowcx);
        pg_sys::CommandCounterIncrement();
        (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
    }

    unsafe fn update_found(&self, layout: &Layout, new: &[Value]) {
        self.fill(layout, self.remote, new, None);
        let mut epq = pg_sys::EPQState::default();
        pg_sys::EvalPlanQualInit(&mut epq, self.estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
        epq.origslot = self.remote;
        pg_sys::ExecSimpleRelationUpdate(self.rri, self.estate, &mut epq, self.local, self.remote);
        pg_sys::EvalPlanQualEnd(&mut epq);
    }

    /// The local row found by `find`, in the canonical text form the sender used.
    unsafe fn local_text(&self, layout: &Layout) -> Vec<Value> {
        pg_sys::slot_getallattrs(self.local);
        let natts = (*(*self.local).tts_tupleDescriptor).natts as usize;
        let values = std::slice::from_raw_parts((*self.local).tts_values, natts);
        let nulls = std::slice::from_raw_parts((*self.local).tts_isnull, natts);
        let _canonical = crate::encoding::CanonicalOutput::new();
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

    fn insert_or_overwrite(&self, layout: &Layout, desc: &RelDesc, new: &[Value]) {
        unsafe {
            if self.find(layout, desc, new) {
                self.update_found(layout, new);
            } else {
                self.fill(layout, self.remote, new, None);
                pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, self.remote);
            }
            self.step_done();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn conflict(&self, layout: &Layout, desc: &RelDesc, kind: Kind, local: Option<&[Value]>, remote: Option<&[Value]>, key_of: &[Value], origin: Origin, clocks: &mut Clocks) -> bool {
        let key = conflicts::key_json(desc, key_of);
        let local_clock = if layout.rule.needs_local_clock() { clocks.local(layout.relid, desc, &key) } else { None };
        conflicts::resolve(
            &layout.rule,
            Conflict {
                table: &layout.table,
                key,
                kind,
                local: local.map(|r| row_json(desc, r, None)),
                remote: remote.map(|r| row_json(desc, r, None)),
                origin: origin.node,
                hlc: origin.hlc,
            },
            local_clock,
        )
    }

    /// Inserts a row. If a row with its key is here already and differs, that is a conflict.
    pub fn insert(&self, layout: &Layout, desc: &RelDesc, new: &[Value], origin: Origin, clocks: &mut Clocks) {
        unsafe {
            if !self.find(layout, desc, new) {
                self.fill(layout, self.remote, new, None);
                pg_sys::ExecSimpleRelationInsert(self.rri, self.estate, self.remote);
            } else {
                let local = self.local_text(layout);
                if local != new && self.conflict(layout, desc, Kind::InsertExists, Some(&local), Some(new), new, origin, clocks) {
                    self.update_found(layout, new);
                }
            }
            self.step_done();
        }
    }

    /// Updates the row with the old key to the new image. A row that differs from the sender's
    /// old image, or is not here, is a conflict.
    pub fn update(&self, layout: &Layout, desc: &RelDesc, old: &[Value], new: &[Value], origin: Origin, clocks: &mut Clocks) {
        unsafe {
            if self.find(layout, desc, old) {
                let local = self.local_text(layout);
                if local == old {
                    self.update_found(layout, new);
                } else if local != new || layout.delta.iter().any(|d| *d) {
                    // Both sides changed the row. If they changed different columns (or only
                    // delta columns in common), both changes survive.
                    let merged = if layout.merge { conflicts::merge(&local, old, new, &layout.delta) } else { None };
                    match merged {
                        Some(row) => {
                            conflicts::log_merge(Conflict {
                                table: &layout.table,
                                key: conflicts::key_json(desc, old),
                                kind: Kind::UpdateDiffers,
                                local: Some(row_json(desc, &local, None)),
                                remote: Some(row_json(desc, new, None)),
                                origin: origin.node,
                                hlc: origin.hlc,
                            });
                            if row != local {
                                self.update_found(layout, &row);
                            }
                        }
                        None if local == new => {}
                        None => {
                            if self.conflict(layout, desc, Kind::UpdateDiffers, Some(&local), Some(new), old, origin, clocks) {
                                self.update_found(layout, new);
                            }
                        }
                    }
                }
                self.step_done();
            } else {
                self.step_done();
                if self.conflict(layout, desc, Kind::UpdateMissing, None, Some(new), old, origin, clocks) {
                    self.insert_or_overwrite(layout, desc, new);
                }
            }
        }
    }

    /// Deletes the row with the old key. A row that differs from the sender's old image, or is
    /// not here, is a conflict.
    pub fn delete(&self, layout: &Layout, desc: &RelDesc, old: &[Value], origin: Origin, clocks: &mut Clocks) {
        unsafe {
            if self.find(layout, desc, old) {
                let local = self.local_text(layout);
                if local == old || self.conflict(layout, desc, Kind::DeleteDiffers, Some(&local), None, old, origin, clocks) {
                    let mut epq = pg_sys::EPQState::default();
                    pg_sys::EvalPlanQualInit(&mut epq, self.estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
                    pg_sys::ExecSimpleRelationDelete(self.rri, self.estate, &mut epq, self.local);
                    pg_sys::EvalPlanQualEnd(&mut epq);
                }
            } else {
                self.conflict(layout, desc, Kind::DeleteMissing, None, None, old, origin, clocks);
            }
            self.step_done();
        }
    }
}

/// A row (or its key columns) as a JSON object of column name to text value.
fn row_json(desc: &RelDesc, row: &[Value], only: Option<&[u16]>) -> serde_json::Value {
    let pick: Vec<usize> = match only {
        Some(keys) => keys.iter().map(|&k| k as usize).collect(),
        None => (0..desc.columns.len()).collect(),
    };
    serde_json::Value::Object(
        pick.into_iter()
            .map(|i| (desc.columns[i].clone(), row[i].clone().map_or(serde_json::Value::Null, serde_json::Value::String)))
            .collect(),
    )
}
