#!/usr/bin/env bash
# Tests the Debian package and the upgrade path: builds the .deb (scripts/package-deb.sh),
# installs it with dpkg into the system PostgreSQL 15, and on a throw-away cluster that preloads
# it checks that
#   - CREATE EXTENSION rbucardo gives the package's version, and a node can be set up;
#   - for every earlier release the package can install (sql/releases/rbucardo--X.sql), a
#     database created at it (CREATE EXTENSION rbucardo VERSION 'X') and brought up with ALTER
#     EXTENSION rbucardo UPDATE has exactly the schema of a fresh install (every member of the
#     extension, with definitions, columns in order, constraints, indexes, triggers,
#     privileges, comments; how many rows the install leaves in its tables); the diff is
#     printed otherwise;
#   - a node set up at that release keeps capturing across the update;
# then removes the package, checks that its files are gone, and puts back the build that
# install_extension installs (the one just built). The whole install/remove window holds
# /tmp/rbucardo-install.lock, as anything else that writes into the PostgreSQL directories must.
# Works as root (the server runs as postgres) and as a user with sudo.
#   bash scripts/test-package.sh
# RBUCARDO_DEB=path tests that .deb instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

PKG=postgresql-15-rbucardo
LOCK=${RBUCARDO_INSTALL_LOCK:-/tmp/rbucardo-install.lock}

if [ -n "${RBUCARDO_DEB:-}" ]; then
    DEB=$RBUCARDO_DEB
else
    DEB=$(bash scripts/package-deb.sh | tail -1)
fi
VERSION=$(dpkg-deb -f "$DEB" Version)
EXTDIR=$("$PG_CONFIG" --sharedir)/extension
# The earlier releases the package installs (their install scripts), oldest first.
PREVS=$(dpkg-deb -c "$DEB" | grep -o 'rbucardo--[0-9][^-]*\.sql$' | sed 's/^rbucardo--//; s/\.sql$//' \
        | grep -vx "$VERSION" | sort -V | xargs)
say "testing $DEB: version $VERSION, updates from ${PREVS:-nothing}"

