//! Collision-free sequences (invariant 4): every sequence of a herd hands out values that no
//! other node can hand out, so two branches that are cut off from each other never create the
//! same serial id.
//!
//! Owns `rbucardo.herd_sequence` and `rbucardo.sync_sequence_strategy` (sql/sequences.sql), the
//! view `rbucardo.sequences` and the event trigger `rbucardo_sequences`. Strategies:
//!
//! - `interleave`: node k hands out values ≡ k (mod [`MAX_NODES`]), `INCREMENT BY 64`; fits
//!   Odoo's int4 serials. Node ids must be below 64.
//! - `range`: node k hands out values from its own block `[k·B, (k+1)·B − 1]`, where
//!   `B = type max / 64`; MINVALUE/MAXVALUE are the block, so exhausting it is an error instead
//!   of a collision. Block 0 is nobody's: ids that existed before replication live there.
//! - `snowflake`: [`snowflake_nextval`] builds bigint ids from time, node id and a counter; the
//!   sequences that feed it are left as they are.
//!
//! Whatever the strategy, a sequence is re-based above every value already in use (its own
//! last value and the maximum of every integer column that uses it), so a cluster cloned from
//! the main server can be switched on without a collision. See docs/sequences.md.

use pgrx::prelude::*;

use crate::base::error::raise;

/// Nodes an interleaved or range-partitioned sequence is split among; node ids must be below it.
pub const MAX_NODES: i64 = 64;
/// Sequence strategies a sync accepts.
pub const STRATEGIES: &[&str] = &["interleave", "range", "snowflake"];
/// Snowflake ids count milliseconds from 2024-01-01 00:00:00 UTC.
pub const SNOWFLAKE_EPOCH_MS: i64 = 1_704_067_200_000;
pub const SNOWFLAKE_NODE_BITS: u32 = 10;
pub const SNOWFLAKE_COUNTER_BITS: u32 = 12;

// ---------------------------------------------------------------------------------------------
// Arithmetic (pure, unit-tested below).

/// The smallest value above `floor`, at least `min`, that is congruent to `node` modulo
/// [`MAX_NODES`]: where an interleaved sequence of node `node` restarts.
pub fn interleave_first(floor: i64, node: i64, min: i64) -> i128 {
    let from = (floor as i128 + 1).max(min as i128);
    let n = MAX_NODES as i128;
    let r = node as i128 % n;
    from + (r - from % n).rem_euclid(n)
}

/// Block size of a range-partitioned sequence whose type ends at `type_max`.
pub fn range_block_size(type_max: i64) -> i64 {
    type_max / MAX_NODES
}

/// Node `node`'s block, `(first, last)`, for a sequence whose type ends at `type_max`.
pub fn range_block(node: i64, type_max: i64) -> (i64, i64) {
    let b = range_block_size(type_max);
    (node * b, (node + 1) * b - 1)
}

/// A snowflake id: milliseconds since [`SNOWFLAKE_EPOCH_MS`] (41 bits), node id (10 bits),
/// counter (12 bits, taken modulo 4096).
pub fn snowflake(ms_since_epoch: i64, node: i64, counter: i64) -> i64 {
    let counter_mask = (1i64 << SNOWFLAKE_COUNTER_BITS) - 1;
    let node_mask = (1i64 << SNOWFLAKE_NODE_BITS) - 1;
    (ms_since_epoch.max(0) << (SNOWFLAKE_NODE_BITS + SNOWFLAKE_COUNTER_BITS))
        | ((node & node_mask) << SNOWFLAKE_COUNTER_BITS)
        | (counter & counter_mask)
}

/// The parts of a snowflake id: (milliseconds since the epoch, node id, counter).
pub fn snowflake_split(id: i64) -> (i64, i64, i64) {
    let ms = id >> (SNOWFLAKE_NODE_BITS + SNOWFLAKE_COUNTER_BITS);
    let node = (id >> SNOWFLAKE_COUNTER_BITS) & ((1 << SNOWFLAKE_NODE_BITS) - 1);
    let counter = id & ((1 << SNOWFLAKE_COUNTER_BITS) - 1);
    (ms, node, counter)
}

