//! The peer endpoints: what another node calls on this one, over the one libpq connection it
//! opened (src/runtime/link.rs is the calling side). A node with a conninfo for its peer both
//! pulls the peer's stream (peer_fetch) and pushes its own (peer_position, peer_push) over it,
//! so a branch behind NAT is fully served by its own outbound connection.
//!
//! These functions are SECURITY DEFINER with a pinned search_path (the pushes pin it first
//! thing in their body, the others with a SET clause), and granted only to the role
//! rbucardo_peer (and superusers). The caller must log in as the role named after the peer it
//! claims to be; what it may then do is this node's policy for that peer (src/apply/admit.rs).

use pgrx::prelude::*;

use crate::base::error::raise;
use crate::base::node::{self, me_or_raise};
use crate::base::plans;
use crate::base::wire::{decode_batch, encode_batch, Position};
use crate::log::changelog::BatchSize;

/// A fetched batch is filled up to about this many bytes, and a transaction larger than this
/// travels in parts (a pushed batch is filled less: src/runtime/link.rs `push_size`).
pub const BATCH_BYTES: usize = 8 << 20;
/// One apply transaction holds about this many bytes of changes: a pushed batch is filled to
/// it near the peer (which applies it in one transaction), a fetched one applied in slices of
/// it. Every version a transaction makes of a row stays on its page and in its index until the
/// transaction ends: each update of a hot row (pgbench's ten branch rows, a shop's stock
/// counters) walked all the versions before it in the batch (docs/performance.md).
pub const APPLY_BYTES: usize = 256 << 10;
/// A batch larger than this is refused unread (a transaction larger than BATCH_BYTES travels
/// alone, up to this size).
pub const MAX_BATCH_BYTES: usize = 512 << 20;

/// The caller must be who it says it is: a superuser, or the login role named after the peer
/// (each branch connects as its own role, member of rbucardo_peer).
/// Asked of the catalog caches at every call (a role's rights can change at any time); the
/// caches are kept current by PostgreSQL's own invalidations. Every peer call passes here, and
/// its transaction may not be prepared.
fn check_caller(peer_name: &str) {
    // A peer call may hold the tick, stream or origin lock to its commit: prepared, it would
    // keep them after the peer left (no idle timeout ends it) and stop this node's stream.
    crate::base::xact::refuse_prepare("called an rbucardo peer function");
    // SAFETY: inside a transaction on the main thread: the session user is a valid role id
    // (or GetUserNameFromId raises), and the name it returns is a palloc'd C string, read at
    // once.
    let allowed = unsafe {
        let session = pg_sys::GetSessionUserId();
        pg_sys::superuser_arg(session) || std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(session, false)).to_bytes() == peer_name.as_bytes()
    };
    if !allowed {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("this session may not act as peer {peer_name}"),
            format!("Connect as the role named {peer_name} (a member of rbucardo_peer) or as a superuser."),
        );
    }
}

/// A peer expired here (src/log/retention.rs) gets nothing more of this node's stream: it
/// would have a hole. What it sends still comes in.
fn refuse_expired(peer_name: &str, why: String) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("{peer_name} must rejoin: {why}"),
        format!(
            "The changes {peer_name} missed are gone from this node, so it would receive a stream with a hole in it. \
             Re-create {peer_name} from a copy of a current node (docs/operations.md, \"A copied node\"), \
             or remove it from its syncs and with remove_db('{peer_name}')."
        ),
    )
}

/// A fetch's position confirms the peer's stream up to it; it never moves back.
macro_rules! confirm_fetch {
    () => {
        "UPDATE rbucardo.peer_state
            SET out_tick = CASE WHEN (out_tick, out_seq) < ($2, $3) THEN $2 ELSE out_tick END,
                out_seq = CASE WHEN (out_tick, out_seq) < ($2, $3) THEN $3 ELSE out_seq END,
                last_contact = now(), state = 'connected', last_error = NULL
          WHERE db = $1"
    };
}

