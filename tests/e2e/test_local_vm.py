"""One real build VM on the local provider: base image, overlay, seed, SSH, jobs, shutdown.

The tests run in file order against one VM (one boot under TCG); the last one powers it
off, and the fixture kills it if anything went wrong before that.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.communicators.ssh import CommunicatorError, KeyPair, SshCommunicator, generate_keypair
from kiln.providers.local import baseimage, qemu, seed

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap")),
        reason="needs qemu-system-x86, qemu-utils and mmdebstrap",
    ),
]

USER = "kiln"
OS_DISK_GB = 6
BOOT_TIMEOUT = 300.0


@dataclass
class Vm:
    image: baseimage.BaseImage
    spec: qemu.VmSpec
    handle: qemu.VmHandle
    client: KeyPair
    host: KeyPair
    started: float


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    cache_root = baseimage.default_cache_root()
    began = time.monotonic()
    image = baseimage.ensure_debian12(cache_root)
    print(f"base image {image.version} ready in {time.monotonic() - began:.1f}s")
    work = tmp_path_factory.mktemp("vm")
    assert image.disk_virtual_size < OS_DISK_GB << 30
    qemu.create_overlay(image.disk_path, work / "os.qcow2", OS_DISK_GB)
    client, host = generate_keypair(), generate_keypair()
    seed.write_seed_iso(
        seed.SeedConfig(
            instance_id="kiln-e2e",
            hostname="kiln-e2e",
            user=USER,
            authorized_key=client.public_key,
            host_private_key=host.private_key,
            host_public_key=host.public_key,
        ),
        work / "seed.iso",
    )
    spec = qemu.VmSpec(
        name="kiln-e2e",
        state_dir=work / "state",
        disk=work / "os.qcow2",
        seed_iso=work / "seed.iso",
        kernel=image.kernel_path,
        initrd=image.initrd_path,
        append=image.cmdline,
        ssh_port=qemu.free_port(),
        accel=qemu.accelerator(cache_root),
    )
    handle = qemu.start(spec)
    try:
        yield Vm(image, spec, handle, client, host, time.monotonic())
    finally:
        qemu.kill(handle)


async def _connect(
    vm: Vm, host_public_key: str | None = None, timeout: float = 60
) -> SshCommunicator:
    comm = SshCommunicator()
    await comm.connect(
        "127.0.0.1",
        vm.handle.ssh_port,
        USER,
        vm.client.private_key.get_secret_value(),
        host_public_key or vm.host.public_key,
        timeout=timeout,
    )
    return comm


async def test_connects_with_the_expected_host_key(vm: Vm) -> None:
    comm = await _connect(vm, timeout=BOOT_TIMEOUT)
    print(f"boot to SSH login: {time.monotonic() - vm.started:.1f}s")
    try:
        result = await comm.run("id -un; sudo -n id -u; hostname")
        assert result.exit_status == 0, result.stderr
        assert result.stdout.split() == [USER, "0", "kiln-e2e"]
        keys = await comm.run("sudo -n sh -c 'ls /etc/ssh/ssh_host_*; cat /etc/ssh/*.pub'")
        assert keys.stdout.split()[:4] == [
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            *vm.host.public_key.split()[:2],
        ]
    finally:
        await comm.close()


async def test_wrong_host_key_is_refused(vm: Vm) -> None:
    impostor = generate_keypair().public_key
    began = time.monotonic()
    with pytest.raises(CommunicatorError, match="host key other than the expected"):
        await _connect(vm, host_public_key=impostor)
    assert time.monotonic() - began < 30, "a wrong host key must fail at once, not be retried"


async def test_root_file_system_grew(vm: Vm) -> None:
    comm = await _connect(vm)
    try:
        result = await comm.run("df --output=size -B1 / | tail -1")
        size = int(result.stdout)
        assert size > vm.image.disk_virtual_size
        assert size > (OS_DISK_GB - 0.5) * (1 << 30)
    finally:
        await comm.close()


async def test_upload(vm: Vm, tmp_path: Path) -> None:
    local = tmp_path / "f.txt"
    local.write_text("from a file\n")
    comm = await _connect(vm)
    try:
        await comm.upload(b"\x00binary\xff", "/tmp/kiln-bytes", 0o600)
        await comm.upload(local, "/tmp/kiln-file", 0o755)
        result = await comm.run(
            "stat -c '%a %s' /tmp/kiln-bytes /tmp/kiln-file; cat /tmp/kiln-file"
        )
        assert result.stdout.splitlines() == ["600 8", "755 12", "from a file"]
    finally:
        await comm.close()


async def _poll_to_end(comm: SshCommunicator, job_id: str) -> tuple[int | None, bytes]:
    log, offset = b"", 0
    deadline = time.monotonic() + 120
    while True:
        status = await comm.poll_job(job_id, offset)
        log, offset = log + status.new_log, status.next_offset
        if not status.running:
            return status.exit_code, log
        assert time.monotonic() < deadline, "job did not finish"
        await asyncio.sleep(1)


async def test_detached_job_survives_the_connection(vm: Vm) -> None:
    script = "echo starting; sleep 6; echo done as $(id -un) >&2; exit 3\n"
    first = await _connect(vm)
    await first.start_job("sleepy", script, elevated=False)
    await first.start_job("root-job", "id -u; touch /etc/kiln-was-here", elevated=True)
    status = await first.poll_job("sleepy")
    assert status.running and status.exit_code is None
    await first.close()  # the operator goes away while the job runs

    second = await _connect(vm)  # ... and comes back with a new connection
    try:
        await second.start_job("sleepy", "echo must not run; exit 0")  # idempotent
        assert await _poll_to_end(second, "sleepy") == (3, b"starting\ndone as kiln\n")
        tail = await second.poll_job("sleepy", len(b"starting\n"))
        assert (tail.new_log, tail.exit_code) == (b"done as kiln\n", 3)
        assert await _poll_to_end(second, "root-job") == (0, b"0\n")
        listing = await second.run("ls /var/lib/kiln/jobs/sleepy; test -f /etc/kiln-was-here")
        assert listing.exit_status == 0
        assert {"script", "log", "exit_code", "run", "started"} <= set(listing.stdout.split())
    finally:
        await second.close()


async def test_find_recovers_the_running_vm(vm: Vm) -> None:
    found = qemu.find(vm.spec.state_dir)
    assert found == vm.handle
    assert qemu.start(vm.spec) == vm.handle  # a restarted operator never starts a second VM
    assert qemu.VmHandle.model_validate_json(vm.handle.model_dump_json()) == vm.handle


async def test_powerdown_via_qmp(vm: Vm) -> None:
    began = time.monotonic()
    assert await qemu.powerdown(vm.handle, timeout=120) is True
    print(f"QMP powerdown took {time.monotonic() - began:.1f}s")
    assert not qemu.is_running(vm.handle)
    stat = Path(f"/proc/{vm.handle.pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z"  # gone or reaped
    assert qemu.find(vm.spec.state_dir) is None
