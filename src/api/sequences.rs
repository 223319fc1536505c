//! Sequence functions: adding sequences to herds, strategies, re-partitioning, snowflake ids.
//! The partitioning itself is in src/schema/sequences.rs.

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::schema::{herd, sequences};

/// Adds a sequence to a herd (one no table uses as a default, e.g. Odoo's document numbers) and
/// makes it node-disjoint at once.
#[pg_extern(sql = "CREATE FUNCTION rbucardo.add_sequence(herd text, seq regclass) RETURNS text
                   STRICT VOLATILE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn add_sequence(herd: &str, seq: pg_sys::Oid) -> String {
    herd::require_herd(herd);
    let kind = Spi::get_one_with_args::<String>("SELECT relkind::text FROM pg_class WHERE oid = $1", &[seq.into()]).ok().flatten();
    if kind.as_deref() != Some("S") {
        raise(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("relation with oid {} is not a sequence", seq.to_u32()), "Pass a sequence, e.g. 'public.pos_order_name_seq'.");
    }
    let msg = sequences::apply_all(herd, &[seq], "explicit").pop().unwrap_or_default();
    format!("added sequence {msg} to herd {herd}")
}

/// Adds every sequence of a schema to a herd; returns how many.
#[pg_extern(volatile)]
fn add_all_sequences(herd: &str, schema: default!(&str, "'public'")) -> i64 {
    herd::require_herd(herd);
    let seqs: Vec<pg_sys::Oid> = Spi::connect(|c| {
        c.select(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind = 'S' AND c.relpersistence <> 't' ORDER BY c.relname",
            None,
            &[schema.into()],
        )
        .unwrap()
        .map(|r| r.get::<pg_sys::Oid>(1).unwrap().unwrap())
        .collect()
    });
    sequences::apply_all(herd, &seqs, "explicit");
    seqs.len() as i64
}

/// Changes the sequence strategy of a sync and re-partitions its herd's sequences.
#[pg_extern(volatile)]
fn set_sequence_strategy(sync: &str, strategy: &str) -> String {
    let herd = Spi::get_one_with_args::<String>("SELECT herd FROM rbucardo.sync WHERE name = $1", &[sync.into()]).ok().flatten();
    let Some(herd) = herd else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no sync named {sync}"), "See SELECT * FROM rbucardo.syncs.");
    };
    sequences::on_add_sync(sync, &herd, strategy);
    format!("sync {sync} uses the {strategy} sequence strategy")
}

/// Partitions every sequence of every herd again for this node (after fixing a sequence that
/// the view `rbucardo.sequences` shows as colliding). Returns how many sequences it covered.
#[pg_extern(volatile)]
fn repartition_sequences() -> i64 {
    let herds: Vec<String> = Spi::connect(|c| {
        c.select("SELECT name FROM rbucardo.herd ORDER BY name", None, &[])
            .unwrap()
            .map(|r| r.get::<String>(1).unwrap().unwrap())
            .collect()
    });
    herds.iter().map(|h| sequences::repartition_herd(h)).sum()
}

/// Called by the event trigger at the end of CREATE SEQUENCE / CREATE TABLE / ALTER TABLE: new
/// sequences in a schema that holds a replicated table join a herd and are partitioned before
/// their first value.
#[pg_extern(volatile)]
fn sequences_on_ddl(objids: Vec<Option<pg_sys::Oid>>) {
    sequences::on_ddl(objids)
}

/// A snowflake id: time, this node's id and a counter from `seq` (see docs/sequences.md).
/// Unique across nodes by construction; unique on a node while fewer than 4096 ids per
/// millisecond are drawn from one sequence. Use it as a bigint column's default:
/// `id bigint PRIMARY KEY DEFAULT rbucardo.snowflake_nextval('orders_id_seq')`.
#[pg_extern(sql = "CREATE FUNCTION rbucardo.snowflake_nextval(seq regclass) RETURNS bigint
                   STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';")]
fn snowflake_nextval(seq: pg_sys::Oid) -> i64 {
    // nextval with the caller's privileges on the sequence.
    let counter = Spi::get_one_with_args::<i64>("SELECT pg_catalog.nextval($1::pg_catalog.regclass)", &[seq.into()])
        .expect("nextval")
        .unwrap_or(0);
    // The node id belongs to the catalog, which the caller may not read.
    let node = {
        let _owner = crate::base::xact::RunAs::extension_owner();
        let _path = crate::base::xact::LocalSetting::pinned_search_path();
        Spi::get_one::<i32>("SELECT node_id FROM rbucardo.node")
    };
    let Ok(Some(node)) = node else {
        raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "this node is not initialised: snowflake ids need its node id", "Call rbucardo.init_node(name, node_id) first.");
    };
    // The hybrid logical clock never goes backwards, even if the wall clock does.
    let ms = crate::base::clock::now() / 1000 - sequences::SNOWFLAKE_EPOCH_MS;
    sequences::snowflake(ms, node as i64, counter)
}

/// The parts of a snowflake id.
#[pg_extern(immutable, parallel_safe)]
fn snowflake_decode(
    id: i64,
) -> TableIterator<'static, (name!(created, pgrx::datum::TimestampWithTimeZone), name!(node_id, i32), name!(counter, i32))> {
    let (ms, node, counter) = sequences::snowflake_split(id);
    let secs = (ms + sequences::SNOWFLAKE_EPOCH_MS) as f64 / 1000.0;
    let ts = pgrx::datum::to_timestamp(secs);
    TableIterator::once((ts, node as i32, counter as i32))
}

pgrx::extension_sql_file!("../../sql/sequences.sql", name = "sequences", requires = ["catalog", sequences_on_ddl]);

