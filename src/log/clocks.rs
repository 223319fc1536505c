//! Row clocks: the hybrid clock and origin of the version of a row this node holds, which the
//! `latest` rule compares with an incoming version's. The change log holds the clocks of
//! recent changes; `rbucardo.row_clock` keeps those of changes trimmed from it.
//!
//! Clocks are kept per column: a conflict on a row's price compares with the clock of the last
//! change here that set the price, not with a later sale that only touched the stock (which
//! would make each node keep its own price). An insert or delete sets every column.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::base::wire::{decode_chunk, Op, RelDesc, RowChange, Value};

/// A row's replica key as JSON text, the form row clocks are kept under (the same as the
/// conflict log's key): an object of the key columns, in name order, compact, as serde_json
/// prints a map. Written out directly: it is made for every applied row, and building the map
/// (copies of every name and value, a tree) cost more than the rest of keeping its clock.
fn key_text(desc: &RelDesc, row: &[Value]) -> String {
    let mut key = desc.key.clone();
    key.sort_by(|a, b| desc.columns[*a as usize].cmp(&desc.columns[*b as usize]));
    let mut out = Vec::with_capacity(32);
    out.push(b'{');
    for (i, &k) in key.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &desc.columns[k as usize]).expect("a string serializes");
        out.push(b':');
        serde_json::to_writer(&mut out, &row[k as usize]).expect("a string serializes");
    }
    out.push(b'}');
    String::from_utf8(out).expect("serde_json writes UTF-8")
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

type Clock = (i64, i32);

/// The clocks of one row's columns: `all` for changes that set every column (inserts, deletes,
/// clocks kept per row), `cols` for updates, by column name.
#[derive(Clone, Debug, Default)]
pub struct RowClock {
    all: Option<Clock>,
    cols: HashMap<String, Clock>,
}

impl RowClock {
    /// Records a change that set `changed` (None: every column).
    fn set(&mut self, changed: Option<Vec<&str>>, clock: Clock) {
        match changed {
            None => self.all = self.all.max(Some(clock)),
            Some(cols) => {
                for c in cols {
                    let slot = self.cols.entry(c.to_string()).or_insert(clock);
                    *slot = (*slot).max(clock);
                }
            }
        }
    }

    fn absorb(&mut self, other: &RowClock) {
        self.all = self.all.max(other.all);
        for (c, clock) in &other.cols {
            let slot = self.cols.entry(c.clone()).or_insert(*clock);
            *slot = (*slot).max(*clock);
        }
    }

    /// The clock of the version of `columns` (None: of any column).
    fn of(&self, columns: Option<&[&str]>) -> Option<Clock> {
        let cols = match columns {
            None => self.cols.values().copied().max(),
            Some(names) => names.iter().filter_map(|c| self.cols.get(*c).copied()).max(),
        };
        self.all.max(cols)
    }
}

/// The columns a change set: every column for an insert or delete, those whose value changed
/// for an update.
fn changed_columns<'a>(desc: &'a RelDesc, ch: &RowChange) -> Option<Vec<&'a str>> {
    match (ch.op, ch.old.as_ref(), ch.new.as_ref()) {
        (Op::Update, Some(old), Some(new)) => Some(desc.columns.iter().zip(old.iter().zip(new)).filter(|(_, (o, n))| o != n).map(|(c, _)| c.as_str()).collect()),
        _ => None,
    }
}

/// The clocks of the rows in the change log, as this backend last read them: read whole once,
/// then only what committed since (by transaction id), and forgotten once trimmed (their clocks
/// are in `row_clock` then). A hub holding a week of log for an offline branch decodes it once
/// per session, not once per batch.
struct Session {
    /// The change log's oid: a re-created extension starts afresh.
    log: pg_sys::Oid,
    /// Transactions from this id on may have committed since the last read.
    mark: i64,
    /// The snapshot of the last read: while it is the current one, nothing committed since.
    snap: String,
    /// Clocks of each row's columns, and the change-log seq of its latest change.
    rows: HashMap<Key, (RowClock, i64)>,
}

