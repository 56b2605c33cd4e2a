#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kubectl of one Kubernetes
# release from the upstream Go modules, and cache them by version.
#
# k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the k8s.io/* staging
# modules with local paths), so a small module of our own requires it and replaces each
# staging module with its published v0.Y.Z. etcd builds from go.etcd.io/etcd/server/v3.
# Module downloads stay in the cache too, so a rebuild needs no network.
#
# Idempotent: with the binaries cached this only prints the directory that holds them
# (the last line of stdout, always). Versions: scripts/kubernetes.env.
#
# Environment:
#   KILN_CACHE  cache root (default: $HOME/.cache/kiln)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=kubernetes.env
source "$here/kubernetes.env"
CACHE_ROOT="${KILN_CACHE:-$HOME/.cache/kiln}"
OUT="$CACHE_ROOT/kubernetes/v$KUBERNETES_VERSION-etcd-v$ETCD_VERSION"
BINARIES=(etcd kube-apiserver kube-controller-manager kubectl)
# The machines' Go lives in /usr/local/go; a shell without it on PATH still finds it.
command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local
export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"

log() { echo "build-control-plane: $*" >&2; }

cached() {
    local b
    for b in "${BINARIES[@]}"; do [ -x "$OUT/$b" ] || return 1; done
}

# go.mod of a module that requires k8s.io/kubernetes and maps its staging replaces
# (k8s.io/x => ./staging/src/k8s.io/x) onto the published k8s.io/x v0.Y.Z.
kubernetes_module() {
    local dir="$1" upstream_mod staging
    upstream_mod="$(go mod download -json "k8s.io/kubernetes@v$KUBERNETES_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [ -f "$upstream_mod" ] || { log "no go.mod for k8s.io/kubernetes v$KUBERNETES_VERSION"; exit 1; }
    staging="v0.${KUBERNETES_VERSION#1.}"
    {
        echo "module kiln.dev/controlplane"
        echo
        echo "go $(awk '$1 == "go" {print $2; exit}' "$upstream_mod")"
        echo
        echo "require k8s.io/kubernetes v$KUBERNETES_VERSION"
        echo
        echo "replace ("
        awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "\t" $1 " => " $1 " " v}' \
            "$upstream_mod"
        echo ")"
    } >"$dir/go.mod"
    cat >"$dir/tools.go" <<'GO'
//go:build tools

// Package tools pins the commands this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
}

etcd_module() {
    local dir="$1"
    cat >"$dir/go.mod" <<MOD
module kiln.dev/etcd

go 1.24

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
MOD
}

build() {
    local scratch="$CACHE_ROOT/kubernetes/.build" started=$SECONDS
    rm -rf "$scratch" "$OUT.tmp"
    mkdir -p "$scratch/kubernetes" "$scratch/etcd" "$OUT.tmp"

    log "building kubernetes v$KUBERNETES_VERSION and etcd v$ETCD_VERSION (cold: several minutes)"
    etcd_module "$scratch/etcd"
    (cd "$scratch/etcd" && go mod tidy >&2 && go build -trimpath -ldflags=-s -o "$OUT.tmp/etcd" go.etcd.io/etcd/server/v3)
    kubernetes_module "$scratch/kubernetes"
    (
        cd "$scratch/kubernetes"
        local version_flags="-s -X k8s.io/component-base/version.gitVersion=v$KUBERNETES_VERSION"
        version_flags+=" -X k8s.io/component-base/version.gitMajor=1"
        version_flags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
        version_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=v$KUBERNETES_VERSION"
        for cmd in kube-apiserver kube-controller-manager kubectl; do
            go build -tags tools -trimpath -ldflags="$version_flags" -o "$OUT.tmp/$cmd" \
                "k8s.io/kubernetes/cmd/$cmd" >&2
        done
    )
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
    rm -rf "$scratch"
    log "cached in $OUT after $((SECONDS - started)) s"
}

main() {
    mkdir -p "$CACHE_ROOT/kubernetes"
    # One build at a time (make cluster-up and the tests may race).
    exec 9>"$CACHE_ROOT/kubernetes/.lock"
    flock 9
    cached || build
    echo "$OUT"
}

main "$@"
