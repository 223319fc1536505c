//! Row clocks: the hybrid clock and origin of the version of a row this node holds, which the
//! `latest` rule compares with an incoming version's. The change log holds the clocks of
//! recent changes; `rbucardo.row_clock` keeps those of changes trimmed from it.
//!
//! Clocks are kept per column: a conflict on a row's price compares with the clock of the last
//! change here that set the price, not with a later sale that only touched the stock (which
//! would make each node keep its own price). An insert or delete sets every column.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use crate::base::wire::{view_chunk, ChunkView, DecodeError, Op, RelDesc, RelDescOf, RowChange, RowChangeOf, Value};

/// The replica key's columns in name order: the order its JSON form lists them in.
fn key_order<S: AsRef<str>>(desc: &RelDescOf<S>) -> Vec<u16> {
    let mut key = desc.key.clone();
    key.sort_by(|a, b| desc.columns[*a as usize].as_ref().cmp(desc.columns[*b as usize].as_ref()));
    key
}

/// Writes a row's replica key as JSON text into `out` (emptied first), the form row clocks are
/// kept under (the same as the conflict log's key): an object of the key columns, in name order
/// (`order`, from [`key_order`]), compact, as serde_json prints a map. Written out directly: it
/// is made for every applied and every trimmed row, and building the map (copies of every name
/// and value, a tree) cost more than the rest of keeping its clock.
fn write_key<S: AsRef<str>>(out: &mut Vec<u8>, columns: &[S], order: &[u16], row: &[Option<S>]) {
    out.clear();
    out.push(b'{');
    for (i, &k) in order.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, columns[k as usize].as_ref()).expect("a string serializes");
        out.push(b':');
        serde_json::to_writer(&mut *out, &row[k as usize].as_ref().map(AsRef::as_ref)).expect("a string serializes");
    }
    out.push(b'}');
}

/// A row's replica key as JSON text (see [`write_key`]).
fn key_text(desc: &RelDesc, row: &[Value]) -> String {
    let mut out = Vec::with_capacity(32);
    write_key(&mut out, &desc.columns, &key_order(desc), row);
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
#[derive(Clone, Debug, Default, PartialEq)]
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
fn changed_columns<'a, S: AsRef<str> + PartialEq>(desc: &'a RelDescOf<S>, ch: &RowChangeOf<S>) -> Option<Vec<&'a str>> {
    match (ch.op, ch.old.as_ref(), ch.new.as_ref()) {
        (Op::Update, Some(old), Some(new)) => Some(desc.columns.iter().zip(old.iter().zip(new)).filter(|(_, (o, n))| o != n).map(|(c, _)| c.as_ref()).collect()),
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
        read_logged(me, &format!("{since} AND txid IS DISTINCT FROM pg_catalog.pg_current_xact_id_if_assigned()"), &[], usize::MAX, |gathered| {
            absorb_into(&mut session.rows, gathered)
        });
        let floor = Spi::get_one::<i64>("SELECT pg_catalog.min(seq) FROM rbucardo.change_log").ok().flatten();
        match floor {
            Some(floor) => session.rows.retain(|_, (_, seq)| *seq >= floor),
            None => session.rows.clear(),
        }
        session.mark = mark;
        session.snap = snap;
    });
}

/// A key whose JSON text is longer than this many bytes is kept in `row_clock.key` as
/// `sha256:` and the hex digest of the text: a btree entry holds at most about 2,700 bytes,
/// and a key's JSON text can be several times its values (a control character takes six).
/// Keeping such a key's clock used to fail, and with it every trim after. A JSON text starts
/// with `{`, so a digest never equals a key. Only such keys take the digest's statements.
/// (The upgrade from 0.1.0 merges the long keys it kept into their digests.)
const KEY_AT_MOST: usize = 2000;

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
        APPLIED.with(|a| {
            let mut a = a.borrow_mut();
            if a.0 != xid {
                *a = (xid, HashMap::new());
            }
            // Drained, so the next transaction reuses the map; a row first changed here (most
            // rows) moves its clocks over instead of copying them.
            for (k, c) in self.txn.drain() {
                match a.1.entry(k) {
                    std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().absorb(&c),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(c);
                    }
                }
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
        let sql = if k.2.len() > KEY_AT_MOST {
            "SELECT hlc, origin FROM rbucardo.row_clock
              WHERE relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text))
                AND key IN ('sha256:' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to($3::text, pg_catalog.getdatabaseencoding())), 'hex'),
                            $3::text)  -- as 0.1.0 kept it, until the upgrade digests it
                AND (col = '*' OR $4::text[] IS NULL OR col = ANY ($4::text[]))
              ORDER BY hlc DESC, origin DESC LIMIT 1"
        } else {
            "SELECT hlc, origin FROM rbucardo.row_clock
              WHERE relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text)) AND key = $3
                AND (col = '*' OR $4::text[] IS NULL OR col = ANY ($4::text[]))
              ORDER BY hlc DESC, origin DESC LIMIT 1"
        };
        let kept = Spi::get_two_with_args::<i64, i32>(sql, &[desc.schema.as_str().into(), desc.name.as_str().into(), k.2.as_str().into(), cols.into()])
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

