#!/usr/bin/env bash
# Build a kube-apiserver from Debian's own `kubernetes` source package and cache it.
#
# Why: there is no Docker/kind here, but Debian ships the Kubernetes 1.20 sources with
# vendored Go dependencies, and a bare kube-apiserver + etcd is a real control plane
# (the same idea as controller-runtime's envtest). See shared/ENVIRONMENT.md.
#
# Idempotent: when the binary for the current Debian source version is cached, this
# only prints its path. The last line of stdout is always the binary path.
#
# Environment:
#   KILN_CACHE  cache root (default: $HOME/.cache/kiln)
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
CACHE_ROOT="${KILN_CACHE:-$HOME/.cache/kiln}"
CACHE_DIR="$CACHE_ROOT/kube-apiserver"
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
PACKAGES=(golang-go etcd-server rsync golang-github-modern-go-reflect2-dev dpkg-dev make)
DEB_SRC_FILE=/etc/apt/sources.list.d/kiln-debian-src.sources

log() { echo "build-kube-apiserver: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The Debian source version of `kubernetes`, empty when apt knows no deb-src for it.
source_version() {
    apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2; exit}'
}

# A version string usable as a directory name (an epoch's ':' is not).
version_dir() {
    echo "$CACHE_DIR/${1//:/_}"
}

# Print the cached binary's path and exit, when it exists for this version (and etcd,
# which runs next to it, is installed: a cache restored on a fresh machine still works).
exit_if_cached() {
    local version="$1"
    [ -n "$version" ] || return 0
    command -v etcd >/dev/null || return 0
    local binary
    binary="$(version_dir "$version")/kube-apiserver"
    if [ -x "$binary" ]; then
        echo "$binary"
        exit 0
    fi
}

deb_src_configured() {
    local files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || return 1
    grep -qE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' "${files[@]}"
}

# Copy the Debian `Types: deb` stanzas (deb822) as `Types: deb-src`; other vendors'
# repositories (nodesource, google cloud, ...) are left out on purpose.
enable_deb_src() {
    if deb_src_configured; then
        log "deb-src already configured"
        return 0
    fi
    local stanzas
    stanzas="$(
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            awk -v RS='' -v ORS='\n\n' '
                /(^|\n)Types:[[:space:]]*deb([[:space:]]|$)/ &&
                /(^|\n)URIs:[^\n]*debian\.org\/debian(-security)?\/?([[:space:]]|$)/ {
                    sub(/(^|\n)Types:[^\n]*/, "&\n__KILN_TYPES__")
                    print
                }' "$f"
        done | sed -e '/^Types:/d' -e 's/^__KILN_TYPES__$/Types: deb-src/'
    )"
    if [ -z "$stanzas" ]; then
        log "no Debian 'Types: deb' stanza found in /etc/apt/sources.list.d/*.sources"
        exit 1
    fi
    log "enabling deb-src in $DEB_SRC_FILE"
    printf '%s\n' "$stanzas" | as_root tee "$DEB_SRC_FILE" >/dev/null
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        as_root "${APT[@]}" install -y --no-install-recommends "${missing[@]}" >&2
    fi
}

reflect2_source() {
    dpkg -L golang-github-modern-go-reflect2-dev \
        | grep -E '/github\.com/modern-go/reflect2$' | head -n1
}

# The vendored reflect2 v1.0.1 faults at run time when built with Go >= 1.18;
# Debian's 1.0.2 is the fixed release.
replace_reflect2() {
    local tree="$1" src
    src="$(reflect2_source)"
    [ -n "$src" ] || { log "reflect2 source not found"; exit 1; }
    local dest="$tree/vendor/github.com/modern-go/reflect2"
    rm -rf "$dest"
    mkdir -p "$dest"
    rsync -rL --exclude '*_test.go' --exclude 'go.mod' --exclude 'go.sum' \
        --exclude 'test*/' "$src/" "$dest/"
}

build() {
    local version="$1" out
    out="$(version_dir "$version")"
    local scratch="$CACHE_DIR/.build-${version//:/_}"
    rm -rf "$scratch"
    mkdir -p "$scratch"
    log "fetching kubernetes $version sources into $scratch"
    (cd "$scratch" && apt-get source kubernetes >&2)
    local tree
    tree="$(find "$scratch" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"
    [ -n "$tree" ] || { log "apt-get source produced no source tree"; exit 1; }

    replace_reflect2 "$tree"
    mkdir -p "$tree/.go/src/k8s.io"
    ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
    log "building cmd/kube-apiserver (takes several minutes)"
    (
        cd "$tree/.go/src/k8s.io/kubernetes"
        env GOPATH="$tree/.go" HOME="$scratch" CGO_ENABLED=0 GOFLAGS= \
            make WHAT=cmd/kube-apiserver >&2
    )
    mkdir -p "$out"
    install -m 0755 "$tree/_output/bin/kube-apiserver" "$out/kube-apiserver.tmp"
    mv -f "$out/kube-apiserver.tmp" "$out/kube-apiserver"
    chmod -R u+w "$scratch"
    rm -rf "$scratch"
    log "cached $out/kube-apiserver"
}

main() {
    mkdir -p "$CACHE_DIR"
    # One build at a time (make cluster-up and the tests may race).
    exec 9>"$CACHE_DIR/.lock"
    flock 9

    exit_if_cached "$(source_version)"
    enable_deb_src
    as_root "${APT[@]}" update >&2
    install_packages
    local version
    version="$(source_version)"
    [ -n "$version" ] || { log "apt knows no source package 'kubernetes'"; exit 1; }
    exit_if_cached "$version"
    build "$version"
    version_dir "$version" | sed 's|$|/kube-apiserver|'
}

main "$@"