/// Records the caller's confirmation of this node's stream up to `after` (and its contact):
/// whether it was written, and why the peer expired here, if it did (one statement, as every
/// fetch asks both).
/// `if_free`: not if another transaction holds the peer's row (then nothing is written, nor
/// checked): a fetch that may hold the tick lock must not wait for the row, which the
/// worker's push locks before it takes the tick lock (link.rs).
fn note_fetch(peer_name: &str, after: Position, if_free: bool) -> (bool, Option<String>) {
    macro_rules! only_if_free {
        () => {
            " AND db IN (SELECT f.db FROM rbucardo.peer_state f WHERE f.db = $1 FOR UPDATE SKIP LOCKED)"
        };
    }
    macro_rules! expiry {
        () => {
            " RETURNING CASE WHEN expired_at IS NOT NULL THEN coalesce(expired_why, 'expired') END"
        };
    }
    // A 0.2 library on a 0.1 catalog (before ALTER EXTENSION UPDATE) has no expiry columns.
    let sql = match (crate::log::retention::ready(), if_free) {
        (true, false) => concat!(confirm_fetch!(), expiry!()),
        (false, false) => concat!(confirm_fetch!(), " RETURNING NULL::text"),
        (true, true) => concat!(confirm_fetch!(), only_if_free!(), expiry!()),
        (false, true) => concat!(confirm_fetch!(), only_if_free!(), " RETURNING NULL::text"),
    };
    plans::run(sql, &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID], &[peer_name.into(), after.tick.into(), after.seq.into()], |rows| {
        rows.into_iter().next().map_or((false, None), |r| (true, r.get::<String>(1).ok().flatten()))
    })
}

/// The node id of the calling peer, which must be an active peer here. Kept between calls
/// while the configuration stays the same (src/base/kept.rs); who the caller is, is not.
fn peer_node(peer_name: &str) -> i32 {
    thread_local! {
        static ACTIVE: crate::base::kept::Kept<Option<i32>> = Default::default();
    }
    check_caller(peer_name);
    ACTIVE.with(|k| {
        k.get_or(peer_name, || {
            plans::one::<i32>(
                "SELECT d.node_id FROM rbucardo.db d WHERE d.name = $1
                    AND EXISTS (SELECT 1 FROM rbucardo.sync s WHERE d.name = ANY (s.dbs) AND NOT s.paused)",
                &[pg_sys::TEXTOID],
                &[peer_name.into()],
            )
        })
    })
    .unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("{peer_name} is not an active peer of this node"),
            "The peer must be added with rbucardo.add_db(), be part of a sync that is not paused, and have said hello.",
        )
    })
}

fn touch(peer_name: &str) {
    plans::run(
        "UPDATE rbucardo.peer_state SET last_contact = now(), state = 'connected', last_error = NULL WHERE db = $1",
        &[pg_sys::TEXTOID],
        &[peer_name.into()],
        |_| (),
    );
}

/// First call of a session: both sides learn each other's node id, and a node that is a copy
/// of another (or not initialised) is refused before any data moves.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_hello(peer_name: &str, peer_node_id: i32) -> TableIterator<'static, (name!(name, String), name!(node_id, i32))> {
    check_caller(peer_name);
    let me = me_or_raise();
    if peer_node_id == me.id {
        raise(PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION, format!("peer {peer_name} uses this node's id {}", me.id), "Every node needs its own node id (rbucardo.init_node).");
    }
    node::learn_peer_id(peer_name, peer_node_id);
    touch(peer_name);
    TableIterator::once((me.name, me.id))
}

