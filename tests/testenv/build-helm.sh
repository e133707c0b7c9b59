#!/usr/bin/env bash
# Build helm from the Go module proxy into OUT_DIR/helm.
#
# helm.sh/helm/v3/cmd/helm has no replace directives, so a plain `go install pkg@version`
# builds the released code; GOBIN points the binary at the versioned cache folder.
# The version is stamped the way helm's own Makefile does, so `helm version` is truthful.
#
# Usage: build-helm.sh OUT_DIR   (OUT_DIR gets helm)
set -euo pipefail

HELM_VERSION="${CAP_HELM_VERSION:-3.22.0}"
out="${1:?usage: build-helm.sh OUT_DIR}"
mkdir -p "$out"
export GOFLAGS="-buildvcs=false"
export CGO_ENABLED=0

log() { printf '[helm-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -x "$out/helm" ]; then
  log "already built: $out/helm"
  exit 0
fi

# Build into a scratch GOBIN and move the finished binary in, so a killed build never
# leaves a half-written helm where the locator would trust it.
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
start=$(date +%s)
# helm's Makefile derives the Kubernetes version `helm template` and `helm lint` assume from
# the client-go it is built with (v0.X.Y -> 1.X); without it they assume 1.20.
log "resolving helm.sh/helm/v3 v${HELM_VERSION}"
gomod="$(go mod download -json "helm.sh/helm/v3@v${HELM_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
kube_minor="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -n1)"
[ -n "$kube_minor" ] || { log "cannot find k8s.io/client-go in $gomod"; exit 1; }
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v${HELM_VERSION}"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1 -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${kube_minor}"
done
log "go install helm.sh/helm/v3/cmd/helm@v${HELM_VERSION} for Kubernetes 1.${kube_minor} (a few minutes on 2 cores)"
GOBIN="$bin" go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@v${HELM_VERSION}"
mv "$bin/helm" "$out/helm"
log "done in $(( $(date +%s) - start ))s: $out/helm"
