#!/usr/bin/env bash
# Installs Azurite (Microsoft's Azure Storage emulator, npm package `azurite`) for the
# Azure provider's tests: Node.js and npm from Debian if `node` is missing, then
# `npm install -g azurite@3` unless `azurite-blob` is already on PATH. Idempotent, no stdin.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "setup-azurite: installing nodejs and npm from Debian"
    as_root "${APT[@]}" update -qq </dev/null
    as_root "${APT[@]}" install -y -qq --no-install-recommends nodejs npm </dev/null >/dev/null
fi

if ! command -v azurite-blob >/dev/null 2>&1; then
    echo "setup-azurite: npm install -g azurite@3"
    as_root npm install -g --no-audit --no-fund --loglevel=error azurite@3 </dev/null
    hash -r
fi

if ! command -v azurite-blob >/dev/null 2>&1; then
    prefix="$(npm prefix -g 2>/dev/null </dev/null || true)"
    echo "setup-azurite: azurite-blob is not on PATH (npm's global bin: ${prefix}/bin)" >&2
    exit 1
fi

echo "setup-azurite: azurite $(azurite-blob --version </dev/null 2>/dev/null | tail -n 1) at $(command -v azurite-blob)"