/// This node's stream after the given position, as a framed batch, leaving out the caller's
/// own changes. The position is also the caller's confirmation of everything up to it.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_fetch(peer_name: &str, after_tick: i64, after_seq: i64, max_bytes: i32, held_tick: default!(i64, 0), held_seq: default!(i64, 0), held_chunks: default!(i32, 0)) -> Vec<u8> {
    let me = me_or_raise();
    let node = peer_node(peer_name);
    let after = Position { tick: after_tick, seq: after_seq };
    // A fetch writes only the peer's confirmation and its last contact: both may be lost in a
    // crash (the peer sends them again), so its commit does not wait for the disk.
    crate::base::xact::set_local(c"synchronous_commit", c"off");
    // A fetch may hold the tick lock to its commit: a caller that leaves its transaction open
    // would stop every tick on this node. It is ended after a minute idle.
    crate::base::xact::set_local(c"idle_in_transaction_session_timeout", c"60s");
    let noted = !noted_lately(peer_name);
    if noted {
        note_fetch_or_refuse(peer_name, after, false);
    } else if let Some(why) = expired_kept(peer_name) {
        refuse_expired(peer_name, why);
    }
    let limit = (max_bytes.max(1) as usize).min(BATCH_BYTES);
    let policy = node::peer_policy(peer_name);
    let held = (held_chunks > 0).then_some((Position { tick: held_tick, seq: held_seq }, held_chunks as u32));
    let newest = crate::log::changelog::served_tick();
    let batch = crate::log::changelog::read_batch(me.id, after, node, BatchSize { fill: limit, max: limit }, &policy, held, newest);
    // Nothing more for the peer: it may not fetch again for a while, so what it confirmed is
    // written now (unless the row is busy: a lower bound, written by a later fetch).
    if !noted && batch.txns.is_empty() {
        note_fetch_or_refuse(peer_name, after, true);
    }
    encode_batch(&batch)
}

/// How long a backend serving a peer's fetches may leave the peer's confirmation (and last
/// contact) unwritten while its fetches bring it something. A hub's store fetches after
/// every notification, 30 times a second with 20 stores, and the write was the costliest
/// statement of a fetch (docs/performance.md). The confirmation is a lower bound wherever it
/// is read (trimming, wait_for_sync, the lag views, a join's end): a late one holds the log a
/// little longer. A fetch that brings nothing writes it (unless another transaction holds the
/// peer's row: then the next fetch does): the peer has everything then, and may not fetch
/// again for a while.
const CONFIRM_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

thread_local! {
    /// The peer whose confirmation this backend last wrote, and when.
    static NOTED: std::cell::RefCell<Option<(String, std::time::Instant)>> = const { std::cell::RefCell::new(None) };
}

/// Whether this backend wrote `peer_name`'s confirmation less than CONFIRM_EVERY ago.
fn noted_lately(peer_name: &str) -> bool {
    NOTED.with(|n| n.borrow().as_ref().is_some_and(|(p, at)| p == peer_name && at.elapsed() < CONFIRM_EVERY))
}

/// Writes the peer's confirmation, or refuses the fetch if it is expired here.
fn note_fetch_or_refuse(peer_name: &str, after: Position, if_free: bool) {
    let (written, expired) = note_fetch(peer_name, after, if_free);
    if let Some(why) = expired {
        refuse_expired(peer_name, why);
    }
    if written {
        NOTED.with(|n| *n.borrow_mut() = Some((peer_name.to_string(), std::time::Instant::now())));
    }
}

/// Whether the peer is expired here, kept between fetches while the configuration stays the
/// same (src/base/kept.rs): the housekeeper bumps it in the transaction that expires a peer,
/// remove_db when it clears one.
fn expired_kept(peer_name: &str) -> Option<String> {
    thread_local! {
        static EXPIRED: crate::base::kept::Kept<Option<String>> = Default::default();
    }
    EXPIRED.with(|k| k.get_or(peer_name, || crate::log::retention::expired(peer_name)))
}

