//! Row clocks: the hybrid clock and origin of the version of a row this node holds, which the
//! `latest` rule compares with an incoming version's. The change log holds the clocks of
//! recent changes; `rbucardo.row_clock` keeps those of changes trimmed from it.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::base::wire::{decode_chunk, RelDesc, Value};

/// A row's replica key as JSON text, the form row clocks are kept under (the same as the
/// conflict log's key).
fn key_text(desc: &RelDesc, row: &[Value]) -> String {
    serde_json::Value::Object(
        desc.key
            .iter()
            .map(|&k| (desc.columns[k as usize].clone(), row[k as usize].clone().map_or(serde_json::Value::Null, serde_json::Value::String)))
            .collect(),
    )
    .to_string()
}

/// The highest clock this database has recorded, in its change log or its kept row clocks: a
/// restarted node moves its clock past it, whatever its wall clock says.
pub fn highest_known() -> Option<i64> {
    Spi::get_one::<i64>(
        "SELECT pg_catalog.max(h) FROM (SELECT pg_catalog.max(hlc) AS h FROM rbucardo.change_log
                                        UNION ALL SELECT pg_catalog.max(hlc) FROM rbucardo.row_clock) s",
    )
    .ok()
    .flatten()
}

type Key = (String, String, String);

/// The clocks of the rows in the change log, as this backend last read them: read whole once,
/// then only what committed since (by transaction id), and forgotten once trimmed (their clocks
/// are in `row_clock` then). A hub holding a week of log for an offline branch decodes it once
/// per session, not once per batch.
struct Session {
    /// The change log's oid: a re-created extension starts afresh.
    log: pg_sys::Oid,
    /// Transactions from this id on may have committed since the last read.
    mark: i64,
    /// Clock and change-log seq of the latest version of each row.
    rows: HashMap<Key, ((i64, i32), i64)>,
}

thread_local! {
    static SESSION: std::cell::RefCell<Option<Session>> = const { std::cell::RefCell::new(None) };
    /// Clocks of the changes applied so far in the current transaction (its top-level xid,
    /// and the clocks), which the session's read leaves out: every applier of the transaction
    /// sees them (a batch, the parked transactions retried after it, another push).
    static APPLIED: std::cell::RefCell<(pg_sys::TransactionId, HashMap<Key, (i64, i32)>)> = std::cell::RefCell::new((pg_sys::InvalidTransactionId, HashMap::new()));
}

/// This transaction's applied clocks, as they stand (to put back if what follows is undone).
pub struct Applied(HashMap<Key, (i64, i32)>);

impl Applied {
    pub fn clone_of(a: &Applied) -> Applied {
        Applied(a.0.clone())
    }
}

fn top_xid() -> pg_sys::TransactionId {
    // SAFETY: reads this backend's transaction state.
    unsafe { pg_sys::GetTopTransactionIdIfAny() }
}

/// The clocks this transaction applied so far, to `restore` if a pass is undone.
pub fn applied_so_far() -> Applied {
    let xid = top_xid();
    APPLIED.with(|a| {
        let a = a.borrow();
        Applied(if a.0 == xid { a.1.clone() } else { HashMap::new() })
    })
}

/// Puts back what `applied_so_far` saw: the changes applied since were undone.
pub fn restore(saved: Applied) {
    let xid = top_xid();
    APPLIED.with(|a| *a.borrow_mut() = (xid, saved.0));
}

fn applied_clock(k: &Key) -> Option<(i64, i32)> {
    let xid = top_xid();
    APPLIED.with(|a| {
        let a = a.borrow();
        if a.0 == xid { a.1.get(k).copied() } else { None }
    })
}

