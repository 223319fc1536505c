//! Apply: turning a peer's batch into local rows, exactly once and in the origin's order.
//!
//! A batch is applied in the caller's transaction together with the progress it makes: the
//! cursor in the sender's stream and, per origin node, the position up to which that origin's
//! changes are applied here. A crash at any moment therefore loses or duplicates nothing, and a
//! transaction that arrives a second time (by another path in a mesh) is recognised and skipped.
//! Applied transactions are written to the local change log under their original origin, so
//! this node forwards them to its other peers, and never back to where they came from.
//!
//! Before anything of a batch is applied, [`admit`] checks it against what this node lets the
//! sending peer do (its tables, the origins it speaks for, its DDL level); a batch that asks for
//! more is refused whole.

use std::collections::HashMap;
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

pub mod admit;
pub mod conflicts;
pub mod copy;
pub mod ddl;
pub mod decide;
pub mod exceptions;
mod fk;
pub mod parts;
pub mod retry;
mod rows;
mod sql;
mod unique;

use crate::apply::decide::{Action, Decision, Forward, Origin};
use crate::apply::exceptions::{Failure, Stop};
use crate::base::error::raise;
use crate::base::locks;
use crate::base::node::{peer_policy, PeerPolicy};
use crate::base::wire::{decode_chunk, encode_chunk, Batch, Op, Position, RelDesc, RowChange, Txn, Value};
use crate::base::xact::{self, LocalSetting, RunAs};
use crate::log::changelog;
use crate::log::clocks::Clocks;

/// What the batch did, for the caller's bookkeeping.
pub struct Applied {
    /// Where the stream stood here, committed, when the batch began.
    pub from: Position,
    pub cursor: Position,
    pub txns: i64,
    /// Set when a schema change that fails here stopped the stream (src/exceptions.rs): why.
    pub stopped: Option<String>,
    /// The count of batches applied in this database this one reached (`signals::note_apply`),
    /// if it moved the cursor.
    pub applies: Option<u64>,
}

/// FxHash, as rustc uses it: the applier looks up a table's description (names of its schema,
/// table and columns) for every row, and SipHash made that cost more than some row writes.
/// Keys are table descriptions and SQL texts of a batch that passed its checksum.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// A replicated table as it exists on this node.
struct LocalRel {
    relid: pg_sys::Oid,
    qualified: String,
    /// Local type of each remote column, in the remote column order.
    types: Vec<String>,
    /// Set when rows can be applied through the executor (the fast path).
    layout: Option<rows::Layout>,
    /// How conflicts on this table are resolved (both paths).
    policy: decide::Policy,
    /// Foreign keys from this table, checked at the end of each remote transaction.
    fks: Vec<fk::ForeignKey>,
    /// The table's owner: rows are written as the owner, restricted (see rows::Layout).
    owner: pg_sys::Oid,
}

/// How many tables `Applier::lately` holds.
const LATELY: usize = 8;

/// How many tables a pass keeps open for the executor path at most.
const MAX_TARGETS: usize = 16;

/// Per-batch state: resolved tables, prepared statements, the tables open for the executor,
/// the clocks of local row versions.
struct Applier {
    /// Keyed by the whole description: two transactions of one batch may see a table with
    /// different columns (a column was added in between).
    rels: FastMap<RelDesc, Rc<LocalRel>>,
    /// The tables of the latest row changes, newest first, searched before `rels`: a
    /// transaction writes a few tables in turn (pgbench's four), and comparing a description
    /// costs less than hashing it.
    lately: Vec<(RelDesc, Rc<LocalRel>)>,
    plans: FastMap<String, OwnedPreparedStatement>,
    /// Tables opened for the executor path, kept for the pass (`keep_targets`) or for the
    /// transaction, with the relation cache invalidations counted when each was opened; the
    /// one with a run of rows under way is `running`.
    targets: Vec<(RelDesc, rows::Target, u64)>,
    running: Option<usize>,
    /// Targets stay open from one run of rows and remote transaction to the next: in a pass
    /// that is one subtransaction. A careful one (a subtransaction per remote transaction)
    /// closes each at the end of its run, as a table was always closed before.
    keep_targets: bool,
    /// Where this pass's writes are, per table (rows::Recent): an applier lives for one pass,
    /// and a new one is made whenever part of it is undone.
    recent: FastMap<pg_sys::Oid, rows::Recent>,
    clocks: Clocks,
    /// Changes of the current transaction that do not travel on as they came: left out
    /// (`None`: the version lost here, or a command skipped here) or with another new image
    /// (only what was accepted here). By ordinal.
    edits: Vec<(u32, Option<Vec<Value>>)>,
    /// Conflicts of the current transaction, counted (src/apply/conflicts.rs).
    tally: conflicts::Tally,
    /// Who this node lets the sender's schema changes run as.
    run_as: ddl::RunAsRole,
    /// The role each schema change ran as, by ordinal, when not the one it claims: what it
    /// carries on when forwarded.
    ran_as: Vec<(u32, String)>,
    /// The sending peer, and the tables of the syncs shared with it (read again after a schema
    /// change, which may add a table to a herd): a row change to any other table is refused.
    sender: Option<String>,
    shared: std::collections::HashSet<(String, String)>,
    /// Applying a parked transaction again (see `shared`).
    retrying: bool,
}

/// Tables resolved by earlier batches of this session. Resolving a table (its columns, key
/// index, input functions, foreign keys, conflict policy) takes about ten catalog queries; a
/// hub's stores and a live subscriber apply small batches many times a second, so doing it
/// again for every batch was a good part of their work. A kept table is used only while
/// nothing may have changed it: no relation cache invalidation arrived (ALTER TABLE, CREATE
/// or DROP INDEX, a foreign key, a rename, an owner change, a rolled-back schema change, or
/// any other), no type or schema changed, and the configuration generation is the same (every function that changes
/// strategies, syncs or nodes bumps it). The table is locked before a kept entry is trusted,
/// so that invalidations committed by others before the lock are seen first.
mod session {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    use pgrx::prelude::*;

    use super::{FastMap, LocalRel};
    use crate::base::wire::RelDesc;

    thread_local! {
        // Never dropped: a thread-local destructor would run inside exit(), after the backend
        // has shut down, and call back into PostgreSQL (each layout deletes its context).
        static KEPT: std::mem::ManuallyDrop<RefCell<(u64, FastMap<RelDesc, Rc<LocalRel>>)>> = std::mem::ManuallyDrop::new(RefCell::new((0, FastMap::default())));
        static CHANGED: Cell<bool> = const { Cell::new(true) };
        static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
        static REGISTERED: Cell<bool> = const { Cell::new(false) };
    }

