#!/usr/bin/env bash
# The whole test suite: unit tests, #[pg_test]s in a pgrx test cluster, and the end-to-end
# tests in tests/, which start their own PostgreSQL clusters (extension preloaded) and their
# own redis-server processes on free loopback ports. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
FEATURES="pg15 pg_test"

# PostgreSQL refuses to run as root: run the clusters as the postgres user.
if [ "$(id -u)" = 0 ]; then
  export CARGO_PGRX_TEST_RUNAS=postgres BROADCASTER_TEST_RUNAS=postgres
  export CARGO_PGRX_TEST_PGDATA=/tmp/broadcaster-pgrx-test
  rm -rf "$CARGO_PGRX_TEST_PGDATA"
  install -d -o postgres -g postgres "$CARGO_PGRX_TEST_PGDATA"
fi

# The end-to-end clusters load the installed library: install this build first, exactly as the
# pgrx test framework does (so its own install is then a no-op), whichever tests run.
cargo pgrx install --test --pg-config "$PG_CONFIG" --features "$FEATURES"

export PGRX_FEATURES="$FEATURES" PGRX_BUILD_PROFILE=debug PGRX_NO_SCHEMA=false
exec cargo test --features "$FEATURES" "$@"