fn type_max(typ: &str) -> i64 {
    match typ {
        "smallint" => i16::MAX as i64,
        "integer" => i32::MAX as i64,
        _ => i64::MAX,
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the catalog.

fn check_strategy(strategy: &str) {
    if !STRATEGIES.contains(&strategy) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("unknown sequence strategy {strategy:?}"),
            format!("Use one of: {}.", STRATEGIES.join(", ")),
        );
    }
}

/// The sequence strategy of the syncs of a herd; `interleave` while no sync uses it.
pub fn herd_strategy(herd: &str) -> String {
    Spi::get_one_with_args::<String>(
        "SELECT ss.strategy FROM rbucardo.sync s JOIN rbucardo.sync_sequence_strategy ss ON ss.sync = s.name
          WHERE s.herd = $1 ORDER BY s.name LIMIT 1",
        &[herd.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| "interleave".into())
}

/// How a column uses a sequence.
#[derive(Clone, Debug)]
struct Use {
    table: String,
    column: String,
    /// int2/int4/int8/numeric: its values count when re-basing.
    integer: bool,
    /// Its default calls snowflake_nextval (and nothing else uses the sequence on this column).
    snowflake: bool,
    /// A text column whose default is `'PREFIX' || nextval(...)`: the number after the prefix
    /// counts when re-basing.
    prefix: Option<String>,
}

/// Every column of an ordinary or partitioned table that uses the sequence: as its default
/// (serial, `nextval('s')`, `'POS/' || nextval('s')`, snowflake_nextval), as its identity, or
/// as the owner of the sequence.
fn uses_of(seq: pg_sys::Oid) -> Vec<Use> {
    Spi::connect(|c| {
        c.select(
            "WITH cols AS (
                 SELECT ad.adrelid AS rel, ad.adnum AS att FROM pg_depend d
                   JOIN pg_attrdef ad ON ad.oid = d.objid
                  WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = $1
                 UNION
                 SELECT d.refobjid, d.refobjsubid FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = $1 AND d.refclassid = 'pg_class'::regclass
                    AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i'))
             SELECT cl.oid::regclass::text, quote_ident(a.attname),
                    a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'numeric'::regtype),
                    a.attidentity = '' AND coalesce(pg_get_expr(ad.adbin, ad.adrelid) LIKE '%snowflake_nextval(%', false),
                    replace(substring(pg_get_expr(ad.adbin, ad.adrelid)
                                      FROM $re$^\\('((?:[^']|'')*)'::(?:text|character varying) \\|\\| nextval\\($re$), '''''', '''')
               FROM cols JOIN pg_class cl ON cl.oid = cols.rel
               JOIN pg_attribute a ON a.attrelid = cols.rel AND a.attnum = cols.att AND NOT a.attisdropped
               LEFT JOIN pg_attrdef ad ON ad.adrelid = cols.rel AND ad.adnum = cols.att
              WHERE cl.relkind IN ('r', 'p')
              ORDER BY 1, 2",
            None,
            &[seq.into()],
        )
        .unwrap()
        .map(|r| Use {
            table: r.get(1).unwrap().unwrap(),
            column: r.get(2).unwrap().unwrap(),
            integer: r.get(3).unwrap().unwrap(),
            snowflake: r.get(4).unwrap().unwrap(),
            prefix: r.get(5).unwrap(),
        })
        .collect()
    })
}

/// Sequences a table uses: owned by it (serial, identity) or named in its column defaults.
pub fn sequences_of_table(tbl: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    Spi::connect(|c| {
        c.select(
            "SELECT DISTINCT s.oid FROM (
                 SELECT d.refobjid AS seq FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                  WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND ad.adrelid = $1
                 UNION
                 SELECT d.objid FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                    AND d.refobjid = $1 AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')) x
               JOIN pg_class s ON s.oid = x.seq AND s.relkind = 'S'
              ORDER BY 1",
            None,
            &[tbl.into()],
        )
        .unwrap()
        .map(|r| r.get::<pg_sys::Oid>(1).unwrap().unwrap())
        .collect()
    })
}

#[derive(Clone, Debug)]
struct SeqInfo {
    name: String,
    typ: String,
    increment: i64,
    min: i64,
    max: i64,
    cycle: bool,
    temp: bool,
    /// The highest value the sequence has handed out (or would be just below its next value).
    floor: i64,
}

