#!/usr/bin/env bash
# Build the tests' kstatus helper (tests/kstatus: sigs.k8s.io/cli-utils' kstatus library)
# and cache it by a hash of its sources. The last line of stdout is the binary's path.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../tests/kstatus"
CACHE_ROOT="${KILN_CACHE:-$HOME/.cache/kiln}"
key="$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-16)"
out="$CACHE_ROOT/kstatus/$key/kstatus"
# The machines' Go lives in /usr/local/go; a shell without it on PATH still finds it.
command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
export GOMODCACHE="$CACHE_ROOT/go/mod" GOCACHE="$CACHE_ROOT/go/build"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local

mkdir -p "$CACHE_ROOT/kstatus"
exec 9>"$CACHE_ROOT/kstatus/.lock"
flock 9
if [ ! -x "$out" ]; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    cp "$src/go.mod" "$src/go.sum" "$src/main.go" "$scratch/"
    (cd "$scratch" && go build -trimpath -o "$out.tmp" . >&2)
    mv -f "$out.tmp" "$out"
    echo "build-kstatus: cached $out" >&2
fi
echo "$out"
