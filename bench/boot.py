"""`boot to ssh, firmware vs direct kernel`: the base image booted by firmware, as build VMs
boot it, against the same disk booted with its own kernel and initrd handed to QEMU
(`-kernel`, how build VMs booted before images were whole disks), alternately.

Each boot is a fresh copy-on-write overlay and a fresh NoCloud seed, timed from QEMU's
start to the first SSH login with the injected host key (Kiln's own communicator), then
to cloud-init's end (what Kiln's connect step waits for).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from bench.env import vm_lock
from bench.report import Figure, Goal, median, seconds
from kiln.communicators.ssh import SshCommunicator, generate_keypair
from kiln.providers.local import baseimage, gptdisk, qemu, seed
from kiln.providers.local.disks import run_tool

# Issue 15: firmware boot may cost at most this much more than direct kernel boot.
FIRMWARE_OVERHEAD_GOAL = 10.0
BOOT_TIMEOUT = 600.0
USER = "kiln"
Peer = Literal["uefi", "bios", "kernel"]
PEERS: dict[Peer, str] = {
    "uefi": "OVMF + GRUB (Gen2 SKUs)",
    "bios": "SeaBIOS + GRUB (Gen1 SKUs)",
    "kernel": "SeaBIOS, -kernel/-initrd",
}


def boot_files(image: baseimage.BaseImage, work: Path) -> tuple[Path, Path]:
    """The image's own /boot/vmlinuz-* and /boot/initrd.img-*, read from its root
    partition with debugfs (no mount)."""
    raw = work / "base.raw"
    run_tool(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image.disk_path, raw])
    try:
        root = f"{raw}?offset={gptdisk.read_partitions(raw).root.start}"
        listing = run_tool(["debugfs", "-R", "ls -p /boot", root])
        names = [line.split("/")[5] for line in listing.splitlines() if line.count("/") >= 6]
        files = []
        for prefix in ("vmlinuz-", "initrd.img-"):
            name = max(n for n in names if n.startswith(prefix))
            run_tool(["debugfs", "-R", f"dump /boot/{name} {work / prefix.rstrip('-')}", root])
            files.append(work / prefix.rstrip("-"))
    finally:
        raw.unlink()
    return files[0], files[1]


def _argv(spec: qemu.VmSpec, port: int, peer: Peer, kernel: tuple[Path, Path], cmdline: str):
    argv = qemu._qemu_argv(spec, port)
    if peer == "kernel":
        argv += ["-kernel", str(kernel[0]), "-initrd", str(kernel[1]), "-append", cmdline]
    return argv


async def _boot(
    image: baseimage.BaseImage, work: Path, peer: Peer, kernel: tuple[Path, Path]
) -> dict[str, float]:
    """One boot: seconds to SSH login, to cloud-init's end, and the guest's own uptime."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    qemu.create_overlay(image.disk_path, work / "os.qcow2")
    client, host = generate_keypair(), generate_keypair()
    seed.write_seed_iso(
        seed.SeedConfig(
            instance_id=work.name,
            hostname="kiln-boot",
            user=USER,
            authorized_key=client.public_key,
            host_private_key=host.private_key,
            host_public_key=host.public_key,
        ),
        work / "seed.iso",
    )
    spec = qemu.VmSpec(
        name="kiln-boot",
        state_dir=work / "state",
        disk=work / "os.qcow2",
        seed_iso=work / "seed.iso",
        generation="V2" if peer == "uefi" else "V1",
        accel=qemu.accelerator(),
    )
    spec.state_dir.mkdir()
    cmdline = f"root=UUID={image.root_uuid} ro {baseimage.KERNEL_ARGS}"
    started = time.monotonic()
    run_tool(_argv(spec, qemu.free_port(), peer, kernel, cmdline), timeout=120)
    handle = qemu.find(spec.state_dir)
    assert handle is not None, f"no VM running from {spec.state_dir}"
    comm = SshCommunicator()
    try:
        key = client.private_key.get_secret_value()
        await comm.connect("127.0.0.1", handle.ssh_port, USER, key, host.public_key, BOOT_TIMEOUT)
        login = time.monotonic() - started
        uptime = await comm.run("cut -d' ' -f1 /proc/uptime", timeout=60)
        await comm.run("cloud-init status --wait", timeout=BOOT_TIMEOUT)
        ready = time.monotonic() - started
        await comm.close()
    finally:
        qemu.kill(handle)
        shutil.rmtree(work, ignore_errors=True)
    return {"ssh": login, "cloud_init": ready, "before_kernel": login - float(uptime.stdout)}


def run(work: Path, repeats: int, lock: Path | None) -> list[Figure]:
    """Each peer once per round, `repeats` rounds, every boot under the VM lock."""
    image = baseimage.ensure_image()
    work.mkdir(parents=True, exist_ok=True)
    kernel = boot_files(image, work)
    samples: dict[Peer, list[dict[str, float]]] = {peer: [] for peer in PEERS}
    for rep in range(repeats):
        for peer in PEERS:
            with vm_lock(lock):
                samples[peer].append(
                    asyncio.run(_boot(image, work / f"{peer}-{rep}", peer, kernel))
                )

    def med(peer: Peer, key: str) -> float:
        return median([s[key] for s in samples[peer]])

    uefi, direct = med("uefi", "ssh"), med("kernel", "ssh")
    raw: dict[str, Any] = {"image": image.version, "peers": PEERS, "samples": samples}
    return [
        Figure(
            name="boot to ssh, firmware vs direct kernel",
            parts=[
                seconds("uefi", uefi),
                seconds("bios", med("bios", "ssh")),
                seconds("kernel", direct),
                seconds("uefi before the kernel", med("uefi", "before_kernel")),
                seconds("uefi to cloud-init done", med("uefi", "cloud_init")),
            ],
            ratio=uefi / direct,
            goals=[Goal(what="uefi - kernel s", value=uefi - direct, limit=FIRMWARE_OVERHEAD_GOAL)],
            raw=raw,
        )
    ]