fn seq_info(seq: pg_sys::Oid) -> Option<SeqInfo> {
    let row = Spi::connect(|c| {
        c.select(
            "SELECT c.oid::regclass::text, format_type(p.seqtypid, NULL), p.seqincrement, p.seqmin, p.seqmax,
                    p.seqcycle, c.relpersistence = 't'
               FROM pg_class c JOIN pg_sequence p ON p.seqrelid = c.oid WHERE c.oid = $1",
            None,
            &[seq.into()],
        )
        .unwrap()
        .next()
        .map(|r| {
            (
                r.get::<String>(1).unwrap().unwrap(),
                r.get::<String>(2).unwrap().unwrap(),
                r.get::<i64>(3).unwrap().unwrap(),
                r.get::<i64>(4).unwrap().unwrap(),
                r.get::<i64>(5).unwrap().unwrap(),
                r.get::<bool>(6).unwrap().unwrap(),
                r.get::<bool>(7).unwrap().unwrap(),
            )
        })
    })?;
    let (name, typ, increment, min, max, cycle, temp) = row;
    let (last, called) = Spi::get_two::<i64, bool>(&format!("SELECT last_value, is_called FROM {name}"))
        .unwrap_or((None, None));
    let last = last.unwrap_or(min);
    let floor = if called.unwrap_or(false) { last } else { last.saturating_sub(1) };
    Some(SeqInfo { name, typ, increment, min, max, cycle, temp, floor })
}

/// The highest value in use among the integer columns that use the sequence, within `[lo, hi]`.
fn max_in_use(uses: &[Use], lo: i64, hi: i64) -> Option<i64> {
    uses.iter()
        .filter_map(|u| {
            let sql = if u.integer {
                format!("SELECT max({c})::bigint FROM {t} WHERE {c} BETWEEN $1 AND $2", c = u.column, t = u.table)
            } else if let Some(p) = &u.prefix {
                // 'POS/' || nextval(...): the numbers after the prefix.
                format!(
                    "SELECT max(n)::bigint FROM (SELECT substr({c}, length($3) + 1)::numeric AS n FROM {t}
                      WHERE left({c}, length($3)) = $3 AND substr({c}, length($3) + 1) ~ '^[0-9]{{1,19}}$') x
                     WHERE n BETWEEN $1 AND $2",
                    c = u.column,
                    t = u.table
                )
                .replace("$3", &format!("'{}'", p.replace('\'', "''")))
            } else {
                return None;
            };
            Spi::get_one_with_args::<i64>(&sql, &[lo.into(), hi.into()]).ok().flatten()
        })
        .max()
}

/// Why a sequence cannot be made node-disjoint.
struct Refusal {
    code: PgSqlErrorCode,
    message: String,
    hint: String,
}

fn refuse(code: PgSqlErrorCode, message: String, hint: impl Into<String>) -> Result<String, Refusal> {
    Err(Refusal { code, message, hint: hint.into() })
}

/// Settings rbucardo gave the sequence earlier (MINVALUE, MAXVALUE), in any herd.
fn recorded_bounds(seq: pg_sys::Oid) -> Vec<(i64, i64)> {
    Spi::connect(|c| {
        c.select(
            "SELECT min_value, max_value FROM rbucardo.herd_sequence WHERE seqrelid = $1 AND min_value IS NOT NULL",
            None,
            &[seq.into()],
        )
        .unwrap()
        .map(|r| (r.get::<i64>(1).unwrap().unwrap(), r.get::<i64>(2).unwrap().unwrap()))
        .collect()
    })
}

