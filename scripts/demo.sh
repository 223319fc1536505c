#!/usr/bin/env bash
# The main job: a local demo cluster of three PostgreSQL 15 servers (main, branch1, branch2) on
# loopback ports, data in ./.demo, replicating a small store schema with rbucardo; it runs a
# store workload on every node, cuts both branch links while the stores keep selling, restores
# them and shows that every node converges.
#   bash scripts/demo.sh          set up (installs what is missing), build, start, run the story
#   bash scripts/demo.sh stop     stop the three servers
# Running it again stops and recreates the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DEMO_DIR=${RBUCARDO_DEMO_DIR:-$PWD/.demo}
NODES=(main branch1 branch2)
BASE_PORT=${RBUCARDO_DEMO_PORT:-55432}

port_of() { local i; for i in "${!NODES[@]}"; do if [ "${NODES[$i]}" = "$1" ]; then echo $((BASE_PORT + i)); fi; done; }
on() { local n=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(port_of "$n")" -U postgres -d store "$@"; }
val() { on "$1" -At -c "$2"; }

stop_demo() {
    local n
    for n in "${NODES[@]}"; do
        if [ -f "$DEMO_DIR/$n/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/$n" -m fast -w stop >/dev/null 2>&1 || true
        fi
    done
    return 0
}

if [ "${1:-}" = "stop" ]; then
    stop_demo
    say "demo stopped"
    exit 0
fi

bash scripts/setup.sh
install_extension

stop_demo
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
[ "$(id -u)" -eq 0 ] && chown postgres: "$DEMO_DIR"

for n in "${NODES[@]}"; do
    port=$(port_of "$n")
    say "starting $n on port $port"
    as_pg "$PG_BIN/initdb" -D "$DEMO_DIR/$n" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
    cat <<CONF | as_pg tee -a "$DEMO_DIR/$n/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$DEMO_DIR/$n'
shared_preload_libraries = 'rbucardo'
max_worker_processes = 16
CONF
    as_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/$n" -l "$DEMO_DIR/$n/server.log" -w start >/dev/null
    psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE store"
    on "$n" -f sql/demo/store_schema.sql
done

say "configuring the star: branches connect to main, each as its own role"
on main -c "SELECT rbucardo.init_node('main', 1)" >/dev/null
for i in 1 2; do
    b=branch$i
    on main -c "CREATE ROLE $b LOGIN IN ROLE rbucardo_peer; SELECT rbucardo.add_db('$b')" >/dev/null
    on "$b" -c "SELECT rbucardo.init_node('$b', $((i + 1)))" >/dev/null
    on "$b" -c "SELECT rbucardo.add_db('main', 'host=127.0.0.1 port=$(port_of main) user=$b dbname=store')" >/dev/null
done
for n in "${NODES[@]}"; do
    # A star: main lists both branches, a branch lists only main (main forwards between them).
    if [ "$n" = main ]; then dbs="ARRAY['main', 'branch1', 'branch2']"; else dbs="ARRAY['main', '$n']"; fi
    # add_all_tables also makes the tables' serial sequences node-disjoint (interleaved ids).
    on "$n" -c "SELECT rbucardo.add_herd('store'); SELECT rbucardo.add_all_tables('store');
                SELECT rbucardo.add_sync('pos', 'store', $dbs);
                SELECT rbucardo.set_column_strategy('products', 'stock', 'delta')" >/dev/null
done

sell() { # node, number of sales
    on "$1" -c "SELECT demo_sell($2)" >/dev/null
}

converged() {
    local t a b c
    for t in users products pos_order pos_order_line product_tag_rel; do
        a=$(val main "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM $t x")
        b=$(val branch1 "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM $t x")
        c=$(val branch2 "SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM $t x")
        [ "$a" = "$b" ] && [ "$a" = "$c" ] || return 1
    done
}

wait_converged() {
    local i
    for i in $(seq 1 600); do
        converged && { echo "  converged in about $((i / 10)).$((i % 10)) s"; return 0; }
        sleep 0.1
    done
    echo "  NOT converged after 60 s" >&2
    return 1
}

report() {
    local n
    for n in "${NODES[@]}"; do
        printf '  %-8s %s\n' "$n" "$(val "$n" "SELECT format('users %s, products %s, orders %s, lines %s, stock %s',
            (SELECT count(*) FROM users), (SELECT count(*) FROM products), (SELECT count(*) FROM pos_order),
            (SELECT count(*) FROM pos_order_line), (SELECT sum(stock) FROM products))") (expected stock $(val "$n" "SELECT 20 * 1000 - coalesce(sum(qty), 0) FROM pos_order_line"))"
    done
}

say "catalogue on main, then sales on every node"
on main -c "SELECT demo_catalogue(20)" >/dev/null
wait_converged
for n in "${NODES[@]}"; do sell "$n" 50; done
wait_converged
report

say "cutting both branch links (the stores keep selling)"
on main -c "ALTER ROLE branch1 NOLOGIN; ALTER ROLE branch2 NOLOGIN;
            SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename IN ('branch1', 'branch2')" >/dev/null
# Different amounts per store, so the report shows the nodes apart.
sell main 200; sell branch1 120; sell branch2 80
on branch1 -c "SELECT db, state, left(last_error, 60) AS last_error FROM rbucardo.status"
report

say "restoring the links"
on main -c "ALTER ROLE branch1 LOGIN; ALTER ROLE branch2 LOGIN"
wait_converged
report
on main -c "SELECT * FROM rbucardo.status"

echo
say "demo cluster is up (data in $DEMO_DIR)"
for n in "${NODES[@]}"; do
    printf '  %-8s psql -h 127.0.0.1 -p %s -U postgres store\n' "$n" "$(port_of "$n")"
done
echo "  try:     SELECT * FROM rbucardo.status;  SELECT demo_sell(10);"
echo "  stop:    bash scripts/demo.sh stop"
