//! Admission: what a peer may send this node is decided here, from this node's configuration
//! (its [`PeerPolicy`]), never from the batch. A batch is checked whole before anything of it
//! is applied; one that asks for more than the peer may do is refused whole, and the stream
//! from that peer waits until the operator changes the configuration (the next try of the same
//! batch then passes). A pulled batch is applied in slices (src/runtime/link.rs), each a batch
//! here: the slices before a refused one stay applied, and the stream waits at it.
//!
//! - Tables: only those in a herd of a sync shared with the peer; never rbucardo's own schema
//!   or a system schema.
//! - Origins: a peer speaks for itself; it relays other nodes' changes only if this node says
//!   it may (`relay`). A transaction's origin is also the only progress it can move.
//! - DDL: per the peer's level; at the limited level, statements that could raise privileges
//!   are refused whatever role would run them.

use std::collections::HashMap;

use pgrx::prelude::*;

use crate::base::node::{DdlLevel, PeerPolicy};
use crate::base::sqltext::refused_at_limited;
use crate::base::wire::{Batch, Op, Position};

/// How far ahead of this node's wall clock a peer's transaction clock may be.
const MAX_CLOCK_LEAD_MICROS: i64 = 86_400 * 1_000_000;

/// Schemas no peer may write into, whatever a herd says.
fn is_system_schema(schema: &str) -> bool {
    schema == "rbucardo" || schema == "information_schema" || schema.starts_with("pg_")
}

/// Checks the transactions of `batch` after `cursor` against what the peer may do here;
/// `applied` holds where this node stands in the stream of each of their origins (this node's
/// own aside).
pub fn admit(me: i32, policy: &PeerPolicy, batch: &Batch, cursor: Position, applied: &HashMap<i32, Position>) -> Result<(), String> {
    let Some(peer_id) = policy.node_id else {
        return Err(format!("{} has not said hello (its node id is unknown here)", policy.name));
    };
    for txn in batch.txns.iter().filter(|t| t.stream_pos > cursor) {
        // A transaction addressed to one node (a repair) comes from its origin, to this node:
        // anything else would be applied and not forwarded, or not applied at all.
        if let Some(to) = txn.to {
            if to != me || txn.origin != peer_id {
                return Err(format!("a transaction of node {} addressed to node {to} came from {} (node {peer_id})", txn.origin, policy.name));
            }
        }
        if txn.origin == me {
            continue; // this node's own change coming back: skipped by the apply
        }
        // Already applied here by another path: the apply skips it, so it asks for nothing
        // (a relaying peer must not be refused for forwarding what a trusted one sent first).
        if applied.get(&txn.origin).is_some_and(|done| txn.origin_pos <= *done) {
            continue;
        }
        // A clock far in the future would win every `latest` conflict from now on, here and
        // on every node this one forwards to.
        if txn.hlc > crate::base::clock::wall_micros().saturating_add(MAX_CLOCK_LEAD_MICROS) {
            return Err(format!("a transaction's clock is more than a day ahead of this node's ({} > {})", txn.hlc, crate::base::clock::wall_micros()));
        }
        if txn.origin != peer_id && !policy.relay {
            return Err(format!(
                "a transaction claims origin node {} but {} may speak only for itself (node {peer_id}); \
                 if it relays other nodes' changes, allow it with rbucardo.set_peer_policy('{}', relay => true)",
                txn.origin, policy.name, policy.name
            ));
        }
        let chunks = txn.decoded_chunks().map_err(|e| e.to_string())?;
        for chunk in chunks.iter() {
            for ch in &chunk.changes {
                let rel = &chunk.relations[ch.rel as usize];
                if ch.op == Op::Ddl {
                    let sql = ch.new.as_ref().and_then(|n| n[0].as_deref()).unwrap_or_default();
                    check_ddl(policy, &rel.schema, &rel.name, sql)?;
                    continue;
                }
                // Membership in the shared syncs is checked as the rows apply (a table created by
                // a schema change of the same batch joins its herd first).
                if is_system_schema(&rel.schema) {
                    return Err(format!("a change to {}.{}, which belongs to rbucardo or the system", rel.schema, rel.name));
                }
            }
        }
    }
    Ok(())
}

/// A schema change recorded in `schema` (`tag` "replicate_ddl" for an explicit one).
fn check_ddl(policy: &PeerPolicy, schema: &str, tag: &str, sql: &str) -> Result<(), String> {
    match policy.ddl {
        DdlLevel::None => Err(format!(
            "a schema change ({tag} in schema {schema}), and {} may send none; allow it with rbucardo.set_peer_policy('{}', ddl => 'limited' or 'trusted')",
            policy.name, policy.name
        )),
        DdlLevel::Trusted => Ok(()),
        DdlLevel::Limited => {
            // The schema a change was recorded under is the batch's word, not a limit: what
            // bounds a limited peer's schema changes is what its ddl_role may do here.
            if is_system_schema(schema) {
                return Err(format!("a schema change recorded in schema {schema}"));
            }
            let _ = tag;
            match refused_at_limited(sql) {
                Some(what) => Err(format!(
                    "a schema change holding {what}, which a peer at the limited DDL level may not run; command: {}",
                    crate::base::sqltext::abbreviate(sql)
                )),
                None => Ok(()),
            }
        }
    }
}

/// Shows a refused batch in `rbucardo.status` (the refusal stays until a batch from that peer
/// is applied).
pub fn record_refusal(peer: &str, why: &str) {
    Spi::run_with_args("UPDATE rbucardo.peer_state SET refused = $2, refused_at = pg_catalog.now() WHERE db = $1", &[peer.into(), why.into()])
        .expect("recording a refused batch");
}
