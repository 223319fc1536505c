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

# Builds and installs the extension into the system PostgreSQL 15.
install_extension() {
    say "building and installing the rbucardo extension"
    if [ "$(id -u)" -eq 0 ]; then
        cargo pgrx install --release --pg-config "$PG_CONFIG"
    else
        cargo pgrx install --release --sudo --pg-config "$PG_CONFIG"
    fi
}