thread_local! {
    static SESSION: std::cell::RefCell<Option<Session>> = const { std::cell::RefCell::new(None) };
    /// Clocks of the changes applied so far in the current transaction (its top-level xid,
    /// and the clocks), which the session's read leaves out: every applier of the transaction
    /// sees them (a batch, the parked transactions retried after it, another push).
    static APPLIED: std::cell::RefCell<(pg_sys::TransactionId, HashMap<Key, RowClock>)> = std::cell::RefCell::new((pg_sys::InvalidTransactionId, HashMap::new()));
}

/// This transaction's applied clocks, as they stand (to put back if what follows is undone).
pub struct Applied(HashMap<Key, RowClock>);

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

fn applied_clock(k: &Key, columns: Option<&[&str]>) -> Option<Clock> {
    let xid = top_xid();
    APPLIED.with(|a| {
        let a = a.borrow();
        if a.0 == xid { a.1.get(k).and_then(|r| r.of(columns)) } else { None }
    })
}

/// Brings the session's clocks up to date with the committed change log.
fn refresh(me: i32) {
    // Nothing committed since the last read (the common case when a batch meets several
    // conflicts in a row): nothing to read.
    let snap = Spi::get_one::<String>("SELECT pg_catalog.pg_current_snapshot()::text").ok().flatten().unwrap_or_default();
    if SESSION.with(|s| s.borrow().as_ref().is_some_and(|s| s.snap == snap)) {
        return;
    }
    let log = Spi::get_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass('rbucardo.change_log')::pg_catalog.oid").ok().flatten().unwrap_or(pg_sys::InvalidOid);
    // Taken before the read: a transaction running now has an id at or above it.
    let mark = Spi::get_one::<i64>("SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint").ok().flatten().unwrap_or(0);
    SESSION.with(|cell| {
        let mut cell = cell.borrow_mut();
        let fresh = cell.as_ref().is_none_or(|s| s.log != log);
        if fresh {
            *cell = Some(Session { log, mark: 0, snap: String::new(), rows: HashMap::new() });
        }
        let session = cell.as_mut().unwrap();
        // This transaction's own rows are not read: they are not committed (the batch notes
        // its changes itself).
        let since = if fresh { "true".to_string() } else { format!("txid >= '{}'::pg_catalog.xid8", session.mark) };
        let rows = logged_clocks(me, &format!("{since} AND txid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()"), &[]);
        for (k, (clock, seq)) in rows {
            let slot = session.rows.entry(k).or_default();
            slot.0.absorb(&clock);
            slot.1 = slot.1.max(seq);
        }
        let floor = Spi::get_one::<i64>("SELECT pg_catalog.min(seq) FROM rbucardo.change_log").ok().flatten();
        match floor {
            Some(floor) => session.rows.retain(|_, (_, seq)| *seq >= floor),
            None => session.rows.clear(),
        }
        session.mark = mark;
        session.snap = snap;
    });
}

/// The clocks of the local versions of rows, for the `latest` rule: those of this batch's own
/// changes, else the latest change to each row still in the change log, else
/// `rbucardo.row_clock`.
pub struct Clocks {
    me: i32,
    /// The current remote transaction's changes, until `commit_txn` (or dropped with it).
    txn: HashMap<Key, RowClock>,
}

