//! Running a replicated schema change on this node (the receiving half of DDL replication;
//! capture is in src/schema/ddl.rs). A command runs in order with the rows of its transaction,
//! with the search_path it had on its origin, as the role this node lets it run as.

use std::cell::Cell;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::apply::exceptions::Stop;
use crate::base::node::{DdlLevel, PeerPolicy};
use crate::base::sqltext::{abbreviate, schema_statements};
use crate::base::wire::{RelDesc, RowChange};
use crate::base::xact::{self, RunAs, SettingsSandbox};

thread_local! {
    /// Set while a replicated DDL command runs in [`apply`].
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a replicated DDL command is running in this backend (the event triggers then let
/// new tables join their herd, even in replica mode).
pub fn applying() -> bool {
    APPLYING.with(|a| a.get())
}

/// SQLSTATEs of "already exists": the same change was made here too (while apart).
const DUPLICATE_STATES: &[PgSqlErrorCode] = &[
    PgSqlErrorCode::ERRCODE_DUPLICATE_COLUMN,
    PgSqlErrorCode::ERRCODE_DUPLICATE_TABLE,
    PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
    PgSqlErrorCode::ERRCODE_DUPLICATE_SCHEMA,
    PgSqlErrorCode::ERRCODE_DUPLICATE_FUNCTION,
];

/// Who a replicated schema change runs as here: this node's policy for the peer that sent it
/// (`rbucardo.set_peer_policy`), never what the change itself claims unless that peer is
/// trusted with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAsRole {
    /// The role that ran it on its origin (a trusted peer: the node that administers the schema).
    Origin,
    /// A role of limited rights chosen by this node's operator.
    Role(String),
    /// None: the peer is limited but no role is chosen for it yet (named here).
    Nobody(String),
}

/// Who the schema changes of the peer with this policy run as here.
pub fn run_as(policy: &PeerPolicy) -> RunAsRole {
    match (policy.ddl, &policy.ddl_role) {
        (DdlLevel::Trusted, _) => RunAsRole::Origin,
        (DdlLevel::Limited, Some(role)) => RunAsRole::Role(role.clone()),
        // A batch with DDL from a peer at level none is refused before it is applied.
        (DdlLevel::Limited | DdlLevel::None, _) => RunAsRole::Nobody(policy.name.clone()),
    }
}

/// Runs a replicated DDL change here, with the search_path its origin had, one statement at a
/// time, as `run_as` decides. A statement that fails because its object exists already (the
/// same change was made here while apart) is left out, provided the touched tables then have
/// the columns and types they have on the origin. Any other failure, or a difference, is a
/// [`Stop`]: nothing of the transaction is applied and its stream stops here until the schema
/// is fixed. Returns the role the command ran as, which is what it carries on when forwarded.
pub fn apply(client: &mut SpiClient<'_>, desc: &RelDesc, ch: &RowChange, run_as: &RunAsRole) -> Result<String, Stop> {
    let new = ch.new.as_ref().expect("checked by decode_chunk");
    let (sql, search_path, origin_role) = (new[0].as_deref().unwrap_or_default(), new[1].as_deref().unwrap_or_default(), new[2].as_deref().unwrap_or_default());
    let origin_shape = new.get(3).and_then(|v| v.as_deref());
    let stop = |message: String| Stop {
        ordinal: ch.ordinal,
        command: sql.to_string(),
        message: format!("replicated DDL ({} in schema {}) failed here: {message}; command: {}", desc.name, desc.schema, abbreviate(sql)),
        refused: false,
    };
    let role = match run_as {
        RunAsRole::Origin => origin_role,
        RunAsRole::Role(r) => r.as_str(),
        RunAsRole::Nobody(peer) => {
            return Err(stop(format!(
                "this node runs schema changes from {peer} at the limited level, as a role it has not chosen yet \
                 (choose one with rbucardo.set_peer_policy('{peer}', ddl_role => 'some_role'))"
            )))
        }
    };
    // Objects get the owner it names, and the command can do nothing here that role could not
    // (roles are not replicated). The role is looked up before the origin's search_path is set.
    let found = Spi::get_two_with_args::<pg_sys::Oid, bool>("SELECT oid, rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[role.into()]);
    let Ok((Some(role_oid), Some(superuser))) = found else {
        return Err(stop(match run_as {
            RunAsRole::Origin => format!("role {role:?}, which ran it on its origin, does not exist here (create it; roles are not replicated)"),
            _ => format!("role {role:?}, which this node runs the peer's schema changes as, does not exist here (create it, or change it with rbucardo.set_peer_policy)"),
        }));
    };
    let _ = superuser;
    if matches!(run_as, RunAsRole::Role(_)) {
        if let Ok(Some(why)) = crate::base::node::too_strong_for_limited(role) {
            return Err(stop(format!("role {role:?} is too strong for the limited level ({why}); choose another with rbucardo.set_peer_policy")));
        }
    }
    // The command's settings live in a sandbox: the origin's search_path, and whatever the
    // command itself sets, are gone when it ends.
    let sandbox = SettingsSandbox::new();
    let path = xact::subtransaction(|| Spi::run_with_args("SELECT pg_catalog.set_config('search_path', $1, true)", &[search_path.into()]).map_err(|e| e.to_string()));
    if !matches!(path, Ok(Ok(()))) {
        drop(sandbox);
        return Err(stop(format!("its search_path {search_path:?} cannot be set here")));
    }
    let mut existed = Vec::new();
    let mut failure = None;
    {
        // As the role the policy names, restricted: it cannot change role or leave anything
        // behind for the applying (superuser) session.
        let _role = RunAs::restricted(role_oid);
        APPLYING.with(|a| a.set(true));
        for statement in schema_statements(sql) {
            let result = xact::subtransaction(std::panic::AssertUnwindSafe(|| {
                client.update(statement.as_str(), None, &[]).unwrap_or_else(|e| panic!("{e}"));
            }));
            if let Err(e) = result {
                let message = xact::error_message_with_detail(&e);
                if xact::error_code(&e).is_some_and(|code| DUPLICATE_STATES.contains(&code)) {
                    existed.push(message);
                } else {
                    failure = Some(message);
                    break;
                }
            }
        }
        APPLYING.with(|a| a.set(false));
    }
    drop(sandbox);
    if let Some(message) = failure {
        return Err(stop(message));
    }
    if !existed.is_empty() {
        let what = existed.join("; ");
        let Some(shape) = origin_shape else {
            return Err(stop(format!("{what}, and the origin did not say what the result must look like")));
        };
        let differences = Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.string_agg(pg_catalog.format('%s.%s is %s here but %s on the origin', table_name, column_name,
                                                 coalesce(here, 'missing'), coalesce(there, 'missing')), '; ')
               FROM rbucardo.shape_differences(rbucardo.table_shape(
                        ARRAY(SELECT pg_catalog.to_regclass(k)::pg_catalog.oid FROM pg_catalog.jsonb_object_keys($1::pg_catalog.jsonb) k)),
                    $1::pg_catalog.jsonb)",
            &[shape.into()],
        )
        .ok()
        .flatten();
        if let Some(differences) = differences {
            return Err(stop(format!("{what}, and it differs: {differences}")));
        }
        log!("rbucardo: replicated DDL made here already, left out ({what}): {}", abbreviate(sql));
    }
    Ok(role.to_string())
}
