"""Other Debian releases than 12 (the other e2e tests' image): built from the host's
Debian mirror on first use (a few minutes each, cached after), booted by firmware.
Debian 11 also proves the kernel fallback: this machine's mirror answers 404 for
bullseye-security's kernel metapackage, so the image gets the versioned kernel it names."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import vmboot
from kiln.providers.local import baseimage

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize(("release", "sku"), [("11", "11"), ("13", "13-gen2")])
async def test_release_boots_by_firmware(release: str, sku: str, tmp_path: Path) -> None:
    began = time.monotonic()
    image = baseimage.ensure_image(release)
    print(f"Debian {release} image {image.version} ready in {time.monotonic() - began:.1f}s")
    resolved = baseimage.resolve(
        baseimage.default_cache_root(), "Debian", f"debian-{release}", sku, "latest"
    )
    assert resolved.version == image.version and sku in resolved.skus
    generation = baseimage.generation(sku)
    with vmboot.booted(image.disk_path, tmp_path, f"kiln-d{release}", generation=generation) as vm:
        comm = await vm.connect(timeout=vmboot.BOOT_TIMEOUT)
        print(f"{generation} boot to SSH login: {time.monotonic() - vm.started:.1f}s")
        try:
            result = await comm.run(
                "cut -d. -f1 /etc/debian_version; test -d /sys/firmware/efi && echo uefi || "
                "echo bios; systemctl is-enabled walinuxagent; cloud-init query platform; "
                "uname -r | grep -o cloud-amd64"
            )
        finally:
            await comm.close()
    assert result.stdout.split() == [
        release,
        "uefi" if generation == "V2" else "bios",
        "enabled",  # Azure's agent is installed ...
        "nocloud",  # ... and cloud-init found the NoCloud seed, not Azure
        "cloud-amd64",  # the cloud kernel, with Azure's Hyper-V drivers
    ], result.stderr
