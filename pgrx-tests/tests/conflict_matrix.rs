//! Every conflict kind under every strategy, on a star and on a mesh (issue "conflicts without
//! data loss", test 1). One cluster per topology; each strategy gets its own table (set with
//! set_table_strategy) and each conflict kind its own row in it, so one partition of branch1
//! produces every case at once:
//!
//! | id | main (while apart)       | branch1 (later)          | kind seen by main |
//! |----|--------------------------|--------------------------|-------------------|
//! | 1  | insert (1, main, 10)     | insert (1, b1, 20)       | insert_exists     |
//! | 2  | update to (main, 10)     | update to (b1, 20)       | update_differs    |
//! | 3  | update to (main, 10)     | delete                   | delete_differs    |
//! | 4  | delete                   | update to (b1, 20)       | update_missing    |
//! | 5  | delete                   | delete                   | delete_missing    |
//!
//! branch2 stays connected to main and has main's versions before branch1 comes back. In the
//! mesh it meets branch1's versions directly (the test lets branch1 reach branch2 first); in the
//! star through main, which forwards only the versions it did not reject. Afterwards the test
//! checks, on every node, the rows (row by row against the expected winner) and the conflict
//! log: one entry per row met, the rule, the winner, and the discarded version itself.
//!
//! latest, the priority list and the custom function converge on every node; so does a star
//! where main decides (target on main, source on the branches). source, target and skip set
//! alike everywhere are rules of the node that applies (incoming wins / local wins): they leave
//! nodes with different versions (as docs/sql-reference.md says), and the test checks exactly
//! which node keeps which, and that each node logged the version it discarded.

mod common;

use std::time::Duration;

use common::*;
use rbucardo_cluster_tests::{wait_until, Cluster};

fn one(cluster: &Cluster, i: usize, sql: &str) -> String {
    cluster.node(i).query_one(DB, sql).unwrap_or_default()
}

/// A version of a row: main's, branch1's, or the custom function's merge of both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum V {
    Main,
    B1,
    Merged,
}

/// Which version each node keeps, per strategy table: main, branch1, branch2.
struct Case {
    table: &'static str,
    /// The strategy set on every node; `MAIN_DECIDES`: target on main, source on the branches.
    strategy: &'static str,
    /// The version every row ends with on (main, branch1, branch2), for ids 1-4; `None`: the
    /// custom function's own choice per row (see `CUSTOM`).
    keeps: Option<[V; 3]>,
}

const CASES: &[Case] = &[
    // branch1 wrote last: its versions win everywhere.
    Case { table: "cov_latest", strategy: "latest", keeps: Some([V::B1, V::B1, V::B1]) },
    Case { table: "cov_priority", strategy: "main,branch1,branch2", keeps: Some([V::Main, V::Main, V::Main]) },
    Case { table: "cov_custom", strategy: "custom:public.cov_resolve", keeps: None },
    // Local wins: each node keeps the version it had first.
    Case { table: "cov_target", strategy: "target", keeps: Some([V::Main, V::B1, V::Main]) },
    Case { table: "cov_skip", strategy: "skip", keeps: Some([V::Main, V::B1, V::Main]) },
    // Incoming wins: each node takes the version it met second.
    Case { table: "cov_source", strategy: "source", keeps: Some([V::B1, V::Main, V::B1]) },
];

/// Star only: main keeps its versions and does not forward the ones it rejected; the branches
/// take what main sends. Everyone ends with main's versions.
const MAIN_DECIDES: &str = "main decides";
const MAIN_DECIDES_CASE: Case = Case { table: "cov_decides", strategy: MAIN_DECIDES, keeps: Some([V::Main, V::Main, V::Main]) };

/// The custom function's choice for ids 1-4, the same on every node: a merge of both inserts,
/// the update with the larger n, and a deletion over any update.
const CUSTOM: [V; 4] = [V::Merged, V::B1, V::B1, V::Main];

/// A symmetric, deterministic resolver: deletions win, two inserts merge, otherwise the larger
/// n wins. Exercises every answer a custom function can give.
const RESOLVER: &str = "
CREATE FUNCTION public.cov_resolve(kind text, tbl regclass, local jsonb, remote jsonb,
                                   local_origin text, local_hlc bigint, remote_origin text, remote_hlc bigint)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN local IS NULL OR remote IS NULL THEN to_jsonb('delete'::text)
    WHEN kind = 'insert_exists' THEN
      jsonb_build_object('val', least(local->>'val', remote->>'val') || '+' || greatest(local->>'val', remote->>'val'),
                         'n', greatest((local->>'n')::int, (remote->>'n')::int))
    WHEN (local->>'n')::int > (remote->>'n')::int THEN to_jsonb('local'::text)
    ELSE to_jsonb('remote'::text)
  END
