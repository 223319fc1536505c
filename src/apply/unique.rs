//! Collisions on a unique index that is not the replica key: the same login made at two stores
//! while they were apart. By default the transaction that collides parks (exceptions.rs) and
//! waits for an operator. An index set to `rename` (rbucardo.set_unique_strategy) settles it
//! here instead: before a row image is written, the row already holding its value is looked
//! up, and the one of the two whose key sorts last (decide::unique_yields) gives its value up,
//! renamed to `value~key`. Both rows stay, nothing is lost, and rbucardo.conflicts logs it.
//!
//! The decision and the new value depend only on the two rows' keys and values, so every node
//! that meets both rows renames the same one to the same value. A node may never meet both (one
//! was deleted or changed before it arrived there), so a rename is also a change that travels:
//! a renamed incoming row is forwarded renamed, and a rename of a local row is captured as this
//! node's own change (capture::log_own_update), one transaction per rename,, which every other node applies like any update.
//! A renamed value that the column cannot hold whole (varchar(n)) is not written: the write
//! meets the index and the transaction parks instead.

use pgrx::prelude::*;

use crate::apply::conflicts::{self, Tally};
use crate::apply::decide::{self, key_json, key_label, key_values, row_json, Conflict, Kind, Logged, Origin, Policy, UniqueRename, Yields};
use crate::base::canonical::CanonicalOutput;
use crate::base::wire::{Op, RelDesc, RowChange, Value};
use crate::base::xact::RunAs;
use crate::log::capture;
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
            let yields = decide::unique_yields(&key_values(desc, image), &key_values(desc, &local));
            let loser: &[Value] = if yields == Yields::Incoming { image } else { &local };
            // The value of the row that gives it up (the two may differ in text and still be
            // equal for the index: citext, a collation).
            let renamed = decide::renamed_value(loser[rule.renamed].as_deref().unwrap_or_default(), &key_label(&key_values(desc, loser)));
            if !fits(table, rule, &renamed) {
                break;
            }
            let logged = Logged {
                conflict: Conflict {
                    kind: Kind::UniqueCollision,
                    key: key_json(desc, loser),
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
            match yields {
                Yields::Incoming => {
                    image[rule.renamed] = Some(renamed);
                    changed = true;
                }
                Yields::Local => {
                    let mut new = local.clone();
                    new[rule.renamed] = Some(renamed);
                    rename_local(table, desc, rule, &local, &new);
                    // The rename comes after both versions it settles.
                    crate::base::clock::observe(origin.hlc.max(local_clock.map_or(0, |c| c.0)));
                    let hlc = capture::log_own_update(desc, local.clone(), new.clone());
                    clocks.note_own(desc, &RowChange { ordinal: 0, rel: 0, op: Op::Update, old: Some(local), new: Some(new) }, hlc);
                }
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
        // Locked, and read again once locked: a user transaction that deletes or changes that
        // row and commits meanwhile leaves nothing, or its own version, to settle against.
        "SELECT ARRAY[{}]::pg_catalog.text[] FROM {} WHERE {} AND NOT ({}) LIMIT 1 FOR UPDATE",
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

/// Whether the column holds `renamed` whole: an explicit cast to varchar(n) would cut it,
/// and a cut value is no longer a function of the row alone.
fn fits(table: &Table, rule: &UniqueRename, renamed: &str) -> bool {
    let sql = format!("SELECT pg_catalog.format('%s', $1::pg_catalog.text::{}) = $1", table.types[rule.renamed]);
    // A domain's check runs the owner's code: as the owner, never as the applier.
    let _owner = RunAs::restricted(table.owner);
    let _canonical = CanonicalOutput::new();
    Spi::get_one_with_args::<bool>(&sql, &[renamed.into()]).ok().flatten().unwrap_or(false)
}

/// Gives the local row's value up: writes `new` (the local row with its renamed value). The
/// caller captures it as this node's change.
fn rename_local(table: &Table, desc: &RelDesc, rule: &UniqueRename, local: &[Value], new: &[Value]) {
    let mut args: Vec<pgrx::datum::DatumWithOid> = vec![new[rule.renamed].as_deref().into()];
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
    // Key values are read back in the canonical text forms they were printed in.
    let _canonical = CanonicalOutput::new();
    let updated = Spi::connect_mut(|c| c.update(&sql, None, &args).map(|t| t.len()).unwrap_or_else(|e| panic!("{e}")));
    // The row is locked since `colliding` read it, so it is there.
    assert_eq!(updated, 1, "the row renamed for a unique collision is gone");
}

fn quote(ident: &str) -> String {
    pgrx::spi::quote_identifier(ident)
}
