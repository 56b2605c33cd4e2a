"""The local provider's disks boot by firmware alone, before and after a build.

One build VM boots the Debian 12 base image through OVMF, is customized, deprovisioned
(Kiln's own script and final shutdown) and captured (Kiln's qcow2 and fixed VHD writers);
then each captured disk boots again with a fresh seed, the qcow2 through OVMF (Gen2) and
the VHD through SeaBIOS (Gen1), with nothing but the disk: no kernel, no initrd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import vmboot
from kiln.communicators.ssh import SshCommunicator
from kiln.customizers.linux import DEPROVISION_SCRIPT, final_shutdown_command
from kiln.providers.local import baseimage, gptdisk, qemu
from kiln.providers.local.disks import (
    MIB,
    check_fixed_vhd,
    image_format,
    image_info,
    run_tool,
    to_fixed_vhd,
    to_qcow2,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUILD_USER = "packer"
OS_DISK_GB = 6
MARKER = "kiln-firmware-e2e"


@dataclass
class Built:
    """What the build VM left: its identity, to be gone from the images made of it."""

    qcow2: Path
    vhd: Path
    machine_id: str
    client_key: str
    image: baseimage.BaseImage


def _argv(handle: qemu.VmHandle) -> list[str]:
    return Path(f"/proc/{handle.pid}/cmdline").read_bytes().decode().split("\0")


async def _run(comm: SshCommunicator, command: str) -> str:
    result = await comm.run(command)
    assert result.exit_status == 0, f"{command}: {result.stderr}"
    return result.stdout.strip()


async def _print_boot_time(comm: SshCommunicator, vm: vmboot.Vm, what: str) -> None:
    """Boot to SSH, and how much of it passed before the kernel ran (firmware and GRUB)."""
    uptime = float(await _run(comm, "cut -d' ' -f1 /proc/uptime"))
    took = time.monotonic() - vm.started
    print(f"{what}: SSH login after {took:.1f}s, {took - uptime:.1f}s of it before the kernel")


@pytest.fixture(scope="module")
async def built(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Built]:
    image = baseimage.ensure_image("12")
    work = tmp_path_factory.mktemp("build")
    with vmboot.booted(image.disk_path, work, "kiln-fw", OS_DISK_GB, user=BUILD_USER) as vm:
        assert "-kernel" not in _argv(vm.handle) and "-initrd" not in _argv(vm.handle)
        comm = await vm.connect(timeout=vmboot.BOOT_TIMEOUT)
        try:
            await _print_boot_time(comm, vm, "UEFI boot of the base image")
            grown = await _run(comm, "df --output=size -B1 / | tail -1")
            assert int(grown) > (OS_DISK_GB - 0.5) * (1 << 30), "growpart grew the root"
            assert await _run(comm, "test -d /sys/firmware/efi && echo uefi") == "uefi"
            await _run(comm, f"echo {MARKER} | sudo tee /etc/kiln-marker")
            machine_id = await _run(comm, "cat /etc/machine-id")
            await comm.upload(DEPROVISION_SCRIPT.encode(), "/tmp/deprovision.sh", 0o755)
            assert (await _run(comm, "sudo -n /tmp/deprovision.sh")).endswith("deprovisioned")
            await comm.run(final_shutdown_command(BUILD_USER))
        finally:
            await comm.close()
        deadline = time.monotonic() + 180
        while qemu.is_running(vm.handle):
            assert time.monotonic() < deadline, "the build VM did not power off"
            await asyncio.sleep(1)
    out = tmp_path_factory.mktemp("image")
    to_qcow2(work / "os.qcow2", out / "disk.qcow2")
    to_fixed_vhd(work / "os.qcow2", out / "disk.vhd")
    yield Built(out / "disk.qcow2", out / "disk.vhd", machine_id, vm.client.public_key, image)


def test_captured_disks_are_whole_bootable_disks(built: Built, tmp_path: Path) -> None:
    info = image_info(built.qcow2)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    footer = check_fixed_vhd(built.vhd)
    assert footer.current_size % MIB == 0
    assert footer.current_size == OS_DISK_GB << 30
    raw = tmp_path / "vhd.raw"
    run_tool(["qemu-img", "convert", "-f", image_format(built.vhd), "-O", "raw", built.vhd, raw])
    layout = gptdisk.read_partitions(raw)
    assert {p.number for p in layout.partitions} == {1, 14, 15}
    # growpart grew the root to the end of the disk and moved the backup GPT there
    assert footer.current_size - MIB < layout.root.end <= footer.current_size - 33 * 512


@pytest.mark.parametrize(
    ("disk", "generation"), [("qcow2", "V2"), ("vhd", "V1")], ids=["qcow2-uefi", "vhd-bios"]
)
async def test_captured_disk_boots_with_the_customization(
    built: Built, tmp_path: Path, disk: str, generation: Literal["V1", "V2"]
) -> None:
    path = built.qcow2 if disk == "qcow2" else built.vhd
    with vmboot.booted(path, tmp_path, f"kiln-{disk}", generation=generation) as vm:
        assert "-kernel" not in _argv(vm.handle)
        comm = await vm.connect(timeout=vmboot.BOOT_TIMEOUT)
        try:
            await _print_boot_time(comm, vm, f"{generation} boot of the {disk}")
            assert await _run(comm, "cat /etc/kiln-marker") == MARKER
            efi = await _run(comm, "test -d /sys/firmware/efi && echo uefi || echo bios")
            assert efi == ("uefi" if generation == "V2" else "bios")
            gone = await comm.run(f"id {BUILD_USER}; ls -d /home/{BUILD_USER} /var/lib/kiln")
            assert "no such user" in gone.stderr
            assert gone.stderr.count("No such file or directory") == 2
            sudo_rule = await comm.run(f"sudo -n grep -rl {BUILD_USER} /etc/sudoers.d")
            assert sudo_rule.exit_status == 1 and not sudo_rule.stdout
            key = built.client_key.split()[1]
            found = await comm.run(f"sudo -n grep -rlF {key} /home /root /etc /var/lib/cloud")
            assert found.exit_status == 1 and not found.stdout, "the build's key is gone"
            machine_id = await _run(comm, "cat /etc/machine-id")
            assert len(machine_id) == 32 and machine_id != built.machine_id
            resolv = await _run(comm, "readlink /etc/resolv.conf")
            assert resolv.endswith("stub-resolv.conf")
        finally:
            await comm.close()