/// Brings the session's clocks up to date with the committed change log.
fn refresh(me: i32) {
    let log = Spi::get_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass('rbucardo.change_log')::pg_catalog.oid").ok().flatten().unwrap_or(pg_sys::InvalidOid);
    // Taken before the read: a transaction running now has an id at or above it.
    let mark = Spi::get_one::<i64>("SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint").ok().flatten().unwrap_or(0);
    SESSION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let fresh = cell.as_ref().is_none_or(|s| s.log != log);
        if fresh {
            *cell = Some(Session { log, mark: 0, rows: HashMap::new() });
        }
        let session = cell.as_mut().unwrap();
        // This transaction's own rows are not read: they are not committed (the batch notes
        // its changes itself).
        let since = if fresh { "true".to_string() } else { format!("txid >= '{}'::pg_catalog.xid8", session.mark) };
        let rows = logged_clocks(me, &format!("{since} AND txid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()"), &[]);
        for (k, (clock, seq)) in rows {
            let slot = session.rows.entry(k).or_insert((clock, seq));
            if clock > slot.0 {
                *slot = (clock, seq);
            }
        }
        let floor = Spi::get_one::<i64>("SELECT pg_catalog.min(seq) FROM rbucardo.change_log").ok().flatten();
        match floor {
            Some(floor) => session.rows.retain(|_, (_, seq)| *seq >= floor),
            None => session.rows.clear(),
        }
        session.mark = mark;
    });
}

/// The clocks of the local versions of rows, for the `latest` rule: those of this batch's own
/// changes, else the latest change to each row still in the change log (brought up to date
/// once per batch, when the first conflict needs it), else `rbucardo.row_clock`.
pub struct Clocks {
    me: i32,
    refreshed: bool,
    /// The current remote transaction's changes, until `commit_txn` (or dropped with it).
    txn: HashMap<Key, (i64, i32)>,
}

impl Clocks {
    pub fn new(me: i32) -> Clocks {
        Clocks { me, refreshed: false, txn: HashMap::new() }
    }

    /// The current remote transaction applied: its clocks count for the rest of this local
    /// transaction, for every applier.
    pub fn commit_txn(&mut self) {
        let xid = top_xid();
        let txn = std::mem::take(&mut self.txn);
        APPLIED.with(|a| {
            let mut a = a.borrow_mut();
            if a.0 != xid {
                *a = (xid, HashMap::new());
            }
            for (k, c) in txn {
                let slot = a.1.entry(k).or_insert(c);
                *slot = (*slot).max(c);
            }
        });
    }

    /// The current remote transaction was undone (parked): its clocks never counted.
    pub fn discard_txn(&mut self) {
        self.txn.clear();
    }

    /// The clock of the local version of the row with this key.
    pub fn local(&mut self, desc: &RelDesc, key: &serde_json::Value) -> Option<(i64, i32)> {
        let k = (desc.schema.clone(), desc.name.clone(), key.to_string());
        if !self.refreshed {
            refresh(self.me);
            self.refreshed = true;
        }
        let logged = SESSION.with(|s| s.borrow().as_ref().and_then(|s| s.rows.get(&k).map(|(c, _)| *c)));
        let mine = self.txn.get(&k).copied().max(applied_clock(&k));
        // Kept clocks count too: a trimmed change, or a parked transaction a retry applied.
        let kept = Spi::get_two_with_args::<i64, i32>(
            "SELECT hlc, origin FROM rbucardo.row_clock
              WHERE relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text)) AND key = $3",
            &[desc.schema.as_str().into(), desc.name.as_str().into(), k.2.as_str().into()],
        )
        .ok()
        .and_then(|(h, o)| Some((h?, o?)));
        logged.max(mine).max(kept)
    }

    /// Records an applied change's clock for its row. The larger clock stays: under `latest` the
    /// version with the larger clock is the one the row holds.
    pub fn note(&mut self, desc: &RelDesc, row: &[Value], clock: (i64, i32)) {
        let slot = self.txn.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, row))).or_insert(clock);
        *slot = (*slot).max(clock);
    }
}

