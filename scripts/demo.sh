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
. scripts/lib.sh

cleanup() {
  if [ "$KEEP" = 1 ]; then
    echo "kept: psql -h 127.0.0.1 -p $PG_PORT -U postgres; redis-cli -p $REDIS_PORT; data in $DIR"
    return
  fi
  stop_services
}
trap cleanup EXIT

echo "== building and installing the extension (release)"
log=$(mktemp)
cargo pgrx install --release --pg-config "$PG_CONFIG" >"$log" 2>&1 || { cat "$log"; exit 1; }
rm -f "$log"

start_services demo
echo "== started redis-server on 127.0.0.1:$REDIS_PORT and PostgreSQL on 127.0.0.1:$PG_PORT"

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
