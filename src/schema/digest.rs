//! Table digests, for comparing a table between two nodes without shipping it (src/api/diff.rs
//! on the comparing node, `peer_diff_*` in src/runtime/endpoints.rs on the other).
//!
//! Rows are spread over buckets by a hash of their key; each side sums up every bucket as a
//! row count and the XOR of its rows' hashes. Only the buckets whose sums differ are read row by
//! row, and only their rows travel. Both sides print values in the canonical text form (the
//! form rows travel in), so the same row hashes the same on every node whatever its settings.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pgrx::prelude::*;

use crate::base::canonical::CanonicalOutput;
use crate::base::error::raise;
use crate::base::sqltext::{output_text, quote_ident, quote_literal};
use crate::base::xact::{LocalSetting, RunAs};

/// What is compared of one table: its columns and its replica key, by name.
#[derive(Clone, Debug)]
pub struct Target {
    pub schema: String,
    pub table: String,
    pub cols: Vec<String>,
    pub key: Vec<String>,
}

/// Bucket number → (rows, XOR of their hashes).
pub type Digest = HashMap<i32, (i64, i64)>;
/// Key (a JSON array of the key values as text) → row (a JSON object, column → value as text).
pub type Rows = BTreeMap<String, String>;

/// The herd table `relid` as this node compares it: its columns (generated ones too) and key.
pub fn target(relid: pg_sys::Oid) -> Target {
    let (schema, table) = Spi::get_two_with_args::<String, String>(
        "SELECT n.nspname::text, k.relname::text FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace WHERE k.oid = $1",
        &[relid.into()],
    )
    .unwrap_or((None, None));
    let (Some(schema), Some(table)) = (schema, table) else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("no table with oid {relid}"), "Name a table of the sync.");
    };
    let key = crate::base::node::replica_key(relid)
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, format!("{schema}.{table} has no replica key"), "A replicated table needs a primary key or a unique index on NOT NULL columns."));
    let cols = Spi::connect(|c| {
        c.select("SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum", None, &[relid.into()])
            .expect("columns")
            .filter_map(|r| r.get::<String>(1).ok().flatten())
            .collect()
    });
    Target { schema, table, cols, key }
}

/// `target` for a peer's request: the table must be one the peer shares, and have the columns
/// and key columns it names.
pub fn checked_target(policy: &crate::base::node::PeerPolicy, schema: &str, table: &str, cols: &[String], key: &[String]) -> Target {
    if !policy.tables.contains(&(schema.to_string(), table.to_string())) {
        raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("{} does not share table {schema}.{table} with this node", policy.name), "Compare the tables of a sync both nodes are in.");
    }
    let (relid, _) = crate::base::node::table_by_name(schema, table)
        .unwrap_or_else(|| raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("table {schema}.{table} is missing here"), "Both nodes need the table."));
    let here = target(relid);
    if let Some(c) = cols.iter().chain(key).find(|c| !here.cols.contains(c)) {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN, format!("table {schema}.{table} has no column {c} here"), "The table differs in shape between the nodes: see rbucardo.validate_schema.");
    }
    if key.is_empty() || cols.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "no columns to compare", "Name the table's columns and key.");
    }
    Target { cols: cols.to_vec(), key: key.to_vec(), ..here }
}

/// The key and the row of each row of the table, as JSON of the values' text (each type's
/// output function, as the capture trigger prints them; arrays, so any number of columns).
fn source_sql(t: &Target) -> String {
    let key: Vec<String> = t.key.iter().map(|c| output_text(c)).collect();
    let names: Vec<String> = t.cols.iter().map(|c| quote_literal(c)).collect();
    let values: Vec<String> = t.cols.iter().map(|c| output_text(c)).collect();
    format!(
        "SELECT pg_catalog.to_jsonb(ARRAY[{}]::text[])::text AS k, pg_catalog.jsonb_object(ARRAY[{}]::text[], ARRAY[{}]::text[])::text AS r FROM {}.{}",
        key.join(", "),
        names.join(", "),
        values.join(", "),
        quote_ident(&t.schema),
        quote_ident(&t.table)
    )
}

/// Runs `f` as the table's owner, restricted (what the values' output functions run is the
/// owner's code, not the caller's: rbucardo's caller here is a superuser), with the values
/// printed in the canonical form.
fn as_owner<R>(t: &Target, f: impl FnOnce() -> R) -> R {
    let Some((_, owner)) = crate::base::node::table_by_name(&t.schema, &t.table) else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, format!("table {}.{} is missing", t.schema, t.table), "It was dropped meanwhile.");
    };
    let _canonical = CanonicalOutput::new();
    let _owner = RunAs::restricted(owner);
    // A row security policy the owner is subject to (FORCE) is an error, not rows left out.
    let _rls = LocalSetting::new(c"row_security", c"off", false);
    f()
}

/// The bucket of a key.
fn bucket_expr(buckets: i32) -> String {
    format!("((pg_catalog.hashtextextended(x.k, 1) & 2147483647) % {buckets})::integer")
}