$$;";

/// Row `id` as main or branch1 left it while apart (None: deleted), and the custom merge.
fn version(id: i32, v: V) -> Option<(String, i32)> {
    match (id, v) {
        (1, V::Merged) => Some(("b1+main".into(), 20)),
        (1 | 2 | 3, V::Main) => Some(("main".into(), 10)),
        (1 | 2 | 4, V::B1) => Some(("b1".into(), 20)),
        _ => None,
    }
}

fn version_json(id: i32, v: V) -> String {
    match version(id, v) {
        Some((val, n)) => format!("'{{\"id\": \"{id}\", \"val\": \"{val}\", \"n\": \"{n}\"}}'::jsonb"),
        None => "NULL::jsonb".into(),
    }
}

/// What node `node` keeps of row `id` in `case`.
fn kept(case: &Case, node: usize, id: i32) -> V {
    match case.keeps {
        Some(k) => k[node],
        None => CUSTOM[id as usize - 1],
    }
}

/// The version node `node` held before the other one reached it (branch2 had main's).
fn own(node: usize) -> V {
    if node == BRANCH1 { V::B1 } else { V::Main }
}

/// The strategy of `case` on node `i`. In a star the branches do not know each other, so a
/// branch's priority list names main and itself (branch1's versions reach branch2 through main
/// and rank below main's there, as an unknown node).
fn strategy_on(topology: Topology, case: &Case, i: usize) -> String {
    if case.strategy == MAIN_DECIDES {
        (if i == MAIN { "target" } else { "source" }).to_string()
    } else if topology == Topology::Star && case.strategy.contains(',') && i != MAIN {
        format!("main,{}", NODE_NAMES[i])
    } else {
        case.strategy.to_string()
    }
}

/// How a node's conflict entry for row `id` reads: the winner, and which version was local.
fn winner(case: &Case, node: usize, id: i32) -> &'static str {
    let keep = kept(case, node, id);
    if keep == V::Merged {
        "merged"
    } else if version(id, keep) == version(id, own(node)) {
        "local"
    } else {
        "remote"
    }
}

/// Whether `node` meets branch1's version of row `id` (1-4): in a star, branch2 gets it only
/// through main, which does not forward a version it rejected (its winner there is local).
fn meets(topology: Topology, case: &Case, node: usize, id: i32) -> bool {
    topology == Topology::Mesh || node != BRANCH2 || winner(case, MAIN, id) != "local"
}

fn expected_rows(case: &Case, node: usize) -> Vec<String> {
    (1..=4).filter_map(|id| version(id, kept(case, node, id)).map(|(val, n)| format!("({id},{val},{n})"))).collect()
}

