"""Boot a disk (a base image or a built one) in a throwaway VM and log in, for tests."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from kiln.communicators.ssh import KeyPair, SshCommunicator, generate_keypair
from kiln.providers.local import baseimage, qemu, seed

USER = "kiln"
BOOT_TIMEOUT = 300.0


@dataclass
class Vm:
    spec: qemu.VmSpec
    handle: qemu.VmHandle
    client: KeyPair
    host: KeyPair
    user: str = USER
    started: float = field(default_factory=time.monotonic)

    async def connect(
        self, host_public_key: str | None = None, timeout: float = 60
    ) -> SshCommunicator:
        comm = SshCommunicator()
        await comm.connect(
            "127.0.0.1",
            self.handle.ssh_port,
            self.user,
            self.client.private_key.get_secret_value(),
            host_public_key or self.host.public_key,
            timeout=timeout,
        )
        return comm


@contextmanager
def booted(
    disk: Path,
    work: Path,
    name: str,
    size_gb: int | None = None,
    *,
    generation: Literal["V1", "V2"] = "V2",
    user: str = USER,
) -> Iterator[Vm]:
    """A VM booting by firmware (V1 SeaBIOS, V2 OVMF) a copy-on-write overlay of disk
    (which stays unchanged), killed on exit."""
    qemu.create_overlay(disk, work / "os.qcow2", size_gb)
    client, host = generate_keypair(), generate_keypair()
    seed.write_seed_iso(
        seed.SeedConfig(
            instance_id=name,
            hostname=name,
            user=user,
            authorized_key=client.public_key,
            host_private_key=host.private_key,
            host_public_key=host.public_key,
        ),
        work / "seed.iso",
    )
    spec = qemu.VmSpec(
        name=name,
        state_dir=work / "state",
        disk=work / "os.qcow2",
        seed_iso=work / "seed.iso",
        generation=generation,
        ssh_port=qemu.free_port(),
        accel=qemu.accelerator(baseimage.default_cache_root(), disk),
    )
    handle = qemu.start(spec)
    try:
        yield Vm(spec, handle, client, host, user)
    finally:
        qemu.kill(handle)


def idle_qemu(directory: Path) -> qemu.VmHandle:
    """A daemonized QEMU with no guest (machine none) in a new state directory: a build VM
    as its pid file records it, for the tests of what finds and removes VMs."""
    directory.mkdir(parents=True)
    argv = [qemu.QEMU, "-machine", "none", "-nodefaults", "-display", "none"]
    argv += ["-netdev", "user,id=n,hostfwd=tcp:127.0.0.1:0-:22"]
    argv += ["-pidfile", str(directory / qemu.PIDFILE), "-daemonize"]
    subprocess.run(argv, check=True, timeout=30)
    handle = qemu.find(directory)
    assert handle is not None
    return handle
