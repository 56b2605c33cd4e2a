#!/usr/bin/env bash
# Installs what Kiln needs from Debian's archive, builds (once) the local kube-apiserver
# and the Debian 12 base image. Idempotent and cached: a second run takes seconds.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
PACKAGES=(
    qemu-system-x86 qemu-utils          # build VMs (TCG) and disk conversion
    ovmf                                # UEFI firmware: Gen2 VMs boot by it (Gen1: SeaBIOS)
    mmdebstrap e2fsprogs                # offline Debian base images ...
    fdisk dosfstools mtools             # ... as GPT disks with an EFI system partition
    openssh-client                      # ssh into a kept build VM
    etcd-server                         # the local control plane's store
    ca-certificates curl
)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# kubectl: the machine's own if it has one, else Debian's client (1.20, the server's version)
command -v kubectl >/dev/null || PACKAGES+=(kubernetes-client)

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

here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/build-kube-apiserver.sh" >/dev/null
bash "$here/setup-azurite.sh" >/dev/null
echo "setup: system packages, kube-apiserver and Azurite ready"
