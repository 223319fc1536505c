//! `rbucardo.join()`: a new node joins running syncs from a provider, online. This part runs
//! in the operator's session and prepares everything in one transaction: it asks the provider
//! where the stream starts and what to copy, creates what is missing here (with
//! `copy_schema`), and records the tables to copy. The worker then copies them and meets the
//! stream (src/runtime/join.rs explains how nothing is missed or applied twice).

use std::time::Duration;

use pgrx::prelude::*;
use serde::Deserialize;

use crate::base::error::raise;
use crate::base::node::{self, me_or_raise};
use crate::base::pq::{Param, PeerConn};
use crate::base::signals;
use crate::base::wire::WHOLE_TICK;
use crate::base::xact::{error_code, error_message, undoable, LocalSetting};

const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What the provider says the node joins (`peer_join_describe`).
#[derive(Deserialize)]
struct Joining {
    syncs: Vec<SyncDesc>,
    tables: Vec<TableDesc>,
}

#[derive(Deserialize)]
struct SyncDesc {
    name: String,
    herd: String,
    conflict_strategy: String,
    sequence_strategy: Option<String>,
}

#[derive(Deserialize)]
struct TableDesc {
    schema: String,
    table: String,
    herd: String,
    est_rows: i64,
    types: Vec<String>,
    creates: Vec<String>,
    laters: Vec<String>,
}

fn fail(message: impl Into<String>, hint: impl Into<String>) -> ! {
    raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, message, hint)
}

