#!/usr/bin/env bash
# Installs what rbucardo needs on a Debian 12 machine and skips what is already there:
# PostgreSQL 15 server and headers, clang/libclang (bindgen), sudo, the Prometheus PostgreSQL
# exporter (monitoring/, tested by pgrx-tests/tests/prometheus.rs), Bucardo 5 with PL/Perl and
# DBD::Pg (bucardo, postgresql-plperl-15, libdbd-pg-perl: pgrx-tests/tests/bucardo.rs imports a
# real Bucardo configuration without starting its daemon), dpkg-dev (dpkg-shlibdeps, for
# scripts/package-deb.sh), cargo-pgrx (pinned to the
# pgrx version in Cargo.toml), `cargo pgrx init` against the system PostgreSQL 15.
# Works as root and as a normal user who may use sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

need_pkgs=()
for pkg in postgresql-15 postgresql-server-dev-15 libpq-dev libclang-dev clang sudo \
           prometheus-postgres-exporter dpkg-dev bucardo postgresql-plperl-15 libdbd-pg-perl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    say "installing Debian packages: ${need_pkgs[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi

if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    say "installing cargo-pgrx $PGRX_VERSION (takes several minutes the first time)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg15 = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    say "pointing pgrx at $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# Debian starts a default cluster on port 5432 when postgresql-15 is installed; rbucardo's
# scripts run their own clusters and do not need it, so it is left as it is. Likewise the
# exporter package enables its own service (port 9187, /etc/default/prometheus-postgres-exporter);
# the tests run the binary themselves on a free port.
say "setup complete"
