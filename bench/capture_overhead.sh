#!/usr/bin/env bash
# Capture overhead: pgbench tpcb on one node, plain and then with every pgbench table captured
# by rbucardo, in the same run on the same server. Prints both tps figures and the ratio.
#   bash bench/capture_overhead.sh [seconds per run, default 30] [clients, default 4] [rounds, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
SECS=${1:-30}
CLIENTS=${2:-4}
ROUNDS=${3:-3}
. bench/lib.sh
bench_server "synchronous_commit = on"
PSQL="psql -X -q -h 127.0.0.1 -p $PORT -U postgres"
$PSQL -d postgres -c "CREATE DATABASE bench"
pgbench -h 127.0.0.1 -p "$PORT" -U postgres -i -s 10 -q bench >/dev/null 2>&1
# rbucardo needs a key on every table; give pgbench_history one in both runs alike.
$PSQL -d bench -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY; CREATE EXTENSION rbucardo" -c "VACUUM ANALYZE"

run() {
    pgbench -h 127.0.0.1 -p "$PORT" -U postgres -c "$CLIENTS" -j 2 -T "$SECS" -n bench > "$DIR/pgbench.out" 2>&1 \
        || { echo "pgbench failed:" >&2; tail -5 "$DIR/pgbench.out" >&2; exit 1; }
    awk '/^tps/ {print $3; exit}' "$DIR/pgbench.out"
}
capture() { # on|off: the same tables, with rbucardo's capture triggers enabled or not
    local t verb=ENABLE
    [ "$1" = off ] && verb=DISABLE
    for t in pgbench_accounts pgbench_branches pgbench_tellers pgbench_history; do
        $PSQL -d bench -c "ALTER TABLE $t $verb TRIGGER rbucardo_capture; ALTER TABLE $t $verb TRIGGER rbucardo_capture_truncate"
    done
}
$PSQL -d bench -c "SELECT rbucardo.init_node('bench', 1); SELECT rbucardo.add_herd('pgbench');
                   SELECT rbucardo.add_all_tables('pgbench')" >/dev/null
[ -n "${EXTRA_SQL:-}" ] && $PSQL -d bench -c "$EXTRA_SQL"

# Alternate the two settings so that drift in the machine's speed hits both alike.
say "pgbench tpcb, $CLIENTS clients, ${ROUNDS} rounds of ${SECS}s per setting, alternating"
plain_all=(); captured_all=()
for r in $(seq 1 "$ROUNDS"); do
    capture off; plain_all+=("$(run)")
    capture on
    # CAPTURE_PERF=PREFIX records a system-wide profile of each captured run in PREFIX.N.data
    # (for development: perf report -i PREFIX.1.data --no-children --sort dso,symbol).
    perf_pid=
    if [ -n "${CAPTURE_PERF:-}" ]; then
        perf record -a -g -F 999 -o "$CAPTURE_PERF.$r.data" >/dev/null 2>&1 &
        perf_pid=$!
    fi
    captured_all+=("$(run)")
    [ -n "$perf_pid" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
    echo "  round $r: plain ${plain_all[-1]} tps, captured ${captured_all[-1]} tps"
done
plain=$(printf '%s\n' "${plain_all[@]}" | awk '{s += $1} END {print s / NR}')
captured=$(printf '%s\n' "${captured_all[@]}" | awk '{s += $1} END {print s / NR}')
rows=$($PSQL -d bench -At -c "SELECT count(*) FROM rbucardo.change_log")
echo "plain tps (mean):     $plain"
echo "captured tps (mean):  $captured"
echo "ratio:                $(awk -v a="$captured" -v b="$plain" 'BEGIN {printf "%.1f%%", 100 * a / b}')"
echo "change log rows written: $rows"
