#!/usr/bin/env bash
# The benchmark, one command: builds and installs the release extension, starts its own
# PostgreSQL cluster (tuned as below) and redis-server, runs bench/driver.py, prints the table
# with the machine it ran on. Takes about 5 minutes. Not part of CI: timing goals live here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/lib.sh
# hiredis: the measuring XREAD client parses replies in C, so it takes less of the two cores
# from what it measures (half a core in pure Python at 10,000 events/s).
PY_DEPS=("psycopg[binary]>=3.1,<4" "redis>=5,<7" "hiredis>=2,<4")
python3 -m pip install -q --disable-pip-version-check "${PY_DEPS[@]}" 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${PY_DEPS[@]}"

log=$(mktemp)
cargo pgrx install --release --pg-config "$PG_CONFIG" >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"

# What a user would set on a small server; everything else is the default (fsync and
# synchronous_commit on).
SETTINGS=(
  "shared_buffers = '512MB'"
  "max_wal_size = '4GB'"
  "checkpoint_timeout = '15min'"
  "wal_buffers = '16MB'"
  "max_connections = 50"
)
trap stop_services EXIT
start_services bench "${SETTINGS[@]}"
psql -c "CREATE EXTENSION broadcaster"

echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "versions: $("$BIN/postgres" --version), redis $(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p'), $(rustc --version | cut -d' ' -f1-2), broadcaster $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
echo "settings: ${SETTINGS[*]}"
echo "date: $(date -u +%F)"
python3 bench/driver.py --pg-port "$PG_PORT" --redis-port "$REDIS_PORT" "$@"
