#!/usr/bin/env bash
# Capture overhead: pgbench tpcb on one node, plain and then with every pgbench table captured
# by rbucardo, in the same run on the same server. Prints both tps figures and the ratio.
#   bash bench/capture_overhead.sh [seconds per run, default 30] [clients, default 4]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
SECS=${1:-30}
CLIENTS=${2:-4}
DIR=$(mktemp -d /tmp/rbucardo-bench.XXXXXX)
PORT=${RBUCARDO_BENCH_PORT:-55500}
[ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
cleanup() { as_pg "$PG_BIN/pg_ctl" -D "$DIR/n" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

as_pg "$PG_BIN/initdb" -D "$DIR/n" -U postgres --auth=trust --no-sync >/dev/null
cat <<CONF | as_pg tee -a "$DIR/n/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR/n'
shared_preload_libraries = 'rbucardo'
shared_buffers = 512MB
max_wal_size = 4GB
synchronous_commit = on
CONF
as_pg "$PG_BIN/pg_ctl" -D "$DIR/n" -l "$DIR/n/server.log" -w start >/dev/null
PSQL="psql -X -q -h 127.0.0.1 -p $PORT -U postgres"
$PSQL -d postgres -c "CREATE DATABASE bench"
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -i -s 10 -q bench >/dev/null 2>&1
# rbucardo needs a key on every table; give pgbench_history one in both runs alike.
$PSQL -d bench -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY; CREATE EXTENSION rbucardo" -c "VACUUM ANALYZE"

run() {
    pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -T "$SECS" -n bench 2>/dev/null \
        | awk '/^tps/ {print $3; exit}'
}
say "plain pgbench tpcb, $CLIENTS clients, ${SECS}s"
plain=$(run)
$PSQL -d bench -c "SELECT rbucardo.init_node('bench', 1); SELECT rbucardo.add_herd('pgbench');
                   SELECT rbucardo.add_all_tables('pgbench')" >/dev/null
[ -n "${EXTRA_SQL:-}" ] && $PSQL -d bench -c "$EXTRA_SQL"
say "with rbucardo capture on all four tables"
captured=$(run)
rows=$($PSQL -d bench -At -c "SELECT count(*) FROM rbucardo.change_log")
echo "plain tps:     $plain"
echo "captured tps:  $captured"
echo "ratio:         $(awk -v a="$captured" -v b="$plain" 'BEGIN {printf "%.1f%%", 100 * a / b}')"
echo "change log rows written: $rows"