/// Where this node stands in the caller's stream: the caller pushes from there, and goes on
/// with the transaction of which this node holds `held_chunks` chunks (at held_tick,
/// held_seq), if any. `stopped` says why the stream is stopped here (a schema change that
/// fails here), while no retry is due.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn peer_position(
    peer_name: &str,
) -> TableIterator<'static, (name!(tick, i64), name!(seq, i64), name!(stopped, Option<String>), name!(held_tick, i64), name!(held_seq, i64), name!(held_chunks, i32))> {
    me_or_raise();
    let node = peer_node(peer_name);
    check_not_joining(peer_name);
    touch(peer_name);
    let (t, s) = plans::two::<i64, i64>("SELECT in_tick, in_seq FROM rbucardo.peer_state WHERE db = $1", &[pg_sys::TEXTOID], &[peer_name.into()]);
    // The caller confirms this position: pushes that committed it may not be on disk yet.
    crate::base::durable::flush_committed();
    let stopped = crate::apply::exceptions::stream_stopped(node).or_else(|| refused(peer_name));
    let (held, chunks) = crate::apply::parts::resume_point(node).unwrap_or((Position { tick: 0, seq: 0 }, 0));
    TableIterator::once((t.unwrap_or(0), s.unwrap_or(Position::START.seq), stopped, held.tick, held.seq, chunks as i32))
}

/// Applies a batch of the caller's stream here, atomically per transaction, with a durable
/// commit; returns the new position, and why the stream stopped short of the batch's end, if
/// it did. (Links call `peer_push_flushed`, and this one while a peer's catalog lacks it.)
#[pg_extern(volatile, security_definer)]
fn peer_push(peer_name: &str, batch: &[u8]) -> TableIterator<'static, (name!(tick, i64), name!(seq, i64), name!(stopped, Option<String>))> {
    let (applied, _) = push(peer_name, batch, false);
    TableIterator::once((applied.cursor.tick, applied.cursor.seq, applied.stopped))
}

/// `peer_push`, committed without waiting for the WAL flush (src/base/durable.rs), and also
/// returning the newest position of the stream known to be on disk here: all the caller may
/// confirm (NULL: none known yet). A batch with a part of a large transaction, or one pushed
/// inside an explicit transaction block, is committed durably all the same.
#[pg_extern(volatile, security_definer)]
#[allow(clippy::type_complexity)]
fn peer_push_flushed(
    peer_name: &str,
    batch: &[u8],
) -> TableIterator<'static, (name!(tick, i64), name!(seq, i64), name!(stopped, Option<String>), name!(flushed_tick, Option<i64>), name!(flushed_seq, Option<i64>))> {
    let (applied, flushed) = push(peer_name, batch, true);
    TableIterator::once((applied.cursor.tick, applied.cursor.seq, applied.stopped, flushed.map(|p| p.tick), flushed.map(|p| p.seq)))
}

/// Applies a pushed batch; with `report_flushed`, lets it commit without waiting for the disk
/// and returns what is known to be on disk.
fn push(peer_name: &str, batch: &[u8], report_flushed: bool) -> (crate::apply::Applied, Option<Position>) {
    // The pushes pin search_path here rather than with a SET clause: a link session has it
    // pinned already (runtime/link.rs), and then no setting changes in the transaction, which
    // keeps the applier's per-row settings sandboxes cheap (base/xact.rs, `has_value`).
    let _path = crate::base::xact::LocalSetting::pinned_search_path();
    // A transaction that wrote before this push (another push in the same statement) may
    // have moved the cursor this push starts from: that position is not committed yet.
    // SAFETY: reads the backend's transaction state.
    let wrote_before = unsafe { pg_sys::GetCurrentTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    let me = me_or_raise();
    let node = peer_node(peer_name);
    check_not_joining(peer_name);
    let batch = decode_batch(batch, MAX_BATCH_BYTES).unwrap_or_else(|e| {
        raise(PgSqlErrorCode::ERRCODE_DATA_CORRUPTED, format!("refused a batch from {peer_name}: {e}"), "Nothing of it was applied; the sender retries. Persistent errors point at a faulty link or peer.")
    });
    // A superuser's link session stays in replica mode from its first push on
    // (xact::replica_session says why and why only a superuser's).
    crate::base::xact::replica_session();
    let applied = crate::apply::apply_batch(me.id, peer_name, node, &batch);
    // A batch that brings a part of a large transaction commits durably: every part kept
    // here survives a crash, so the sender goes on from all it sent; a part is megabytes, so
    // its flush costs little. Inside a transaction block the commit is the caller's, later:
    // nothing is noted, nothing confirmed.
    // SAFETY: reads the backend's transaction state.
    let in_block = unsafe { pg_sys::IsTransactionBlock() } || wrote_before;
    let holds_part = batch.txns.iter().any(|t| t.part.is_some());
    let flushed = if report_flushed && !holds_part && !in_block {
        crate::base::xact::set_local(c"synchronous_commit", c"off");
        crate::base::durable::note_committed(node, applied.from)
    } else if in_block {
        None
    } else {
        Some(applied.cursor)
    };
    // An applied batch has written last_contact already: most pushes write nothing here.
    plans::run(
        "UPDATE rbucardo.peer_state SET last_contact = now(), state = 'connected', last_error = NULL
          WHERE db = $1 AND (last_contact IS DISTINCT FROM now() OR state IS DISTINCT FROM 'connected' OR last_error IS NOT NULL)",
        &[pg_sys::TEXTOID],
        &[peer_name.into()],
        |_| (),
    );
    (applied, flushed)
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
    me_or_raise();
    peer_node(peer_name);
    if let Some(shape) = shape {
        crate::schema::ddl::store_peer_shape(peer_name, shape);
    }
    let (md5, mine) = crate::schema::ddl::my_shape();
    let mine = (known_md5 != Some(md5.as_str())).then_some(mine);
    TableIterator::once((md5, mine))
}

/// Report exchange for the rbucardo.cluster view (sql/cluster.sql): keeps the reports the
/// caller passes on (its own and those it holds of nodes beyond it) and returns this node's
/// own and those it holds, except the caller's.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_report(peer_name: &str, reports: &str) -> String {
    me_or_raise();
    peer_node(peer_name);
    touch(peer_name);
    crate::api::cluster::exchange(peer_name, reports)
}

