//! Transport: the conversation between two nodes over one libpq connection.
//!
//! The node that has a conninfo for its peer connects out and, over that one connection, both
//! pulls the peer's stream (peer_fetch) and pushes its own (peer_position, peer_push), so a
//! branch behind NAT is fully served by its own outbound connection. The functions here named
//! `peer_*` are what the other side calls; they are SECURITY DEFINER and granted only to the
//! role rbucardo_peer (and superusers).

use std::time::Duration;

use pgrx::prelude::*;

use crate::catalog::{self, Me, Peer};
use crate::changelog::DONE;
use crate::encoding::{decode_batch, encode_batch, Position};
use crate::error::raise;
use crate::peer::{Param, PeerConn};

/// A batch is filled up to about this many bytes.
pub const BATCH_BYTES: usize = 8 << 20;
/// A batch larger than this is refused unread (a transaction larger than BATCH_BYTES travels
/// alone, up to this size).
pub const MAX_BATCH_BYTES: usize = 512 << 20;

/// The caller must be who it says it is: a superuser, or the login role named after the peer
/// (each branch connects as its own role, member of rbucardo_peer).
fn check_caller(peer_name: &str) {
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT r.rolsuper OR r.rolname = $1 FROM pg_catalog.pg_roles r WHERE r.rolname = session_user",
        &[peer_name.into()],
    )
    .ok()
    .flatten()
        == Some(true);
    if !allowed {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("this session may not act as peer {peer_name}"),
            format!("Connect as the role named {peer_name} (a member of rbucardo_peer) or as a superuser."),
        );
    }
}

fn peer_node(peer_name: &str) -> i32 {
    check_caller(peer_name);
    Spi::get_one_with_args::<i32>(
        "SELECT d.node_id FROM rbucardo.db d WHERE d.name = $1
            AND EXISTS (SELECT 1 FROM rbucardo.sync s WHERE d.name = ANY (s.dbs) AND NOT s.paused)",
        &[peer_name.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{peer_name} is not an active peer of this node"),
            "The peer must be added with rbucardo.add_db(), be part of a sync that is not paused, and have said hello.",
        )
    })
}

fn touch(peer_name: &str) {
    Spi::run_with_args(
        "UPDATE rbucardo.peer_state SET last_contact = now(), state = 'connected', last_error = NULL WHERE db = $1",
        &[peer_name.into()],
    )
    .expect("peer state");
}

/// First call of a session: both sides learn each other's node id, and a node that is a copy
/// of another (or not initialised) is refused before any data moves.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_hello(peer_name: &str, peer_node_id: i32) -> TableIterator<'static, (name!(name, String), name!(node_id, i32))> {
    check_caller(peer_name);
    let me = catalog::me_or_raise();
    if peer_node_id == me.id {
        raise(PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION, format!("peer {peer_name} uses this node's id {}", me.id), "Every node needs its own node id (rbucardo.init_node).");
    }
    catalog::learn_peer_id(peer_name, peer_node_id);
    touch(peer_name);
    TableIterator::once((me.name, me.id))
}

/// This node's stream after the given position, as a framed batch, leaving out the caller's
/// own changes. The position is also the caller's confirmation of everything up to it.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_fetch(peer_name: &str, after_tick: i64, after_seq: i64, max_bytes: i32) -> Vec<u8> {
    let me = catalog::me_or_raise();
    let node = peer_node(peer_name);
    let after = Position { tick: after_tick, seq: after_seq };
    record_confirmed(peer_name, after);
    touch(peer_name);
    let limit = (max_bytes.max(1) as usize).min(BATCH_BYTES);
    encode_batch(&crate::changelog::read_batch(me.id, after, node, limit))
}

/// Where this node stands in the caller's stream: the caller pushes from there. `stopped` says
/// why the stream is stopped here (a schema change that fails here), while no retry is due.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_position(peer_name: &str) -> TableIterator<'static, (name!(tick, i64), name!(seq, i64), name!(stopped, Option<String>))> {
    catalog::me_or_raise();
    let node = peer_node(peer_name);
    touch(peer_name);
    let (t, s) = Spi::get_two_with_args::<i64, i64>("SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = $1", &[peer_name.into()])
        .expect("peer state");
    TableIterator::once((t.unwrap_or(0), s.unwrap_or(DONE), crate::exceptions::stream_stopped(node)))
}

/// Applies a batch of the caller's stream here, atomically per transaction; returns the new
/// position, and why the stream stopped short of the batch's end, if it did.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_push(peer_name: &str, batch: &[u8]) -> TableIterator<'static, (name!(tick, i64), name!(seq, i64), name!(stopped, Option<String>))> {
    let me = catalog::me_or_raise();
    let node = peer_node(peer_name);
    let batch = decode_batch(batch, MAX_BATCH_BYTES).unwrap_or_else(|e| {
        raise(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("refused a batch from {peer_name}: {e}"), "Nothing of it was applied; the sender retries. Persistent errors point at a faulty link or peer.")
    });
    let applied = crate::apply::apply_batch(me.id, peer_name, node, &batch);
    touch(peer_name);
    TableIterator::once((applied.cursor.tick, applied.cursor.seq, applied.stopped))
}