impl Clocks {
    pub fn new(me: i32) -> Clocks {
        Clocks { me, txn: HashMap::new() }
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
                a.1.entry(k).or_default().absorb(&c);
            }
        });
    }

    /// The current remote transaction was undone (parked): its clocks never counted.
    pub fn discard_txn(&mut self) {
        self.txn.clear();
    }

    /// The clock of the local version of `columns` (None: of the row) of the row with this key.
    ///
    /// The caller has locked the row, so every transaction that wrote the version it read has
    /// committed: the session's clocks are brought up to date now (with what committed since
    /// the last call only), not once per batch. A user transaction that changed the row after
    /// the batch started, and held the row until it committed, would otherwise be judged by
    /// the row's previous clock, and this node alone would let an older change win.
    pub fn local(&mut self, desc: &RelDesc, key: &serde_json::Value, columns: Option<&[&str]>) -> Option<Clock> {
        let k = (desc.schema.clone(), desc.name.clone(), key.to_string());
        refresh(self.me);
        let logged = SESSION.with(|s| s.borrow().as_ref().and_then(|s| s.rows.get(&k).and_then(|(c, _)| c.of(columns))));
        let mine = self.txn.get(&k).and_then(|r| r.of(columns)).max(applied_clock(&k, columns));
        // Kept clocks count too: a trimmed change, or a parked transaction a retry applied.
        let cols: Option<Vec<String>> = columns.map(|c| c.iter().map(|s| s.to_string()).collect());
        let kept = Spi::get_two_with_args::<i64, i32>(
            "SELECT hlc, origin FROM rbucardo.row_clock
              WHERE relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text)) AND key = $3
                AND (col = '*' OR $4::text[] IS NULL OR col = ANY ($4::text[]))
              ORDER BY hlc DESC, origin DESC LIMIT 1",
            &[desc.schema.as_str().into(), desc.name.as_str().into(), k.2.as_str().into(), cols.into()],
        )
        .ok()
        .and_then(|(h, o)| Some((h?, o?)));
        logged.max(mine).max(kept)
    }

    /// Records the clock of a change this node made itself while applying (a unique rename),
    /// captured with `hlc`.
    pub fn note_own(&mut self, desc: &RelDesc, ch: &RowChange, hlc: i64) {
        let me = self.me;
        self.note(desc, ch, (hlc, me));
    }

    /// Records an applied change's clock for the columns it set. The larger clock stays: under
    /// `latest` the version with the larger clock is the one the row holds.
    pub fn note(&mut self, desc: &RelDesc, ch: &RowChange, clock: Clock) {
        if let Some(row) = ch.new.as_ref().or(ch.old.as_ref()) {
            self.txn.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, row))).or_default().set(changed_columns(desc, ch), clock);
        }
    }
}

/// The latest clock of every row changed by the change log rows that `where_sql` selects.
/// The largest clock per row: the log also keeps changes that lost here, for forwarding, and
/// the row holds the version with the largest clock.
fn logged_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) -> HashMap<Key, (RowClock, i64)> {
    let mut latest: HashMap<Key, (RowClock, i64)> = HashMap::new();
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
                        let slot = latest.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, r))).or_default();
                        slot.0.set(changed_columns(desc, ch), clock);
                        slot.1 = slot.1.max(seq);
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
    let mut latest: HashMap<Key, RowClock> = HashMap::new();
    for chunk in chunks.iter().filter_map(|c| decode_chunk(c).ok()) {
        for ch in &chunk.changes {
            let desc = &chunk.relations[ch.rel as usize];
            if let Some(r) = ch.new.as_ref().or(ch.old.as_ref()).filter(|_| !desc.key.is_empty()) {
                latest.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, r))).or_default().set(changed_columns(desc, ch), (hlc, origin));
            }
        }
    }
    store(latest);
}