/// The table's digest over `buckets` buckets.
pub fn digest(t: &Target, buckets: i32) -> Digest {
    let sql = format!(
        "SELECT {} AS b, count(*), pg_catalog.bit_xor(pg_catalog.hashtextextended(x.r, 0)) FROM ({}) x GROUP BY 1",
        bucket_expr(buckets),
        source_sql(t)
    );
    as_owner(t, || Spi::connect(|c| {
        c.select(&sql, None, &[])
            .expect("digest")
            .map(|r| (r.get::<i32>(1).unwrap().unwrap(), (r.get::<i64>(2).unwrap().unwrap(), r.get::<i64>(3).unwrap().unwrap())))
            .collect()
    }))
}

/// The rows of the buckets `wanted`.
pub fn rows(t: &Target, buckets: i32, wanted: &[i32]) -> Rows {
    if wanted.is_empty() {
        return Rows::new();
    }
    let list: Vec<String> = wanted.iter().map(|b| b.to_string()).collect();
    let sql = format!("SELECT x.k, x.r FROM ({}) x WHERE {} IN ({})", source_sql(t), bucket_expr(buckets), list.join(", "));
    as_owner(t, || Spi::connect(|c| {
        c.select(&sql, None, &[])
            .expect("rows")
            .map(|r| (r.get::<String>(1).unwrap().unwrap(), r.get::<String>(2).unwrap().unwrap()))
            .collect()
    }))
}

/// Keys as this module prints them (JSON text as PostgreSQL prints jsonb), from keys written
/// in any JSON spelling; a key that is not a JSON array of strings is refused.
pub fn normalize_keys(keys: &[serde_json::Value]) -> Vec<String> {
    keys.iter()
        .map(|k| match k {
            serde_json::Value::Array(items) if !items.is_empty() && items.iter().all(|i| i.is_string() || i.is_number()) => {
                let texts: Vec<String> = items.iter().map(|i| i.as_str().map(str::to_string).unwrap_or_else(|| i.to_string())).collect();
                Spi::get_one_with_args::<String>("SELECT pg_catalog.to_jsonb($1::text[])::text", &[texts.into()]).ok().flatten().unwrap_or_default()
            }
            _ => raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("a key must be a JSON array of its values: {k}"), "For example [\"42\"], or [\"7\", \"a\"] for a key of two columns."),
        })
        .collect()
}

/// The bucket of each key (the same hash as the queries, computed by the server).
pub fn buckets_of(keys: &[String], buckets: i32) -> Vec<i32> {
    let set: BTreeSet<i32> = Spi::connect(|c| {
        c.select(
            &format!("SELECT DISTINCT {} FROM unnest($1::text[]) AS x(k)", bucket_expr(buckets)),
            None,
            &[keys.to_vec().into()],
        )
        .expect("buckets")
        .filter_map(|r| r.get::<i32>(1).ok().flatten())
        .collect()
    });
    set.into_iter().collect()
}

/// How many buckets a table of about `rows` rows is cut into: about 128 rows each.
pub fn bucket_count(rows: i64) -> i32 {
    (rows / 128).clamp(16, 1 << 16) as i32
}

/// The buckets whose sums differ between two digests (missing on one side included).
pub fn differing_buckets(here: &Digest, there: &Digest) -> Vec<i32> {
    let all: BTreeSet<i32> = here.keys().chain(there.keys()).copied().collect();
    all.into_iter().filter(|b| here.get(b) != there.get(b)).collect()
}

/// The rows that differ: (key, row here, row there), `None` where a side lacks the key.
pub fn differing_rows(here: &Rows, there: &Rows) -> Vec<(String, Option<String>, Option<String>)> {
    let keys: BTreeSet<&String> = here.keys().chain(there.keys()).collect();
    keys.into_iter()
        .filter(|k| here.get(*k) != there.get(*k))
        .map(|k| (k.clone(), here.get(k).cloned(), there.get(k).cloned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_differ_by_count_hash_or_presence() {
        let here: Digest = [(1, (10, 7)), (2, (5, 3)), (3, (1, 1))].into_iter().collect();
        let there: Digest = [(1, (10, 7)), (2, (5, 4)), (4, (1, 1))].into_iter().collect();
        assert_eq!(differing_buckets(&here, &there), vec![2, 3, 4]);
        assert!(differing_buckets(&here, &here).is_empty());
    }

    #[test]
    fn rows_differ_by_value_or_presence() {
        let here: Rows = [("[\"1\"]", "a"), ("[\"2\"]", "b"), ("[\"3\"]", "c")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let there: Rows = [("[\"1\"]", "a"), ("[\"2\"]", "B"), ("[\"4\"]", "d")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let d = differing_rows(&here, &there);
        assert_eq!(
            d,
            vec![
                ("[\"2\"]".to_string(), Some("b".to_string()), Some("B".to_string())),
                ("[\"3\"]".to_string(), Some("c".to_string()), None),
                ("[\"4\"]".to_string(), None, Some("d".to_string())),
            ]
        );
    }

    #[test]
    fn bucket_counts_stay_in_bounds() {
        assert_eq!(bucket_count(0), 16);
        assert_eq!(bucket_count(1_000_000), 7812);
        assert_eq!(bucket_count(i64::MAX), 65536);
    }
}
