//! Foreign keys on apply. Apply runs with `session_replication_role = replica`, so PostgreSQL
//! checks no foreign keys there; a child row whose parent has not arrived yet would be written
//! as an orphan. The applier checks them itself, for the rows a remote transaction inserted or
//! updated, once the whole transaction is in (parent and child may come in any order within
//! it). A missing parent raises `foreign_key_violation`, which parks the transaction whole in
//! `rbucardo.exceptions`; it is retried after every batch that applied something and every few
//! seconds, and applies once the parent is here.
//!
//! Only tables with outgoing foreign keys pay anything: their keys are looked up once per batch,
//! and the check is one query per foreign key per remote transaction that wrote such a table.

use std::collections::HashMap;

use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use super::Applier;
use crate::base::wire::{RelDesc, Value};
use crate::base::xact::RunAs;
use crate::base::error::raise;

/// A foreign key from a replicated table, as checked on apply.
pub struct ForeignKey {
    name: String,
    /// Schema-qualified, quoted name of the referenced table.
    parent: String,
    /// Quoted referencing columns of the child, in key order.
    columns: Vec<String>,
    /// Quoted referenced columns of the parent, in the same order.
    referenced: Vec<String>,
}

/// The foreign keys whose child is the table `relid` (MATCH SIMPLE and FULL alike: a key with
/// a NULL column is not checked, which is MATCH SIMPLE's rule).
pub fn foreign_keys(relid: pg_sys::Oid) -> Vec<ForeignKey> {
    crate::base::plans::run(
        "SELECT con.conname::text, con.confrelid::regclass::text,
                ARRAY(SELECT quote_ident(a.attname) FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
                ARRAY(SELECT quote_ident(a.attname) FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o)
           FROM pg_constraint con
          WHERE con.conrelid = $1 AND con.contype = 'f'
          ORDER BY con.conname",
        &[pg_sys::OIDOID],
        &[relid.into()],
        |t| {
            t.map(|r| ForeignKey {
                name: r.get::<String>(1).ok().flatten().unwrap_or_default(),
                parent: r.get::<String>(2).ok().flatten().unwrap_or_default(),
                columns: r.get::<Vec<String>>(3).ok().flatten().unwrap_or_default(),
                referenced: r.get::<Vec<String>>(4).ok().flatten().unwrap_or_default(),
            })
            .collect()
        },
    )
}

/// The keys of the rows a remote transaction wrote to tables with foreign keys.
#[derive(Default)]
pub struct Written {
    rows: HashMap<RelDesc, Vec<Vec<Value>>>,
}

impl Written {
    /// Remembers the key of a row written with this new image.
    pub fn note(&mut self, desc: &RelDesc, new: &[Value]) {
        let key = desc.key.iter().map(|&k| new[k as usize].clone()).collect();
        self.rows.entry(desc.clone()).or_default().push(key);
    }

    /// Checks every foreign key of the written rows as they are now (a row deleted later in
    /// the transaction, or kept in its local version by a conflict rule, is checked as it
    /// stands); raises `foreign_key_violation` for the first row whose parent is missing.
    pub fn check(&mut self, applier: &mut Applier, client: &mut SpiClient<'_>) {
        for (desc, keys) in std::mem::take(&mut self.rows) {
            let rel = applier.local_rel(&desc);
            let child = rel.qualified.clone();
            let key_cols: Vec<String> = desc.key.iter().map(|&k| pgrx::spi::quote_identifier(&desc.columns[k as usize])).collect();
            let key_types: Vec<String> = desc.key.iter().map(|&k| rel.types[k as usize].clone()).collect();
            let checks: Vec<(String, String, String)> = rel
                .fks
                .iter()
                .map(|fk| {
                    let unnest: Vec<String> = (0..key_cols.len()).map(|i| format!("${}::text[]::{}[]", i + 1, key_types[i])).collect();
                    let sql = format!(
                        "SELECT ARRAY[{values}] FROM {child} c
                          WHERE ({keys}) IN (SELECT * FROM unnest({unnest}))
                            AND {not_null}
                            AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {join})
                          LIMIT 1",
                        values = fk.columns.iter().map(|c| format!("c.{c}::text")).collect::<Vec<_>>().join(", "),
                        keys = key_cols.iter().map(|c| format!("c.{c}")).collect::<Vec<_>>().join(", "),
                        unnest = unnest.join(", "),
                        not_null = fk.columns.iter().map(|c| format!("c.{c} IS NOT NULL")).collect::<Vec<_>>().join(" AND "),
                        parent = fk.parent,
                        join = fk.columns.iter().zip(&fk.referenced).map(|(c, r)| format!("p.{r} = c.{c}")).collect::<Vec<_>>().join(" AND "),
                    );
                    (sql, fk.name.clone(), format!("({}) of {child} referencing {}", fk.columns.join(", "), fk.parent))
                })
                .collect();
            // As the child table's owner, restricted, as PostgreSQL runs its own foreign-key
            // checks as a table's owner: a domain or operator of the key's type is someone's
            // code, which must not run with the applier's rights.
            let _owner = RunAs::restricted(rel.owner);
            for (sql, name, what) in checks {
                if !applier.plans.contains_key(&sql) {
                    let types = vec![PgOid::from(pg_sys::TEXTARRAYOID); key_cols.len()];
                    let plan = client.prepare_mut(sql.as_str(), &types).unwrap_or_else(|e| panic!("preparing {sql}: {e}")).keep();
                    applier.plans.insert(sql.clone(), plan);
                }
                let args: Vec<pgrx::datum::DatumWithOid> =
                    (0..key_cols.len()).map(|i| keys.iter().map(|k| k[i].clone()).collect::<Vec<Value>>().into()).collect();
                let missing = client
                    .update(&applier.plans[&sql], Some(1), &args)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .first()
                    .get_one::<Vec<Option<String>>>()
                    .ok()
                    .flatten();
                if let Some(values) = missing {
                    let values: Vec<String> = values.into_iter().map(|v| v.unwrap_or_else(|| "NULL".into())).collect();
                    raise(
                        PgSqlErrorCode::ERRCODE_FOREIGN_KEY_VIOLATION,
                        format!("foreign key {name}: {what} = ({}) has no parent row here yet", values.join(", ")),
                        "The remote transaction is parked in rbucardo.exceptions and applied automatically once the parent row arrives.",
                    );
                }
            }
        }
    }
}
