//! This node's identity and the peers it knows, as recorded in the catalog (`node`, `db`),
//! and the replica key that identifies a row on every node.

use pgrx::prelude::*;

use std::rc::Rc;

use crate::base::kept::Kept;
use crate::base::plans;

use crate::base::error::raise;

/// This node as it is configured: id and name.
#[derive(Clone, Debug)]
pub struct Me {
    pub id: i32,
    pub name: String,
}

/// What tells this server apart from a physical copy of it: host name, system identifier,
/// data directory and port. A copy keeps the system identifier, so one of the others must
/// differ; moving a node (new host, directory or port) asks for init_node again, which keeps
/// its identity if given the same name and id.
pub fn fingerprint() -> String {
    thread_local! {
        // The server's part cannot change while this backend lives; peer calls ask for it
        // every time.
        static SERVER: std::cell::OnceCell<String> = const { std::cell::OnceCell::new() };
    }
    let server = SERVER.with(|s| {
        s.get_or_init(|| {
            Spi::get_one::<String>(
                "SELECT (SELECT system_identifier FROM pg_control_system())::text || ':' ||
                        current_setting('data_directory') || ':' || current_setting('port')",
            )
            .expect("reading the server fingerprint")
            .unwrap_or_default()
        })
        .clone()
    });
    format!("{}:{server}", host_name())
}

/// The host name, asked anew every time (a running machine cloned with its memory gets a new
/// one): one system call, where reading /proc/sys/kernel/hostname opened a file per peer call.
fn host_name() -> String {
    unsafe extern "C" {
        fn gethostname(name: *mut std::ffi::c_char, len: usize) -> std::ffi::c_int;
    }
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most len bytes into buf.
    if unsafe { gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).trim().to_string()
}

/// This node's identity, or why it may not replicate: not initialised, or a physical copy of
/// another node (its fingerprint differs from the one recorded by init_node).
pub fn me() -> Result<Me, String> {
    thread_local! {
        static NODE: Kept<(Option<i32>, Option<String>, Option<String>)> = Kept::default();
    }
    // The row is kept between calls; the fingerprint it is checked against is not.
    let row = NODE.with(|k| {
        k.get_or("", || {
            plans::run("SELECT node_id, name, fingerprint FROM rbucardo.node", &[], &[], |t| {
                if t.is_empty() { (None, None, None) } else { t.first().get_three::<i32, String, String>().unwrap_or((None, None, None)) }
            })
        })
    });
    match row {
        (Some(id), Some(name), Some(fp)) => {
            if fp != fingerprint() {
                Err(format!(
                    "this database is a copy of node {name} (id {id}) made on another server or data directory; \
                     it must not replicate as that node. Give it its own identity with rbucardo.init_node(name, node_id)"
                ))
            } else {
                Ok(Me { id, name })
            }
        }
        _ => Err("this node is not initialised: call rbucardo.init_node(name, node_id)".into()),
    }
}

/// Like [`me`], but raises the reason as an error for SQL callers.
pub fn me_or_raise() -> Me {
    me().unwrap_or_else(|e| raise(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, e, "See docs/operations.md, section Nodes."))
}

/// A peer this node talks to, as the worker and the peer-facing functions see it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub name: String,
    pub conninfo: Option<String>,
    pub node_id: Option<i32>,
}

/// Peers that take part in at least one sync that is not paused.
pub fn active_peers() -> Vec<Peer> {
    plans::run(
        "SELECT d.name, d.conninfo, d.node_id FROM rbucardo.db d
          WHERE EXISTS (SELECT 1 FROM rbucardo.sync s WHERE d.name = ANY (s.dbs) AND NOT s.paused)
          ORDER BY d.name",
        &[],
        &[],
        |t| t.map(|r| Peer { name: r.get(1).unwrap().unwrap(), conninfo: r.get(2).unwrap(), node_id: r.get(3).unwrap() }).collect(),
    )
}

/// `active_peers`, kept from one call to the next while the configuration stays the same
/// (src/base/kept.rs): every batch applied asks whom it forwards to.
pub fn active_peers_kept() -> Rc<Vec<Peer>> {
    thread_local! {
        static PEERS: Kept<Rc<Vec<Peer>>> = Kept::default();
    }
    PEERS.with(|k| k.get_or("", || Rc::new(active_peers())))
}

