#!/usr/bin/env bash
# Builds an installable Debian package of broadcaster for each PostgreSQL major given (default:
# 15), laid out as Debian's and the PostgreSQL project's (apt.postgresql.org) server packages
# are, whatever the pg_config built against says:
#
#   /usr/lib/postgresql/<major>/lib/broadcaster.so
#   /usr/share/postgresql/<major>/extension/broadcaster.control, broadcaster--*.sql
#
# Output: target/debian/postgresql-<major>-broadcaster_<version>-1_<arch>.deb, depending on
# postgresql-<major> and the shared libraries the library links (libssl3, libc6, libgcc-s1, zlib1g:
# librdkafka is linked in statically).
# Install on a machine with the server: `apt-get install ./postgresql-15-broadcaster_...deb`.
# Needs scripts/setup.sh's toolchain (cargo-pgrx) and dpkg-deb; builds in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

arch=$(dpkg --print-architecture)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
mkdir -p target/debian
for major in "${@:-15}"; do
  pg_config=$(pg_config_of "$major")
  echo "package: building broadcaster $version for PostgreSQL $major ($("$pg_config" --version))"
  built=target/release/broadcaster-pg$major
  rm -rf "$built"   # nothing left over from an earlier version
  cargo pgrx package --pg-config "$pg_config" --no-default-features --features "pg$major" --out-dir "$built" >/dev/null
  staging=$(mktemp -d)
  chmod 0755 "$staging"
  lib=$staging/usr/lib/postgresql/$major/lib
  ext=$staging/usr/share/postgresql/$major/extension
  install -d "$lib" "$ext" "$staging/DEBIAN"
  install -m 0644 "$built$("$pg_config" --pkglibdir)/broadcaster.so" "$lib/"
  install -m 0644 "$built$("$pg_config" --sharedir)"/extension/broadcaster* "$ext/"
  installed_size=$(du -sk "$staging/usr" | cut -f1)
  cat >"$staging/DEBIAN/control" <<EOF
Package: postgresql-$major-broadcaster
Version: $version-1
Architecture: $arch
Maintainer: broadcaster developers <broadcaster@localhost>
Depends: postgresql-$major, libc6 (>= 2.34), libssl3 (>= 3.0.0), libgcc-s1, zlib1g (>= 1:1.2.0)
Installed-Size: $installed_size
Section: database
Priority: optional
Homepage: https://github.com/broadcaster/broadcaster
Description: transactional outbox for PostgreSQL $major, relayed to Redis Streams
 broadcaster: events written in the same transaction as business data, relayed by
 background workers inside PostgreSQL to Redis Streams as CloudEvents 1.0.
 Preload it (shared_preload_libraries = 'broadcaster'), restart, CREATE EXTENSION.
EOF
  deb=target/debian/postgresql-$major-broadcaster_${version}-1_$arch.deb
  dpkg-deb --root-owner-group --build "$staging" "$deb" >/dev/null
  rm -rf "$staging"
  echo "package: $deb ($(du -h "$deb" | cut -f1))"
done
