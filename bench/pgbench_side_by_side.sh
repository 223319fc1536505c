#!/usr/bin/env bash
# Side by side: pgbench tpcb replicated one way by rbucardo, by PostgreSQL's native logical
# replication and by pglogical (when postgresql-15-pglogical is installed), in one run on
# identical PostgreSQL 15 clusters (copies of one template: same postgresql.conf, same data).
# For each system three copies run: plain (never replicated), origin and subscriber:
#   capture   with the link down (rbucardo: sync paused; native LR and pglogical: subscription
#             disabled, slot kept), pgbench -T on the origin alternating with runs on plain;
#   catch-up  with the link down again, pgbench -t builds the same backlog for every system;
#             then the link comes back: time until the subscriber has every one of them;
#   live      pgbench -T on the origin while it replicates, alternating with runs on plain;
#             after each, how long until the subscriber has everything;
#   lag       pgbench -R (steady rate); one-hop lag from timestamps written on both ends.
# Ratios compare each figure with the plain runs it alternated with. Only one system's clusters
# run at a time; they are stopped and removed before the next system's start.
#   bash bench/pgbench_side_by_side.sh [short|full]     (short: ~6 min, full: ~20 min)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

MODE=${1:-short}
case $MODE in
    short) SCALE=5;  ROUNDS=2; SECS=8;  BACKLOG=2500;  RATE=100; LAGSECS=15 ;;
    full)  SCALE=10; ROUNDS=3; SECS=20; BACKLOG=10000; RATE=200; LAGSECS=60 ;;
    *) echo "usage: $0 [short|full]" >&2; exit 2 ;;
esac
# SBS_SCALE and SBS_BACKLOG override the mode's scale and backlog (for development).
SCALE=${SBS_SCALE:-$SCALE}
BACKLOG=${SBS_BACKLOG:-$BACKLOG}
CLIENTS=4
THREADS=2
TXNS=$((CLIENTS * BACKLOG))
LAG_PAUSE=10    # seconds between the live runs and the lag run (see docs/performance.md)
WAIT_LIMIT=1800 # seconds a subscriber may take to catch up before the run fails

SYSTEMS=(rbucardo native)
PRELOAD=rbucardo
PLUGINS="pgoutput, test_decoding"
if [ -f "$($PG_CONFIG --pkglibdir)/pglogical.so" ]; then
    SYSTEMS=(rbucardo pglogical native)
    PRELOAD=rbucardo,pglogical
    PLUGINS="$PLUGINS, pglogical_output"
else
    say "pglogical not installed (apt-get install postgresql-15-pglogical): its column stays empty"
fi

# SBS_ONLY="rbucardo native" runs a subset (for development; the table leaves the rest empty).
[ -n "${SBS_ONLY:-}" ] && read -r -a SYSTEMS <<< "$SBS_ONLY"