/// Joins the syncs this node shares with `provider` (a peer added here with its conninfo,
/// which lists this node in those syncs): copies their tables from it while every node keeps
/// writing, then replicates from where the copies end. Tables must be empty here; missing
/// ones are created from the provider's definition with `copy_schema`. Returns at once: the
/// worker copies, and `rbucardo.join_progress` shows how far it is.
#[pg_extern(volatile)]
fn join(provider: &str, copy_schema: default!(bool, false)) -> String {
    // SAFETY: reads the current user's superuser flag from the catalog cache.
    if !unsafe { pg_sys::superuser() } {
        raise(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "only a superuser may join a node", "join() creates tables and fills them as the extension's owner.");
    }
    let me = me_or_raise();
    let conninfo = Spi::get_one_with_args::<String>("SELECT conninfo FROM rbucardo.db WHERE name = $1", &[provider.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| fail(format!("{provider} is not a peer this node connects to"), format!("Add it first with rbucardo.add_db('{provider}', conninfo).")));
    if let Some(other) = Spi::get_one_with_args::<String>(
        "SELECT d FROM rbucardo.sync s, unnest(s.dbs) d WHERE d <> $1 AND d <> $2 LIMIT 1",
        &[provider.into(), me.name.as_str().into()],
    )
    .ok()
    .flatten()
    {
        fail(
            format!("this node shares a sync with {other} as well as {provider}"),
            "A node joins through one provider, its only peer (a store joins through its hub); its other links would start without the copies' position. Add them after the join, or make the node from a copy.",
        );
    }
    let state = Spi::get_one_with_args::<String>("SELECT state FROM rbucardo.join_run WHERE provider = $1", &[provider.into()]).ok().flatten();
    if let Some(state) = state {
        fail(format!("a join from {provider} is {state} here already"), "See rbucardo.join_progress. To join again, delete its row from rbucardo.join_run and empty the tables.");
    }

    let mut conn = PeerConn::connect(&conninfo, Duration::from_secs(10)).unwrap_or_else(|e| fail(format!("cannot reach {provider}: {e}"), "Check its conninfo in rbucardo.db."));
    let call = |conn: &mut PeerConn, sql: &str, params: &[Param]| {
        conn.query(sql, params, CALL_TIMEOUT)
            .unwrap_or_else(|e| fail(format!("{provider} refused the join: {e}"), format!("On {provider}: add_db('{}') and list it in the syncs it joins.", me.name)))
    };
    let hello = call(&mut conn, "SELECT name, node_id FROM rbucardo.peer_hello($1, $2)", &[Param::Text(&me.name), Param::Text(&me.id.to_string())]);
    match hello.first().and_then(|r| Some((r.text(0)?, r.i32(1)?))) {
        Some((name, id)) if name == provider => node::learn_peer_id(provider, id),
        Some((name, _)) => fail(format!("the server at {provider}'s conninfo is node {name}"), "Fix the conninfo in rbucardo.db."),
        None => fail("peer_hello returned nothing", "Is the provider running rbucardo?"),
    }
    let rows = call(&mut conn, "SELECT rbucardo.peer_join_describe($1)", &[Param::Text(&me.name)]);
    let text = rows.first().and_then(|r| r.text(0)).unwrap_or_default();
    let joining: Joining = serde_json::from_str(&text).unwrap_or_else(|e| fail(format!("{provider} described the join badly: {e}"), "Both nodes must run the same rbucardo version."));
    if joining.tables.is_empty() {
        fail(format!("{provider} shares no table with this node"), format!("On {provider}: list {} in the syncs it joins (their herds must hold tables).", me.name));
    }

    // What is missing here is made from the provider's definitions, as local statements.
    let _local = LocalSetting::new(c"rbucardo.replicate_ddl", c"off", true);
    let missing: Vec<&TableDesc> = joining.tables.iter().filter(|t| relid(&t.schema, &t.table).is_none()).collect();
    if !missing.is_empty() {
        if !copy_schema {
            let names: Vec<String> = missing.iter().map(|t| format!("{}.{}", t.schema, t.table)).collect();
            fail(format!("tables missing here: {}", names.join(", ")), "Create them as on the provider, or call join(provider, copy_schema => true).");
        }
        for t in &missing {
            for stmt in &t.types {
                // Several tables may use one type: one made already is fine.
                if let Err(e) = undoable(|| {
                    Spi::run(stmt).expect("type");
                    Ok::<_, ()>(())
                }) {
                    if error_code(&e) != Some(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT) {
                        fail(format!("creating a type of {}.{} failed: {}", t.schema, t.table, error_message(&e)), format!("The statement was: {stmt}"));
                    }
                }
            }
        }
        for t in &missing {
            for stmt in &t.creates {
                Spi::run(stmt).unwrap_or_else(|e| fail(format!("creating {}.{} failed: {e}", t.schema, t.table), format!("The statement was: {stmt}")));
            }
        }
        for t in &missing {
            for stmt in &t.laters {
                Spi::run(stmt).unwrap_or_else(|e| fail(format!("creating {}.{} failed: {e}", t.schema, t.table), format!("The statement was: {stmt}")));
            }
        }
    }
    // Herds, their tables and the syncs, as the provider has them.
    for t in &joining.tables {
        let oid = relid(&t.schema, &t.table).expect("table made above");
        let herd_known = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd WHERE name = $1)", &[t.herd.as_str().into()]).ok().flatten() == Some(true);
        if !herd_known {
            Spi::run_with_args("SELECT rbucardo.add_herd($1)", &[t.herd.as_str().into()]).expect("add_herd");
        }
        let in_herd = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.herd_table WHERE herd = $1 AND relid = $2)", &[t.herd.as_str().into(), oid.into()]).ok().flatten() == Some(true);
        if !in_herd {
            Spi::run_with_args("SELECT rbucardo.add_table($1, $2)", &[t.herd.as_str().into(), oid.into()]).expect("add_table");
        }
    }
    for s in &joining.syncs {
        let exists = Spi::get_one_with_args::<bool>("SELECT $2 = ANY (dbs) FROM rbucardo.sync WHERE name = $1", &[s.name.as_str().into(), provider.into()]).ok().flatten();
        match exists {
            Some(true) => {}
            Some(false) => fail(format!("sync {} here does not list {provider}", s.name), "Remove it with remove_sync, or add the provider to it."),
            None => {
                Spi::run_with_args(
                    "SELECT rbucardo.add_sync($1, $2, ARRAY[$3, $4], $5, $6)",
                    &[
                        s.name.as_str().into(),
                        s.herd.as_str().into(),
                        me.name.as_str().into(),
                        provider.into(),
                        s.conflict_strategy.as_str().into(),
                        s.sequence_strategy.as_deref().unwrap_or("interleave").into(),
                    ],
                )
                .unwrap_or_else(|e| fail(format!("adding sync {} failed: {e}", s.name), "Check the provider's sync definition."));
            }
        }
    }
    // Copies go into empty tables only: rows here would be neither replaced nor sent.
    for t in &joining.tables {
        let sql = format!("SELECT EXISTS (SELECT 1 FROM {}.{})", crate::base::sqltext::quote_ident(&t.schema), crate::base::sqltext::quote_ident(&t.table));
        if Spi::get_one::<bool>(&sql).ok().flatten() == Some(true) {
            fail(
                format!("table {}.{} holds rows here", t.schema, t.table),
                "A join copies into empty tables. Empty them without replicating that: BEGIN; SET LOCAL session_replication_role = replica; TRUNCATE ...; COMMIT;",
            );
        }
    }
    // Ready: the provider cuts the tick the stream goes on after (the last remote call, so
    // that nothing above, refused, has changed anything there). The worker copies first.
    let rows = call(&mut conn, "SELECT rbucardo.peer_join_start($1)", &[Param::Text(&me.name)]);
    let tick = rows.first().and_then(|r| r.i64(0)).unwrap_or_else(|| fail("peer_join_start returned nothing", "Both nodes must run the same rbucardo version."));
    Spi::run_with_args("UPDATE rbucardo.peer_state SET in_tick = $2, in_seq = $3 WHERE db = $1", &[provider.into(), tick.into(), WHOLE_TICK.into()]).expect("cursor");
    Spi::run_with_args("INSERT INTO rbucardo.join_run (provider, start_tick) VALUES ($1, $2)", &[provider.into(), tick.into()]).expect("join run");
    for t in &joining.tables {
        Spi::run_with_args(
            "INSERT INTO rbucardo.join_table (provider, schema_name, table_name, est_rows) VALUES ($1, $2, $3, $4)",
            &[provider.into(), t.schema.as_str().into(), t.table.as_str().into(), t.est_rows.into()],
        )
        .expect("join table");
    }
    signals::wake_local_worker_at_commit();
    format!("joining from {provider}: {} tables to copy; see rbucardo.join_progress", joining.tables.len())
}

fn relid(schema: &str, table: &str) -> Option<pg_sys::Oid> {
    node::table_by_name(schema, table).map(|(relid, _)| relid)
}