DIR=$(mktemp -d /tmp/rbucardo-pkgtest.XXXXXX)
[ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
PSQL=("$PG_BIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$DIR" -p 5432 -U postgres)
installed=0 touched=0 started=0

cleanup() {
    local rc=$?
    set +e
    [ $started -eq 1 ] && as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1
    if [ $installed -eq 1 ]; then
        echo "removing $PKG after a failure" >&2
        as_root env DEBIAN_FRONTEND=noninteractive dpkg -r "$PKG" >/dev/null
    fi
    if [ $touched -eq 1 ]; then
        say "putting back the current build (install_extension)"
        install_packaged_extension || { echo "could not put back the current build" >&2; rc=1; }
    fi
    [ $rc -eq 0 ] || [ ! -e "$DIR/server.log" ] || { echo "server log:" >&2; tail -n 30 "$DIR/server.log" >&2; }
    rm -rf "$DIR"
    exit $rc
}
trap cleanup EXIT

# Opened read-only: a lock file that another user created can still be locked.
[ -e "$LOCK" ] || : > "$LOCK"
exec 9< "$LOCK"
if ! flock -n 9; then
    say "waiting for $LOCK"
    flock 9
fi
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "ok installed"; then
    echo "$PKG is installed on this machine: this test would remove it. Remove it first" \
         "(dpkg -r $PKG) or run the test elsewhere." >&2
    exit 1
fi

say "dpkg -i $(basename "$DEB")"
touched=1
as_root env DEBIAN_FRONTEND=noninteractive dpkg -i "$DEB" >/dev/null
installed=1
files=$(dpkg -L "$PKG")
as_root dpkg --verify "$PKG"     # every file on disk is the package's (md5sums)
for f in "$("$PG_CONFIG" --pkglibdir)/rbucardo.so" "$EXTDIR/rbucardo.control" \
         "$EXTDIR/rbucardo--$VERSION.sql" "/usr/share/doc/$PKG/copyright"; do
    grep -qx "$f" <<<"$files" || { echo "$PKG does not ship $f" >&2; exit 1; }
done
for prev in $PREVS; do
    grep -qx "$EXTDIR/rbucardo--$prev--$VERSION.sql" <<<"$files" \
        || echo "note: no direct upgrade script from $prev (a chain of them must do)" >&2
done

say "a fresh cluster preloading rbucardo"
as_pg "$PG_BIN/initdb" -D "$DIR/data" -U postgres --auth=trust --no-sync >/dev/null
cat <<CONF | as_pg tee -a "$DIR/data/postgresql.conf" >/dev/null
listen_addresses = ''
port = 5432
unix_socket_directories = '$DIR'
shared_preload_libraries = 'rbucardo'
fsync = off
CONF
as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
started=1
q() { local db=$1; shift; "${PSQL[@]}" -d "$db" "$@"; }
expect() { # expect WHAT GOT WANTED
    [ "$2" = "$3" ] || { echo "$1: got '$2', expected '$3'" >&2; exit 1; }
}
# Everything that makes up the extension in a database, one entry per fact, sorted, without
# OIDs: what a fresh install and an updated one must agree on.
cat > "$DIR/describe.sql" <<'SQL'
WITH ext AS (SELECT * FROM pg_extension WHERE extname = 'rbucardo'),
mem AS (
    SELECT d.classid, d.objid, d.objsubid FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'),
rels AS (SELECT c.* FROM mem JOIN pg_class c ON mem.classid = 'pg_class'::regclass AND c.oid = mem.objid),
types AS (SELECT t.* FROM mem JOIN pg_type t ON mem.classid = 'pg_type'::regclass AND t.oid = mem.objid),
facts(kind, name, detail) AS (
    SELECT 'extension', e.extname::text,
           format('version %s, schema %s, relocatable %s, config tables %s', e.extversion,
                  e.extnamespace::regnamespace, e.extrelocatable,
                  (SELECT string_agg(cfg.t::regclass::text || coalesce(' WHERE ' || nullif(cfg.c, ''), ''), ', ' ORDER BY 1)
                     FROM unnest(e.extconfig, e.extcondition) AS cfg(t, c)))
      FROM ext e
    UNION ALL
    SELECT 'member', (o).type || ' ' || (o).identity, ''
      FROM (SELECT pg_identify_object(classid, objid, objsubid) AS o FROM mem) m
    UNION ALL
    SELECT 'schema', n.nspname::text, format('acl %s, comment %s', n.nspacl, obj_description(n.oid, 'pg_namespace'))
      FROM ext JOIN pg_namespace n ON n.oid = ext.extnamespace
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text,
           CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE pg_get_functiondef(p.oid) END
           || format(E'\n  acl %s, comment %s', p.proacl, obj_description(p.oid, 'pg_proc'))
      FROM mem JOIN pg_proc p ON mem.classid = 'pg_proc'::regclass AND p.oid = mem.objid
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           format('kind %s, persistence %s, rls %s/%s, replica identity %s, options %s, acl %s, comment %s',
                  c.relkind, c.relpersistence, c.relrowsecurity, c.relforcerowsecurity, c.relreplident,
                  c.reloptions, c.relacl, obj_description(c.oid, 'pg_class'))
      FROM rels c
    UNION ALL
    SELECT 'column', c.oid::regclass::text || ' #' || lpad((row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum))::text, 3, '0'),
           format('%s %s, not null %s, default %s, identity %s, generated %s, collation %s, acl %s, comment %s',
                  a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid),
                  a.attidentity, a.attgenerated, a.attcollation::regcollation, a.attacl, col_description(c.oid, a.attnum))
      FROM rels c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
    UNION ALL
    SELECT 'view', c.oid::regclass::text, pg_get_viewdef(c.oid, true) FROM rels c WHERE c.relkind IN ('v', 'm')
    UNION ALL
    SELECT 'sequence', s.seqrelid::regclass::text,
           format('%s start %s increment %s min %s max %s cache %s cycle %s', s.seqtypid::regtype, s.seqstart,
                  s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
      FROM rels c JOIN pg_sequence s ON s.seqrelid = c.oid
    UNION ALL
    SELECT 'constraint', coalesce(k.conrelid::regclass::text, k.contypid::regtype::text) || ' ' || k.conname,
           pg_get_constraintdef(k.oid) || coalesce(', comment ' || obj_description(k.oid, 'pg_constraint'), '')
      FROM pg_constraint k
     WHERE k.conrelid IN (SELECT oid FROM rels) OR k.contypid IN (SELECT oid FROM types)
    UNION ALL
    SELECT 'index', i.indexrelid::regclass::text,
           pg_get_indexdef(i.indexrelid) || coalesce(', comment ' || obj_description(i.indexrelid, 'pg_class'), '')
      FROM pg_index i WHERE i.indrelid IN (SELECT oid FROM rels)
    UNION ALL
    SELECT 'trigger', t.tgrelid::regclass::text || ' ' || t.tgname,
           pg_get_triggerdef(t.oid) || ', enabled ' || t.tgenabled::text
      FROM pg_trigger t WHERE t.tgrelid IN (SELECT oid FROM rels) AND NOT t.tgisinternal
    UNION ALL
    SELECT 'rule', r.ev_class::regclass::text || ' ' || r.rulename, pg_get_ruledef(r.oid)
      FROM pg_rewrite r WHERE r.ev_class IN (SELECT oid FROM rels) AND r.rulename <> '_RETURN'
    UNION ALL
    SELECT 'policy', p.polrelid::regclass::text || ' ' || p.polname,
           format('%s %s roles %s using %s check %s', p.polcmd, p.polpermissive, p.polroles::regrole[],
                  pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid))
      FROM pg_policy p WHERE p.polrelid IN (SELECT oid FROM rels)
    UNION ALL
    SELECT 'type', t.oid::regtype::text,
           format('type %s, base %s, not null %s, default %s, labels %s, attributes %s', t.typtype,
                  CASE WHEN t.typbasetype <> 0 THEN format_type(t.typbasetype, t.typtypmod) END, t.typnotnull,
                  t.typdefault,
                  (SELECT string_agg(l.enumlabel::text, ', ' ORDER BY l.enumsortorder) FROM pg_enum l WHERE l.enumtypid = t.oid),
                  (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                     FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped))
      FROM types t
    UNION ALL
    SELECT 'event trigger', e.evtname::text,
           format('on %s execute %s tags %s enabled %s', e.evtevent, e.evtfoid::regproc, e.evttags, e.evtenabled)
      FROM mem JOIN pg_event_trigger e ON mem.classid = 'pg_event_trigger'::regclass AND e.oid = mem.objid
    UNION ALL
    SELECT 'initial privileges', (pg_identify_object(i.classoid, i.objoid, i.objsubid)).identity,
           i.privtype::text || ' ' || i.initprivs::text
      FROM pg_init_privs i JOIN mem ON mem.classid = i.classoid AND mem.objid = i.objoid
)
SELECT kind || ' ' || name || ': ' || coalesce(detail, '') FROM facts ORDER BY kind, name, detail;
SQL
# How many rows the install script leaves in each of the extension's tables (their contents
# may hold snapshots and times).
cat > "$DIR/rows.sql" <<'SQL'
SELECT format('SELECT ''rows in %s: '' || count(*) FROM %s', c.oid::regclass, c.oid::regclass)
  FROM pg_depend d JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND c.relkind IN ('r', 'p')
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'rbucardo')
 ORDER BY 1
