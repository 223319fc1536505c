#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds and installs the extension, runs the
# single-node #[pg_test] tests, then the multi-node harness tests in pgrx-tests/, then the
# Debian package and upgrade-path test (scripts/test-package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

bash scripts/setup.sh

say "single-node tests (cargo pgrx test)"
if [ "$(id -u)" -eq 0 ]; then
    # PostgreSQL refuses root: cargo-pgrx runs the test server as postgres through sudo.
    PGDATA_DIR=/tmp/rbucardo-pgrx-pgdata
    rm -rf "$PGDATA_DIR"
    mkdir -p "$PGDATA_DIR"
    chown postgres: "$PGDATA_DIR"
    cargo pgrx test pg15 --runas postgres --pgdata "$PGDATA_DIR"
else
    cargo pgrx test pg15
fi

# cargo pgrx test installs its own (test) build; the multi-node tests run the release build.
install_extension

say "multi-node tests (pgrx-tests/)"
cargo test --release -p rbucardo-cluster-tests -- --test-threads="${RBUCARDO_TEST_THREADS:-2}"

say "Debian package and upgrade path (scripts/test-package.sh)"
bash scripts/test-package.sh
