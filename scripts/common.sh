# Shared by the scripts: versions, paths, and how to run things as root or as postgres.
PGRX_VERSION=0.18.1
PG_BIN=/usr/lib/postgresql/15/bin
PG_CONFIG=$PG_BIN/pg_config

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Runs a PostgreSQL server command as an unprivileged user: PostgreSQL refuses root.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The extension's package tree, as `cargo pgrx package` writes it (and package_extension
# completes it).
PKG_ROOT=target/release/rbucardo-pg15
PKG_EXTDIR=$PKG_ROOT/usr/share/postgresql/15/extension

# Builds the extension into $PKG_ROOT: the library, the control file, the install script of
# this version, plus the scripts of earlier releases and the upgrade scripts (sql/releases/,
# which cargo pgrx does not copy).
package_extension() {
    cargo pgrx package --pg-config "$PG_CONFIG" >/dev/null
    install -m 644 sql/releases/*.sql "$PKG_EXTDIR/"
}

# Builds and installs the extension into the system PostgreSQL 15.
install_extension() {
    say "building and installing the rbucardo extension"
    package_extension
    install_packaged_extension
}

# Installs what package_extension built last.
install_packaged_extension() {
    # Built into target/ first, then each file put in place with install(1), which replaces
    # the file (a new inode) rather than writing over it: servers already running keep the
    # library they loaded instead of crashing when it changes underneath them.
    local root="$PKG_ROOT" sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    (cd "$root" && find . -type f) | while read -r f; do
        $sudo install -D -m 644 "$root/$f" "/${f#./}"
    done
}
