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

/// The clocks of the local versions of rows, for the `latest` rule: the last change to each row
/// still in the change log (read once per batch, when the first conflict needs it, then kept up
/// to date as the batch applies), else `rbucardo.row_clock`.
pub struct Clocks {
    me: i32,
    pending: Option<HashMap<(String, String, String), (i64, i32)>>,
}

impl Clocks {
    pub fn new(me: i32) -> Clocks {
        Clocks { me, pending: None }
    }

    fn load(&mut self) -> &mut HashMap<(String, String, String), (i64, i32)> {
        let me = self.me;
        self.pending.get_or_insert_with(|| logged_clocks(me, "true", &[]))
    }

    /// The clock of the local version of the row with this key.
    pub fn local(&mut self, desc: &RelDesc, key: &serde_json::Value) -> Option<(i64, i32)> {
        let k = (desc.schema.clone(), desc.name.clone(), key.to_string());
        if let Some(c) = self.load().get(&k) {
            return Some(*c);
        }
        Spi::get_two_with_args::<i64, i32>(
            "SELECT hlc, origin FROM rbucardo.row_clock
              WHERE relid = pg_catalog.to_regclass(pg_catalog.format('%I.%I', $1::text, $2::text)) AND key = $3",
            &[desc.schema.as_str().into(), desc.name.as_str().into(), k.2.as_str().into()],
        )
        .ok()
        .and_then(|(h, o)| Some((h?, o?)))
    }

    /// Records an applied change's clock for its row. The larger clock stays: under `latest` the
    /// version with the larger clock is the one the row holds.
    pub fn note(&mut self, desc: &RelDesc, row: &[Value], clock: (i64, i32)) {
        if let Some(map) = self.pending.as_mut() {
            let slot = map.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, row))).or_insert(clock);
            *slot = (*slot).max(clock);
        }
    }
}

/// The latest clock of every row changed by the change log rows that `where_sql` selects.
/// The largest clock per row: the log also keeps changes that lost here, for forwarding, and
/// the row holds the version with the largest clock.
fn logged_clocks(me: i32, where_sql: &str, args: &[pgrx::datum::DatumWithOid]) -> HashMap<(String, String, String), (i64, i32)> {
    let mut latest: HashMap<(String, String, String), (i64, i32)> = HashMap::new();
    Spi::connect(|c| {
        // A parked transaction is in the log (forwarded) but not applied here: its clock is not
        // that of any local version until a retry applies it (see `remember`).
        let sql = format!(
            "SELECT data, hlc, origin FROM rbucardo.change_log
              WHERE ({where_sql})
                AND NOT EXISTS (SELECT 1 FROM rbucardo.exceptions e
                                 WHERE e.resolved_at IS NULL AND e.kind = 'constraint' AND e.origin = change_log.origin
                                   AND e.origin_tick = change_log.origin_tick AND e.origin_seq = change_log.origin_seq)"
        );
        for row in c.select(sql.as_str(), None, args).expect("reading the change log") {
            let data = row.get::<Vec<u8>>(1).unwrap().unwrap_or_default();
            let clock = (row.get::<i64>(2).unwrap().unwrap_or(0), row.get::<i32>(3).unwrap().unwrap_or(me));
            if let Ok(chunk) = decode_chunk(&data) {
                for ch in &chunk.changes {
                    let desc = &chunk.relations[ch.rel as usize];
                    if let Some(r) = ch.new.as_ref().or(ch.old.as_ref()) {
                        let slot = latest.entry((desc.schema.clone(), desc.name.clone(), key_text(desc, r))).or_insert(clock);
                        *slot = (*slot).max(clock);
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
    store(logged_clocks(me, where_sql, args));
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

