#!/usr/bin/env bash
# Build kube-apiserver and etcd from the Go module proxy into a versioned cache folder.
#
# Why a wrapper module: k8s.io/kubernetes and go.etcd.io/etcd/server/v3 point their
# sibling modules at ./staging or ../ with replace directives, which `go install
# pkg@version` refuses. A throwaway main module that requires the release and replaces
# each sibling with its published version builds the same code.
#
# Usage: build-binaries.sh OUT_DIR   (OUT_DIR gets kube-apiserver and etcd)
set -euo pipefail

K8S_VERSION="${CAP_K8S_VERSION:-1.37.2}"
ETCD_VERSION="${CAP_ETCD_VERSION:-3.7.3}"
out="${1:?usage: build-binaries.sh OUT_DIR}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[testenv-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

build_kube_apiserver() {
  local dir="$work/kube"
  mkdir -p "$dir"
  local minor="${K8S_VERSION#*.}"
  local staging_version="v0.${minor}"
  log "resolving k8s.io/kubernetes v${K8S_VERSION} (staging modules at ${staging_version})"
  local mod
  mod="$(go mod download -json "k8s.io/kubernetes@v${K8S_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module certautopilot.local/testenv/kube"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes v${K8S_VERSION}"
    echo
    echo "replace ("
    # Every sibling that upstream points at ./staging becomes its published release.
    sed -n 's#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => ./staging/.*#\1#p' "$mod" | while read -r m; do
      echo "	$m => $m ${staging_version}"
    done
    echo ")"
  } > "$dir/go.mod"
  # sample-* modules are not published; nothing kube-apiserver imports needs them.
  sed -i '/k8s.io\/sample-/d' "$dir/go.mod"
  log "downloading kube-apiserver dependencies"
  (cd "$dir" && go get "k8s.io/kubernetes/cmd/kube-apiserver@v${K8S_VERSION}")
  log "compiling kube-apiserver (several minutes on 2 cores)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}" \
      -o "$out/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
}

build_etcd() {
  local dir="$work/etcd"
  mkdir -p "$dir"
  log "resolving go.etcd.io/etcd/server/v3 v${ETCD_VERSION}"
  cat > "$dir/go.mod" <<MOD
module certautopilot.local/testenv/etcd

go $(go env GOVERSION | sed 's/^go//; s/\([0-9]*\.[0-9]*\).*/\1/')

require go.etcd.io/etcd/server/v3 v${ETCD_VERSION}

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 v${ETCD_VERSION}
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 v${ETCD_VERSION}
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 v${ETCD_VERSION}
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 v${ETCD_VERSION}
)
MOD
  (cd "$dir" && go get "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}")
  log "compiling etcd"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$out/etcd.tmp" "$out/etcd"
}

[ -x "$out/etcd" ] || build_etcd
[ -x "$out/kube-apiserver" ] || build_kube_apiserver
log "done: $out"