    /// Called by PostgreSQL for every relation cache invalidation this backend processes
    /// (`relid` 0: all of them). Only sets a flag: it may run in the middle of anything.
    unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
        CHANGED.with(|c| c.set(true));
        INVALIDATIONS.with(|i| i.set(i.get() + 1));
    }

    /// Relation cache invalidations this backend has processed so far (registered by the first
    /// `stamp`, which resolving any table calls): an executor state set up before the count
    /// moved may hold a table's old triggers, indexes or constraints.
    pub(super) fn invalidations() -> u64 {
        INVALIDATIONS.with(|i| i.get())
    }

    /// Likewise for a type or schema changed (renamed, moved): a kept table holds the names
    /// of its columns' types, which such a change leaves the table's relation cache entry
    /// alone for.
    unsafe extern "C-unwind" fn syscache_changed(_arg: pg_sys::Datum, _cacheid: std::ffi::c_int, _hash: u32) {
        CHANGED.with(|c| c.set(true));
    }

    /// What a table resolved now may be kept under: the configuration generation, once any
    /// invalidation seen so far has emptied the cache. None: nothing is kept (a database
    /// without a registry slot never sees its generation change).
    pub(super) fn stamp() -> Option<u64> {
        if !REGISTERED.with(|r| r.replace(true)) {
            // SAFETY: registers plain functions once per backend (PostgreSQL 15 allows ten
            // relation cache callbacks per backend; rbucardo registers three: capture, this
            // cache and src/base/kept.rs).
            unsafe {
                pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0));
                for cache in [pg_sys::SysCacheIdentifier::TYPEOID, pg_sys::SysCacheIdentifier::NAMESPACEOID] {
                    pg_sys::CacheRegisterSyscacheCallback(cache as std::ffi::c_int, Some(syscache_changed), pg_sys::Datum::from(0));
                }
            }
            CHANGED.with(|c| c.set(true));
        }
        let generation = crate::base::signals::tracked_config_generation();
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            if CHANGED.with(|c| c.replace(false)) || Some(k.0) != generation {
                k.1.clear();
                k.0 = generation.unwrap_or(0);
            }
        });
        generation
    }

    /// The kept resolution of `desc`, if it still holds.
    pub(super) fn get(desc: &RelDesc) -> Option<Rc<LocalRel>> {
        let rel = KEPT.with(|k| k.borrow().1.get(desc).cloned())?;
        // SAFETY: a lock on a relation id that may have gone; taking it processes the
        // invalidations other sessions committed before it (which the check below reads).
        // The original resolution held this lock to commit too.
        unsafe { pg_sys::LockRelationOid(rel.relid, pg_sys::AccessShareLock as i32) };
        let generation = stamp()?;
        KEPT.with(|k| k.borrow().1.contains_key(desc) && k.borrow().0 == generation).then_some(rel)
    }

    /// Keeps `rel` for later batches if nothing changed since `stamp` was taken before it
    /// was resolved.
    pub(super) fn keep(desc: &RelDesc, rel: &Rc<LocalRel>, stamp: Option<u64>) {
        let Some(stamp) = stamp else { return };
        if CHANGED.with(|c| c.get()) || crate::base::signals::tracked_config_generation() != Some(stamp) {
            return;
        }
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            if k.0 == stamp {
                k.1.insert(desc.clone(), rel.clone());
            }
        });
    }

    /// Forgets every kept table (a schema change ran in this session).
    pub(super) fn forget() {
        KEPT.with(|k| k.borrow_mut().1.clear());
    }
}

fn quote(ident: &str) -> String {
    pgrx::spi::quote_identifier(ident)
}

impl Applier {
    fn new(me: i32, run_as: ddl::RunAsRole, sender: Option<&PeerPolicy>) -> Applier {
        Applier {
            rels: FastMap::default(),
            lately: Vec::new(),
            plans: FastMap::default(),
            targets: Vec::new(),
            running: None,
            keep_targets: false,
            recent: FastMap::default(),
            clocks: Clocks::new(me),
            edits: Vec::new(),
            tally: conflicts::Tally::default(),
            run_as,
            ran_as: Vec::new(),
            sender: sender.map(|p| p.name.clone()),
            shared: sender.map(|p| p.tables.clone()).unwrap_or_default(),
            retrying: false,
        }
    }

    /// Whether the sending peer may change this table here. A parked transaction being
    /// retried was checked whole when it was parked: its table may have been renamed since,
    /// which is then its error, not a refusal.
    fn shared(&self, desc: &RelDesc) -> bool {
        self.retrying || self.shared.contains(&(desc.schema.clone(), desc.name.clone()))
    }