/// Records the node id a peer announced; a different id than the one on record is refused,
/// because it means two servers claim the same name.
pub fn learn_peer_id(name: &str, node_id: i32) {
    let known = Spi::get_one_with_args::<i32>("SELECT node_id FROM rbucardo.db WHERE name = $1", &[name.into()]);
    match known {
        Ok(Some(id)) if id == node_id => {}
        Ok(Some(id)) => raise(
            PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
            format!("peer {name} announced node id {node_id}, but it is known here as node id {id}"),
            "Two servers use the same node name, or the peer was re-initialised; fix its identity or remove and re-add the db.",
        ),
        _ => {
            let exists = Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM rbucardo.db WHERE name = $1)", &[name.into()]).ok().flatten() == Some(true);
            if !exists {
                raise(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("node {name} is not a known db here"), format!("On this node, run SELECT rbucardo.add_db('{name}');"));
            }
            Spi::run_with_args("UPDATE rbucardo.db SET node_id = $2 WHERE name = $1", &[name.into(), node_id.into()])
                .unwrap_or_else(|_| raise(PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT, format!("node id {node_id} is already used by another db"), "Node ids must be unique in the cluster."));
            // Node names by id are part of what appliers keep per session (priority lists).
            crate::base::signals::wake_local_worker_at_commit();
        }
    }
}

/// The columns that identify a row on every node: the primary key, else the unique index on
/// NOT NULL columns with the fewest columns (ties broken by index name, which is the same on
/// every node). `None` when the table has neither.
pub fn replica_key(relid: pg_sys::Oid) -> Option<Vec<String>> {
    Spi::get_one_with_args::<Vec<String>>(
        "WITH cand AS (
             SELECT i.indisprimary, i.indnkeyatts, c.relname,
                    (i.indkey::int2[])[0:i.indnkeyatts - 1] AS cols
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL),
         best AS (
             SELECT cols FROM cand
              WHERE NOT EXISTS (SELECT 1 FROM unnest(cols) k
                                  JOIN pg_attribute a ON a.attrelid = $1 AND a.attnum = k
                                 WHERE NOT a.attnotnull)
              ORDER BY indisprimary DESC, indnkeyatts, relname
              LIMIT 1)
         SELECT array_agg(a.attname::text ORDER BY k.ord)
           FROM best, unnest(best.cols) WITH ORDINALITY k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = $1 AND a.attnum = k.attnum",
        &[relid.into()],
    )
    .ok()
    .flatten()
}


/// Node and db names: letters, digits and underscores, starting with a letter or underscore.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}


/// How far this node trusts a peer's schema changes (`rbucardo.set_peer_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DdlLevel {
    /// No schema change from this peer is accepted: a batch carrying one is refused.
    None,
    /// Schema changes run as a role of limited rights chosen here (`ddl_role`), never as a
    /// superuser; role commands, ALTER SYSTEM, COPY ... PROGRAM, extensions and untrusted
    /// languages are refused.
    Limited,
    /// Schema changes run as the role that ran them on their origin: for the node that
    /// administers the schema (main, seen from a branch).
    Trusted,
}

impl DdlLevel {
    pub fn parse(text: &str) -> Option<DdlLevel> {
        match text {
            "none" => Some(DdlLevel::None),
            "limited" => Some(DdlLevel::Limited),
            "trusted" => Some(DdlLevel::Trusted),
            _ => None,
        }
    }
}

/// What this node lets one peer send it, from this node's own configuration: never from what
/// the peer sends.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    pub name: String,
    pub node_id: Option<i32>,
    pub ddl: DdlLevel,
    /// The role its schema changes run as at the limited level.
    pub ddl_role: Option<String>,
    /// Whether it may relay other nodes' changes (a hub, or a mesh peer); otherwise it speaks
    /// only for itself.
    pub relay: bool,
    /// Every table in a herd of a sync shared with this peer, as (schema, name).
    pub tables: std::collections::HashSet<(String, String)>,
    /// The schemas of those tables.
    pub schemas: std::collections::HashSet<String>,
    /// Every replicated table of this node, shared with this peer or not.
    pub replicated: std::collections::HashSet<(String, String)>,
    /// Whether those are all the replicated tables of this node (then nothing needs filtering
    /// when sending to it).
    pub shares_all: bool,
    /// While the peer joins from this node's copies (src/runtime/join.rs): what its copies hold.
    pub join: Option<JoinFilter>,
}

