# Shared by the one-server benchmarks (bench/capture_overhead.sh, bench/diff_1m.sh): one
# PostgreSQL 15 server with rbucardo preloaded, in a temporary directory, removed on exit.
# Source after scripts/common.sh; sets DIR and PORT, starts the server.
#   bench_server [extra postgresql.conf lines]

bench_server() {
    DIR=$(mktemp -d /tmp/rbucardo-bench.XXXXXX)
    PORT=${RBUCARDO_BENCH_PORT:-$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
    chmod 755 "$DIR"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
    trap 'as_pg "$PG_BIN/pg_ctl" -D "$DIR/n" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
    as_pg "$PG_BIN/initdb" -D "$DIR/n" -U postgres --auth=trust --no-sync >/dev/null
    printf '%s\n' "listen_addresses = '127.0.0.1'" "port = $PORT" "unix_socket_directories = '$DIR/n'" \
        "shared_preload_libraries = 'rbucardo'" "shared_buffers = 512MB" "max_wal_size = 4GB" "$@" \
        | as_pg tee -a "$DIR/n/postgresql.conf" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/n" -l "$DIR/n/server.log" -w start >/dev/null || { cat "$DIR/n/server.log"; exit 1; }
}
