#!/usr/bin/env bash
# What the benchmarks need beyond `make setup`: HashiCorp Packer (Debian's package, 1.6.6
# on bookworm), the peer Kiln is measured against. Idempotent.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! dpkg-query -W -f='${Status}' packer 2>/dev/null | grep -q "install ok installed"; then
    echo "setup-bench: installing packer"
    as_root "${APT[@]}" update -qq
    as_root "${APT[@]}" install -y -qq --no-install-recommends packer >/dev/null
fi
echo "setup-bench: $(packer version | head -1) ready"