/// Makes one sequence of a herd node-disjoint for node `node` under the herd's strategy,
/// re-basing it above every value in use, and records what was done. Returns a description.
fn apply(herd: &str, seq: pg_sys::Oid, herd_strategy: &str, node: Option<i32>, source: &str) -> Result<String, Refusal> {
    let Some(info) = seq_info(seq) else {
        return refuse(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sequence with oid {}", seq.to_u32()), "Pass a sequence name, e.g. 'public.pos_order_name_seq'.");
    };
    if info.temp {
        return refuse(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("{} is a temporary sequence", info.name), "Temporary sequences are never replicated.");
    }
    let uses = uses_of(seq);
    let strategy = if !uses.is_empty() && uses.iter().all(|u| u.snowflake) {
        // Only snowflake_nextval reads it: the node id inside every id keeps them apart.
        "snowflake"
    } else if herd_strategy == "snowflake" && !uses.is_empty() {
        // A plain nextval()/identity column would collide: interleave it anyway.
        "interleave"
    } else {
        herd_strategy
    };
    let record = |strategy: Option<&str>, node: Option<i32>, inc: Option<i64>, min: Option<i64>, max: Option<i64>, restart: Option<i64>| {
        Spi::run_with_args(
            "INSERT INTO rbucardo.herd_sequence AS h (herd, seqrelid, source, strategy, node_id, increment, min_value, max_value, restart, applied)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $4 IS NULL THEN NULL ELSE now() END)
             ON CONFLICT (herd, seqrelid) DO UPDATE SET
                 source = CASE WHEN h.source = 'explicit' THEN h.source ELSE EXCLUDED.source END,
                 strategy = EXCLUDED.strategy, node_id = EXCLUDED.node_id, increment = EXCLUDED.increment,
                 min_value = EXCLUDED.min_value, max_value = EXCLUDED.max_value, restart = EXCLUDED.restart,
                 applied = EXCLUDED.applied",
            &[herd.into(), seq.into(), source.into(), strategy.into(), node.into(), inc.into(), min.into(), max.into(), restart.into()],
        )
        .expect("recording the sequence");
    };
    if strategy == "snowflake" {
        record(Some("snowflake"), node, None, None, None, None);
        return Ok(format!("{}: snowflake (left as it is)", info.name));
    }
    if info.increment < 0 {
        return refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("sequence {} is descending (INCREMENT BY {})", info.name, info.increment),
            "rbucardo partitions ascending sequences only; give it a positive increment, or leave it out of the herd.",
        );
    }
    let tmax = type_max(&info.typ);
    let ours = recorded_bounds(seq).contains(&(info.min, info.max));
    if info.cycle || (!ours && (info.min != 1 || info.max != tmax)) {
        return refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "sequence {} has custom settings (MINVALUE {}, MAXVALUE {}{}) that rbucardo cannot partition safely",
                info.name,
                info.min,
                info.max,
                if info.cycle { ", CYCLE" } else { "" }
            ),
            format!("Give it the defaults first: ALTER SEQUENCE {} NO CYCLE MINVALUE 1 MAXVALUE {tmax};", info.name),
        );
    }
    let Some(node) = node else {
        // Not initialised yet: init_node partitions it.
        record(None, None, None, None, None, None);
        return Ok(format!("{}: waits for init_node", info.name));
    };
    let k = node as i64;
    if k >= MAX_NODES {
        return refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("node id {k} is too large for the {strategy} sequence strategy (at most {})", MAX_NODES - 1),
            "Interleaved and range-partitioned sequences allow node ids 1 to 63; use the snowflake strategy for more nodes.",
        );
    }
    let (inc, lo, hi, restart) = if strategy == "interleave" {
        let floor = info.floor.max(max_in_use(&uses, i64::MIN, i64::MAX).unwrap_or(0));
        let v = interleave_first(floor, k, 1);
        if v > tmax as i128 {
            return refuse(
                PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
                format!("sequence {} has no value left above {floor} for node {k}", info.name),
                "Change the column and sequence to bigint (ALTER SEQUENCE ... AS bigint).",
            );
        }
        (MAX_NODES, 1, tmax, v as i64)
    } else {
        let (lo, hi) = range_block(k, tmax);
        let mut floor = max_in_use(&uses, lo, hi).unwrap_or(lo - 1);
        if (lo..=hi).contains(&info.floor) {
            floor = floor.max(info.floor);
        }
        if floor >= hi {
            return refuse(
                PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
                format!("sequence {} has used up node {k}'s block {lo}..{hi}", info.name),
                "Change the column and sequence to bigint (ALTER SEQUENCE ... AS bigint).",
            );
        }
        (1, lo, hi, (floor + 1).max(lo))
    };
    Spi::run(&format!(
        "ALTER SEQUENCE {} INCREMENT BY {inc} MINVALUE {lo} MAXVALUE {hi} NO CYCLE START WITH {restart} RESTART WITH {restart}",
        info.name
    ))
    .expect("altering the sequence");
    record(Some(strategy), Some(node), Some(inc), Some(lo), Some(hi), Some(restart));
    Ok(format!("{}: {strategy}, next value {restart}", info.name))
}

