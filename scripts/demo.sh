#!/usr/bin/env bash
# The main job: a local demo cluster of three PostgreSQL 15 servers (main, branch1, branch2) on
# loopback ports, data in ./.demo, the rbucardo extension created in database "store" on each.
#   bash scripts/demo.sh          set up (installs what is missing), build, start
#   bash scripts/demo.sh stop     stop the three servers
# Running it again stops and recreates the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

DEMO_DIR=${RBUCARDO_DEMO_DIR:-$PWD/.demo}
NODES=(main branch1 branch2)
BASE_PORT=${RBUCARDO_DEMO_PORT:-55432}

port_of() { local i; for i in "${!NODES[@]}"; do [ "${NODES[$i]}" = "$1" ] && echo $((BASE_PORT + i)); done; }

stop_demo() {
    local n
    for n in "${NODES[@]}"; do
        if [ -f "$DEMO_DIR/$n/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" -D "$DEMO_DIR/$n" -m fast -w stop >/dev/null 2>&1 || true
        fi
    done
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
    psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d store -c "CREATE EXTENSION rbucardo"
done

echo
say "demo cluster is up (data in $DEMO_DIR)"
for n in "${NODES[@]}"; do
    printf '  %-8s psql -h 127.0.0.1 -p %s -U postgres store\n' "$n" "$(port_of "$n")"
done
echo "  stop:    bash scripts/demo.sh stop"
