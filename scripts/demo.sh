#!/usr/bin/env bash
# Shows broadcaster working, from nothing: builds and installs the extension, starts a throwaway
# PostgreSQL cluster (extension preloaded) and redis-server on free loopback ports, writes events
# in committed and rolled-back transactions, and prints what arrived in the Redis stream.
# Everything it starts is stopped and removed on exit, unless --keep is given.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

scripts/setup.sh
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
BIN=$("$PG_CONFIG" --bindir)

free_port() {
  local p
  for p in $(seq "$1" $(($1 + 200))); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port near $1" >&2; exit 1
}
PG_PORT=$(free_port 55432)
REDIS_PORT=$(free_port 56379)
DIR=$(mktemp -d /tmp/broadcaster-demo.XXXXXX)
RUN=()
if [ "$(id -u)" = 0 ]; then RUN=(runuser -u postgres --); chown postgres "$DIR"; fi

cleanup() {
  if [ "$KEEP" = 1 ]; then
    echo "kept: psql -h 127.0.0.1 -p $PG_PORT -U postgres; redis-cli -p $REDIS_PORT; data in $DIR"
    return
  fi
  "${RUN[@]}" "$BIN/pg_ctl" stop -m fast -D "$DIR/data" >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

echo "== building and installing the extension (release)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >"$DIR/install.log" 2>&1 \
  || { cat "$DIR/install.log"; exit 1; }

echo "== starting redis-server on 127.0.0.1:$REDIS_PORT and PostgreSQL on 127.0.0.1:$PG_PORT"
redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
  --logfile "$DIR/redis.log" >/dev/null
"${RUN[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres -A trust --no-sync >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'broadcaster'
broadcaster.redis_url = 'redis://127.0.0.1:$REDIS_PORT'
CONF
"${RUN[@]}" "$BIN/pg_ctl" start -w -D "$DIR/data" -l "$DIR/postgres.log" >/dev/null

psql() { "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -X -q "$@"; }

echo "== SQL"
psql -e <<'SQL'
CREATE EXTENSION broadcaster;
CREATE TABLE orders (id int PRIMARY KEY, total numeric);

-- Business data and its event commit together ...
BEGIN;
INSERT INTO orders VALUES (42, 99.90);
SELECT broadcaster_publish(
    type          => 'order.created',
    data          => '{"order_id": 42, "total": 99.90}',
    subject       => 'order-42',
    partition_key => 'customer-7');
COMMIT;

-- ... or not at all.
BEGIN;
INSERT INTO orders VALUES (43, 5.00);
SELECT broadcaster_publish('order.created', '{"order_id": 43}');
ROLLBACK;

-- A plain INSERT from any ORM works the same way.
INSERT INTO broadcaster_outbox (type, data) VALUES ('order.paid', '{"order_id": 42}');
SQL

for _ in $(seq 100); do
  [ "$(redis-cli -p "$REDIS_PORT" XLEN broadcaster:postgres)" -ge 2 ] && break
  sleep 0.1
done
psql -c "SELECT broadcaster_health() AS healthy, count(*) AS still_in_outbox FROM broadcaster_outbox"

echo "== redis-cli XRANGE broadcaster:postgres - +"
redis-cli -p "$REDIS_PORT" --no-raw XRANGE broadcaster:postgres - +
