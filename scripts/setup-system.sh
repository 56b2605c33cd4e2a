#!/usr/bin/env bash
# Installs what Kiln needs from Debian's archive, builds (once) the local control plane
# (etcd, kube-apiserver, kube-controller-manager, kubectl of one Kubernetes release, from
# the upstream Go modules) and the tests' kstatus helper. Idempotent and cached: a second
# run takes seconds.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
PACKAGES=(
    qemu-system-x86 qemu-utils          # build VMs (TCG) and disk conversion
    ovmf                                # UEFI firmware: Gen2 VMs boot by it (Gen1: SeaBIOS)
    mmdebstrap e2fsprogs                # offline Debian base images ...
    fdisk dosfstools mtools             # ... as GPT disks with an EFI system partition
    openssh-client                      # ssh into a kept build VM
    ca-certificates curl
)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    as_root "${APT[@]}" update -qq
    as_root "${APT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
command -v go >/dev/null || {
    echo "setup: Go (1.26) is needed to build the control plane; it is not on PATH" >&2
    exit 1
}

here="$(cd "$(dirname "$0")" && pwd)"
bin="$(bash "$here/build-control-plane.sh" | tail -n 1)"
# A kubectl of the same release where the machine has none (the tests use this one).
command -v kubectl >/dev/null || as_root ln -sfn "$bin/kubectl" /usr/local/bin/kubectl
bash "$here/build-kstatus.sh" >/dev/null
bash "$here/setup-azurite.sh" >/dev/null
echo "setup: system packages, control plane ($bin) and Azurite ready"