/// Row clocks gathered from changes, per table: each row's clocks by its key text, with the
/// change-log seq of its latest change. A table is named once, not once per row.
#[derive(Default)]
struct Gathered {
    tables: Vec<TableClocks>,
    /// Where each table is in `tables`, by schema, then name (looked up without a copy of
    /// either: once per table of every chunk).
    index: HashMap<String, HashMap<String, usize>>,
    /// Rows held, over every table.
    rows: usize,
}

struct TableClocks {
    schema: String,
    name: String,
    rows: HashMap<String, (RowClock, i64)>,
}

impl Gathered {
    /// Notes the clock of every row `chunk` changes. The larger clock stays: under `latest` the
    /// version with the larger clock is the one the row holds (the log also keeps changes that
    /// lost here, for forwarding). Tables without a replica key keep no clocks. Whenever
    /// `limit` rows are held, they are handed to `take`.
    fn note(&mut self, chunk: &ChunkView, clock: Clock, seq: i64, limit: usize, take: &mut impl FnMut(Gathered)) {
        // Each of the chunk's tables that has a keyed change: where its rows go, and its key's
        // columns in name order.
        let mut slots: Vec<Option<(usize, Vec<u16>)>> = vec![None; chunk.relations.len()];
        let mut key = Vec::with_capacity(32);
        for ch in &chunk.changes {
            let desc = &chunk.relations[ch.rel as usize];
            let Some(row) = ch.new.as_ref().or(ch.old.as_ref()).filter(|_| !desc.key.is_empty()) else { continue };
            let (t, order) = slots[ch.rel as usize].get_or_insert_with(|| (self.table(desc.schema, desc.name), key_order(desc)));
            write_key(&mut key, &desc.columns, order, row);
            let key = std::str::from_utf8(&key).expect("serde_json writes UTF-8");
            let rows = &mut self.tables[*t].rows;
            let slot = match rows.get_mut(key) {
                Some(slot) => slot,
                None => {
                    self.rows += 1;
                    rows.entry(key.to_string()).or_default()
                }
            };
            slot.0.set(changed_columns(desc, ch), clock);
            slot.1 = slot.1.max(seq);
            if self.rows >= limit {
                take(self.drain());
            }
        }
    }

    /// The rows held, taken out; the tables stay where they are, for the rest of a chunk.
    fn drain(&mut self) -> Gathered {
        let tables = self.tables.iter_mut().map(|t| TableClocks { schema: t.schema.clone(), name: t.name.clone(), rows: std::mem::take(&mut t.rows) }).collect();
        // The part is only stored: it needs no index.
        Gathered { tables, index: HashMap::new(), rows: std::mem::replace(&mut self.rows, 0) }
    }

    fn table(&mut self, schema: &str, name: &str) -> usize {
        if let Some(&t) = self.index.get(schema).and_then(|names| names.get(name)) {
            return t;
        }
        let t = self.tables.len();
        self.index.entry(schema.to_string()).or_default().insert(name.to_string(), t);
        self.tables.push(TableClocks { schema: schema.to_string(), name: name.to_string(), rows: HashMap::new() });
        t
    }
}

/// Merges gathered clocks into `rows`, keeping the larger clock of each column (as
/// `row_clock` keeps them) and the latest seq.
fn absorb_into(rows: &mut HashMap<Key, (RowClock, i64)>, gathered: Gathered) {
    for table in gathered.tables {
        for (key, (clock, seq)) in table.rows {
            let slot = rows.entry((table.schema.clone(), table.name.clone(), key)).or_default();
            slot.0.absorb(&clock);
            slot.1 = slot.1.max(seq);
        }
    }
}

