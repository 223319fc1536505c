//! Collisions on a unique index that is not the replica key: the same login made at two stores
//! while they were apart. By default the transaction that collides parks (exceptions.rs) and
//! waits for an operator. An index set to `rename` (rbucardo.set_unique_strategy) settles it
//! here instead: before a row image is written, the row already holding its value is looked
//! up, and the later of the two (decide::unique_yields) gives its value up, renamed to
//! `value~key`. Both rows stay, nothing is lost, and every node that holds both rows renames
//! the same one to the same value, whichever arrived first; rbucardo.conflicts logs it.
//!
//! A rename of the incoming row travels on with it (its new image is what this node forwards).
//! A rename of the local row is not captured: every other node renames it by the same rule when
//! the two rows meet there.

use pgrx::prelude::*;

use crate::apply::conflicts::{self, Tally};
use crate::apply::decide::{self, key_json, key_text, row_json, Conflict, Kind, Logged, Origin, Policy, UniqueRename, Yields};
use crate::base::canonical::CanonicalOutput;
use crate::base::wire::{RelDesc, Value};
use crate::base::xact::RunAs;
use crate::log::clocks::Clocks;

/// The local table the image goes to.
pub struct Table<'a> {
    pub qualified: &'a str,
    /// Local type of each remote column.
    pub types: &'a [String],
    pub owner: pg_sys::Oid,
}

/// Settles the collisions of `image`, about to be written, on the policy's `rename` indexes:
/// renames the local row that collides, or the image. Returns whether the image changed.
/// `old` is the row's old image for an update (the row at its old key is the row itself, not a
/// collision, when the key changes).
#[allow(clippy::too_many_arguments)]
pub fn settle(table: &Table, policy: &Policy, desc: &RelDesc, image: &mut [Value], old: Option<&[Value]>, origin: Origin, clocks: &mut Clocks, tally: &mut Tally) -> bool {
    let mut changed = false;
    for rule in &policy.renames {
        // A renamed value could itself be taken: look again, a few times, then let the write
        // meet the index (and park) rather than loop.
        for _ in 0..3 {
            let Some(local) = colliding(table, desc, rule, image, old) else { break };
            let column = desc.columns[rule.renamed].as_str();
            let local_clock = clocks.local(desc, &key_json(desc, &local), Some(&[column]));
            let (image_key, local_key) = (key_text(desc, image), key_text(desc, &local));
            let yields = decide::unique_yields(((origin.hlc, origin.node), &image_key), (local_clock, &local_key));
            let renamed_key = if yields == Yields::Incoming { &image_key } else { &local_key };
            let logged = Logged {
                conflict: Conflict {
                    kind: Kind::UniqueCollision,
                    key: if yields == Yields::Incoming { key_json(desc, image) } else { key_json(desc, &local) },
                    local: Some(row_json(desc, &local)),
                    remote: Some(row_json(desc, image)),
                    local_clock,
                    origin: origin.node,
                    hlc: origin.hlc,
                },
                rule: format!("rename on {}", rule.index),
                winner: if yields == Yields::Incoming { "local" } else { "remote" },
            };
            conflicts::record(policy, &logged);
            tally.count(&policy.table, Kind::UniqueCollision, "renamed");
            // The value of the row that gives it up (the two may differ in text and still be
            // equal for the index: citext, a collation).
            let value = if yields == Yields::Incoming { image[rule.renamed].clone() } else { local[rule.renamed].clone() }.unwrap_or_default();
            let renamed = decide::renamed_value(&value, renamed_key);
            match yields {
                Yields::Incoming => {
                    image[rule.renamed] = Some(renamed);
                    changed = true;
                }
                Yields::Local => rename_local(table, desc, rule, &local, &renamed),
            }
        }
    }
    changed
}

/// The row other than the image's own (by key) that holds the image's values of the index,
/// in canonical text form; None when a value is NULL (NULLs never collide) or no row does.
fn colliding(table: &Table, desc: &RelDesc, rule: &UniqueRename, image: &[Value], old: Option<&[Value]>) -> Option<Vec<Value>> {
    let mut args: Vec<pgrx::datum::DatumWithOid> = Vec::new();
    let mut conds = Vec::new();
    for &c in &rule.columns {
        args.push(image[c].as_deref()?.into());
        conds.push(format!("{} = ${}::pg_catalog.text::{}", quote(&desc.columns[c]), args.len(), table.types[c]));
    }
    let mut mine = Vec::new();
    for row in std::iter::once(image).chain(old) {
        let mut conds = Vec::new();
        for &k in &desc.key {
            args.push(row[k as usize].as_deref().into());
            conds.push(format!("{} = ${}::pg_catalog.text::{}", quote(&desc.columns[k as usize]), args.len(), table.types[k as usize]));
        }
        mine.push(format!("({})", conds.join(" AND ")));
    }
    let values: Vec<String> = desc.columns.iter().map(|c| format!("CASE WHEN {0} IS NULL THEN NULL ELSE pg_catalog.format('%s', {0}) END", quote(c))).collect();
    let sql = format!(
        "SELECT ARRAY[{}]::pg_catalog.text[] FROM {} WHERE {} AND NOT ({}) LIMIT 1",
        values.join(", "),
        table.qualified,
        conds.join(" AND "),
        mine.join(" OR ")
    );
    let _owner = RunAs::restricted(table.owner);
    let _canonical = CanonicalOutput::new();
    match Spi::get_one_with_args::<Vec<Option<String>>>(&sql, &args) {
        Ok(row) => row,
        Err(pgrx::spi::SpiError::InvalidPosition) => None, // no row holds the values
        Err(e) => panic!("{e}"),
    }
}

/// Gives the local row's value up. Not captured (the apply runs in replica mode): each node
/// renames it itself.
fn rename_local(table: &Table, desc: &RelDesc, rule: &UniqueRename, local: &[Value], renamed: &str) {
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![renamed.into()];
    let mut conds = Vec::new();
    for &k in &desc.key {
        args.push(local[k as usize].as_deref().into());
        conds.push(format!("{} = ${}::pg_catalog.text::{}", quote(&desc.columns[k as usize]), args.len(), table.types[k as usize]));
    }
    let sql = format!(
        "UPDATE {} SET {} = $1::pg_catalog.text::{} WHERE {}",
        table.qualified,
        quote(&desc.columns[rule.renamed]),
        table.types[rule.renamed],
        conds.join(" AND ")
    );
    let _owner = RunAs::restricted(table.owner);
    Spi::run_with_args(&sql, &args).unwrap_or_else(|e| panic!("{e}"));
}

fn quote(ident: &str) -> String {
    pgrx::spi::quote_identifier(ident)
}