/// The latest clock of every row changed by the change log rows that `where_sql` selects.
/// The largest clock per row: the log also keeps changes that lost here, for forwarding, and
/// the row holds the version with the largest clock.
fn logged_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) -> HashMap<Key, ((i64, i32), i64)> {
    let mut latest: HashMap<Key, ((i64, i32), i64)> = HashMap::new();
    Spi::connect(|c| {
        // A parked transaction is in the log (forwarded) but not applied here: its clock is not
        // that of any local version until a retry applies it (see `remember`).
        let sql = format!(
            "SELECT data, hlc, origin, seq FROM rbucardo.change_log
              WHERE ({where_sql})
                AND NOT EXISTS (SELECT 1 FROM rbucardo.exceptions e
                                 WHERE e.resolved_at IS NULL AND e.kind = 'constraint' AND e.origin = change_log.origin
                                   AND e.origin_tick = change_log.origin_tick AND e.origin_seq = change_log.origin_seq)"
        );
        for row in c.select(sql.as_str(), None, args).expect("reading the change log") {
            let data = row.get::<Vec<u8>>(1).unwrap().unwrap_or_default();
            let clock = (row.get::<i64>(2).unwrap().unwrap_or(0), row.get::<i32>(3).unwrap().unwrap_or(me));
            let seq = row.get::<i64>(4).unwrap().unwrap_or(0);
            if let Ok(chunk) = decode_chunk(&data) {
                for ch in &chunk.changes {
                    let desc = &chunk.relations[ch.rel as usize];
                    if let Some(r) = ch.new.as_ref().or(ch.old.as_ref()) {
                        let slot = latest.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, r))).or_insert((clock, seq));
                        if clock > slot.0 {
                            *slot = (clock, seq);
                        }
                    }
                }
            }
        }
    });
    latest
}

/// Keeps the clocks of rows whose changes are about to leave the change log (`where_sql`
/// selects the change log rows being trimmed).
pub fn keep_row_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    store(logged_clocks(me, where_sql, args).into_iter().map(|(k, (clock, _))| (k, clock)).collect());
}

/// Records the clock of every row a transaction applied here without a change-log entry of
/// its own (a parked transaction applied by a retry: it was forwarded when it was parked).
pub fn remember(chunks: &[Vec<u8>], hlc: i64, origin: i32) {
    let mut latest: HashMap<(String, String, String), (i64, i32)> = HashMap::new();
    for chunk in chunks.iter().filter_map(|c| decode_chunk(c).ok()) {
        for ch in &chunk.changes {
            let desc = &chunk.relations[ch.rel as usize];
            if let Some(r) = ch.new.as_ref().or(ch.old.as_ref()).filter(|_| !desc.key.is_empty()) {
                latest.insert((desc.schema.clone(), desc.name.clone(), key_text(desc, r)), (hlc, origin));
            }
        }
    }
    store(latest);
}

fn store(latest: HashMap<(String, String, String), (i64, i32)>) {
    if latest.is_empty() {
        return;
    }
    let (mut schemas, mut names, mut keys, mut hlcs, mut origins) = (vec![], vec![], vec![], vec![], vec![]);
    for ((s, n, k), (h, o)) in latest {
        schemas.push(s);
        names.push(n);
        keys.push(k);
        hlcs.push(h);
        origins.push(o);
    }
    Spi::run_with_args(
        "INSERT INTO rbucardo.row_clock (relid, key, hlc, origin)
         SELECT to_regclass(format('%I.%I', s, n)), k, h, o
           FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[]) AS u(s, n, k, h, o)
          WHERE to_regclass(format('%I.%I', s, n)) IS NOT NULL
         ON CONFLICT (relid, key) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin
          WHERE (EXCLUDED.hlc, EXCLUDED.origin) > (row_clock.hlc, row_clock.origin)",
        &[schemas.into(), names.into(), keys.into(), hlcs.into(), origins.into()],
    )
    .expect("keeping row clocks");
}