    fn local_rel(&mut self, desc: &RelDesc) -> Rc<LocalRel> {
        if let Some((_, rel)) = self.lately.iter().find(|(d, _)| d == desc) {
            return rel.clone();
        }
        if !self.rels.contains_key(desc) {
            if let Some(rel) = session::get(desc) {
                self.rels.insert(desc.clone(), rel);
            }
        }
        if !self.rels.contains_key(desc) {
            let stamp = session::stamp();
            let qualified = format!("{}.{}", quote(&desc.schema), quote(&desc.name));
            let (relid, owner, found) = crate::base::plans::run(
                "SELECT c.oid, c.relowner, array_agg((SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                                           WHERE a.attrelid = c.oid AND a.attname = col AND a.attnum > 0
                                             AND NOT a.attisdropped) ORDER BY o)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
                        unnest($3::text[]) WITH ORDINALITY u(col, o)
                  WHERE n.nspname = $1 AND c.relname = $2
                  GROUP BY c.oid, c.relowner",
                &[pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTARRAYOID],
                &[desc.schema.as_str().into(), desc.name.as_str().into(), desc.columns.clone().into()],
                |t| if t.is_empty() { (None, None, None) } else { t.first().get_three::<pg_sys::Oid, pg_sys::Oid, Vec<Option<String>>>().unwrap_or((None, None, None)) },
            );
            let (Some(relid), Some(types)) = (relid, found) else {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    format!("replicated table {qualified} does not exist on this node"),
                    "Create the table here with the same columns (or let DDL replication do it), then the stream resumes.",
                );
            };
            let types = types
                .into_iter()
                .zip(&desc.columns)
                .map(|(t, col)| {
                    t.unwrap_or_else(|| {
                        raise(
                            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                            format!("column {col} of replicated table {qualified} does not exist on this node"),
                            "Add the column here (or let DDL replication do it), then the stream resumes.",
                        )
                    })
                })
                .collect();
            let policy = conflicts::policy_for(relid, desc);
            // Renaming a colliding row writes a second row of the table mid-change: only the
            // SQL path, whose every statement sees the one before, serves such a table.
            let layout = if policy.renames.is_empty() { rows::layout(relid, desc) } else { None };
            let fks = fk::foreign_keys(relid);
            let owner = owner.unwrap_or(pg_sys::Oid::from_u32(pg_sys::BOOTSTRAP_SUPERUSERID));
            // Rows are written as the owner, whom FORCE ROW LEVEL SECURITY would hide rows
            // from: refused, as PostgreSQL's own apply refuses it.
            if crate::base::plans::one::<bool>("SELECT relrowsecurity AND relforcerowsecurity FROM pg_catalog.pg_class WHERE oid = $1", &[pg_sys::OIDOID], &[relid.into()]) == Some(true) {
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("replicated table {qualified} has FORCE ROW LEVEL SECURITY"),
                    "rbucardo writes replicated rows as the table's owner; ALTER TABLE ... NO FORCE ROW LEVEL SECURITY, then the stream resumes.",
                );
            }
            let rel = Rc::new(LocalRel { relid, qualified, types, layout, policy, fks, owner });
            session::keep(desc, &rel, stamp);
            self.rels.insert(desc.clone(), rel);
        }
        let rel = self.rels[desc].clone();
        self.lately.truncate(LATELY - 1);
        self.lately.insert(0, (desc.clone(), rel.clone()));
        rel
    }

    /// Forgets every resolved table: a schema change ran, or what ran was rolled back.
    fn forget_tables(&mut self) {
        self.rels.clear();
        self.lately.clear();
        self.recent.clear();
        session::forget();
    }

    /// Runs `sql` (prepared once per batch) with text arguments; returns the rows affected.
    fn run(&mut self, client: &mut SpiClient<'_>, sql: String, args: Vec<Option<&str>>) -> usize {
        if !self.plans.contains_key(&sql) {
            let types = vec![PgOid::from(pg_sys::TEXTOID); args.len()];
            let plan = client.prepare_mut(sql.as_str(), &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep();
            self.plans.insert(sql.clone(), plan);
        }
        let plan = &self.plans[&sql];
        let args: Vec<pgrx::datum::DatumWithOid> = args.into_iter().map(|a| a.into()).collect();
        client.update(plan, None, &args).unwrap_or_else(|e| panic!("{e}")).len()
    }

    fn upsert(&mut self, client: &mut SpiClient<'_>, desc: &RelDesc, row: &[Option<String>]) {
        let rel = self.local_rel(desc);
        let cols: Vec<String> = desc.columns.iter().map(|c| quote(c)).collect();
        let vals: Vec<String> = rel.types.iter().enumerate().map(|(i, t)| format!("${}::text::{t}", i + 1)).collect();
        let keys: Vec<String> = desc.key.iter().map(|&k| cols[k as usize].clone()).collect();
        let sets: Vec<String> = (0..cols.len())
            .filter(|i| !desc.key.contains(&(*i as u16)))
            .map(|i| format!("{0} = EXCLUDED.{0}", cols[i]))
            .collect();
        let action = if sets.is_empty() { "NOTHING".to_string() } else { format!("UPDATE SET {}", sets.join(", ")) };
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {action}",
            rel.qualified,
            cols.join(", "),
            vals.join(", "),
            keys.join(", ")
        );
        self.run(client, sql, row.iter().map(|v| v.as_deref()).collect());
    }

    fn key_condition(rel: &LocalRel, desc: &RelDesc, first_param: usize) -> String {
        desc.key
            .iter()
            .enumerate()
            .map(|(n, &k)| format!("{} = ${}::text::{}", quote(&desc.columns[k as usize]), first_param + n, rel.types[k as usize]))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn update(&mut self, client: &mut SpiClient<'_>, desc: &RelDesc, old: &[Option<String>], new: &[Option<String>]) {
        let rel = self.local_rel(desc);
        let sets: Vec<String> = desc
            .columns
            .iter()
            .zip(&rel.types)
            .enumerate()
            .map(|(i, (c, t))| format!("{} = ${}::text::{t}", quote(c), i + 1))
            .collect();
        let sql = format!("UPDATE {} SET {} WHERE {}", rel.qualified, sets.join(", "), Self::key_condition(&rel, desc, new.len() + 1));
        let mut args: Vec<Option<&str>> = new.iter().map(|v| v.as_deref()).collect();
        args.extend(desc.key.iter().map(|&k| old[k as usize].as_deref()));
        if self.run(client, sql, args) == 0 {
            // The row is not here (deleted, or never arrived): keep the newer version.
            self.upsert(client, desc, new);
        }
    }

    fn delete(&mut self, client: &mut SpiClient<'_>, desc: &RelDesc, old: &[Option<String>]) {
        let rel = self.local_rel(desc);
        let sql = format!("DELETE FROM {} WHERE {}", rel.qualified, Self::key_condition(&rel, desc, 1));
        let args = desc.key.iter().map(|&k| old[k as usize].as_deref()).collect();
        self.run(client, sql, args);
    }

    /// Empties the tables of a replicated TRUNCATE. A table that a local-only table references
    /// here cannot be truncated without CASCADE, which would empty the local table too: then
    /// its rows are deleted instead (in replica mode, as every applied delete, without
    /// foreign-key actions), so the stream goes on and no local data is lost.
    fn truncate(&mut self, client: &mut SpiClient<'_>, descs: &[&RelDesc]) {
        let names: Vec<String> = descs.iter().map(|d| self.local_rel(d).qualified.clone()).collect();
        // As the tables' owner when they have one (their TRUNCATE triggers then run with its
        // rights, not the applier's); tables of several owners are truncated as the applier.
        let owners: Vec<pg_sys::Oid> = descs.iter().map(|d| self.local_rel(d).owner).collect();
        let _owner = owners.iter().all(|o| *o == owners[0]).then(|| RunAs::restricted(owners[0]));
        let truncated = xact::subtransaction(std::panic::AssertUnwindSafe(|| {
            client.update(format!("TRUNCATE {}", names.join(", ")).as_str(), None, &[]).unwrap_or_else(|e| panic!("{e}"));
        }));
        match truncated {
            Ok(()) => {}
            Err(e) if xact::error_code(&e) == Some(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED) => {
                for name in &names {
                    client.update(format!("DELETE FROM {name}").as_str(), None, &[]).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            Err(e) => e.rethrow(),
        }
    }

    /// Applies one remote transaction's changes in capture order, leaving out the schema change
    /// `skip` (exception_skip). A schema change that cannot run here ends it with a [`Stop`].
    fn apply_txn(&mut self, client: &mut SpiClient<'_>, txn: &Txn, skip: Option<u32>) -> Result<(), Stop> {
        self.edits.clear();
        self.ran_as.clear();
        self.tally = conflicts::Tally::default();
        let chunks = txn.decoded_chunks().unwrap_or_else(|e| panic!("{e}"));
        let mut changes: Vec<(&RelDesc, &RowChange)> =
            chunks.iter().flat_map(|c| c.changes.iter().map(|ch| (&c.relations[ch.rel as usize], ch))).collect();
        changes.sort_by_key(|(_, c)| c.ordinal);
        let origin = Origin { node: txn.origin, hlc: txn.hlc };
        // Rows written to tables with foreign keys, checked once the whole transaction is in.
        let mut written = fk::Written::default();
        let mut i = 0;
        while i < changes.len() {
            let (desc, ch) = changes[i];
            if ch.op == Op::Ddl {
                // Schema changes run in order with the rows; what was resolved before them
                // (tables, columns, plans) may have changed.
                // Rows written before it are checked against the schema they were written in.
                // (A table open here could not be altered.)
                self.close_targets();
                written.check(self, client);
                if skip != Some(ch.ordinal) {
                    let role = ddl::apply(client, desc, ch, &self.run_as)?;
                    if ch.new.as_ref().and_then(|n| n[2].as_deref()) != Some(role.as_str()) {
                        self.ran_as.push((ch.ordinal, role));
                    }
                } else {
                    self.edits.push((ch.ordinal, None));
                }
                self.forget_tables();
                self.plans.clear();
                if let Some(sender) = &self.sender {
                    self.shared = peer_policy(sender).tables.clone();
                }
                i += 1;
                continue;
            }
            if !self.shared(desc) {
                return Err(Stop {
                    ordinal: ch.ordinal,
                    command: String::new(),
                    message: format!("a change to {}.{}, which is not in a sync shared with {}", desc.schema, desc.name, self.sender.as_deref().unwrap_or("the sender")),
                    refused: true,
                });
            }
            if matches!(ch.op, Op::Insert | Op::Update) && !self.local_rel(desc).fks.is_empty() {
                written.note(desc, ch.new.as_ref().unwrap());
            }
            if ch.op != Op::Truncate && self.executor_apply(desc, ch, origin) {
                i += 1;
                continue;
            }
            // Another path, or a TRUNCATE, which no table open in this session allows.
            self.close_targets();
            match ch.op {
                Op::Insert | Op::Update | Op::Delete => self.sql_change(client, desc, ch, origin),
                Op::Ddl => unreachable!("handled above"),
                Op::Truncate => {
                    // A TRUNCATE of several tables (or one with CASCADE) arrives as one change
                    // per table; truncating them together keeps foreign keys satisfied.
                    let mut j = i;
                    while j < changes.len() && changes[j].1.op == Op::Truncate {
                        j += 1;
                    }
                    let descs: Vec<&RelDesc> = changes[i..j].iter().map(|(d, _)| *d).collect();
                    self.truncate(client, &descs);
                    i = j;
                    continue;
                }
            }
            i += 1;
        }
        self.finish_run();
        written.check(self, client);
        Ok(())
    }

    /// Applies one row change through the executor if the table allows it.
    fn executor_apply(&mut self, desc: &RelDesc, ch: &RowChange, origin: Origin) -> bool {
        if self.local_rel(desc).layout.is_none() {
            return false;
        }
        if self.running.is_some_and(|i| &self.targets[i].0 != desc || self.targets[i].2 != session::invalidations()) {
            self.finish_run();
        }
        let rel = self.local_rel(desc);
        let layout = rel.layout.as_ref().unwrap();
        let starting = self.running.is_none();
        if starting {
            // A table whose definition may have changed since (a trigger created one on it,
            // autovacuum updated its statistics) is set up again, and so are all when one more
            // would be too many (each holds its other indexes' locks and some memory).
            let mut open = self.targets.iter().position(|(d, _, _)| d == desc);
            if self.targets.iter().any(|t| t.2 != session::invalidations()) || (open.is_none() && self.targets.len() >= MAX_TARGETS) {
                self.close_targets();
                open = None;
            }
            let i = match open {
                Some(i) => i,
                None => {
                    let target = rows::Target::open(layout);
                    // Counted once open: opening takes locks, which reads the invalidations
                    // other sessions sent meanwhile (none of which can touch a table we hold).
                    self.targets.push((desc.clone(), target, session::invalidations()));
                    self.targets.len() - 1
                }
            };
            self.targets[i].1.begin();
            self.running = Some(i);
            if self.recent.values().map(rows::Recent::len).sum::<usize>() >= rows::RECENT_LIMIT {
                self.recent.clear();
            }
        }
        let target = &self.targets[self.running.unwrap()].1;
        let recent = self.recent.entry(layout.relid).or_default();
        if starting {
            target.check_recent(recent);
        }
        let (clocks, edits, tally) = (&mut self.clocks, &mut self.edits, &mut self.tally);
        let decision = target.change(layout, desc, ch, recent, |local| decide_change(&rel.policy, desc, ch, local, origin, clocks, tally));
        settle(decision, ch.ordinal, edits);
        self.note_clock(desc, ch, origin);
        true
    }

    /// A later change of this batch to the same row compares with this one's clock: for what
    /// was accepted of it (nothing when it lost here, its accepted columns when it lost some).
    fn note_clock(&mut self, desc: &RelDesc, ch: &RowChange, origin: Origin) {
        match self.edits.last().filter(|(o, _)| *o == ch.ordinal) {
            Some((_, None)) => {}
            Some((_, Some(image))) => {
                let accepted = RowChange { new: Some(image.clone()), ..ch.clone() };
                self.clocks.note(desc, &accepted, (origin.hlc, origin.node));
            }
            None => self.clocks.note(desc, ch, (origin.hlc, origin.node)),
        }
    }

    /// The decision on one row change of the SQL path; records what travels on.
    fn decide(&mut self, desc: &RelDesc, ch: &RowChange, local: Option<&[Value]>, origin: Origin) -> Action {
        let rel = self.local_rel(desc);
        let mut decision = decide_change(&rel.policy, desc, ch, local, origin, &mut self.clocks, &mut self.tally);
        if let (false, Action::Write(row)) = (rel.policy.renames.is_empty(), &mut decision.action) {
            let before = row.clone();
            let table = unique::Table { qualified: &rel.qualified, types: &rel.types, owner: rel.owner };
            let old = if ch.op == Op::Update { ch.old.as_deref() } else { None };
            if unique::settle(&table, &rel.policy, desc, row, old, origin, &mut self.clocks, &mut self.tally) {
                decision.forward = renamed_forward(decision.forward, ch, &before, row);
            }
        }
        settle(decision, ch.ordinal, &mut self.edits)
    }

    /// Drops the open tables without closing them: their subtransaction was rolled back, which
    /// released their references and locks already.
    fn forget_targets(&mut self) {
        self.running = None;
        for (_, target, _) in self.targets.drain(..) {
            std::mem::forget(target);
        }
    }

    /// Ends the run of rows under way, if any: its AFTER triggers fire.
    fn end_run(&mut self) {
        if let Some(i) = self.running.take() {
            self.targets[i].1.end();
        }
    }

    /// Ends the run under way; a careful pass (`keep_targets` off) closes its tables too.
    fn finish_run(&mut self) {
        self.end_run();
        if !self.keep_targets {
            self.close_targets();
        }
    }

    fn close_targets(&mut self) {
        self.end_run();
        for (_, target, _) in self.targets.drain(..) {
            target.close();
        }
    }
}

/// Runs the pure conflict decision for one row change with what this node knows (row clocks,
/// custom functions), writes its conflict log entry, counts it, and stops the batch under
/// `abort`.
fn decide_change(policy: &decide::Policy, desc: &RelDesc, ch: &RowChange, local: Option<&[Value]>, origin: Origin, clocks: &mut Clocks, tally: &mut conflicts::Tally) -> Decision {
    let mut env = conflicts::NodeEnv { clocks };
    let decision = decide::decide(policy, desc, ch.op, local, ch.old.as_deref(), ch.new.as_deref(), origin, &mut env);
    if let Action::Abort(message) = &decision.action {
        raise(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            message.clone(),
            "Nothing of this batch was applied. Fix the row or change the strategy (rbucardo.set_conflict_strategy), and the stream resumes.",
        );
    }
    if let Some(logged) = &decision.log {
        conflicts::record(policy, logged);
    }
    if let Some((kind, outcome)) = decision.tally {
        tally.count(&policy.table, kind, outcome);
    }
    decision
}

/// What travels on of a change whose written image had a unique value renamed here: the
/// renamed value wherever the forwarded image carries the value it replaced.
fn renamed_forward(forward: Forward, ch: &RowChange, before: &[Value], after: &[Value]) -> Forward {
    let patch = |mut image: Vec<Value>| {
        for (i, v) in image.iter_mut().enumerate() {
            if before[i] != after[i] && *v == before[i] {
                *v = after[i].clone();
            }
        }
        Forward::NewImage(image)
    };
    match forward {
        Forward::AsIs => patch(ch.new.clone().expect("a written change has a new image")),
        Forward::NewImage(image) => patch(image),
        Forward::LeaveOut => Forward::LeaveOut,
    }
}

/// Notes what of a decided change travels on; returns what to do with the local row.
fn settle(decision: Decision, ordinal: u32, edits: &mut Vec<(u32, Option<Vec<Value>>)>) -> Action {
    match decision.forward {
        Forward::AsIs => {}
        Forward::LeaveOut => edits.push((ordinal, None)),
        Forward::NewImage(row) => edits.push((ordinal, Some(row))),
    }
    decision.action
}

/// Writes an applied transaction to the local change log under its original origin, so that
/// this node forwards it (never back to where it came from). `edits` changes what travels on:
/// a change left out (a command skipped here, a version that lost a conflict here) or carrying
/// another new image; `ran_as` the role a schema change ran as here.
fn relog(txn: &Txn, source: changelog::Source, edits: &[(u32, Option<Vec<Value>>)], ran_as: &[(u32, String)]) {
    let edited: Vec<Vec<u8>>;
    let chunks = if edits.is_empty() && ran_as.is_empty() {
        &txn.chunks
    } else {
        edited = txn
            .chunks
            .iter()
            .map(|bytes| {
                let mut chunk = decode_chunk(bytes).unwrap_or_else(|e| panic!("{e}"));
                chunk.changes.retain_mut(|c| match edits.iter().find(|(o, _)| *o == c.ordinal) {
                    Some((_, None)) => false,
                    Some((_, Some(row))) => {
                        c.new = Some(row.clone());
                        true
                    }
                    None => {
                        if let (Some((_, role)), Some(new)) = (ran_as.iter().find(|(o, _)| *o == c.ordinal), c.new.as_mut()) {
                            new[2] = Some(role.clone());
                        }
                        true
                    }
                });
                encode_chunk(&chunk)
            })
            .collect();
        &edited
    };
    for (i, chunk) in chunks.iter().enumerate() {
        changelog::append(chunk, i as i32, i + 1 == chunks.len(), Some(source), txn.hlc, txn.to);
    }
}

/// Applies a parked transaction again (its progress was recorded, and it was forwarded, when
/// it was parked), with the policy of the peer `via` that sent it. It is not forwarded again.
pub fn apply_parked(me: i32, via: i32, txn: &Txn) -> Result<(), String> {
    let _replica = LocalSetting::replica_mode();
    let policy = crate::base::node::peer_policy_by_id(via);
    let run_as = policy.as_deref().map_or_else(|| ddl::RunAsRole::Nobody(format!("node {via}")), ddl::run_as);
    let mut applier = Applier::new(me, run_as, policy.as_deref());
    applier.retrying = true;
    let result = Spi::connect_mut(|client| exceptions::attempt(|| applier.apply_txn(client, txn, None)));
    match result {
        Ok(()) => {
            applier.clocks.commit_txn();
            std::mem::take(&mut applier.tally).write();
            Ok(())
        }
        Err(Failure::Park(reason)) => {
            applier.forget_targets();
            Err(reason)
        }
        Err(Failure::Stop(stop)) => Err(stop.message),
    }
}

/// The transaction without its change `ordinal` (a schema change skipped by the operator).
fn leave_out(txn: &Txn, ordinal: u32) -> Txn {
    let chunks = txn
        .chunks
        .iter()
        .map(|bytes| {
            let mut chunk = decode_chunk(bytes).unwrap_or_else(|e| panic!("{e}"));
            chunk.changes.retain(|c| c.ordinal != ordinal);
            encode_chunk(&chunk)
        })
        .collect();
    Txn { chunks, decoded: Default::default(), ..txn.clone() }
}

/// What a transaction holds, checked without applying it: its first schema change (ordinal
/// and command), and the first table of its row changes not in `shared`.
fn inspect(txn: &Txn, shared: &std::collections::HashSet<(String, String)>) -> (Option<(u32, String)>, Option<String>) {
    let chunks = txn.decoded_chunks().unwrap_or_else(|e| panic!("{e}"));
    let mut ddl: Option<(u32, String)> = None;
    let mut unshared = None;
    for chunk in chunks.iter() {
        for ch in &chunk.changes {
            let rel = &chunk.relations[ch.rel as usize];
            if ch.op == Op::Ddl {
                if ddl.as_ref().is_none_or(|(o, _)| ch.ordinal < *o) {
                    ddl = Some((ch.ordinal, ch.new.as_ref().and_then(|n| n[0].clone()).unwrap_or_default()));
                }
            } else if unshared.is_none() && !shared.contains(&(rel.schema.clone(), rel.name.clone())) {
                unshared = Some(format!("{}.{}", rel.schema, rel.name));
            }
        }
    }
    (ddl, unshared)
}

/// Where this node stands in the streams of the origins of `batch`'s transactions after
/// `cursor` (not this node's own). The origins the sender may deliver (`may_send`) are locked
/// until commit, all at once, in ascending order and before anything is applied: another
/// peer may be delivering the same origins' transactions by another path at this moment. The
/// others are only read: admit refuses their transactions unless they are applied here
/// already, and the pass skips those (progress only moves forward). So a peer cannot make
/// this node wait on, or hold, locks of origins it may not send. One statement per kind: a
/// hub's store applied a few origins per pull, each with a lock and a read of its own
/// (docs/performance.md).
fn load_progress(me: i32, batch: &Batch, cursor: Position, may_send: impl Fn(i32) -> bool) -> HashMap<i32, Position> {
    let mut origins: Vec<i32> = batch.txns.iter().filter(|t| t.stream_pos > cursor && t.origin != me).map(|t| t.origin).collect();
    origins.sort_unstable();
    origins.dedup();
    let (locked, read): (Vec<i32>, Vec<i32>) = origins.into_iter().partition(|&o| may_send(o));
    let mut progress = HashMap::new();
    if !locked.is_empty() {
        locks::lock_origins(&locked);
        read_progress("SELECT origin, tick, seq FROM rbucardo.origin_progress WHERE origin = ANY ($1) FOR UPDATE", locked, &mut progress);
    }
    if !read.is_empty() {
        read_progress("SELECT origin, tick, seq FROM rbucardo.origin_progress WHERE origin = ANY ($1)", read, &mut progress);
    }
    progress
}

/// Adds the positions of `origins` to `progress`, read with `sql` (the start for an origin
/// without a row).
fn read_progress(sql: &'static str, origins: Vec<i32>, progress: &mut HashMap<i32, Position>) {
    for &origin in &origins {
        progress.insert(origin, Position::START);
    }
    crate::base::plans::run(sql, &[pg_sys::INT4ARRAYOID], &[origins.into()], |t| {
        for r in t {
            if let (Ok(Some(origin)), Ok(Some(tick)), Ok(Some(seq))) = (r.get::<i32>(1), r.get::<i64>(2), r.get::<i64>(3)) {
                progress.insert(origin, Position { tick, seq });
            }
        }
    });
}

/// Writes the positions of `progress` that moved from `loaded`, in one statement.
fn save_progress(loaded: &HashMap<i32, Position>, progress: &HashMap<i32, Position>) {
    let moved: Vec<(i32, Position)> = progress.iter().filter(|(o, p)| loaded.get(o) != Some(p)).map(|(o, p)| (*o, *p)).collect();
    if moved.is_empty() {
        return;
    }
    let origins: Vec<i32> = moved.iter().map(|(o, _)| *o).collect();
    let ticks: Vec<i64> = moved.iter().map(|(_, p)| p.tick).collect();
    let seqs: Vec<i64> = moved.iter().map(|(_, p)| p.seq).collect();
    crate::base::plans::run(
        "INSERT INTO rbucardo.origin_progress (origin, tick, seq)
         SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int4[]), pg_catalog.unnest($2::pg_catalog.int8[]), pg_catalog.unnest($3::pg_catalog.int8[]))
         ON CONFLICT (origin) DO UPDATE SET tick = EXCLUDED.tick, seq = EXCLUDED.seq, applied_at = pg_catalog.now()",
        &[pg_sys::INT4ARRAYOID, pg_sys::INT8ARRAYOID, pg_sys::INT8ARRAYOID],
        &[origins.into(), ticks.into(), seqs.into()],
        |_| (),
    );
}

