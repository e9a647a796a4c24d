#!/usr/bin/env bash
# The benchmark, one command: builds and installs the release extension, starts its own
# PostgreSQL cluster (tuned as below) and redis-server, runs bench/driver.py, prints the table
# with the machine it ran on; then what WAIT to a replica costs, and a drain into a Redis Cluster
# of 3 primaries. Takes about 8 minutes. Not part of CI: timing goals live here.
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
# Servers started below besides start_services': a replica and a cluster's nodes.
EXTRA_PORTS=()
stop_all() {
  for p in "${EXTRA_PORTS[@]}"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  stop_services
}
trap stop_all EXIT
start_services bench "${SETTINGS[@]}"
psql -c "CREATE EXTENSION broadcaster"

echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "versions: $("$BIN/postgres" --version), redis $(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p'), $(rustc --version | cut -d' ' -f1-2), broadcaster $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
echo "settings: ${SETTINGS[*]}"
echo "date: $(date -u +%F)"
python3 bench/driver.py --pg-port "$PG_PORT" --redis-port "$REDIS_PORT" "$@"

# What WAIT costs: the same server with one replica.
REPLICA_PORT=$(free_port 56500)
EXTRA_PORTS+=("$REPLICA_PORT")
redis-server --daemonize yes --bind 127.0.0.1 --port "$REPLICA_PORT" --save "" --appendonly no \
  --replicaof 127.0.0.1 "$REDIS_PORT" --dir "$DIR" --logfile "$DIR/replica.log" >/dev/null
until redis-cli -p "$REPLICA_PORT" info replication | grep -q 'master_link_status:up'; do sleep 0.2; done
python3 bench/driver.py --pg-port "$PG_PORT" --redis-port "$REDIS_PORT" --wait "$@"
redis-cli -p "$REPLICA_PORT" shutdown nosave >/dev/null 2>&1 || true

# The same relay into a Redis Cluster of 3 primaries (no replicas) on this machine.
CLUSTER_PORTS=()
for i in 0 1 2; do
  port=$(free_port $((17000 + i * 300)))  # its cluster bus, port + 10000, must exist too
  mkdir -p "$DIR/cluster-$port"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
    --cluster-enabled yes --cluster-config-file "$DIR/cluster-$port/nodes.conf" \
    --dir "$DIR/cluster-$port" --logfile "$DIR/cluster-$port/redis.log" >/dev/null
  CLUSTER_PORTS+=("$port")
  EXTRA_PORTS+=("$port")
done
sleep 0.5
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CLUSTER_PORTS[0]}" cluster info | grep -q 'cluster_state:ok'; do sleep 0.2; done
python3 bench/driver.py --pg-port "$PG_PORT" --redis-port "$REDIS_PORT" \
  --cluster-ports "$(IFS=,; echo "${CLUSTER_PORTS[*]}")" "$@"
