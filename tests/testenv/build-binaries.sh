#!/usr/bin/env bash
# Build kube-apiserver and etcd from the Go module proxy into a versioned cache folder.
#
# Why a wrapper module: k8s.io/kubernetes and go.etcd.io/etcd/server/v3 point their
# sibling modules at ./staging or ../ with replace directives, which `go install
# pkg@version` refuses. A throwaway main module that requires the release and replaces
# each sibling with its published version builds the same code.
#
# Usage: build-binaries.sh OUT_DIR [COMPONENT...]
#   COMPONENT: etcd, crictl or a k8s.io/kubernetes command (kube-apiserver, kubelet,
#   kube-controller-manager, kube-scheduler, kube-proxy); default: etcd kube-apiserver.
#   Components already in OUT_DIR are kept.
set -euo pipefail

K8S_VERSION="${CAP_K8S_VERSION:-1.37.2}"
ETCD_VERSION="${CAP_ETCD_VERSION:-3.7.3}"
CRI_TOOLS_VERSION="${CAP_CRI_TOOLS_VERSION:-1.37.0}"
out="${1:?usage: build-binaries.sh OUT_DIR [COMPONENT...]}"
shift
components=("$@")
[ "${#components[@]}" -gt 0 ] || components=(etcd kube-apiserver)
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[testenv-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

kube_module_ready=""
kube_module() {
  # The wrapper module, written once per run; every kubernetes command builds in it.
  local dir="$work/kube"
  [ -n "$kube_module_ready" ] && return 0
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
  # sample-* modules are not published; nothing the commands built here import needs them.
  sed -i '/k8s.io\/sample-/d' "$dir/go.mod"
  kube_module_ready=1
}

build_kube_command() {
  local command="$1" dir="$work/kube"
  local minor="${K8S_VERSION#*.}"
  kube_module
  log "downloading $command dependencies"
  (cd "$dir" && go get "k8s.io/kubernetes/cmd/${command}@v${K8S_VERSION}")
  log "compiling $command (minutes on 2 cores with a cold Go build cache)"
  (cd "$dir" && go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v${K8S_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor%%.*}" \
      -o "$out/${command}.tmp" "k8s.io/kubernetes/cmd/${command}")
  mv "$out/${command}.tmp" "$out/${command}"
}

build_crictl() {
  # cri-tools has no replace directives: a plain install from the module proxy works.
  log "compiling crictl v${CRI_TOOLS_VERSION}"
  GOBIN="$work/crictl-bin" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/cri-tools/cmd/crictl@v${CRI_TOOLS_VERSION}"
  mv "$work/crictl-bin/crictl" "$out/crictl"
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

for component in "${components[@]}"; do
  [ -x "$out/$component" ] && continue
  started=$(date +%s)
  case "$component" in
    etcd) build_etcd ;;
    crictl) build_crictl ;;
    kube-apiserver|kubelet|kube-controller-manager|kube-scheduler|kube-proxy)
      build_kube_command "$component" ;;
    *) echo "build-binaries.sh: unknown component '$component'" >&2; exit 2 ;;
  esac
  log "$component built in $(( $(date +%s) - started ))s"
done
log "done: $out"