/// What a joining peer's table copies hold already: each table was copied in a snapshot of
/// this node, and a transaction of this node's stream visible in a table's snapshot must not
/// reach the peer again for that table. Only ticks up to `until` (cut after the last copy
/// ended) can hold such transactions.
#[derive(Clone, Debug)]
pub struct JoinFilter {
    pub until: i64,
    pub tables: std::collections::HashMap<(String, String), crate::base::snapshot::Snapshot>,
}

impl JoinFilter {
    /// From its stored form, `[[schema, table, snapshot], ...]`; `None` when it does not parse
    /// (then nothing is sent to the peer until it does: see `peer_policy`).
    pub fn parse(until: i64, json: &str) -> Option<JoinFilter> {
        let rows: Vec<(String, String, String)> = serde_json::from_str(json).ok()?;
        let mut tables = std::collections::HashMap::new();
        for (schema, table, snap) in rows {
            tables.insert((schema, table), crate::base::snapshot::Snapshot::parse(&snap)?);
        }
        Some(JoinFilter { until, tables })
    }

    /// The tables whose copy holds the transaction `txid` of tick `tick` already.
    pub fn holds(&self, tick: i64, txid: u64) -> std::collections::HashSet<(String, String)> {
        if tick > self.until {
            return Default::default();
        }
        self.tables.iter().filter(|(_, s)| s.sees(txid)).map(|(t, _)| t.clone()).collect()
    }
}

/// The policy for the peer named `name`; a peer without a db row here may send nothing. Kept
/// between calls while the configuration stays the same (src/base/kept.rs).
pub fn peer_policy(name: &str) -> Rc<PeerPolicy> {
    thread_local! {
        static POLICIES: Kept<Rc<PeerPolicy>> = Kept::default();
    }
    POLICIES.with(|k| k.get_or(name, || Rc::new(read_peer_policy(name))))
}

fn read_peer_policy(name: &str) -> PeerPolicy {
    // The peer's row, and its join filter while it joins from this node's copies (until it
    // confirms the tick after its last copy).
    let (node_id, ddl, ddl_role, relay, join) = plans::run(
        "SELECT d.node_id, d.ddl, d.ddl_role::text, d.relay, p.join_until, p.join_filter
           FROM rbucardo.db d
           LEFT JOIN rbucardo.peer_state p ON p.db = d.name AND p.join_until IS NOT NULL AND p.out_tick <= p.join_until
          WHERE d.name = $1",
        &[pg_sys::TEXTOID],
        &[name.into()],
        |t| match t.into_iter().next() {
            Some(r) => (
                r.get::<i32>(1).ok().flatten(),
                r.get::<String>(2).ok().flatten(),
                r.get::<String>(3).ok().flatten(),
                r.get::<bool>(4).ok().flatten(),
                r.get::<i64>(5).ok().flatten().map(|until| (until, r.get::<String>(6).ok().flatten().unwrap_or_default())),
            ),
            None => (None, None, None, None, None),
        },
    );
    let relay = relay.unwrap_or(false);
    // Every replicated table, and whether a sync with this peer holds it.
    // The names come from the catalog caches: joining pg_class and pg_namespace made this,
    // run for every fetch and push, the costliest statement of a store's worker.
    let tables: Vec<(String, String, bool)> = plans::run(
        "SELECT t.relid, bool_or(EXISTS (SELECT 1 FROM rbucardo.sync s WHERE s.herd = t.herd AND $1 = ANY (s.dbs)))
           FROM rbucardo.herd_table t
          GROUP BY t.relid",
        &[pg_sys::TEXTOID],
        &[name.into()],
        |t| {
            t.filter_map(|r| {
                let (schema, table) = relation_name(r.get::<pg_sys::Oid>(1).ok()??)?;
                Some((schema, table, r.get::<bool>(2).ok()??))
            })
            .collect()
        },
    );
    let shared: std::collections::HashSet<(String, String)> = tables.iter().filter(|t| t.2).map(|(s, n, _)| (s.clone(), n.clone())).collect();
    let join = join
    .map(|(until, json)| {
        JoinFilter::parse(until, &json).unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("the join filter of {name} does not parse"),
                "rbucardo.peer_state.join_filter was changed by hand; the peer must join again.",
            )
        })
    });
    PeerPolicy {
        join,
        name: name.to_string(),
        node_id,
        ddl: ddl.as_deref().and_then(DdlLevel::parse).unwrap_or(DdlLevel::None),
        ddl_role,
        relay,
        shares_all: shared.len() == tables.len(),
        schemas: shared.iter().map(|(s, _)| s.clone()).collect(),
        replicated: tables.into_iter().map(|(s, n, _)| (s, n)).collect(),
        tables: shared,
    }
}