/// The stream a batch belongs to, for [`Stream::pass`].
struct Stream<'a> {
    me: i32,
    sender_node: i32,
    batch: &'a Batch,
    /// Transactions of this stream that stopped it before (a failed schema change).
    blocks: &'a [exceptions::Stopped],
    /// Who the sender's schema changes run as here.
    run_as: &'a ddl::RunAsRole,
    policy: &'a PeerPolicy,
    /// The node ids of the active peers but the sender (None: not known yet): those that may
    /// get what this batch forwards.
    forward_to: &'a [Option<i32>],
    /// Where this node stood in each origin's stream before the batch (`load_progress`).
    progress: &'a HashMap<i32, Position>,
}

/// What a pass over a batch did.
struct Pass {
    /// Conflicts of the transactions that applied, counted.
    tally: conflicts::Tally,
    cursor: Position,
    progress: HashMap<i32, Position>,
    applied: i64,
    stopped: Option<String>,
}

/// Why a pass over a batch ended early, undone.
enum PassEnd {
    /// A fast pass met a remote transaction that needs a subtransaction of its own (it must be
    /// parked, or it stops the stream): the pass is done again carefully.
    NeedsCare,
    /// A transaction asks for more than the sender may do here: the batch is refused whole.
    Refused(String),
}

impl Stream<'_> {
    /// Applies the batch's transactions after `cursor` in order. `careful`: each in a
    /// subtransaction of its own, so that one that breaks a constraint is parked and one whose
    /// schema change fails stops the stream; otherwise any such failure raises an error.
    /// `keep_tables`: a fast pass keeps the tables it writes open for the whole pass.
    fn pass(&self, applier: &mut Applier, client: &mut SpiClient<'_>, mut cursor: Position, careful: bool, keep_tables: bool) -> Result<Pass, PassEnd> {
        applier.keep_targets = keep_tables && !careful;
        let mut progress = self.progress.clone();
        let (mut applied, mut stopped) = (0i64, None);
        let mut tally = conflicts::Tally::default();
        for txn in &self.batch.txns {
            if txn.stream_pos <= cursor {
                continue;
            }
            let before = cursor;
            cursor = txn.stream_pos;
            // This node's own, or addressed to another node (the sender does not send those).
            if txn.origin == self.me || txn.to.is_some_and(|n| n != self.me) {
                continue;
            }
            let block = self.blocks.iter().find(|b| b.origin == txn.origin && b.origin_pos == txn.origin_pos);
            // Every origin of the batch was loaded (and, if the sender may send it, locked)
            // before the pass: a large transaction put together from its parts keeps its own.
            let Some(&done) = progress.get(&txn.origin) else {
                raise(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("no progress loaded for origin {} of a batch from node {}", txn.origin, self.sender_node),
                    "This is a bug in rbucardo; nothing of the batch was applied.",
                );
            };
            if txn.origin_pos <= done {
                // Already here by another path (a mesh): so is a schema change that stopped
                // this stream at it.
                if let Some(b) = block {
                    exceptions::record_superseded(b, "applied");
                }
                continue;
            }
            if let Some(b) = block.filter(|b| !b.due) {
                // Not yet time to try it again: the stream stays where it is.
                stopped = Some(b.reason.clone());
                cursor = before;
                break;
            }
            let skip = block.and_then(|b| b.skip);
            let result = if careful {
                exceptions::attempt(|| applier.apply_txn(client, txn, skip))
            } else {
                // A constraint violation raises out of the whole pass; a stop asks for care.
                match applier.apply_txn(client, txn, skip) {
                    Ok(()) => Ok(()),
                    Err(stop) if stop.refused => return Err(PassEnd::Refused(stop.message)),
                    Err(_) => return Err(PassEnd::NeedsCare),
                }
            };
            let wakes = self.forward_to.iter().any(|&peer| peer != Some(txn.origin));
            let source = changelog::Source { origin: txn.origin, origin_pos: txn.origin_pos, via: self.sender_node, wakes };
            match result {
                Ok(()) => {
                    relog(txn, source, &applier.edits, &applier.ran_as);
                    applier.clocks.commit_txn();
                    tally.absorb(std::mem::take(&mut applier.tally));
                    applied += 1;
                    if let Some(b) = block {
                        exceptions::record_resumed(b);
                    }
                }
                // A transaction that breaks a constraint here is parked, not allowed to stop
                // the stream; one whose schema change fails here stops the stream before it.
                // A parked transaction is forwarded as it came, unapplied, so it must be checked
                // whole first (its apply stopped at the failing row): every row to a shared
                // table, else the batch is refused. One with a schema change is not parked but
                // stops the stream (retried every few seconds), so that the change is run here,
                // as this node's policy says, before anything forwards it.
                Err(Failure::Park(reason)) => {
                    // What was resolved inside the rolled-back transaction (tables after its
                    // schema change, row clocks) no longer holds.
                    applier.forget_targets();
                    *applier = Applier::new(self.me, self.run_as.clone(), Some(self.policy));
                    // A schema change skipped by the operator stays left out, here and downstream.
                    let without_skipped;
                    let txn = match skip {
                        Some(ordinal) => {
                            without_skipped = leave_out(txn, ordinal);
                            &without_skipped
                        }
                        None => txn,
                    };
                    let (ddl, unshared) = inspect(txn, &self.policy.tables);
                    // A schema change first: its tables may join a herd only once it runs.
                    if let (None, Some(table)) = (&ddl, unshared) {
                        return Err(PassEnd::Refused(format!("a change to {table}, which is not in a sync shared with {}", self.policy.name)));
                    }
                    if let Some((ordinal, command)) = ddl {
                        let stop = Stop { ordinal, command, message: format!("a transaction with a schema change broke a constraint here: {reason}"), refused: false };
                        exceptions::record_stop(block.map(|b| b.id), txn, self.sender_node, &stop);
                        stopped = Some(stop.message);
                        cursor = before;
                        break;
                    }
                    exceptions::park(txn, self.sender_node, &reason);
                    // It travels on now, as it came, under its own origin and position: nodes
                    // behind this one must not see a later transaction of its origin before it
                    // (they would take it as applied), and may well apply it at once. When it
                    // applies here later, it is not forwarded again.
                    relog(txn, source, &[], &[]);
                    if let Some(b) = block {
                        exceptions::record_superseded(b, "parked");
                    }
                }
                Err(Failure::Stop(stop)) if stop.refused => return Err(PassEnd::Refused(stop.message)),
                Err(Failure::Stop(stop)) => {
                    applier.forget_targets();
                    exceptions::record_stop(block.map(|b| b.id), txn, self.sender_node, &stop);
                    stopped = Some(stop.message);
                    cursor = before;
                    break;
                }
            }
            crate::base::clock::observe(txn.hlc);
            progress.insert(txn.origin, txn.origin_pos);
        }
        // Before the pass's subtransaction is released, which must find no table open.
        applier.close_targets();
        Ok(Pass { tally, cursor, progress, applied, stopped })
    }
}