/// Schema exchange for validate_schema: stores the caller's table shape (when it sends one)
/// and returns this node's, unless its md5 is `known_md5`.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_schema(
    peer_name: &str,
    shape: Option<pgrx::JsonB>,
    known_md5: Option<&str>,
) -> TableIterator<'static, (name!(md5, String), name!(shape, Option<pgrx::JsonB>))> {
    catalog::me_or_raise();
    peer_node(peer_name);
    if let Some(shape) = shape {
        crate::ddl::store_peer_shape(peer_name, shape);
    }
    let (md5, mine) = crate::ddl::my_shape();
    let mine = (known_md5 != Some(md5.as_str())).then_some(mine);
    TableIterator::once((md5, mine))
}

fn record_confirmed(peer_name: &str, pos: Position) {
    Spi::run_with_args(
        "UPDATE rbucardo.peer_state SET out_tick = $2, out_seq = $3
          WHERE db = $1 AND (out_tick, out_seq) < ($2, $3)",
        &[peer_name.into(), pos.tick.into(), pos.seq.into()],
    )
    .expect("recording a confirmation");
}

pgrx::extension_sql!(
    "REVOKE ALL ON FUNCTION rbucardo.peer_hello(text, integer), rbucardo.peer_fetch(text, bigint, bigint, integer),
                            rbucardo.peer_position(text), rbucardo.peer_push(text, bytea),
                            rbucardo.peer_schema(text, jsonb, text) FROM PUBLIC;
     GRANT EXECUTE ON FUNCTION rbucardo.peer_hello(text, integer), rbucardo.peer_fetch(text, bigint, bigint, integer),
                            rbucardo.peer_position(text), rbucardo.peer_push(text, bytea),
                            rbucardo.peer_schema(text, jsonb, text) TO rbucardo_peer;",
    name = "peer_grants",
    requires = [peer_hello, peer_fetch, peer_position, peer_push, peer_schema]
);

// ---------------------------------------------------------------------------------------------
// The connecting side, run by the worker.

