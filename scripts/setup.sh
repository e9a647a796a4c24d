#!/usr/bin/env bash
# Installs what building and testing broadcaster needs on Debian 12, skipping what is already
# there: PostgreSQL 15 with headers, clang, redis-server, cargo-pgrx pinned to the pgrx
# version in Cargo.toml, and the Python packages the tests use (psycopg 3, SQLAlchemy 2,
# Django, the CloudEvents SDK, redis-py).
set -euo pipefail
cd "$(dirname "$0")/.."

PGRX_VERSION=$(sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang pkg-config libssl-dev openssl redis-server redis-tools sudo)

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

# Re-running init rewrites the config and forces a full rebuild of pgrx-pg-sys: only when needed.
if ! grep -qs "pg15 = \"$PG_CONFIG\"" "$HOME/.pgrx/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

# The Python clients tests/publishing.rs and tests/capture.rs drive (from PyPI): the drivers
# and ORMs applications publish through, and the CloudEvents SDK and redis-py a consumer reads
# with.
PY_DEPS=("psycopg[binary]>=3.1,<4" "sqlalchemy>=2,<3" "django>=4.2,<6" "cloudevents>=2.2,<3" "redis>=5,<7")
if ! python3 -c "import psycopg, sqlalchemy, django, redis; import cloudevents.core.bindings.kafka" 2>/dev/null; then
  echo "setup: installing ${PY_DEPS[*]}"
  python3 -m pip install -q --disable-pip-version-check "${PY_DEPS[@]}" 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "${PY_DEPS[@]}"
fi
