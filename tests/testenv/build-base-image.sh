#!/usr/bin/env bash
# Build one local base image root filesystem from Debian packages (no Docker Hub here).
#
#   build-base-image.sh NAME OUT_TAR MIRROR DEB_CACHE
#
# NAME is one of: python (python3 + venv, stands in for the official python image),
# redis (redis-server, for the official redis image), postgres (PostgreSQL 15 with an
# entrypoint that honours POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB like the official
# postgres image). The root comes from `debootstrap --variant=minbase` of Debian bookworm;
# OUT_TAR is a tarball for `docker import` (tests/testenv/docker.py adds the image config).
# DEB_CACHE keeps the downloaded .deb files between builds. Runs as root (debootstrap).
# This file is part of the image recipe: tests/testenv/docker.py keys its cache by its hash.
set -euo pipefail

name="${1:?usage: build-base-image.sh NAME OUT_TAR MIRROR DEB_CACHE}"
out="${2:?OUT_TAR}"
mirror="${3:?MIRROR}"
debs="${4:?DEB_CACHE}"
suite=bookworm

case "$name" in
  python)   include="python3,python3-venv,ca-certificates" ;;
  redis)    include="redis-server" ;;
  postgres) include="postgresql-15,postgresql-client-15" ;;
  *) echo "unknown base image $name" >&2; exit 2 ;;
esac

log() { printf '[base-image %s %s] %s\n' "$name" "$(date +%H:%M:%S)" "$*" >&2; }

root="$(mktemp -d "${TMPDIR:-/tmp}/cap-rootfs-$name.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$debs"
start=$(date +%s)
log "debootstrap --variant=minbase --include=$include $suite from $mirror"
debootstrap --variant=minbase --include="$include" --cache-dir="$debs" \
  "$suite" "$root" "$mirror" >&2

case "$name" in
  python)
    # The image build installs from PyPI through whatever this machine's egress is; where that
    # is a TLS-intercepting proxy, its CA is in /usr/local/share/ca-certificates (the local
    # CAs the host trusts): the base image trusts the same ones. Part of the recipe's hash.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
      chroot "$root" update-ca-certificates >&2
    fi
    ;;
  redis)
    # The official image's layout: data in /data, owned by the server's user.
    install -d -o "$(chroot "$root" id -u redis)" -g "$(chroot "$root" id -g redis)" -m 0750 "$root/data"
    ;;
  postgres)
    pg_uid="$(chroot "$root" id -u postgres)"; pg_gid="$(chroot "$root" id -g postgres)"
    install -d -o "$pg_uid" -g "$pg_gid" -m 0700 "$root/var/lib/postgresql/data"
    install -d -o "$pg_uid" -g "$pg_gid" -m 2775 "$root/var/run/postgresql"
    # The official image's interface: first start initialises PGDATA with POSTGRES_USER,
    # POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) and POSTGRES_DB; arguments go to the
    # server (`postgres -c k=v` too).
    cat > "$root/usr/local/bin/docker-entrypoint.sh" <<'ENTRY'
#!/bin/sh
set -eu
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then POSTGRES_PASSWORD="$(cat "$POSTGRES_PASSWORD_FILE")"; fi
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE must be set}"
  user="${POSTGRES_USER:-postgres}"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  printf "host all all all scram-sha-256\n" >> "$PGDATA/pg_hba.conf"
  db="${POSTGRES_DB:-$user}"
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | postgres --single -D "$PGDATA" postgres >/dev/null
  fi
fi
exec "$@"
ENTRY
    chmod 0755 "$root/usr/local/bin/docker-entrypoint.sh"
    ;;
esac

# Nothing an image needs: package lists, downloaded archives, docs, man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
mkdir -p "$(dirname "$out")"
tar --numeric-owner -C "$root" -cf "$out.partial" .
mv "$out.partial" "$out"
log "done in $(( $(date +%s) - start ))s: $out ($(du -h "$out" | cut -f1))"