/// The latest clock of every row changed by the change log rows that `where_sql` selects,
/// handed to `take` whenever `limit` rows are held, and once at the end.
fn read_logged(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid], limit: usize, mut take: impl FnMut(Gathered)) {
    let mut gathered = Gathered::default();
    // Each log row's bytes are read (and detoasted) in a context emptied after the row: a trim
    // of a bulk load, thousands of 8 MB chunks, holds one of them at a time.
    let mut cx = PgMemoryContexts::new("rbucardo row clocks");
    // Log rows this build cannot read, and the first one's seq and why.
    let mut unread: (usize, Option<(i64, DecodeError)>) = (0, None);
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
        let mut rows = c.select(sql.as_str(), None, args).expect("reading the change log");
        while rows.next().is_some() {
            let hlc = rows.get::<i64>(2).unwrap().unwrap_or(0);
            // NULL origin: this node's own change.
            let origin = rows.get::<i32>(3).unwrap().unwrap_or(me);
            let seq = rows.get::<i64>(4).unwrap().unwrap_or(0);
            let Some(data) = rows.get_datum_by_ordinal(1).unwrap() else { continue };
            // SAFETY: `data` is a bytea of the current row; its detoasted copy is made in `cx`
            // (pgrx's typed getters would make it in the caller's context, for good), and the
            // bytes and the view borrowing them are dropped before `cx` is reset.
            unsafe {
                cx.switch_to(|_| {
                    let bytes = pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(data.cast_mut_ptr()));
                    match view_chunk(bytes) {
                        Ok(chunk) => gathered.note(&chunk, (hlc, origin), seq, limit, &mut take),
                        Err(e) => {
                            unread.0 += 1;
                            unread.1.get_or_insert((seq, e));
                        }
                    }
                });
                cx.reset();
            }
        }
    });
    take(gathered);
    // Not chunks this build reads: their rows' clocks cannot be kept. Said once per read, where
    // an operator sees it, rather than skipped in silence.
    if let (n, Some((seq, e))) = unread {
        warning!("rbucardo: the row clocks of {n} change log row(s) cannot be read (the first, seq {seq}: {:?})", e.to_string());
    }
}

/// At most this many rows' clocks are held while they are being kept: a trim of a bulk load
/// stores them in parts rather than holding a row per loaded row in memory.
const KEEP_AT_ONCE: usize = 100_000;

/// Keeps the clocks of rows whose changes are about to leave the change log (`where_sql`
/// selects the change log rows being trimmed).
pub fn keep_row_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) {
    read_logged(me, where_sql, args, KEEP_AT_ONCE, store);
}

/// Records the clock of every row a transaction applied here without a change-log entry of
/// its own (a parked transaction applied by a retry: it was forwarded when it was parked).
pub fn remember(chunks: &[Vec<u8>], hlc: i64, origin: i32) {
    let mut gathered = Gathered::default();
    for bytes in chunks {
        match view_chunk(bytes) {
            Ok(chunk) => gathered.note(&chunk, (hlc, origin), 0, KEEP_AT_ONCE, &mut store),
            // Checked when it was parked; said rather than skipped in silence all the same.
            Err(e) => warning!("rbucardo: the row clocks of a retried transaction cannot be read: {:?}", e.to_string()),
        }
    }
    store(gathered);
}

/// Keeps row clocks in `row_clock`, per column as they were gathered. One statement per
/// table, which is resolved once (resolving the name per clock cost about as much as keeping
/// the clock), with the keys in order: each lands next to the one before in the index.
fn store(mut gathered: Gathered) {
    // Tables in name order: two stores at once (a trim and a retry) lock row clocks in the
    // same order, at least within one part each. (Should stores of several parts still
    // deadlock, one transaction is aborted and done again later: nothing is lost.)
    gathered.tables.sort_unstable_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
    for table in gathered.tables {
        if table.rows.is_empty() {
            continue;
        }
        // A table dropped since keeps no clocks.
        let Ok(Some(relid)) = Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text))::pg_catalog.oid",
            &[table.schema.as_str().into(), table.name.as_str().into()],
        ) else {
            continue;
        };
        let mut rows: Vec<(String, RowClock)> = table.rows.into_iter().map(|(k, (clock, _))| (k, clock)).collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // Keys too long for the index (rare) are kept by their digest, in a statement of their own.
        let (mut short, mut long) = (Entries::default(), Entries::default());
        for (k, mut clock) in rows {
            // A column named `*` shares the whole row's entry (a lookup reads it as such): one
            // entry, or the statement would update the same row twice and fail every trim.
            if let Some(star) = clock.cols.remove("*") {
                clock.all = clock.all.max(Some(star));
            }
            // Columns in order too (a row's are in a map).
            let mut by_col: Vec<(String, Clock)> = clock.cols.into_iter().collect();
            by_col.sort_unstable();
            let to = if k.len() > KEY_AT_MOST { &mut long } else { &mut short };
            for (col, (h, o)) in clock.all.map(|c| ("*".to_string(), c)).into_iter().chain(by_col) {
                to.keys.push(k.clone());
                to.cols.push(col);
                to.hlcs.push(h);
                to.origins.push(o);
            }
        }
        short.upsert(relid, "u.k");
        long.upsert(relid, "'sha256:' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(u.k, pg_catalog.getdatabaseencoding())), 'hex')");
    }
}