DIR=$(mktemp -d /tmp/rbucardo-sbs.XXXXXX)
chmod 755 "$DIR"
[ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
RUNNING=()
cleanup() {
    local rc=$? d
    for d in "${RUNNING[@]}"; do
        [ "$rc" -ne 0 ] && { echo "--- last lines of $d/server.log" >&2; tail -15 "$d/server.log" >&2 || true; }
        as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
now() { date +%s.%N; }
# q PORT SQL...: one psql call on database bench, unaligned, stops at the first error.
q() { local port=$1; shift; psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench "$@"; }
conninfo() { echo "host=127.0.0.1 port=$1 user=postgres dbname=bench"; }
# wait_for PORT SQL [LIMIT]: polls (in the server, every 0.1 s) until SQL returns true. Each
# poll commits: a DO block that did not held one snapshot for the whole wait, so the server
# being waited on could not prune the dead versions of pgbench's hot rows (10 branches, 100
# tellers) while it applied a backlog, and every update of one walked a chain that grew for the
# whole catch-up (native LR's apply worker ran for minutes at 100 % CPU).
wait_for() {
    local limit=${3:-$WAIT_LIMIT}
    q "$1" -c "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
                 WHILE NOT coalesce(($2), false) LOOP
                   IF clock_timestamp() - t0 > interval '$limit s' THEN RAISE EXCEPTION 'timed out waiting for: %', \$q\$$2\$q\$; END IF;
                   PERFORM pg_sleep(0.1);
                   COMMIT;
                 END LOOP; END \$\$"
}
# The backlog rows past an id: every pgbench transaction inserts exactly one history row, last.
rows_after() { q "$1" -c "SELECT count(*) FROM pgbench_history WHERE id > $2"; }
wait_rows() { wait_for "$1" "(SELECT count(*) FROM pgbench_history WHERE id > $2) >= $3"; }
max_id() { q "$1" -c "SELECT coalesce(max(id), 0) FROM pgbench_history"; }
# pgbench PORT ARGS...: tpcb on the origin; prints the tps.
run_pgbench() {
    local port=$1; shift
    pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c "$CLIENTS" -j "$THREADS" "$@" bench > "$DIR/pgbench.out" 2>&1 \
        || { echo "pgbench failed:" >&2; tail -5 "$DIR/pgbench.out" >&2; exit 1; }
    awk '/^tps/ {print $3; exit}' "$DIR/pgbench.out"
}
# Before every measured run: the same clean state on both ends.
settle() {
    local p
    for p in "$@"; do q "$p" -c "VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts" -c "CHECKPOINT"; done
}

# --- template cluster: every cluster of the run is a copy of it, so all have the same settings and data
say "template cluster: pgbench scale $SCALE ($MODE mode)"
TPORT=$(free_port)
as_pg "$PG_BIN/initdb" -D "$DIR/tpl" -U postgres --auth=trust --no-sync >/dev/null
cat <<CONF | as_pg tee -a "$DIR/tpl/postgresql.conf" >/dev/null
listen_addresses = '127.0.0.1'
shared_preload_libraries = '$PRELOAD'
wal_level = logical
shared_buffers = 512MB
max_wal_size = 4GB
synchronous_commit = on
max_worker_processes = 16
max_replication_slots = 10
max_wal_senders = 10
port = $TPORT
unix_socket_directories = '$DIR/tpl'
CONF
# SBS_STATEMENTS=1 loads pg_stat_statements (track = all) and prints each end's costliest
# statements of the first live run (for development).
if [ -n "${SBS_STATEMENTS:-}" ]; then
    printf "shared_preload_libraries = '%s,pg_stat_statements%s'\npg_stat_statements.track = all\n" "$PRELOAD" "${SBS_EXPLAIN:+,auto_explain}" \
        | as_pg tee -a "$DIR/tpl/postgresql.conf" >/dev/null
fi
# SBS_EXPLAIN=MS (with SBS_STATEMENTS) logs the plan of every statement slower than MS ms,
# nested ones too, in the server logs (keep them with SBS_KEEPLOGS).
if [ -n "${SBS_STATEMENTS:-}" ] && [ -n "${SBS_EXPLAIN:-}" ]; then
    printf "auto_explain.log_min_duration = '%sms'\nauto_explain.log_nested_statements = on\n" "$SBS_EXPLAIN" \
        | as_pg tee -a "$DIR/tpl/postgresql.conf" >/dev/null
fi
# Recent PostgreSQL 15 releases let only listed output plugins be used (pglogical's is not by default).
if "$PG_BIN/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
    echo "output_plugin_libraries = '$PLUGINS'" | as_pg tee -a "$DIR/tpl/postgresql.conf" >/dev/null
fi
as_pg "$PG_BIN/pg_ctl" -D "$DIR/tpl" -l "$DIR/tpl/server.log" -w start >/dev/null || { cat "$DIR/tpl/server.log"; exit 1; }
RUNNING+=("$DIR/tpl")
psql -X -q -h 127.0.0.1 -p "$TPORT" -U postgres -d postgres -c "CREATE DATABASE bench"
pgbench -h 127.0.0.1 -p "$TPORT" -U postgres -i -s "$SCALE" -q bench >/dev/null 2>&1
# A key on every table (replication needs one); origin_ts is written on the origin when the
# row is inserted (the last statement of a tpcb transaction) and travels as data; arrived is
# written on the subscriber by an ENABLE ALWAYS trigger (created on subscribers only), which
# fires for replicated rows under all three systems. Every column exists on both ends, so
# rbucardo applies through its executor path, as it does without these columns.
q "$TPORT" -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY,
                 ADD COLUMN origin_ts timestamptz DEFAULT clock_timestamp(), ADD COLUMN arrived timestamptz" \
           -c "CREATE FUNCTION public.stamp_arrival() RETURNS trigger LANGUAGE plpgsql
                 AS \$\$ BEGIN NEW.arrived := clock_timestamp(); RETURN NEW; END \$\$" \
           -c "VACUUM ANALYZE" -c "CHECKPOINT"
as_pg "$PG_BIN/pg_ctl" -D "$DIR/tpl" -m fast -w stop >/dev/null
RUNNING=()

start_node() { # NAME VAR: starts a copy of the template on a free port, put in VAR
    local d=$DIR/$1 port
    port=$(free_port)
    printf -v "$2" '%s' "$port"
    as_pg cp -a "$DIR/tpl" "$d"
    as_pg rm -f "$d/server.log"
    printf "port = %s\nunix_socket_directories = '%s'\n" "$port" "$d" | as_pg tee -a "$d/postgresql.conf" >/dev/null
    as_pg "$PG_BIN/pg_ctl" -D "$d" -l "$d/server.log" -w start >/dev/null || { cat "$d/server.log" >&2; exit 1; }
    RUNNING+=("$d")
}
# CPU seconds every process of a node has used so far: the postmaster and its live children,
# and the children that have exited (the postmaster's cutime/cstime, as it reaps them).
node_cpu() { # NAME
    local pm
    pm=$(head -1 "$DIR/$1/postmaster.pid")
    { sed 's/.*) //' "/proc/$pm/stat" | awk '{print $12 + $13 + $14 + $15}'
      # (a child that exits meanwhile is counted in the postmaster's cutime instead)
      for c in $(pgrep -P "$pm" || true); do { sed 's/.*) //' "/proc/$c/stat" 2>/dev/null || true; } | awk '{print $12 + $13}'; done
    } | awk -v hz="$(getconf CLK_TCK)" '{s += $1} END {printf "%.3f", s / hz}'
}
# CPU seconds one process has used so far.
proc_cpu() { sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($12 + $13) / hz}'; }
stop_node() { # NAME
    local d=$DIR/$1 keep=() r
    as_pg "$PG_BIN/pg_ctl" -D "$d" -m fast -w -t 60 stop >/dev/null 2>&1 || as_pg "$PG_BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    for r in "${RUNNING[@]}"; do [ "$r" != "$d" ] && keep+=("$r"); done
    RUNNING=("${keep[@]+"${keep[@]}"}")
    # SBS_KEEPLOGS=DIR keeps every cluster's server log (for development).
    [ -n "${SBS_KEEPLOGS:-}" ] && mkdir -p "$SBS_KEEPLOGS" && cp "$d/server.log" "$SBS_KEEPLOGS/$1.log" 2>/dev/null
    rm -rf "$d"
}

# --- per system: set up (link up, connected), link down, link up. $O origin port, $S subscriber port.
rbucardo_setup() {
    q "$S" -c "CREATE EXTENSION rbucardo" -c "SELECT rbucardo.init_node('b', 2)" -c "SELECT rbucardo.add_herd('pgbench')" \
           -c "SELECT rbucardo.add_all_tables('pgbench')" -c "SELECT rbucardo.add_db('a')" \
           -c "SELECT rbucardo.add_sync('s', 'pgbench', ARRAY['a', 'b'])" >/dev/null
    q "$O" -c "CREATE EXTENSION rbucardo" -c "SELECT rbucardo.init_node('a', 1)" -c "SELECT rbucardo.add_herd('pgbench')" \
           -c "SELECT rbucardo.add_all_tables('pgbench')" -c "SELECT rbucardo.add_db('b', '$(conninfo "$S")')" \
           -c "SELECT rbucardo.add_sync('s', 'pgbench', ARRAY['a', 'b'])" >/dev/null
    wait_for "$O" "(SELECT state = 'connected' AND last_contact IS NOT NULL FROM rbucardo.peer_state WHERE db = 'b')" 120
}
rbucardo_down() { q "$O" -c "SELECT rbucardo.pause_sync('s')" >/dev/null; }
rbucardo_up() { q "$O" -c "SELECT rbucardo.resume_sync('s')" -c "SELECT rbucardo.kick('s')" >/dev/null; }

native_setup() {
    q "$O" -c "CREATE PUBLICATION p FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
    q "$S" -c "SET client_min_messages = warning" -c "CREATE SUBSCRIPTION s CONNECTION '$(conninfo "$O")' PUBLICATION p WITH (copy_data = false)"
    wait_for "$O" "(SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming')" 120
}
native_down() {
    q "$S" -c "ALTER SUBSCRIPTION s DISABLE"
    wait_for "$O" "(SELECT count(*) = 0 FROM pg_stat_replication)" 120
}
native_up() { q "$S" -c "ALTER SUBSCRIPTION s ENABLE"; }

pglogical_setup() {
    q "$O" -c "CREATE EXTENSION pglogical" -c "SELECT pglogical.create_node(node_name := 'p1', dsn := '$(conninfo "$O")')" \
           -c "SELECT pglogical.replication_set_add_all_tables('default', ARRAY['public'])" >/dev/null
    q "$S" -c "CREATE EXTENSION pglogical" -c "SELECT pglogical.create_node(node_name := 'p2', dsn := '$(conninfo "$S")')" \
           -c "SELECT pglogical.create_subscription(subscription_name := 's', provider_dsn := '$(conninfo "$O")',
                 synchronize_structure := false, synchronize_data := false)" >/dev/null
    wait_for "$S" "(SELECT status = 'replicating' FROM pglogical.show_subscription_status('s'))" 120
    wait_for "$O" "(SELECT count(*) = 1 FROM pg_stat_replication WHERE state = 'streaming')" 120
}
pglogical_down() {
    q "$S" -c "SELECT pglogical.alter_subscription_disable('s', true)" >/dev/null
    wait_for "$O" "(SELECT count(*) = 0 FROM pg_stat_replication)" 120
}
pglogical_up() { q "$S" -c "SELECT pglogical.alter_subscription_enable('s', true)" >/dev/null; }

# Same data on both ends? Prints yes, or NO with the differing figures (and rbucardo's conflicts).
CHECK="SELECT 'accounts ' || (SELECT sum(abalance) FROM pgbench_accounts) || ', branches ' || (SELECT sum(bbalance) FROM pgbench_branches)
              || ', tellers ' || (SELECT sum(tbalance) FROM pgbench_tellers) || ', history ' || (SELECT count(*) || ' ' || coalesce(sum(delta), 0) FROM pgbench_history)"
compare() { # SYSTEM PHASE
    local o s
    o=$(q "$O" -c "$CHECK"); s=$(q "$S" -c "$CHECK")
    if [ "$o" = "$s" ]; then echo yes; return; fi
    echo NO
    { echo "  DIFFERENT after $2: origin $o"; echo "                     subscriber $s"
      if [ "$1" = rbucardo ]; then q "$S" -c "SELECT '  rbucardo on the subscriber: ' || coalesce(string_agg(tbl || ' ' || kind || ' ' || outcome || ' ' || conflicts, ', '), 'no conflicts')
                                       || '; open exceptions ' || (SELECT count(*) FROM rbucardo.exceptions WHERE resolved_at IS NULL) FROM rbucardo.conflict_stats"; fi
    } >&2
}

declare -A R
mean() { printf '%s\n' "$@" | awk '{s += $1} END {printf "%.1f", s / NR}'; }
measure() { # SYSTEM
    local sys=$1 start want t0 t1 r tps drain plains=() caps=() lives=() drains=() p_cap=() p_live=()
    say "$sys (load average $(cut -d' ' -f1-3 /proc/loadavg))"
    # plain runs on a third copy: one on the origin would leave it with rows the subscriber
    # lacks. It stays up, idle, and its runs alternate with the origin's, so that drift in the
    # machine's speed (it may be shared) hits both alike.
    start_node "${sys}_plain" P
    start_node "${sys}_o" O
    start_node "${sys}_s" S
    q "$S" -c "CREATE TRIGGER stamp_arrival BEFORE INSERT ON pgbench_history FOR EACH ROW EXECUTE FUNCTION public.stamp_arrival()" \
           -c "ALTER TABLE pgbench_history ENABLE ALWAYS TRIGGER stamp_arrival"
    "${sys}_setup"

    # capture-only: the link down, pgbench runs on the origin alternate with runs on plain
    "${sys}_down"
    start=$(max_id "$O")
    for r in $(seq 1 "$ROUNDS"); do
        settle "$P"; tps=$(run_pgbench "$P" -T "$SECS"); p_cap+=("$tps")
        settle "$O"; caps+=("$(run_pgbench "$O" -T "$SECS")")
        echo "  round $r: plain $tps tps, capture-only ${caps[-1]} tps (link down)"
    done
    "${sys}_up"
    wait_rows "$S" "$start" "$(rows_after "$O" "$start")"

    # catch-up: the same number of transactions for every system, made with the link down.
    # rbucardo's origin first trims what the rounds before left, so that its trim of the
    # backlog (measured below) is of the backlog only.
    [ "$sys" = rbucardo ] && wait_for "$O" "NOT EXISTS (SELECT FROM rbucardo.change_log)"
    "${sys}_down"
    settle "$O" "$S"
    start=$(max_id "$O")
    run_pgbench "$O" -t "$BACKLOG" >/dev/null
    want=$(rows_after "$O" "$start")
    # SBS_PERF=PREFIX records a system-wide profile of the catch-up in PREFIX.SYSTEM.data
    # (for development: perf report -i PREFIX.SYSTEM.data --no-children --sort comm,symbol).
    local perf_pid=
    if [ -n "${SBS_PERF:-}" ]; then
        perf record -a -g -F 999 -o "$SBS_PERF.$sys.data" >/dev/null 2>&1 &
        perf_pid=$!
        sleep 0.5
    fi
    t0=$(now)
    local o0 s0 o1 s1 hk= h0 shk= sh0
    # rbucardo's origin trims what the subscriber confirmed, and keeps the row clocks of what
    # it trims: its housekeeper's CPU from here until the whole backlog is trimmed. The
    # subscriber's housekeeper likewise, until its own log is empty (what it re-logged, if
    # anything, trimmed and its clocks kept).
    if [ "$sys" = rbucardo ]; then
        hk=$(q "$O" -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'rbucardo housekeeper' AND datname = current_database()")
        shk=$(q "$S" -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'rbucardo housekeeper' AND datname = current_database()")
        h0=$(proc_cpu "$hk"); sh0=$(proc_cpu "$shk")
    fi
    o0=$(node_cpu "${sys}_o"); s0=$(node_cpu "${sys}_s")
    "${sys}_up"
    wait_rows "$S" "$start" "$want"
    t1=$(now)
    o1=$(node_cpu "${sys}_o"); s1=$(node_cpu "${sys}_s")
    [ -n "$perf_pid" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
    R[$sys.catchup_s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
    R[$sys.catchup_rate]=$(awk -v a="$t0" -v b="$t1" -v n="$want" 'BEGIN {printf "%.0f", 4 * n / (b - a)}')
    # What the machine's load at the moment moves least: each server's CPU per change.
    R[$sys.catchup_cpu]=$(awk -v o0="$o0" -v o1="$o1" -v s0="$s0" -v s1="$s1" -v n="$want" \
        'BEGIN {printf "%.1f / %.1f", 1e6 * (o1 - o0) / (4 * n), 1e6 * (s1 - s0) / (4 * n)}')
    R[$sys.same]=$(compare "$sys" catch-up)
    echo "  catch-up of $want transactions: ${R[$sys.catchup_s]} s, ${R[$sys.catchup_rate]} row changes/s, ${R[$sys.catchup_cpu]} us of CPU per change on origin / subscriber; same data: ${R[$sys.same]}"
    if [ -n "$hk" ]; then
        if wait_for "$O" "NOT EXISTS (SELECT FROM rbucardo.change_log)"; then
            R[$sys.trim_cpu]=$(awk -v a="$h0" -v b="$(proc_cpu "$hk")" -v n="$want" 'BEGIN {printf "%.1f", 1e6 * (b - a) / (4 * n)}')
        else
            R[$sys.trim_cpu]="not trimmed within ${WAIT_LIMIT} s"
        fi
        echo "  the origin's housekeeper trimmed it all, with its row clocks: ${R[$sys.trim_cpu]} us of CPU per change"
        if wait_for "$S" "NOT EXISTS (SELECT FROM rbucardo.change_log)"; then
            R[$sys.strim_cpu]=$(awk -v a="$sh0" -v b="$(proc_cpu "$shk")" -v n="$want" 'BEGIN {printf "%.1f", 1e6 * (b - a) / (4 * n)}')
        else
            R[$sys.strim_cpu]="not trimmed within ${WAIT_LIMIT} s"
        fi
        echo "  the subscriber's housekeeper, until its log was empty: ${R[$sys.strim_cpu]} us of CPU per change"
    fi

    # live: replicating while pgbench runs, alternating with plain runs; after each live run,
    # how long until the subscriber has everything
    for r in $(seq 1 "$ROUNDS"); do
        settle "$P"; tps=$(run_pgbench "$P" -T "$SECS"); p_live+=("$tps")
        settle "$O" "$S"
        start=$(max_id "$O")
        # SBS_PERF also profiles the first live run, in PREFIX.SYSTEM.live.data.
        perf_pid=
        if [ -n "${SBS_PERF:-}" ] && [ "$r" = 1 ]; then
            perf record -a -g -F 999 -o "$SBS_PERF.$sys.live.data" >/dev/null 2>&1 &
            perf_pid=$!
        fi
        if [ -n "${SBS_STATEMENTS:-}" ] && [ "$r" = 1 ]; then
            for n in "$O" "$S"; do q "$n" -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "SELECT pg_stat_statements_reset()" >/dev/null; done
        fi
        lives+=("$(run_pgbench "$O" -T "$SECS")")
        [ -n "$perf_pid" ] && { kill -INT "$perf_pid"; wait "$perf_pid" || true; }
        if [ -n "${SBS_STATEMENTS:-}" ] && [ "$r" = 1 ]; then
            for n in "$O" "$S"; do
                echo "  costliest statements on port $n (first live run): ms, calls, rows, query"
                q "$n" -c "SELECT round(total_exec_time)::int, calls, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 150)
                             FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 15" | sed 's/^/    /'
            done
        fi
        t0=$(now)
        want=$(rows_after "$O" "$start")
        wait_rows "$S" "$start" "$want"
        t1=$(now)
        drains+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')")
        echo "  round $r: plain $tps tps, live ${lives[-1]} tps; subscriber complete ${drains[-1]} s after pgbench ended"
    done
    R[$sys.same]+=/$(compare "$sys" live)
    R[$sys.plain]=$(mean "${p_cap[@]}" "${p_live[@]}")
    R[$sys.capture]=$(mean "${caps[@]}")
    R[$sys.capture_base]=$(mean "${p_cap[@]}")
    R[$sys.live]=$(mean "${lives[@]}")
    R[$sys.live_base]=$(mean "${p_live[@]}")
    R[$sys.drain]=$(printf '%s\n' "${drains[@]}" | sort -g | tail -1)
    stop_node "${sys}_plain"

    # lag: a steady rate, after a pause that lets the replication settle from the live runs
    settle "$O" "$S"
    sleep "$LAG_PAUSE"
    start=$(max_id "$O")
    run_pgbench "$O" -R "$RATE" -T "$LAGSECS" >/dev/null
    want=$(rows_after "$O" "$start")
    wait_rows "$S" "$start" "$want"
    # Written: the row's arrival on the subscriber. Visible: the last arrival of the
    # subscriber transaction that wrote it (its commit follows at once), which differs when
    # one local transaction applies several origin transactions.
    IFS='|' read -r R[$sys.lag_w50] R[$sys.lag_w99] R[$sys.lag_v50] R[$sys.lag_v99] R[$sys.per_txn] R[$sys.unstamped] < <(q "$S" -c "
        WITH r AS (SELECT xmin::text::bigint AS x, origin_ts, arrived FROM pgbench_history WHERE id > $start),
             v AS (SELECT x, max(arrived) AS visible FROM r GROUP BY x),
             l AS (SELECT extract(epoch FROM r.arrived - r.origin_ts) * 1000 AS w,
                          extract(epoch FROM v.visible - r.origin_ts) * 1000 AS vis FROM r JOIN v USING (x))
        SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY w)::numeric, 1),
               round(percentile_cont(0.99) WITHIN GROUP (ORDER BY w)::numeric, 1),
               round(percentile_cont(0.5) WITHIN GROUP (ORDER BY vis)::numeric, 1),
               round(percentile_cont(0.99) WITHIN GROUP (ORDER BY vis)::numeric, 1),
               round((SELECT count(*) FROM r)::numeric / greatest((SELECT count(*) FROM v), 1), 2),
               (SELECT count(*) FROM r WHERE arrived IS NULL)
          FROM l")
    echo "  lag:      written p50/p99 ${R[$sys.lag_w50]}/${R[$sys.lag_w99]} ms, visible ${R[$sys.lag_v50]}/${R[$sys.lag_v99]} ms ($want transactions at $RATE/s, ${R[$sys.per_txn]} per subscriber transaction)"
    [ "${R[$sys.unstamped]}" = 0 ] || echo "  WARNING: ${R[$sys.unstamped]} rows without an arrival stamp (trigger did not fire)"

    # SBS_LAGDUMP=PREFIX keeps each system's lag rows in PREFIX.SYSTEM.csv (for development).
    [ -n "${SBS_LAGDUMP:-}" ] && q "$S" -c "\\copy (SELECT id, origin_ts, arrived, xmin FROM pgbench_history WHERE id > $start ORDER BY origin_ts) TO '$SBS_LAGDUMP.$sys.csv' CSV"
    R[$sys.same]+=/$(compare "$sys" lag)
    echo "  same data on both ends after catch-up/live/lag: ${R[$sys.same]}"
    stop_node "${sys}_s"
    stop_node "${sys}_o"
}

T_START=$(now)
for sys in "${SYSTEMS[@]}"; do measure "$sys"; done

# --- the table
get() { echo "${R[$1.$2]:--}"; }
ratio() { # SYSTEM KEY: value and its ratio to the plain runs it alternated with
    local v=${R[$1.$2]:-} p=${R[$1.$2_base]:-}
    [ -z "$v" ] && { echo "-"; return; }
    awk -v v="$v" -v p="$p" 'BEGIN {printf "%.0f (%.1f %%)", v, 100 * v / p}'
}
row() { printf '| %-44s | %-22s | %-22s | %-22s |\n' "$@"; }
echo
say "side by side, $MODE mode: pgbench tpcb scale $SCALE, -c$CLIENTS -j$THREADS, $(date -u +%Y-%m-%d), $(nproc) cores, $(awk -v a="$T_START" -v b="$(now)" 'BEGIN {printf "%.0f", b - a}') s"
row "figure" "rbucardo" "pglogical" "native LR"
row "---" "---" "---" "---"
cell() { [ -n "${R[$1.plain]:-}" ] && "${@:2}" "$1" || echo "-"; }
line() { # LABEL FUNCTION...: one row, FUNCTION SYSTEM prints a cell
    row "$1" "$(cell rbucardo "${@:2}")" "$(cell pglogical "${@:2}")" "$(cell native "${@:2}")"
}
f_plain() { printf '%.0f' "${R[$1.plain]}"; }
f_capture() { ratio "$1" capture; }
f_live() { ratio "$1" live; }
f_drain() { echo "${R[$1.drain]} s"; }
f_catchup() { echo "${R[$1.catchup_s]} s, ${R[$1.catchup_rate]}/s"; }
f_catchup_cpu() { echo "${R[$1.catchup_cpu]} us"; }
f_trim_cpu() { case "${R[$1.trim_cpu]:--}" in [0-9]*) echo "${R[$1.trim_cpu]} us" ;; *) echo "${R[$1.trim_cpu]:--}" ;; esac; }
f_strim_cpu() { case "${R[$1.strim_cpu]:--}" in [0-9]*) echo "${R[$1.strim_cpu]} us" ;; *) echo "${R[$1.strim_cpu]:--}" ;; esac; }
f_lagw() { echo "${R[$1.lag_w50]} / ${R[$1.lag_w99]} ms"; }
f_lagv() { echo "${R[$1.lag_v50]} / ${R[$1.lag_v99]} ms"; }
f_per() { echo "${R[$1.per_txn]}"; }
f_same() { echo "${R[$1.same]}"; }
line "plain tps (no replication; ${ROUNDS}x2 runs of ${SECS}s)" f_plain
line "capture-only tps (link down; vs plain)" f_capture
line "live tps (replicating; ${ROUNDS} runs; vs plain)" f_live
line "subscriber complete after a live run (max)" f_drain
line "catch-up of $TXNS txns ($((4 * TXNS)) row changes)" f_catchup
line "catch-up: CPU per row change, origin / subscriber" f_catchup_cpu
line "origin's trim of the catch-up, CPU per row change" f_trim_cpu
line "subscriber's trim after the catch-up, CPU per row change" f_strim_cpu
line "one-hop lag p50 / p99, row written (-R $RATE)" f_lagw
line "one-hop lag p50 / p99, visible (-R $RATE)" f_lagv
line "origin txns per subscriber txn (lag run)" f_per
line "same data both ends (catch-up/live/lag)" f_same