\gexec
SQL
describe() { q "$1" -f "$DIR/describe.sql"; q "$1" -f "$DIR/rows.sql"; }
version_in() { q "$1" -c "SELECT extversion FROM pg_extension WHERE extname = 'rbucardo'"; }

say "CREATE EXTENSION rbucardo ($VERSION)"
q postgres -c "CREATE DATABASE fresh"
q fresh -c "CREATE EXTENSION rbucardo"
expect "fresh version" "$(version_in fresh)" "$VERSION"
describe fresh > "$DIR/fresh.schema"
grep -q '^function rbucardo.init_node' "$DIR/fresh.schema" \
    || { echo "the schema description came out empty" >&2; exit 1; }
expect "available versions" \
    "$(q postgres -c "SELECT string_agg(version, ' ' ORDER BY string_to_array(version, '.')::int[]) FROM pg_available_extension_versions WHERE name = 'rbucardo'")" \
    "$(echo $PREVS $VERSION)"

for prev in $PREVS; do
    db=from_${prev//./_}
    say "CREATE EXTENSION rbucardo VERSION '$prev', then ALTER EXTENSION rbucardo UPDATE"
    expect "update path from $prev" \
        "$(q postgres -c "SELECT path IS NOT NULL FROM pg_extension_update_paths('rbucardo') WHERE source = '$prev' AND target = '$VERSION'")" t
    q postgres -c "CREATE DATABASE $db"
    q "$db" -c "CREATE EXTENSION rbucardo VERSION '$prev'"
    expect "created version" "$(version_in "$db")" "$prev"
    q "$db" -c "ALTER EXTENSION rbucardo UPDATE"
    expect "updated version" "$(version_in "$db")" "$VERSION"
    describe "$db" > "$DIR/$db.schema"
    if ! diff -u --label "fresh $VERSION" --label "$prev updated to $VERSION" "$DIR/fresh.schema" "$DIR/$db.schema"; then
        echo "FAIL: a database updated from $prev differs from a fresh $VERSION install (diff above):" \
             "the upgrade scripts in sql/releases/ miss these changes" >&2
        exit 1
    fi
    say "updated schema equals the fresh one ($(wc -l < "$DIR/fresh.schema") lines of facts)"

    say "a node set up at $prev keeps capturing across the update"
    q postgres -c "CREATE DATABASE live_$db"
    q "live_$db" -c "CREATE EXTENSION rbucardo VERSION '$prev'" \
           -c "SELECT rbucardo.init_node('n1', 1)" \
           -c "SELECT rbucardo.add_herd('h')" \
           -c "CREATE TABLE public.item (id integer PRIMARY KEY, name text)" \
           -c "SELECT rbucardo.add_table('h', 'public.item')" \
           -c "INSERT INTO public.item VALUES (1, 'before')" >/dev/null
    q "live_$db" -c "ALTER EXTENSION rbucardo UPDATE"
    q "live_$db" -c "INSERT INTO public.item VALUES (2, 'after')"
    expect "captured transactions" "$(q "live_$db" -c "SELECT count(DISTINCT txid) FROM rbucardo.change_log")" 2
    expect "node after the update" "$(q "live_$db" -c "SELECT name FROM rbucardo.node")" n1
done

say "smoke test of the fresh install"
q fresh -c "SELECT rbucardo.init_node('n1', 1)" >/dev/null
q fresh -c "SELECT count(*) FROM rbucardo.status" >/dev/null
expect "library in use" "$(q fresh -c "SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'")" rbucardo

as_pg "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null
started=0

say "dpkg -r $PKG"
as_root env DEBIAN_FRONTEND=noninteractive dpkg -r "$PKG" >/dev/null
installed=0
left=0
while read -r f; do
    case "$f" in /usr/share/doc/$PKG*|*/rbucardo*) [ ! -e "$f" ] || { echo "left behind: $f" >&2; left=1; } ;; esac
done <<<"$files"
[ $left -eq 0 ] || exit 1
dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -q "ok installed" && { echo "$PKG still installed" >&2; exit 1; }

say "putting back the current build (install_extension)"
install_packaged_extension
touched=0
test -e "$("$PG_CONFIG" --pkglibdir)/rbucardo.so"
test -e "$EXTDIR/rbucardo.control"
say "package test passed: dpkg -i, CREATE EXTENSION $VERSION, updates from ${PREVS:-nothing}, dpkg -r"
