//! The SQL row path, for tables the executor path cannot serve (local columns the peer does
//! not send, a partitioned table here): the local row is read by key with `SELECT ... FOR
//! UPDATE` in the sender's canonical text form, `conflicts::decide` compares it with what the
//! sender saw, exactly as on the executor path, and statements prepared once per batch write
//! the outcome. Local-only columns keep their values on update and get their defaults on insert.

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::Applier;
use crate::apply::decide::{Action, Origin};
use crate::base::canonical::CanonicalOutput;
use crate::base::wire::{Op, RelDesc, RowChange, Value};
use crate::base::xact::RunAs;

impl Applier {
    /// Applies one row change through SQL, with conflict detection.
    pub(super) fn sql_change(&mut self, client: &mut SpiClient<'_>, desc: &RelDesc, ch: &RowChange, origin: Origin) {
        let (old, new) = (ch.old.as_deref(), ch.new.as_deref());
        let probe = if ch.op == Op::Insert { new } else { old }.expect("row change with its key image");
        // Reads and writes run as the table's owner, restricted; the decision as the applier.
        let owner = self.local_rel(desc).owner;
        let local = {
            let _owner = RunAs::restricted(owner);
            self.sql_local(client, desc, probe)
        };
        // The decision runs as the applier, after the owner's sandbox is gone.
        let decision = self.decide(desc, ch, local.as_deref(), origin);
        let _owner = RunAs::restricted(owner);
        match decision {
            Action::Nothing => {}
            Action::Write(row) if local.is_some() => self.update(client, desc, probe, &row),
            Action::Write(row) => self.upsert(client, desc, &row),
            Action::Delete if local.is_some() => self.delete(client, desc, probe),
            Action::Delete | Action::Abort(_) => {}
        }
        // A later change of this batch to the same row compares with this one's clock.
        self.note_clock(desc, ch, origin);
    }

    /// The local row with the key of `probe`, locked, as the sender's text values of its
    /// columns (each type's output function, canonical settings), or None.
    fn sql_local(&mut self, client: &mut SpiClient<'_>, desc: &RelDesc, probe: &[Value]) -> Option<Vec<Value>> {
        let rel = self.local_rel(desc);
        let values: Vec<String> = desc
            .columns
            .iter()
            .map(|c| {
                let c = pgrx::spi::quote_identifier(c);
                format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END")
            })
            .collect();
        let sql = format!("SELECT ARRAY[{}]::text[] FROM {} WHERE {} FOR UPDATE", values.join(", "), rel.qualified, Self::key_condition(&rel, desc, 1));
        if !self.plans.contains_key(&sql) {
            let types = vec![PgOid::from(pg_sys::TEXTOID); desc.key.len()];
            let plan = client.prepare_mut(sql.as_str(), &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep();
            self.plans.insert(sql.clone(), plan);
        }
        let args: Vec<pgrx::datum::DatumWithOid> = desc.key.iter().map(|&k| probe[k as usize].as_deref().into()).collect();
        let _canonical = CanonicalOutput::new();
        client
            .update(&self.plans[&sql], Some(1), &args)
            .unwrap_or_else(|e| panic!("{e}"))
            .first()
            .get_one::<Vec<Option<String>>>()
            .ok()
            .flatten()
    }
}