/// How long one remote call may take before the link is considered dead.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `f` in its own local transaction; an ERROR becomes `Err(message)` and the transaction
/// is rolled back, so the worker survives it.
pub fn in_txn<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe + std::panic::RefUnwindSafe) -> Result<R, String> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| Err(crate::exceptions::error_message(&e)))
        .execute();
    unsafe {
        if result.is_ok() {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    result
}

/// One outbound link and what it has learned.
pub struct Link {
    pub peer: Peer,
    pub conn: Option<PeerConn>,
    pub peer_id: i32,
    /// Why a direction of this link is stopped (a schema change of the stream that fails on
    /// the receiving side), as learned in the last round.
    pub stopped: Option<String>,
    /// md5 of the table shape the peer last received from us.
    schema_sent: Option<String>,
    me_name: String,
}

impl Link {
    /// Connects, says hello and listens for the peer's change notifications.
    pub fn connect(peer: &Peer, me: &Me) -> Result<Link, String> {
        let conninfo = peer.conninfo.as_deref().unwrap_or_default();
        let mut conn = PeerConn::connect(conninfo, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        let rows = conn
            .query("SELECT name, node_id FROM rbucardo.peer_hello($1, $2)", &[Param::Text(&me.name), Param::Text(&me.id.to_string())], CALL_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let (name, id) = rows.first().and_then(|r| Some((r.text(0)?, r.i32(1)?))).ok_or("peer_hello returned nothing")?;
        if name != peer.name {
            return Err(format!("the server at this conninfo is node {name}, not {}", peer.name));
        }
        let peer_name = peer.name.clone();
        in_txn(move || catalog::learn_peer_id(&peer_name, id))?;
        conn.execute("LISTEN rbucardo_changes", CALL_TIMEOUT).map_err(|e| e.to_string())?;
        Ok(Link { peer: peer.clone(), conn: Some(conn), peer_id: id, stopped: None, schema_sent: None, me_name: me.name.clone() })
    }

    fn conn(&mut self) -> Result<&mut PeerConn, String> {
        self.conn.as_mut().ok_or_else(|| "not connected".to_string())
    }

    /// Pulls the peer's stream until it has nothing more; returns transactions applied.
    pub fn pull(&mut self, me: &Me) -> Result<i64, String> {
        let mut total = 0;
        loop {
            let (name, peer_id) = (self.peer.name.clone(), self.peer_id);
            let (after, stopped) = in_txn(move || {
                let (t, s) = Spi::get_two_with_args::<i64, i64>("SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = $1", &[name.as_str().into()])
                    .expect("peer state");
                (Position { tick: t.unwrap_or(0), seq: s.unwrap_or(DONE) }, crate::exceptions::stream_stopped(peer_id))
            })?;
            if stopped.is_some() {
                self.stopped = stopped;
                return Ok(total);
            }
            let rows = self
                .conn()?
                .query(
                    "SELECT rbucardo.peer_fetch($1, $2, $3, $4)",
                    &[Param::Text(&me.name), Param::Text(&after.tick.to_string()), Param::Text(&after.seq.to_string()), Param::Text(&BATCH_BYTES.to_string())],
                    CALL_TIMEOUT,
                )
                .map_err(|e| e.to_string())?;
            let bytes = rows.first().and_then(|r| r.bytes(0)).ok_or("peer_fetch returned nothing")?;
            let batch = decode_batch(bytes, MAX_BATCH_BYTES).map_err(|e| format!("refused a batch from {}: {e}", self.peer.name))?;
            if batch.txns.is_empty() && batch.upto == after {
                return Ok(total);
            }
            let (me_id, name, peer_id) = (me.id, self.peer.name.clone(), self.peer_id);
            let empty = batch.txns.is_empty();
            let applied = in_txn(move || {
                let a = crate::apply::apply_batch(me_id, &name, peer_id, &batch);
                (a.txns, a.stopped)
            })?;
            total += applied.0;
            if applied.1.is_some() {
                self.stopped = applied.1;
                return Ok(total);
            }
            if empty {
                return Ok(total);
            }
        }
    }

    /// Trades table shapes with the peer (for validate_schema); sends ours only when it changed
    /// since the peer last acknowledged it.
    pub fn exchange_schema(&mut self) -> Result<(), String> {
        let (md5, shape) = in_txn(crate::ddl::my_shape)?;
        let send = (self.schema_sent.as_deref() != Some(md5.as_str())).then(|| shape.0.to_string());
        let name = self.peer.name.clone();
        let known = in_txn(move || crate::ddl::peer_shape_md5(&name))?;
        let me = self.me_name.clone();
        let rows = self
            .conn()?
            .query(
                "SELECT md5, shape::text FROM rbucardo.peer_schema($1, $2::jsonb, $3)",
                &[Param::Text(&me), send.as_deref().map_or(Param::Null, Param::Text), known.as_deref().map_or(Param::Null, Param::Text)],
                CALL_TIMEOUT,
            )
            .map_err(|e| e.to_string())?;
        self.schema_sent = Some(md5);
        if let Some(theirs) = rows.first().and_then(|r| r.text(1)) {
            let shape: serde_json::Value = serde_json::from_str(&theirs).map_err(|e| format!("peer_schema returned bad JSON: {e}"))?;
            let name = self.peer.name.clone();
            in_txn(move || crate::ddl::store_peer_shape(&name, pgrx::JsonB(shape)))?;
        }
        Ok(())
    }

    /// Pushes this node's stream to the peer until it has everything; returns batches sent.
    /// While the peer applies one batch, the next is read from the change log, so catching up
    /// after an outage keeps both nodes busy.
    pub fn push(&mut self, me: &Me) -> Result<i64, String> {
        let mut sent = 0;
        'from_the_peer: loop {
            let rows = self
                .conn()?
                .query("SELECT tick, seq, stopped FROM rbucardo.peer_position($1)", &[Param::Text(&me.name)], CALL_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let pos = rows.first().and_then(|r| Some(Position { tick: r.i64(0)?, seq: r.i64(1)? })).ok_or("peer_position returned nothing")?;
            let (me_id, name, peer_id) = (me.id, self.peer.name.clone(), self.peer_id);
            if let Some(why) = rows.first().and_then(|r| r.text(2)) {
                in_txn(move || record_confirmed(&name, pos))?;
                self.stopped = Some(format!("{} stopped applying this node's stream: {why}", self.peer.name));
                return Ok(sent);
            }
            let mut batch = in_txn(move || {
                record_confirmed(&name, pos);
                crate::changelog::read_batch(me_id, pos, peer_id, BATCH_BYTES)
            })?;
            if batch.txns.is_empty() && batch.upto == pos {
                return Ok(sent);
            }
            loop {
                let empty = batch.txns.is_empty();
                let bytes = encode_batch(&batch);
                self.conn()?
                    .send("SELECT tick, seq, stopped FROM rbucardo.peer_push($1, $2)", &[Param::Text(&me.name), Param::Bytes(&bytes)], CALL_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                drop(bytes);
                // The peer ends at batch.upto unless it stops short; read on from there.
                let upto = batch.upto;
                let next = (!empty).then(|| in_txn(move || crate::changelog::read_batch(me_id, upto, peer_id, BATCH_BYTES)));
                let rows = self.conn()?.receive(CALL_TIMEOUT).map_err(|e| e.to_string())?;
                let done = rows.first().and_then(|r| Some(Position { tick: r.i64(0)?, seq: r.i64(1)? })).ok_or("peer_push returned nothing")?;
                let name = self.peer.name.clone();
                in_txn(move || record_confirmed(&name, done))?;
                sent += 1;
                if let Some(why) = rows.first().and_then(|r| r.text(2)) {
                    self.stopped = Some(format!("{} stopped applying this node's stream: {why}", self.peer.name));
                    return Ok(sent);
                }
                let Some(next) = next else { return Ok(sent) };
                let next = next?;
                if done != upto {
                    continue 'from_the_peer;
                }
                if next.txns.is_empty() && next.upto == upto {
                    return Ok(sent);
                }
                batch = next;
            }
        }
    }
}
