"""One real build VM on the local provider: base image, overlay, seed, SSH, jobs, shutdown.

The tests run in file order against one VM (one boot under TCG); the last one powers it
off, and the fixture kills it if anything went wrong before that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vmboot
from kiln.communicators.ssh import CommunicatorError, KeyPair, SshCommunicator, generate_keypair
from kiln.providers.local import baseimage, qemu

pytestmark = pytest.mark.e2e

OS_DISK_GB = 6


@dataclass
class BaseVm:
    image: baseimage.BaseImage
    booted: vmboot.Vm

    @property
    def handle(self) -> qemu.VmHandle:
        return self.booted.handle

    @property
    def spec(self) -> qemu.VmSpec:
        return self.booted.spec

    @property
    def host(self) -> KeyPair:
        return self.booted.host

    @property
    def started(self) -> float:
        return self.booted.started


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseVm]:
    began = time.monotonic()
    image = baseimage.ensure_image("12", baseimage.default_cache_root())
    print(f"base image {image.version} ready in {time.monotonic() - began:.1f}s")
    assert image.disk_virtual_size < OS_DISK_GB << 30
    work = tmp_path_factory.mktemp("vm")
    with vmboot.booted(image.disk_path, work, "kiln-e2e", OS_DISK_GB) as booted:
        yield BaseVm(image, booted)


async def _connect(
    vm: BaseVm, host_public_key: str | None = None, timeout: float = 60
) -> SshCommunicator:
    return await vm.booted.connect(host_public_key, timeout)


async def test_connects_with_the_expected_host_key(vm: BaseVm) -> None:
    comm = await _connect(vm, timeout=vmboot.BOOT_TIMEOUT)
    print(f"boot to SSH login: {time.monotonic() - vm.started:.1f}s")
    try:
        result = await comm.run("id -un; sudo -n id -u; hostname")
        assert result.exit_status == 0, result.stderr
        assert result.stdout.split() == [vmboot.USER, "0", "kiln-e2e"]
        keys = await comm.run("sudo -n sh -c 'ls /etc/ssh/ssh_host_*; cat /etc/ssh/*.pub'")
        assert keys.stdout.split()[:4] == [
            "/etc/ssh/ssh_host_ed25519_key",
            "/etc/ssh/ssh_host_ed25519_key.pub",
            *vm.host.public_key.split()[:2],
        ]
    finally:
        await comm.close()


async def test_wrong_host_key_is_refused(vm: BaseVm) -> None:
    impostor = generate_keypair().public_key
    began = time.monotonic()
    with pytest.raises(CommunicatorError, match="host key other than the expected"):
        await _connect(vm, host_public_key=impostor)
    assert time.monotonic() - began < 30, "a wrong host key must fail at once, not be retried"


async def test_root_file_system_grew(vm: BaseVm) -> None:
    comm = await _connect(vm)
    try:
        result = await comm.run("df --output=size -B1 / | tail -1")
        size = int(result.stdout)
        assert size > vm.image.disk_virtual_size
        assert size > (OS_DISK_GB - 0.5) * (1 << 30)
    finally:
        await comm.close()


async def test_upload(vm: BaseVm, tmp_path: Path) -> None:
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


async def test_detached_job_survives_the_connection(vm: BaseVm) -> None:
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


async def test_find_recovers_the_running_vm(vm: BaseVm) -> None:
    found = qemu.find(vm.spec.state_dir)
    assert found == vm.handle
    assert qemu.start(vm.spec) == vm.handle  # a restarted operator never starts a second VM
    assert qemu.VmHandle.model_validate_json(vm.handle.model_dump_json()) == vm.handle


async def test_powerdown_via_qmp(vm: BaseVm) -> None:
    began = time.monotonic()
    assert await qemu.powerdown(vm.handle, timeout=120) is True
    print(f"QMP powerdown took {time.monotonic() - began:.1f}s")
    assert not qemu.is_running(vm.handle)
    stat = Path(f"/proc/{vm.handle.pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z"  # gone or reaped
    assert qemu.find(vm.spec.state_dir) is None