fn run(topology: Topology) {
    let name = if topology == Topology::Star { "matrix_star" } else { "matrix_mesh" };
    let cluster = start_store(name, topology);
    let mut cases: Vec<&Case> = CASES.iter().collect();
    if topology == Topology::Star {
        cases.push(&MAIN_DECIDES_CASE);
    }

    // The same tables, resolver and strategies on every node, made locally (not replicated).
    for i in ALL {
        let mut sql = format!("SET rbucardo.replicate_ddl = off; {RESOLVER}");
        for case in &cases {
            let strategy = strategy_on(topology, case, i);
            sql += &format!(
                "CREATE TABLE {t} (id int PRIMARY KEY, val text, n int);
                 SELECT rbucardo.add_table('store', '{t}');
                 SELECT rbucardo.set_table_strategy('{t}', '{strategy}');",
                t = case.table
            );
        }
        cluster.node(i).sql(DB, &sql);
    }
    assert_eq!(one(&cluster, MAIN, "SELECT strategy FROM rbucardo.table_option WHERE relid = 'cov_custom'::regclass"), "custom:public.cov_resolve");
    if topology == Topology::Star {
        check_custom_validation(&cluster);
    }

    let all_tables = |f: &dyn Fn(&str) -> String| cases.iter().map(|c| f(c.table)).collect::<Vec<_>>().join("\n");
    cluster.node(MAIN).sql(DB, &all_tables(&|t| format!("INSERT INTO {t} SELECT i, 'orig', 0 FROM generate_series(2, 5) i;")));
    for i in ALL {
        wait_until("seed rows everywhere", Duration::from_secs(30), || {
            Ok(one(&cluster, i, &format!("SELECT count(*) FROM {}", cases.last().unwrap().table)) == "4")
        });
    }

    // branch1 apart from everyone.
    let b1_links: Vec<(usize, usize)> = match topology {
        Topology::Star => vec![(BRANCH1, MAIN)],
        Topology::Mesh => vec![(BRANCH1, MAIN), (MAIN, BRANCH1), (BRANCH1, BRANCH2), (BRANCH2, BRANCH1)],
    };
    for &(a, b) in &b1_links {
        cluster.link(a, b).cut();
    }
    cluster.node(MAIN).sql(
        DB,
        &format!(
            "BEGIN;\n{}\nCOMMIT;",
            all_tables(&|t| format!(
                "INSERT INTO {t} VALUES (1, 'main', 10);
                 UPDATE {t} SET val = 'main', n = 10 WHERE id IN (2, 3);
                 DELETE FROM {t} WHERE id IN (4, 5);"
            ))
        ),
    );
    wait_until("main's versions on branch2", Duration::from_secs(30), || {
        Ok(one(&cluster, BRANCH2, &format!("SELECT count(*) FROM {} WHERE id = 1", cases.last().unwrap().table)) == "1")
    });
    cluster.node(BRANCH1).sql(
        DB,
        &format!(
            "BEGIN;\n{}\nCOMMIT;",
            all_tables(&|t| format!(
                "INSERT INTO {t} VALUES (1, 'b1', 20);
                 UPDATE {t} SET val = 'b1', n = 20 WHERE id IN (2, 4);
                 DELETE FROM {t} WHERE id IN (3, 5);"
            ))
        ),
    );
    // In the mesh, branch1 reaches branch2 and main directly, each before the other can forward
    // (a node does not forward versions it rejected): main and branch2 talk again last.
    if topology == Topology::Mesh {
        cluster.link(MAIN, BRANCH2).cut();
        cluster.link(BRANCH2, MAIN).cut();
        let all = (4 * cases.len()).to_string();
        for (i, links) in [(BRANCH2, [(BRANCH1, BRANCH2), (BRANCH2, BRANCH1)]), (MAIN, [(BRANCH1, MAIN), (MAIN, BRANCH1)])] {
            for (a, b) in links {
                cluster.link(a, b).restore();
            }
            wait_until(&format!("branch1's versions on {}", NODE_NAMES[i]), Duration::from_secs(60), || {
                let n = one(&cluster, i, "SELECT count(*) FROM rbucardo.conflicts");
                if n == all { Ok(true) } else { Err(format!("{n} conflicts")) }
            });
        }
        cluster.link(MAIN, BRANCH2).restore();
        cluster.link(BRANCH2, MAIN).restore();
    }
    for &(a, b) in &b1_links {
        cluster.link(a, b).restore();
    }

    // Every node ends with the expected version of every row, has logged the four conflicts that
    // discarded a version and counted the fifth (row 5, deleted on both sides).
    wait_until("every row settled and every conflict logged", Duration::from_secs(90), || {
        let mut off = Vec::new();
        for case in &cases {
            for i in ALL {
                let rows = cluster.node(i).dump_table(DB, case.table, "id");
                let want = expected_rows(case, i);
                let logged = one(&cluster, i, &format!("SELECT count(*) FROM rbucardo.conflicts WHERE tbl = 'public.{}'", case.table));
                let met = (1..=4).filter(|&id| meets(topology, case, i, id)).count();
                let both_deleted = one(&cluster, i, &format!("SELECT conflicts FROM rbucardo.conflict_stats WHERE tbl = 'public.{}' AND kind = 'delete_missing'", case.table));
                if rows != want || logged != met.to_string() || both_deleted != "1" {
                    off.push(format!("{} on {}: rows {rows:?} (want {want:?}), {logged} conflicts", case.table, NODE_NAMES[i]));
                }
            }
        }
        if off.is_empty() { Ok(true) } else { Err(off.join("; ")) }
    });

    // The conflict log: each row once, with the rule, the winner and the discarded version.
    for case in &cases {
        for i in ALL {
            let rule = strategy_on(topology, case, i);
            let (mine, theirs) = (own(i), if own(i) == V::Main { V::B1 } else { V::Main });
            for id in 1..=4 {
                let (winner, local, remote) = (winner(case, i, id), mine, theirs);
                let check = format!(
                    "SELECT count(*) FROM rbucardo.conflicts
                      WHERE tbl = 'public.{t}' AND key = '{{\"id\": \"{id}\"}}' AND sync = 'store_sync'
                        AND rule = '{rule}' AND winner = '{winner}'
                        AND local_version IS NOT DISTINCT FROM {lv} AND remote_version IS NOT DISTINCT FROM {rv}",
                    t = case.table,
                    lv = version_json(id, local),
                    rv = version_json(id, remote),
                );
                let found = one(&cluster, i, &check);
                assert_eq!(
                    found,
                    if meets(topology, case, i, id) { "1" } else { "0" },
                    "{} on {}: expected one conflict for id {id} won by {winner} under {rule}; log: {:?}",
                    case.table,
                    NODE_NAMES[i],
                    cluster.node(i).query(DB, &format!("SELECT key, kind, local_version, remote_version, rule, winner FROM rbucardo.conflicts WHERE tbl = 'public.{}' ORDER BY id", case.table))
                );
            }
            // Both deleted row 5: nothing lost, counted and not logged.
            assert_eq!(
                one(&cluster, i, &format!("SELECT conflicts FROM rbucardo.conflict_stats WHERE tbl = 'public.{}' AND kind = 'delete_missing' AND outcome = 'both_deleted'", case.table)),
                "1",
                "{} on {}: both deleted row 5",
                case.table,
                NODE_NAMES[i]
            );
        }
    }
    // The strategies that promise it end with the same rows everywhere.
    for case in &cases {
        if case.keeps.is_none_or(|k| k.iter().all(|v| *v == k[0])) {
            cluster.assert_tables_equal(DB, case.table, "id", &ALL);
        }
    }
    // The local version's origin and clock are logged where they are known: main's own change.
    assert_eq!(
        one(&cluster, MAIN, "SELECT local_origin || ' ' || (local_hlc > 0) FROM rbucardo.conflicts WHERE tbl = 'public.cov_latest' AND key = '{\"id\": \"2\"}'"),
        "1 true"
    );
    // branch1 wrote last, so its clock value beats main's in main's log.
    assert_eq!(
        one(&cluster, MAIN, "SELECT remote_hlc > local_hlc FROM rbucardo.conflicts WHERE tbl = 'public.cov_latest' AND key = '{\"id\": \"2\"}'"),
        "t"
    );
}