/// Keeps row clocks in `row_clock`, per column as they were kept in memory.
fn store(latest: HashMap<Key, RowClock>) {
    if latest.is_empty() {
        return;
    }
    // Each table is named once and resolved once: resolving the name per clock cost about
    // as much as keeping the clock (a trim keeps tens of thousands under pgbench).
    let mut tables: Vec<(String, String)> = Vec::new();
    let (mut table_of, mut keys, mut cols, mut hlcs, mut origins) = (vec![], vec![], vec![], vec![], vec![]);
    for ((s, n, k), clock) in latest {
        let t = match tables.iter().position(|(ts, tn)| *ts == s && *tn == n) {
            Some(t) => t,
            None => {
                tables.push((s, n));
                tables.len() - 1
            }
        };
        let entries = clock.all.map(|c| ("*".to_string(), c)).into_iter().chain(clock.cols);
        for (col, (h, o)) in entries {
            table_of.push(t as i32 + 1);
            keys.push(k.clone());
            cols.push(col);
            hlcs.push(h);
            origins.push(o);
        }
    }
    let (schemas, names): (Vec<String>, Vec<String>) = tables.into_iter().unzip();
    Spi::run_with_args(
        "WITH t AS MATERIALIZED (
             SELECT x.i::int AS i, to_regclass(format('%I.%I', x.s, x.n)) AS relid
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS x(s, n, i))
         INSERT INTO rbucardo.row_clock (relid, key, col, hlc, origin)
         SELECT t.relid, u.k, u.c, u.h, u.o
           FROM unnest($3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[]) AS u(t, k, c, h, o)
           JOIN t ON t.i = u.t
          WHERE t.relid IS NOT NULL
         ON CONFLICT (relid, key, col) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin
          WHERE (EXCLUDED.hlc, EXCLUDED.origin) > (row_clock.hlc, row_clock.origin)",
        &[schemas.into(), names.into(), table_of.into(), keys.into(), cols.into(), hlcs.into(), origins.into()],
    )
    .expect("keeping row clocks");
}


#[cfg(test)]
mod tests {
    use super::*;

    /// Row clocks already kept use serde_json's form of the key: the hand-written one must be
    /// byte for byte the same, whatever the key's column order, NULLs or characters to escape.
    #[test]
    fn key_text_is_serde_jsons_map() {
        let serde_form = |desc: &RelDesc, row: &[Value]| {
            serde_json::Value::Object(
                desc.key
                    .iter()
                    .map(|&k| (desc.columns[k as usize].clone(), row[k as usize].clone().map_or(serde_json::Value::Null, serde_json::Value::String)))
                    .collect(),
            )
            .to_string()
        };
        let desc = |columns: &[&str], key: &[u16]| RelDesc {
            schema: "public".into(),
            name: "t".into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            key: key.to_vec(),
        };
        let cases: Vec<(RelDesc, Vec<Value>)> = vec![
            (desc(&["id", "name"], &[0]), vec![Some("42".into()), Some("x".into())]),
            (desc(&["z", "b", "a"], &[0, 2, 1]), vec![Some("1".into()), None, Some("3".into())]),
            (desc(&["k\"q\n", "Ä", "a"], &[1, 0, 2]), vec![Some("tab\there \"quoted\" \\ /\u{1}\u{7f}".into()), Some("é€😀".into()), Some(String::new())]),
            (desc(&["B", "a", "_"], &[0, 1, 2]), vec![None, None, None]),
        ];
        for (d, row) in &cases {
            assert_eq!(key_text(d, row), serde_form(d, row), "key of {:?}", d.columns);
        }
    }

    /// A sale after a price change does not make the row's price newer.
    #[test]
    fn clocks_are_per_column() {
        let mut r = RowClock::default();
        r.set(None, (100, 1)); // insert
        r.set(Some(vec!["price"]), (200, 2));
        r.set(Some(vec!["stock"]), (300, 2));
        assert_eq!(r.of(Some(&["price"])), Some((200, 2)));
        assert_eq!(r.of(Some(&["name"])), Some((100, 1)), "an untouched column has the insert's clock");
        assert_eq!(r.of(None), Some((300, 2)));
        let mut other = RowClock::default();
        other.set(Some(vec!["price"]), (250, 3));
        r.absorb(&other);
        assert_eq!(r.of(Some(&["price", "name"])), Some((250, 3)));
    }
}