/// A joining node's first call to its provider (src/runtime/join.rs): what it joins (the
/// syncs and tables it shares with this node), as JSON. Changes nothing.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_join_describe(peer_name: &str) -> String {
    me_or_raise();
    peer_node(peer_name);
    touch(peer_name);
    crate::runtime::join::provide_description(peer_name)
}

/// A joining node's second call, once it is ready: cuts the tick its stream starts after.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_join_start(peer_name: &str) -> i64 {
    me_or_raise();
    peer_node(peer_name);
    touch(peer_name);
    crate::runtime::join::provide_start(peer_name)
}

/// A temporary view of a shared table's columns for a joining node to COPY out of, in the
/// snapshot of its transaction; returns its name.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_copy_view(peer_name: &str, schema_name: &str, table_name: &str, cols: Vec<String>) -> String {
    me_or_raise();
    peer_node(peer_name);
    // A long copy keeps the peer in contact (retention counts from the last contact).
    touch(peer_name);
    crate::runtime::join::provide_copy_view(peer_name, schema_name, table_name, &cols)
}

/// A joining node's last call: the snapshot of each of its table copies, so that what they
/// hold is left out of its stream. Returns the tick after which that no longer matters.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn peer_join_end(peer_name: &str, filter: &str) -> i64 {
    me_or_raise();
    peer_node(peer_name);
    touch(peer_name);
    crate::runtime::join::provide_end(peer_name, filter)
}

/// A table's digest (src/schema/digest.rs), for a peer comparing it with its own: the
/// columns and key it names, over `buckets` buckets.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn peer_diff_digest(
    peer_name: &str,
    schema_name: &str,
    table_name: &str,
    cols: Vec<String>,
    key: Vec<String>,
    buckets: i32,
) -> TableIterator<'static, (name!(bucket, i32), name!(rows, i64), name!(hash, i64))> {
    me_or_raise();
    peer_node(peer_name);
    let t = crate::schema::digest::checked_target(&node::peer_policy(peer_name), schema_name, table_name, &cols, &key);
    let d = crate::schema::digest::digest(&t, buckets.clamp(1, 1 << 16));
    TableIterator::new(d.into_iter().map(|(b, (n, h))| (b, n, h)).collect::<Vec<_>>())
}

