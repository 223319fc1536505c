#!/usr/bin/env bash
# Compare benchmark: rbucardo.diff on a 1M-row table with 10 planted differences, two nodes
# (two databases of one server, as a branch and main on one machine), printed next to a plain
# SELECT count(*) of the same table in the same run.
#   bash bench/diff_1m.sh [rows, default 1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
ROWS=${1:-1000000}
. bench/lib.sh
bench_server
q() { local db=$1; shift; psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d "$db" "$@"; }
now() { date +%s.%N; }

say "two nodes with $ROWS identical rows each"
for db in a b; do
    q postgres -c "CREATE DATABASE $db"
    q "$db" -c "CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL, qty int, price numeric(12,2), updated timestamptz)" \
            -c "INSERT INTO items SELECT g, 'sku-' || g, g % 100, g / 7.0, '2026-01-01'::timestamptz + g * interval '1 s' FROM generate_series(1, $ROWS) g" \
            -c "VACUUM ANALYZE items" \
            -c "CREATE EXTENSION rbucardo"
done
q a -c "SELECT rbucardo.init_node('a', 1)" -c "SELECT rbucardo.add_db('b', 'host=127.0.0.1 port=$PORT user=postgres dbname=b')" \
    -c "SELECT rbucardo.add_herd('h')" -c "SELECT rbucardo.add_table('h', 'items')" -c "SELECT rbucardo.add_sync('s', 'h', ARRAY['a', 'b'])" >/dev/null
q b -c "SELECT rbucardo.init_node('b', 2)" -c "SELECT rbucardo.add_db('a')" \
    -c "SELECT rbucardo.add_herd('h')" -c "SELECT rbucardo.add_table('h', 'items')" -c "SELECT rbucardo.add_sync('s', 'h', ARRAY['a', 'b'])" >/dev/null
q a -c "SELECT rbucardo.wait_for_sync('s')" >/dev/null

say "10 differences planted on b (not captured)"
q b -c "BEGIN; SET LOCAL session_replication_role = replica;
        UPDATE items SET qty = -1 WHERE id IN (17, $ROWS / 4, $ROWS - 1);
        UPDATE items SET price = 0 WHERE id IN (42, $ROWS / 2);
        DELETE FROM items WHERE id IN (77, $ROWS * 3 / 5);
        INSERT INTO items VALUES ($ROWS + 1, 'extra', 1, 1, now()), ($ROWS + 2, 'extra', 1, 1, now()), ($ROWS + 3, 'extra', 1, 1, now());
        COMMIT;"

t0=$(now); q a -c "SELECT count(*) FROM items" >/dev/null; t1=$(now)
found=$(q a -c "SELECT count(*) FROM rbucardo.diff('s')"); t2=$(now)
t3=$(now); q a -c "SELECT count(*) FROM items" >/dev/null; t4=$(now)
count_s=$(echo "$t0 $t1 $t3 $t4" | awk '{printf "%.2f", (($2 - $1) + ($4 - $3)) / 2}')
diff_s=$(echo "$t1 $t2" | awk '{printf "%.2f", $2 - $1}')
echo
printf '| %-40s | %-12s |\n' "figure ($ROWS rows)" "value"
printf '|%s|%s|\n' "$(printf -- '-%.0s' {1..42})" "$(printf -- '-%.0s' {1..14})"
printf '| %-40s | %-12s |\n' "SELECT count(*) on a, seconds" "$count_s"
printf '| %-40s | %-12s |\n' "rbucardo.diff a <-> b, seconds" "$diff_s"
printf '| %-40s | %-12s |\n' "differences found (10 planted)" "$found"
[ "$found" = 10 ] || { echo "expected 10 differences" >&2; exit 1; }