/// A custom strategy is checked when it is set: a missing function, one with other arguments
/// and one that does not return jsonb are refused with the signature in the hint.
fn check_custom_validation(cluster: &Cluster) {
    let mut conn = cluster.node(MAIN).connect(DB);
    conn.execute(
        "SET rbucardo.replicate_ddl = off;
         CREATE FUNCTION public.bad_args(int) RETURNS jsonb LANGUAGE sql AS $$ SELECT NULL::jsonb $$;
         CREATE FUNCTION public.bad_return(kind text, tbl regclass, local jsonb, remote jsonb, local_origin text,
                                           local_hlc bigint, remote_origin text, remote_hlc bigint)
         RETURNS text LANGUAGE sql AS $$ SELECT 'local' $$;",
    )
    .unwrap();
    for (strategy, says) in [
        ("custom:public.nowhere", "does not exist"),
        ("custom:public.bad_args", "has the wrong arguments"),
        ("custom:public.bad_return", "returns text, not jsonb"),
    ] {
        let err = conn.execute(&format!("SELECT rbucardo.set_table_strategy('cov_custom', '{strategy}')")).unwrap_err();
        assert!(err.contains(says) && err.contains("HINT") && err.contains("local_origin text"), "{strategy}: {err}");
        let err = conn.execute(&format!("SELECT rbucardo.set_conflict_strategy('store_sync', '{strategy}')")).unwrap_err();
        assert!(err.contains(says), "{strategy} for a sync: {err}");
    }
    // Unqualified names are stored qualified: the apply runs with its own search_path.
    conn.execute("SELECT rbucardo.set_table_strategy('cov_custom', 'custom:cov_resolve')").unwrap();
    assert_eq!(one(cluster, MAIN, "SELECT strategy FROM rbucardo.table_option WHERE relid = 'cov_custom'::regclass"), "custom:public.cov_resolve");
}

#[test]
fn every_conflict_kind_under_every_strategy_on_a_star() {
    run(Topology::Star);
}

#[test]
fn every_conflict_kind_under_every_strategy_on_a_mesh() {
    run(Topology::Mesh);
}