fn raise_refusal(r: Refusal) -> ! {
    raise(r.code, r.message, r.hint)
}

pub fn my_node_id() -> Option<i32> {
    crate::base::node::me().ok().map(|m| m.id)
}

pub fn apply_all(herd: &str, seqs: &[pg_sys::Oid], source: &str) -> Vec<String> {
    let strategy = herd_strategy(herd);
    let node = my_node_id();
    seqs.iter()
        .map(|s| apply(herd, *s, &strategy, node, source).unwrap_or_else(|r| raise_refusal(r)))
        .collect()
}

/// Every sequence recorded for a herd, plus those its tables use now.
fn herd_sequences(herd: &str) -> Vec<(pg_sys::Oid, String)> {
    Spi::connect(|c| {
        c.select(
            "SELECT DISTINCT ON (seq) seq, source FROM (
                 SELECT h.seqrelid AS seq, h.source, 0 AS pri FROM rbucardo.herd_sequence h
                   JOIN pg_class c ON c.oid = h.seqrelid AND c.relkind = 'S' WHERE h.herd = $1
                 UNION ALL
                 SELECT s.oid, 'table', 1 FROM rbucardo.herd_table t
                   JOIN pg_depend d ON (d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
                                        AND d.objid IN (SELECT ad.oid FROM pg_attrdef ad WHERE ad.adrelid = t.relid))
                                    OR (d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                                        AND d.refobjid = t.relid AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i'))
                   JOIN pg_class s ON s.oid = CASE WHEN d.classid = 'pg_attrdef'::regclass THEN d.refobjid ELSE d.objid END
                                  AND s.relkind = 'S'
                  WHERE t.herd = $1) x
              ORDER BY seq, pri",
            None,
            &[herd.into()],
        )
        .unwrap()
        .map(|r| (r.get::<pg_sys::Oid>(1).unwrap().unwrap(), r.get::<String>(2).unwrap().unwrap()))
        .collect()
    })
}

// ---------------------------------------------------------------------------------------------
// Hooks called by the catalog functions.

/// add_table: the table's sequences join its herd and are partitioned.
pub fn on_add_table(herd: &str, tbl: pg_sys::Oid) {
    apply_all(herd, &sequences_of_table(tbl), "table");
}

/// add_sync: records the sync's sequence strategy and re-partitions the herd's sequences with it.
pub fn on_add_sync(sync: &str, herd: &str, strategy: &str) {
    check_strategy(strategy);
    let other = Spi::get_one_with_args::<String>(
        "SELECT ss.sync || ' (' || ss.strategy || ')' FROM rbucardo.sync s JOIN rbucardo.sync_sequence_strategy ss ON ss.sync = s.name
          WHERE s.herd = $1 AND s.name <> $2 AND ss.strategy <> $3 LIMIT 1",
        &[herd.into(), sync.into(), strategy.into()],
    )
    .ok()
    .flatten();
    if let Some(other) = other {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("herd {herd} is already replicated by sync {other} with another sequence strategy"),
            "All syncs of a herd use the same sequence strategy.",
        );
    }
    Spi::run_with_args(
        "INSERT INTO rbucardo.sync_sequence_strategy (sync, strategy) VALUES ($1, $2)
         ON CONFLICT (sync) DO UPDATE SET strategy = EXCLUDED.strategy",
        &[sync.into(), strategy.into()],
    )
    .expect("recording the sequence strategy");
    repartition_herd(herd);
}

/// init_node: every recorded sequence is partitioned again for this node's (new) id.
pub fn on_init_node() {
    let herds: Vec<String> = Spi::connect(|c| {
        c.select("SELECT name FROM rbucardo.herd ORDER BY name", None, &[])
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
    });
    for herd in herds {
        repartition_herd(&herd);
    }
}

pub fn repartition_herd(herd: &str) -> i64 {
    let seqs = herd_sequences(herd);
    let strategy = herd_strategy(herd);
    let node = my_node_id();
    for (s, source) in &seqs {
        apply(herd, *s, &strategy, node, source).unwrap_or_else(|r| raise_refusal(r));
    }
    seqs.len() as i64
}

