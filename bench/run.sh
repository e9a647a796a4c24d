#!/usr/bin/env bash
# The benchmark, one command: builds and installs the release extension, starts its own
# PostgreSQL cluster (tuned as below) and redis-server, runs bench/driver.py, prints the table
# with the machine it ran on; then what WAIT to a replica costs, a drain into a Redis Cluster
# of 3 primaries, and each other backend's drain against its broker next to that broker's
# ceiling (bench/backends.py, bench/ceiling.rs). Takes about 12 minutes. Not part of CI: timing
# goals live here. BENCH_ONLY=backends runs only the other backends' section (a few minutes),
# BENCH_BACKEND=<kind> only that backend's line of it.
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
if [ "${BENCH_ONLY:-}" != backends ]; then
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
fi

# The other backends, each against its broker on this machine, next to its ceiling: the same
# messages from a plain client loop of the same crate with the same confirmations
# (bench/ceiling.rs).
cargo build --release --example ceiling >/dev/null 2>&1
CEILING=target/release/examples/ceiling
PIDS=()
stop_brokers() {
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
  # RabbitMQ's Erlang VM leaves its start script's process group: found by its HOME.
  pkill -KILL -f -- "-home $DIR/rabbit" 2>/dev/null || true
  stop_all
}
trap stop_brokers EXIT
NATS_PORT=$(free_port 14222)
setsid nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$DIR/nats" >"$DIR/nats.log" 2>&1 &
PIDS+=($!)
MQTT_PORT=$(free_port 11883)
mkdir -p "$DIR/mqtt" && chmod 777 "$DIR/mqtt"
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQTT_PORT" >"$DIR/mqtt/mosquitto.conf"
setsid mosquitto -c "$DIR/mqtt/mosquitto.conf" >"$DIR/mqtt.log" 2>&1 &
PIDS+=($!)
HTTP_PORT=$(free_port 18080)
setsid "$CEILING" receiver "$HTTP_PORT" &
PIDS+=($!)
AMQP_PORT=$(free_port 15672)
AMQP_DIST_PORT=$(free_port $((AMQP_PORT + 1)))
mkdir -p "$DIR/rabbit" && echo "[]." >"$DIR/rabbit/enabled_plugins"
(cd "$DIR/rabbit" && HOME="$DIR/rabbit" RABBITMQ_NODENAME="bcbench$$@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
  RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$AMQP_DIST_PORT" RABBITMQ_MNESIA_BASE="$DIR/rabbit/mnesia" \
  RABBITMQ_LOG_BASE="$DIR/rabbit/log" RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/rabbit/enabled_plugins" \
  RABBITMQ_CONFIG_FILE="$DIR/rabbit/rabbitmq" setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$DIR/rabbit.log" 2>&1) &
PIDS+=($!)
AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
TANSU=/opt/broadcaster-tansu/bin/tansu
KAFKA_PORT=$(free_port 19092)
# In memory. On its SQLite storage (tests/kafka.rs's), with the drain's 200,000 records in its
# file and the latency's listener asking for more every 10 ms, tansu took over 2 s to write one
# record, every time: the relay's batches timed out and half the latency's events never came.
setsid "$TANSU" broker --silent --storage-engine memory://tansu/ \
  --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  >"$DIR/kafka.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 240); do "$TANSU" topic create bench.events --partitions 3 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1 && break; sleep 0.25; done
for topic in bench.ceiling bench.latency; do
  "$TANSU" topic create "$topic" --partitions 3 --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null
done
for _ in $(seq 1 240); do "$CEILING" nats-setup "nats://127.0.0.1:$NATS_PORT" 2>/dev/null && break; sleep 0.25; done
for _ in $(seq 1 240); do "$CEILING" amqp-setup "$AMQP_URL" 2>/dev/null && break; sleep 0.25; done
echo "brokers: $(nats-server --version), mosquitto $(mosquitto -h | sed -n 's/mosquitto version //p'), RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server), $("$TANSU" --version) (in memory)"
python3 bench/backends.py --pg-port "$PG_PORT" --ceiling "$CEILING" \
  --nats "nats://127.0.0.1:$NATS_PORT" --amqp "$AMQP_URL" --mqtt "127.0.0.1:$MQTT_PORT" \
  --webhook "http://127.0.0.1:$HTTP_PORT" --kafka "127.0.0.1:$KAFKA_PORT" \
  ${BENCH_BACKEND:+--only "$BENCH_BACKEND"}