/// The rows of a table's buckets `wanted`, for a peer narrowing a difference down.
#[pg_extern(volatile, security_definer)]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn peer_diff_rows(
    peer_name: &str,
    schema_name: &str,
    table_name: &str,
    cols: Vec<String>,
    key: Vec<String>,
    buckets: i32,
    wanted: Vec<i32>,
) -> TableIterator<'static, (name!(key, String), name!(row, String))> {
    me_or_raise();
    peer_node(peer_name);
    let t = crate::schema::digest::checked_target(&node::peer_policy(peer_name), schema_name, table_name, &cols, &key);
    let rows = crate::schema::digest::rows(&t, buckets.clamp(1, 1 << 16), &wanted);
    TableIterator::new(rows.into_iter().collect::<Vec<_>>())
}

/// While this node joins from its provider, nothing is pushed to it: its cursor in the
/// provider's stream waits for its copies.
fn check_not_joining(peer_name: &str) {
    if let Some(provider) = crate::runtime::join::joining() {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this node is joining from {provider}; it takes no stream from {peer_name} until its copies are done"),
            "See rbucardo.join_progress on this node.",
        );
    }
}

/// Why the last batch from `peer_name` was refused, for a few seconds after the refusal: the
/// sender then tries again (the operator may have changed the configuration), so that a
/// refusal never stops a stream for good.
fn refused(peer_name: &str) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT refused FROM rbucardo.peer_state
          WHERE db = $1 AND refused_at > pg_catalog.now() - pg_catalog.make_interval(secs => $2)",
        &[peer_name.into(), crate::apply::exceptions::DDL_RETRY_EVERY.into()],
    )
    .ok()
    .flatten()
}

/// Records that `peer_name` has everything of this node's stream up to `pos`.
pub fn record_confirmed(peer_name: &str, pos: Position) {
    plans::run(
        "UPDATE rbucardo.peer_state SET out_tick = $2, out_seq = $3
          WHERE db = $1 AND (out_tick, out_seq) < ($2, $3)",
        &[pg_sys::TEXTOID, pg_sys::INT8OID, pg_sys::INT8OID],
        &[peer_name.into(), pos.tick.into(), pos.seq.into()],
        |_| (),
    );
}

pgrx::extension_sql!(
    "REVOKE ALL ON FUNCTION rbucardo.peer_hello(text, integer), rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer),
                            rbucardo.peer_position(text), rbucardo.peer_push(text, bytea), rbucardo.peer_push_flushed(text, bytea),
                            rbucardo.peer_schema(text, jsonb, text), rbucardo.peer_report(text, text),
                            rbucardo.peer_join_describe(text), rbucardo.peer_join_start(text), rbucardo.peer_copy_view(text, text, text, text[]),
                            rbucardo.peer_join_end(text, text),
                            rbucardo.peer_diff_digest(text, text, text, text[], text[], integer),
                            rbucardo.peer_diff_rows(text, text, text, text[], text[], integer, integer[]) FROM PUBLIC;
     GRANT EXECUTE ON FUNCTION rbucardo.peer_hello(text, integer), rbucardo.peer_fetch(text, bigint, bigint, integer, bigint, bigint, integer),
                            rbucardo.peer_position(text), rbucardo.peer_push(text, bytea), rbucardo.peer_push_flushed(text, bytea),
                            rbucardo.peer_schema(text, jsonb, text), rbucardo.peer_report(text, text),
                            rbucardo.peer_join_describe(text), rbucardo.peer_join_start(text), rbucardo.peer_copy_view(text, text, text, text[]),
                            rbucardo.peer_join_end(text, text),
                            rbucardo.peer_diff_digest(text, text, text, text[], text[], integer),
                            rbucardo.peer_diff_rows(text, text, text, text[], text[], integer, integer[]) TO rbucardo_peer;",
    name = "peer_grants",
    requires = [peer_hello, peer_fetch, peer_position, peer_push, peer_push_flushed, peer_schema, peer_report, peer_join_describe, peer_join_start, peer_copy_view, peer_join_end, peer_diff_digest, peer_diff_rows]
);