/// Applies a batch from the peer `sender_db` (node `sender_node`) in the current transaction.
/// `me` is this node's id. Everything or nothing: any error aborts the caller's transaction. A
/// batch that asks for more than this node lets that peer do is refused whole before anything
/// of it is applied: the refusal is the returned `stopped`, and the server log says it too.
pub fn apply_batch(me: i32, sender_db: &str, sender_node: i32, batch: &Batch) -> Applied {
    let applied = apply_batch_here(me, sender_db, sender_node, batch);
    // The commit must be durable before the sender hears of it: the sender trims what it
    // believes we have. (A push whose sender confirms only flushed positions commits without
    // waiting: src/base/durable.rs.) Asked for once the rows are in, since only the commit
    // reads it: a transaction that changed no setting pops the owners' per-row settings
    // sandboxes without looking at every setting (base/xact.rs, `has_value`).
    xact::set_local(c"synchronous_commit", c"local");
    applied
}

fn apply_batch_here(me: i32, sender_db: &str, sender_node: i32, batch: &Batch) -> Applied {
    // A row is judged by the clocks read once it is locked, which needs each statement's own
    // snapshot: under REPEATABLE READ the clock of a change committed while the applier
    // waited for the row would stay unseen (src/log/clocks.rs).
    // SAFETY: reads a backend global, inside a transaction.
    if unsafe { pg_sys::XactIsoLevel } != pg_sys::XACT_READ_COMMITTED as i32 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            "rbucardo applies changes only under READ COMMITTED",
            "Run it in a READ COMMITTED transaction (the worker and the peer links set default_transaction_isolation themselves).",
        );
    }
    if batch.sender != sender_node {
        raise(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            format!("batch claims to come from node {} but the peer {sender_db} is node {sender_node}", batch.sender),
            "Check that every node has its own node id (rbucardo.init_node) and that conninfos point at the right servers.",
        );
    }
    // Our own changes must not be re-captured by our triggers.
    let _replica = LocalSetting::replica_mode();
    locks::lock_stream(sender_node);
    let (tick, seq) = match crate::base::plans::two::<i64, i64>("SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = $1 FOR UPDATE", &[pg_sys::TEXTOID], &[sender_db.into()]) {
        (Some(tick), Some(seq)) => (Some(tick), Some(seq)),
        _ => raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no peer state for {sender_db}"), "Add the peer with rbucardo.add_db()."),
    };
    let cursor = Position { tick: tick.unwrap_or(0), seq: seq.unwrap_or(Position::START.seq) };
    if batch.after > cursor {
        raise(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            format!(
                "batch from {sender_db} starts after ({}, {}) but this node has applied only up to ({}, {})",
                batch.after.tick, batch.after.seq, cursor.tick, cursor.seq
            ),
            "The batch is refused; the sender will resend from this node's position.",
        );
    }
    let policy = peer_policy(sender_db);
    // Parts are kept and dropped only around batches that carry one: the apply of every other
    // batch pays nothing for them.
    let holds_part = batch.txns.iter().any(|t| t.part.is_some());
    let refuse = |why: String| {
        let why = format!("refused a batch from {sender_db}: {why}");
        pgrx::warning!("rbucardo: {why}");
        admit::record_refusal(sender_db, &why);
        Applied { from: cursor, cursor, txns: 0, stopped: Some(why), applies: None }
    };
    // The origins' positions, and the locks of those the sender may deliver, for the batch as
    // it came (a large transaction's last part stands for it whole).
    let loaded = load_progress(me, batch, cursor, |origin| policy.relay || policy.node_id == Some(origin));
    // A part is checked before it is kept, and the last one before the kept parts are read:
    // a refusal leaves them kept.
    if holds_part {
        if let Err(why) = admit::admit(me, &policy, batch, cursor, &loaded) {
            return refuse(why);
        }
    }
    // A part of a large transaction is kept; its last part brings the whole transaction.
    let batch = match parts::take_in(sender_node, batch, cursor) {
        Ok(batch) => batch,
        Err(parts::Refusal::TooLarge(why)) => return refuse(why),
        Err(parts::Refusal::Malformed(why)) => raise(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            format!("refused a batch from {sender_db}: {why}"),
            "Nothing of it was kept; the sender goes on from the parts this node holds.",
        ),
    };
    let batch: &Batch = &batch;
    if let Err(why) = admit::admit(me, &policy, batch, cursor, &loaded) {
        return refuse(why);
    }
    let run_as = ddl::run_as(&policy);
    let blocks = exceptions::stopped_in(sender_node);
    let forward_to: Vec<Option<i32>> = crate::base::node::active_peers_kept().iter().map(|p| p.node_id).filter(|&id| id != Some(sender_node)).collect();
    let stream = Stream { me, sender_node, batch, blocks: &blocks, run_as: &run_as, policy: &policy, forward_to: &forward_to, progress: &loaded };
    // Fast path: the whole batch in one subtransaction. If a transaction of it breaks a
    // constraint or a schema change fails, that is undone and the batch is applied again with a
    // subtransaction per remote transaction, which parks or stops just that one. Either pass is
    // undone whole when the batch turns out to ask for more than the sender may do.
    // The clocks of what this transaction applied before the batch: a pass that is undone
    // puts them back.
    let clocks_before = crate::log::clocks::applied_so_far();
    let pass = |careful: bool, keep_tables: bool| {
        let mut applier = Applier::new(me, run_as.clone(), Some(&policy));
        let result = Spi::connect_mut(|client| xact::undoable(std::panic::AssertUnwindSafe(|| stream.pass(&mut applier, client, cursor, careful, keep_tables))));
        if result.is_err() || matches!(result, Ok(Err(_))) {
            applier.forget_targets();
        }
        result
    };
    // Fast, keeping tables open; then, if a table it held open was in use (a local trigger
    // truncating or altering it: ERRCODE_OBJECT_IN_USE), fast with each table closed when its
    // run of rows ends, as they always were before; then careful.
    let (mut careful, mut keep_tables) = (false, true);
    let outcome = loop {
        let result = pass(careful, keep_tables);
        let next = match &result {
            Ok(Err(PassEnd::NeedsCare)) if !careful => Some((true, false)),
            Err(e) if !careful && exceptions::is_parkable(e) => Some((true, false)),
            Err(e) if keep_tables && xact::error_code(e) == Some(PgSqlErrorCode::ERRCODE_OBJECT_IN_USE) => Some((false, false)),
            _ => None,
        };
        let Some(mode) = next else { break result };
        crate::log::clocks::restore(crate::log::clocks::Applied::clone_of(&clocks_before));
        (careful, keep_tables) = mode;
    };
    let from = cursor;
    let Pass { tally, mut cursor, progress, applied, stopped } = match outcome {
        Ok(Ok(pass)) => pass,
        Ok(Err(PassEnd::Refused(why))) => {
            crate::log::clocks::restore(clocks_before);
            let why = format!("refused a batch from {sender_db}: {why}");
            pgrx::warning!("rbucardo: {why}");
            admit::record_refusal(sender_db, &why);
            return Applied { from: cursor, cursor, txns: 0, stopped: Some(why), applies: None };
        }
        Ok(Err(PassEnd::NeedsCare)) => unreachable!("a careful pass handles every transaction"),
        Err(e) => e.rethrow(),
    };
    if stopped.is_none() {
        cursor = cursor.max(batch.upto);
    }
    tally.write();
    if applied > 0 {
        retry::retry_after_batch(me);
    }
    save_progress(&loaded, &progress);
    crate::base::plans::run(
        "UPDATE rbucardo.peer_state SET in_tick = $2, in_seq = $3, applied_in = applied_in + $4,
                last_contact = pg_catalog.now(), refused = NULL WHERE db = $1",
        &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID, pg_sys::INT8OID],
        &[sender_db.into(), cursor.tick.into(), cursor.seq.into(), applied.into()],
        |_| (),
    );
    if holds_part {
        parts::drop_passed(sender_node, cursor);
    }
    // Inside the stream lock, before the commit: see `signals::Applies`.
    let applies = crate::base::signals::note_apply();
    Applied { from, cursor, txns: applied, stopped, applies }
}
