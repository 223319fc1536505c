//! The operator's hand on exceptions: retry, skip a failing schema change, discard.

use pgrx::prelude::*;

use crate::apply::retry::{resume_stopped, retry_open};
use crate::base::xact::LocalSetting;
use crate::base::error::raise;
use crate::base::node::me_or_raise;

fn open_kind(id: i64) -> String {
    Spi::get_one_with_args::<String>("SELECT kind FROM rbucardo.exceptions WHERE id = $1 AND resolved_at IS NULL", &[id.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no open exception {id}"), "See SELECT * FROM rbucardo.exceptions WHERE resolved_at IS NULL.")
        })
}

/// Retries one exception now; true if it applied. A transaction that stopped its stream is
/// applied as the next one of that stream, which then goes on.
#[pg_extern(volatile)]
fn exception_retry(id: i64) -> bool {
    // It applies, trims clocks and runs owners' code in an operator's session: rbucardo's
    // statements resolve to the built-in operators whatever that session's search_path.
    let _path = LocalSetting::pinned_search_path();
    let me = me_or_raise();
    if open_kind(id) == "ddl" {
        Spi::run_with_args("UPDATE rbucardo.exceptions SET last_retry = NULL WHERE id = $1", &[id.into()]).expect("marking a retry");
        return resume_stopped(me.id, id);
    }
    retry_open(me.id, Some(id)) == 1
}

/// Applies the transaction that stopped its stream without its failing schema change, and lets
/// the stream go on. Its row changes are applied; the command is not run here.
#[pg_extern(volatile)]
fn exception_skip(id: i64) -> String {
    let _path = LocalSetting::pinned_search_path();
    let me = me_or_raise();
    if open_kind(id) != "ddl" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("exception {id} is a parked transaction, not a stopped schema change"),
            "Only a failed replicated DDL command can be skipped; use rbucardo.exception_retry() or rbucardo.exception_discard().",
        );
    }
    Spi::run_with_args("UPDATE rbucardo.exceptions SET skip_ordinal = ddl_ordinal WHERE id = $1", &[id.into()]).expect("marking a skip");
    if !resume_stopped(me.id, id) {
        let reason = Spi::get_one_with_args::<String>("SELECT reason FROM rbucardo.exceptions WHERE id = $1", &[id.into()]).ok().flatten().unwrap_or_default();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("exception {id}: the transaction still fails without the skipped command: {reason}"),
            "Another schema change of the same transaction fails here too; fix the schema by hand and use rbucardo.exception_retry().",
        );
    }
    format!("skipped the failed command of exception {id}; the stream goes on")
}

/// Gives up on one parked transaction; the record stays, marked discarded.
#[pg_extern(volatile)]
fn exception_discard(id: i64) -> String {
    if open_kind(id) == "ddl" {
        raise(
            PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
            format!("exception {id} stopped its stream at a schema change and cannot be discarded"),
            "Discarding it would lose the rows of its transaction and of the stream behind it: fix the schema and use \
             rbucardo.exception_retry(), or rbucardo.exception_skip() to leave out only the failing command.",
        );
    }
    Spi::run_with_args(
        "UPDATE rbucardo.exceptions SET resolved_at = pg_catalog.now(), resolution = 'discarded' WHERE id = $1 AND resolved_at IS NULL",
        &[id.into()],
    )
    .expect("discarding an exception");
    format!("discarded exception {id}; its record stays in rbucardo.exceptions")
}

/// The changes of a kept transaction as rows a person can read: table, operation, key, and the
/// old and new row as jsonb (as `rbucardo.conflicts` shows them), in capture order. Schema
/// changes show their command as `new.command`.
#[pg_extern(stable)]
fn exception_changes(
    id: i64,
) -> TableIterator<
    'static,
    (
        name!(ordinal, i32),
        name!(tbl, String),
        name!(op, String),
        name!(key, Option<pgrx::JsonB>),
        name!(old, Option<pgrx::JsonB>),
        name!(new, Option<pgrx::JsonB>),
    ),
> {
    let stored = Spi::get_one_with_args::<Vec<u8>>("SELECT chunks FROM rbucardo.exceptions WHERE id = $1", &[id.into()]).ok().flatten();
    let Some(stored) = stored else {
        raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("no exception {id}"), "See SELECT * FROM rbucardo.exceptions.");
    };
    let chunks = crate::apply::exceptions::stored_chunks(&stored)
        .unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("exception {id}: {e}"), "The stored transaction is damaged."));
    let mut rows = Vec::new();
    for bytes in &chunks {
        let chunk = crate::base::wire::decode_chunk(bytes).expect("checked by stored_chunks");
        for ch in &chunk.changes {
            let rel = &chunk.relations[ch.rel as usize];
            let tbl = format!("{}.{}", pgrx::spi::quote_identifier(&rel.schema), pgrx::spi::quote_identifier(&rel.name));
            let op = format!("{:?}", ch.op).to_lowercase();
            if ch.op == crate::base::wire::Op::Ddl {
                let command = ch.new.as_ref().and_then(|n| n[0].clone());
                rows.push((ch.ordinal as i32, rel.schema.clone(), op, None, None, Some(pgrx::JsonB(serde_json::json!({ "command": command, "tag": rel.name })))));
                continue;
            }
            let image = |r: &Option<Vec<crate::base::wire::Value>>| r.as_ref().map(|r| pgrx::JsonB(crate::apply::decide::row_json(rel, r)));
            let key = ch.new.as_ref().or(ch.old.as_ref()).filter(|_| !rel.key.is_empty()).map(|r| pgrx::JsonB(crate::apply::decide::key_json(rel, r)));
            rows.push((ch.ordinal as i32, tbl, op, key, image(&ch.old), image(&ch.new)));
        }
    }
    rows.sort_by_key(|r| r.0);
    TableIterator::new(rows)
}
