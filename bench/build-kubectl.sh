#!/usr/bin/env bash
# Build kubectl at the test apiserver's version from the Go module proxy (no clone, no Docker).
#
# Used by bench/kubectl.py only when no kubectl is installed. k8s.io/kubectl is a published
# module (unlike k8s.io/kubernetes, whose replace directives `go install` refuses), so a
# throwaway main module with the same few lines as upstream cmd/kubectl builds the real CLI.
#
# Usage: build-kubectl.sh OUT_DIR   (OUT_DIR gets kubectl)
set -euo pipefail

K8S_VERSION="${CAP_K8S_VERSION:-1.37.2}"
out="${1:?usage: build-kubectl.sh OUT_DIR}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
staging="v0.${K8S_VERSION#*.}"   # 1.37.2 -> v0.37.2
minor="${K8S_VERSION#*.}"
minor="${minor%%.*}"

log() { printf '[bench-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

cat > "$work/main.go" <<'GO'
// kubectl, as upstream k8s.io/kubernetes/cmd/kubectl builds it.
package main

import (
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
GO

cd "$work"
go mod init certautopilot.local/bench/kubectl >/dev/null 2>&1
log "resolving k8s.io/kubectl ${staging}"
go get "k8s.io/kubectl@${staging}" "k8s.io/client-go@${staging}" "k8s.io/component-base@${staging}"
log "compiling kubectl v${K8S_VERSION} (a few minutes on 2 cores)"
versions="-X k8s.io/client-go/pkg/version.gitVersion=v${K8S_VERSION}"
versions+=" -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=${minor}"
versions+=" -X k8s.io/component-base/version.gitVersion=v${K8S_VERSION}"
versions+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor}"
go build -trimpath -ldflags "-s -w ${versions}" -o "$out/kubectl.tmp" .
mv "$out/kubectl.tmp" "$out/kubectl"
log "built $out/kubectl"