/// Called by the event trigger at the end of CREATE SEQUENCE / CREATE TABLE / ALTER TABLE: new
/// sequences in a schema that holds a replicated table join a herd and are partitioned before
/// their first value. Sequences that cannot be partitioned get a warning (the DDL goes through)
/// and show as colliding in `rbucardo.sequences`.
pub fn on_ddl(objids: Vec<Option<pg_sys::Oid>>) {
    let mut seqs: Vec<pg_sys::Oid> = Vec::new();
    for oid in objids.into_iter().flatten() {
        let kind = Spi::get_one_with_args::<String>(
            "SELECT relkind::text FROM pg_class WHERE oid = $1 AND relpersistence <> 't'",
            &[oid.into()],
        )
        .ok()
        .flatten();
        match kind.as_deref() {
            Some("S") => seqs.push(oid),
            Some("r") | Some("p") => seqs.extend(sequences_of_table(oid)),
            _ => {}
        }
    }
    seqs.sort_by_key(|o| o.to_u32());
    seqs.dedup();
    let node = my_node_id();
    for seq in seqs {
        // The herd of a table that uses it, else the first herd with a table in its schema.
        let herd = Spi::get_one_with_args::<String>(
            "WITH s AS (SELECT relnamespace FROM pg_class WHERE oid = $1 AND relpersistence <> 't'
                         AND relnamespace <> 'rbucardo'::regnamespace)
             SELECT herd FROM (
                 SELECT t.herd, 0 AS pri FROM rbucardo.herd_table t
                  WHERE t.relid IN (SELECT ad.adrelid FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                                     WHERE d.classid = 'pg_attrdef'::regclass AND d.refobjid = $1
                                    UNION SELECT d.refobjid FROM pg_depend d
                                     WHERE d.classid = 'pg_class'::regclass AND d.objid = $1 AND d.deptype IN ('a', 'i'))
                 UNION ALL
                 SELECT t.herd, 1 FROM rbucardo.herd_table t JOIN pg_class c ON c.oid = t.relid
                  WHERE c.relnamespace = (SELECT relnamespace FROM s)) x
              WHERE EXISTS (SELECT 1 FROM s)
              ORDER BY pri, herd LIMIT 1",
            &[seq.into()],
        )
        .ok()
        .flatten();
        let Some(herd) = herd else { continue };
        let strategy = herd_strategy(&herd);
        if let Err(r) = apply(&herd, seq, &strategy, node, "created") {
            let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[seq.into()]).ok().flatten().unwrap_or_default();
            ereport!(
                PgLogLevel::WARNING,
                PgSqlErrorCode::ERRCODE_WARNING,
                format!("rbucardo could not partition the new sequence {name}: {}", r.message),
                r.hint
            );
            Spi::run_with_args(
                "INSERT INTO rbucardo.herd_sequence (herd, seqrelid, source) VALUES ($1, $2, 'created') ON CONFLICT DO NOTHING",
                &[herd.as_str().into(), seq.into()],
            )
            .expect("recording the sequence");
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn interleave_first_is_above_the_floor_and_congruent_to_the_node() {
        for floor in [0i64, 1, 5, 63, 64, 65, 4999, 5000, 5001, 123_456_789] {
            for node in [1i64, 2, 3, 17, 63] {
                let v = interleave_first(floor, node, 1);
                assert!(v > floor as i128, "floor {floor} node {node}: {v}");
                assert_eq!(v.rem_euclid(64), node as i128, "floor {floor} node {node}: {v}");
                assert!(v - (floor as i128) <= 64, "not the smallest: floor {floor} node {node}: {v}");
            }
        }
        assert_eq!(interleave_first(0, 1, 1), 1);
        assert_eq!(interleave_first(0, 2, 1), 2);
        assert_eq!(interleave_first(5000, 1, 1), 5057); // 5057 = 79 * 64 + 1
        assert_eq!(interleave_first(-10, 3, 1), 3);
        // Near the top of bigint the answer may not fit: the caller sees it.
        assert!(interleave_first(i64::MAX, 1, 1) > i64::MAX as i128);
    }

    #[pg_test]
    fn range_blocks_are_disjoint_and_inside_the_type() {
        for tmax in [i16::MAX as i64, i32::MAX as i64, i64::MAX] {
            let mut prev_hi = range_block(0, tmax).1;
            for node in 1..MAX_NODES {
                let (lo, hi) = range_block(node, tmax);
                assert_eq!(lo, prev_hi + 1);
                assert!(hi > lo && hi <= tmax);
                assert_eq!(hi - lo + 1, range_block_size(tmax));
                prev_hi = hi;
            }
        }
        assert_eq!(range_block(1, i32::MAX as i64), (33_554_431, 67_108_861));
    }

    #[pg_test]
    fn snowflake_layout_holds_the_node_and_is_monotonic() {
        let a = snowflake(1000, 5, 4095);
        let b = snowflake(1001, 5, 0);
        assert!(b > a);
        assert_eq!(snowflake_split(a), (1000, 5, 4095));
        assert_eq!(snowflake_split(snowflake(123_456, 1023, 7)), (123_456, 1023, 7));
        // The counter is taken modulo 4096 and never spills into the node bits.
        assert_eq!(snowflake_split(snowflake(9, 3, 4096 + 11)), (9, 3, 11));
        // Two nodes at the same millisecond and counter never meet.
        assert_ne!(snowflake(77, 1, 1), snowflake(77, 2, 1));

        Spi::run("SELECT rbucardo.init_node('main', 7)").unwrap();
        Spi::run("CREATE SEQUENCE sf_seq").unwrap();
        let mut last = 0i64;
        for _ in 0..500 {
            let id = Spi::get_one::<i64>("SELECT rbucardo.snowflake_nextval('sf_seq')").unwrap().unwrap();
            assert!(id > last, "{id} after {last}");
            let (ms, node, _) = snowflake_split(id);
            assert_eq!(node, 7);
            assert!(ms > 0);
            last = id;
        }
        let node = Spi::get_one::<i32>(&format!("SELECT node_id FROM rbucardo.snowflake_decode({last})")).unwrap();
        assert_eq!(node, Some(7));
    }

    #[pg_test]
    fn add_table_interleaves_and_rebases_serials() {
        Spi::run("SELECT rbucardo.init_node('main', 3)").unwrap();
        Spi::run("CREATE TABLE sq_t (id serial PRIMARY KEY, v int)").unwrap();
        Spi::run("INSERT INTO sq_t (id) SELECT generate_series(1, 1000)").unwrap();
        Spi::run("SELECT rbucardo.add_herd('sq')").unwrap();
        Spi::run("SELECT rbucardo.add_table('sq', 'sq_t')").unwrap();
        let inc = Spi::get_one::<i64>("SELECT increment_by FROM pg_sequences WHERE sequencename = 'sq_t_id_seq'").unwrap();
        assert_eq!(inc, Some(64));
        let a = Spi::get_one::<i64>("SELECT nextval('sq_t_id_seq')").unwrap().unwrap();
        let b = Spi::get_one::<i64>("SELECT nextval('sq_t_id_seq')").unwrap().unwrap();
        assert!(a > 1000 && a % 64 == 3 && b == a + 64, "{a} {b}");
        let state = Spi::get_one::<String>("SELECT state FROM rbucardo.sequences WHERE sequence = 'sq_t_id_seq'::regclass").unwrap();
        assert_eq!(state.as_deref(), Some("ok"));
        // Altered back by hand: reported, not trusted.
        Spi::run("ALTER SEQUENCE sq_t_id_seq INCREMENT BY 1").unwrap();
        let state = Spi::get_one::<String>("SELECT state FROM rbucardo.sequences WHERE sequence = 'sq_t_id_seq'::regclass").unwrap();
        assert_eq!(state.as_deref(), Some("colliding"));
    }

    #[pg_test]
    fn document_numbers_in_text_columns_count_when_rebasing() {
        Spi::run("SELECT rbucardo.init_node('main', 2)").unwrap();
        Spi::run("CREATE SEQUENCE doc_seq").unwrap();
        Spi::run("CREATE TABLE doc_t (id int PRIMARY KEY, name text NOT NULL DEFAULT 'D''OC/' || nextval('doc_seq'))").unwrap();
        Spi::run("INSERT INTO doc_t SELECT g, 'D''OC/' || g FROM generate_series(1, 300) g").unwrap();
        Spi::run("INSERT INTO doc_t VALUES (1000, 'D''OC/99999x'), (1001, 'OTHER/5000')").unwrap();
        Spi::run("SELECT rbucardo.add_herd('doc')").unwrap();
        Spi::run("SELECT rbucardo.add_table('doc', 'doc_t')").unwrap();
        let v = Spi::get_one::<i64>("SELECT nextval('doc_seq')").unwrap().unwrap();
        assert_eq!(v, 322); // the first value above 300 that is 2 modulo 64
    }

    #[pg_test]
    fn range_strategy_gives_the_node_its_block() {
        Spi::run("SELECT rbucardo.init_node('main', 2)").unwrap();
        Spi::run("CREATE TABLE rq_t (id bigserial PRIMARY KEY)").unwrap();
        Spi::run("SELECT rbucardo.add_herd('rq')").unwrap();
        Spi::run("SELECT rbucardo.add_table('rq', 'rq_t')").unwrap();
        Spi::run("SELECT rbucardo.add_sync('rq_sync', 'rq', ARRAY['main'], 'latest', 'range')").unwrap();
        let (lo, hi) = range_block(2, i64::MAX);
        let v = Spi::get_one::<i64>("SELECT nextval('rq_t_id_seq')").unwrap().unwrap();
        assert_eq!(v, lo);
        let max = Spi::get_one::<i64>("SELECT max_value FROM pg_sequences WHERE sequencename = 'rq_t_id_seq'").unwrap();
        assert_eq!(max, Some(hi));
        let state = Spi::get_one::<String>("SELECT state FROM rbucardo.sequences WHERE sequence = 'rq_t_id_seq'::regclass").unwrap();
        assert_eq!(state.as_deref(), Some("ok"));
        // 1,000 ids left of the block: near exhaustion.
        Spi::run(&format!("SELECT setval('rq_t_id_seq', {})", hi - 1000)).unwrap();
        let row = Spi::get_two::<String, i64>("SELECT state, ids_left FROM rbucardo.sequences WHERE sequence = 'rq_t_id_seq'::regclass").unwrap();
        assert_eq!(row, (Some("near exhaustion".to_string()), Some(1000)));
    }

    #[pg_test(error = "sequence desc_seq is descending (INCREMENT BY -1)")]
    fn descending_sequences_are_refused() {
        Spi::run("SELECT rbucardo.init_node('main', 1)").unwrap();
        Spi::run("CREATE SEQUENCE desc_seq INCREMENT BY -1").unwrap();
        Spi::run("SELECT rbucardo.add_herd('dq')").unwrap();
        Spi::run("SELECT rbucardo.add_sequence('dq', 'desc_seq')").unwrap();
    }

    #[pg_test(error = "node id 100 is too large for the interleave sequence strategy (at most 63)")]
    fn interleave_needs_a_small_node_id() {
        Spi::run("SELECT rbucardo.init_node('main', 100)").unwrap();
        Spi::run("CREATE SEQUENCE big_node_seq").unwrap();
        Spi::run("SELECT rbucardo.add_herd('bq')").unwrap();
        Spi::run("SELECT rbucardo.add_sequence('bq', 'big_node_seq')").unwrap();
    }

    #[pg_test]
    fn new_sequences_in_a_replicated_schema_are_partitioned_at_once() {
        Spi::run("SELECT rbucardo.init_node('main', 5)").unwrap();
        Spi::run("CREATE TABLE ev_t (id int PRIMARY KEY)").unwrap();
        Spi::run("SELECT rbucardo.add_herd('ev')").unwrap();
        Spi::run("SELECT rbucardo.add_table('ev', 'ev_t')").unwrap();
        Spi::run("CREATE SEQUENCE ev_doc_seq").unwrap();
        Spi::run("CREATE TABLE ev_new (id serial PRIMARY KEY)").unwrap();
        Spi::run("CREATE TEMP SEQUENCE ev_temp_seq").unwrap();
        for s in ["ev_doc_seq", "ev_new_id_seq"] {
            let v = Spi::get_one::<i64>(&format!("SELECT nextval('{s}')")).unwrap().unwrap();
            assert_eq!(v, 5, "{s}");
            let v = Spi::get_one::<i64>(&format!("SELECT nextval('{s}')")).unwrap().unwrap();
            assert_eq!(v, 69, "{s}");
        }
        let v = Spi::get_one::<i64>("SELECT nextval('ev_temp_seq')").unwrap().unwrap();
        assert_eq!(v, 1);
    }
}
