#!/usr/bin/env bash
# Build Docker Compose v2 from the Go module proxy into OUT_DIR/docker-compose.
#
# Debian bookworm ships only Compose v1 (1.29, Python, end of life, no `docker compose`
# plugin form); v2 is the one users run. github.com/docker/compose/v2 has no replace
# directives, so a plain `go install pkg@version` builds the released code. The version is
# stamped the way compose's own Makefile does, so `docker-compose version` is truthful.
#
# Usage: build-compose.sh OUT_DIR   (OUT_DIR gets docker-compose)
set -euo pipefail

COMPOSE_VERSION="${CAP_COMPOSE_VERSION:?set CAP_COMPOSE_VERSION}"
out="${1:?usage: build-compose.sh OUT_DIR}"
mkdir -p "$out"
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

log() { printf '[compose-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -x "$out/docker-compose" ]; then
  log "already built: $out/docker-compose"
  exit 0
fi

# Build into a scratch GOBIN and move the finished binary in, so a killed build never
# leaves a half-written binary where the locator would trust it.
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
start=$(date +%s)
log "go install github.com/docker/compose/v2/cmd@v${COMPOSE_VERSION} (a few minutes on 2 cores)"
GOBIN="$bin" go install -trimpath \
  -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=v${COMPOSE_VERSION}" \
  "github.com/docker/compose/v2/cmd@v${COMPOSE_VERSION}"
mv "$bin/cmd" "$out/docker-compose"
log "done in $(( $(date +%s) - start ))s: $out/docker-compose"