/// A table by schema and name: its oid and owner.
pub fn table_by_name(schema: &str, table: &str) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    let (relid, owner) = Spi::get_two_with_args::<pg_sys::Oid, pg_sys::Oid>(
        "SELECT k.oid, k.relowner FROM pg_catalog.pg_class k JOIN pg_catalog.pg_namespace n ON n.oid = k.relnamespace
          WHERE n.nspname = $1 AND k.relname = $2 AND k.relkind IN ('r', 'p')",
        &[schema.into(), table.into()],
    )
    .ok()?;
    Some((relid?, owner?))
}

/// The columns a row image of the table holds, in order: not dropped, not generated (as the
/// capture trigger sends them, and as a copy fills them).
pub fn stored_columns(relid: pg_sys::Oid) -> Vec<String> {
    Spi::connect(|c| {
        c.select(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            None,
            &[relid.into()],
        )
        .expect("columns")
        .filter_map(|r| r.get::<String>(1).ok().flatten())
        .collect()
    })
}

/// Why `role` may not run a peer's schema changes at the limited level: a superuser, or a role
/// that can create roles, bypass row security, replicate, or read, write or run programs on
/// the server. `None` when it may; raises if it does not exist.
pub fn too_strong_for_limited(role: &str) -> Result<Option<String>, String> {
    let found = Spi::get_one_with_args::<String>(
        "SELECT concat_ws(', ',
                    CASE WHEN r.rolsuper THEN 'a superuser' END,
                    CASE WHEN r.rolcreaterole THEN 'may create roles' END,
                    CASE WHEN r.rolreplication THEN 'may replicate' END,
                    CASE WHEN r.rolbypassrls THEN 'bypasses row security' END,
                    CASE WHEN pg_catalog.pg_has_role(r.oid, 'pg_execute_server_program', 'MEMBER') THEN 'may run server programs' END,
                    CASE WHEN pg_catalog.pg_has_role(r.oid, 'pg_read_server_files', 'MEMBER') THEN 'may read server files' END,
                    CASE WHEN pg_catalog.pg_has_role(r.oid, 'pg_write_server_files', 'MEMBER') THEN 'may write server files' END,
                    CASE WHEN pg_catalog.pg_has_role(r.oid, 'pg_write_all_data', 'MEMBER') THEN 'may write every table' END,
                    CASE WHEN pg_catalog.pg_has_role(r.oid, 'pg_read_all_data', 'MEMBER') THEN 'may read every table' END)
           FROM pg_catalog.pg_roles r WHERE r.rolname = $1",
        &[role.into()],
    );
    match found {
        Ok(Some(why)) if why.is_empty() => Ok(None),
        Ok(Some(why)) => Ok(Some(why)),
        _ => Err(format!("role {role:?} does not exist")),
    }
}

/// The policy for the peer with node id `node_id`, if it is a known db here.
pub fn peer_policy_by_id(node_id: i32) -> Option<Rc<PeerPolicy>> {
    let name = Spi::get_one_with_args::<String>("SELECT name FROM rbucardo.db WHERE node_id = $1", &[node_id.into()]).ok().flatten()?;
    Some(peer_policy(&name))
}

/// The schema and name of a relation, from the catalog caches; None when it is gone.
pub fn relation_name(relid: pg_sys::Oid) -> Option<(String, String)> {
    // SAFETY: syscache lookups inside a transaction; both return palloc'd copies (or NULL),
    // read before anything else can free them.
    unsafe {
        let rel = pg_sys::get_rel_name(relid);
        if rel.is_null() {
            return None;
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if nsp.is_null() {
            return None;
        }
        Some((std::ffi::CStr::from_ptr(nsp).to_string_lossy().into_owned(), std::ffi::CStr::from_ptr(rel).to_string_lossy().into_owned()))
    }
}