/// Row clock entries of one table, as the arrays `store` upserts.
#[derive(Default)]
struct Entries {
    keys: Vec<String>,
    cols: Vec<String>,
    hlcs: Vec<i64>,
    origins: Vec<i32>,
}

impl Entries {
    /// Upserts the entries (if any) into `row_clock`, each key kept as the SQL `key_sql` of
    /// its text `u.k` makes it; the larger clock stays.
    fn upsert(self, relid: pg_sys::Oid, key_sql: &str) {
        if self.keys.is_empty() {
            return;
        }
        Spi::run_with_args(
            &format!(
                "INSERT INTO rbucardo.row_clock AS r (relid, key, col, hlc, origin)
                 SELECT $1, {key_sql}, u.c, u.h, u.o FROM unnest($2::text[], $3::text[], $4::bigint[], $5::int[]) AS u(k, c, h, o)  -- several arrays: FROM-clause syntax, not a function
                 ON CONFLICT (relid, key, col) DO UPDATE SET hlc = EXCLUDED.hlc, origin = EXCLUDED.origin
                  WHERE (EXCLUDED.hlc, EXCLUDED.origin) > (r.hlc, r.origin)"
            ),
            &[relid.into(), self.keys.into(), self.cols.into(), self.hlcs.into(), self.origins.into()],
        )
        .expect("keeping row clocks");
    }
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

    /// Clocks gathered in parts (a part every two rows, the same rows on both sides of a cut,
    /// two tables) keep, merged by the larger clock as `row_clock` merges them, what one
    /// gathering keeps.
    #[test]
    fn clocks_gathered_in_parts_merge_to_the_whole() {
        use crate::base::wire::{encode_chunk, view_chunk, Chunk};
        let t = RelDesc { schema: "public".into(), name: "t".into(), columns: vec!["id".into(), "price".into(), "stock".into()], key: vec![0] };
        let u = RelDesc { name: "u".into(), ..t.clone() };
        let r = |id: &str, price: &str, stock: &str| Some(vec![Some(id.to_string()), Some(price.to_string()), Some(stock.to_string())]);
        let ch = |ordinal, rel, op, old, new| RowChange { ordinal, rel, op, old, new };
        let first = encode_chunk(&Chunk {
            relations: vec![t.clone(), u.clone()],
            changes: vec![
                ch(1, 0, Op::Insert, None, r("1", "1", "1")),
                ch(2, 1, Op::Insert, None, r("1", "1", "1")),
                ch(3, 0, Op::Insert, None, r("2", "1", "1")),
                ch(4, 0, Op::Update, r("1", "1", "1"), r("1", "2", "1")),
                ch(5, 1, Op::Delete, r("1", "1", "1"), None),
            ],
        });
        let second = encode_chunk(&Chunk {
            relations: vec![u, t],
            changes: vec![ch(1, 1, Op::Update, r("2", "1", "1"), r("2", "1", "5")), ch(2, 0, Op::Insert, None, r("1", "1", "1")), ch(3, 1, Op::Update, r("1", "2", "1"), r("1", "2", "3"))],
        });
        let chunks = [(view_chunk(&first).unwrap(), (100, 1), 7), (view_chunk(&second).unwrap(), (200, 2), 9)];
        let merged = |parts: Vec<Gathered>| {
            let mut all: HashMap<Key, (RowClock, i64)> = HashMap::new();
            for part in parts {
                assert!(part.rows == part.tables.iter().map(|t| t.rows.len()).sum::<usize>(), "rows counted as held");
                absorb_into(&mut all, part);
            }
            all
        };
        let mut whole = Gathered::default();
        for (view, clock, seq) in &chunks {
            whole.note(view, *clock, *seq, usize::MAX, &mut |_| panic!("no limit, no part"));
        }
        let mut parts = vec![];
        let mut rest = Gathered::default();
        for (view, clock, seq) in &chunks {
            rest.note(view, *clock, *seq, 2, &mut |part: Gathered| {
                assert_eq!(part.rows, 2, "a part is handed over when the limit is reached");
                parts.push(part);
            });
        }
        parts.push(rest);
        assert!(parts.len() >= 3, "cut into parts, the same rows on both sides");
        let whole = merged(vec![whole]);
        assert_eq!(whole.len(), 3, "rows 1 and 2 of t, row 1 of u");
        let of = |table: &str, col: &str| whole[&("public".to_string(), table.to_string(), r#"{"id":"1"}"#.to_string())].0.of(Some(&[col]));
        assert_eq!((of("t", "price"), of("t", "stock")), (Some((100, 1)), Some((200, 2))), "t row 1: price set by the first chunk, stock by the second");
        assert_eq!(of("u", "price"), Some((200, 2)), "u row 1: deleted, then inserted again by the second chunk");
        assert_eq!(merged(parts), whole);
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
