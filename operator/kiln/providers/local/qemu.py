"""QEMU build VMs: overlays, daemonized VMs that outlive the operator, QMP shutdown.

VMs boot their disk by firmware, as on Azure: Gen2 (V2) through OVMF, Gen1 (V1) through
SeaBIOS; nothing but the disk is needed.

A VM is identified by its state directory: the pid file there, checked against
/proc/PID/cmdline, lets a restarted operator find its VM again instead of starting a
second one. Everything a VmHandle holds can be recovered from the running process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from kiln.providers.local import baseimage
from kiln.providers.local.disks import (
    ToolError,
    atomic_output,
    image_format,
    kill_group,
    run_tool,
    spawn,
    virtual_size,
)

log = logging.getLogger(__name__)

GIB = 1024**3
QEMU = "qemu-system-x86_64"
TCG_ARGS = ["-accel", "tcg,thread=multi", "-cpu", "max"]
KVM_ARGS = ["-accel", "kvm", "-cpu", "host"]
PIDFILE = "qemu.pid"
QMP_SOCKET = "qmp.sock"
SERIAL_LOG = "serial.log"
ACCEL_VERDICT = "accel.json"
UEFI_VARS = "efivars.fd"
# Debian's ovmf package; the code is shared read-only, each VM gets its own variables.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
KVM_PROBE_MARKER = "Run /init as init process"
# No option ROM: the firmware never tries a network boot, which only costs time.
NIC_ARGS = ["-device", "virtio-net-pci,netdev=net0,romfile="]
_UNIX_PATH_MAX = 107
_HOSTFWD = re.compile(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22")


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error, or the conversation broke."""


class VmSpec(BaseModel):
    """What to boot. state_dir holds the pid file, QMP socket and serial log."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    state_dir: Path
    disk: Path
    data_disks: list[Path] = Field(default_factory=list, description="qcow2, LUN = index.")
    seed_iso: Path | None = None
    generation: Literal["V1", "V2"] = "V2"
    memory_mb: int = Field(default=1024, ge=256)
    cpus: int = Field(default=2, ge=1)
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    accel: list[str] = Field(default_factory=lambda: list(TCG_ARGS))

    @field_validator("state_dir")
    @classmethod
    def _short_enough(cls, state_dir: Path) -> Path:
        state_dir = state_dir.absolute()
        if len(os.fsencode(state_dir / QMP_SOCKET)) > _UNIX_PATH_MAX:
            raise ValueError(f"state_dir {state_dir} is too long for a unix socket path")
        return state_dir


class VmHandle(BaseModel):
    """A running VM; JSON-serializable so it can live in a status checkpoint."""

    name: str
    pid: int
    state_dir: Path
    pidfile: Path
    qmp_socket: Path
    serial_log: Path
    ssh_port: int


def create_overlay(base_disk: Path, overlay: Path, size_gb: int | None = None) -> None:
    """qcow2 copy-on-write overlay on base_disk, grown to size_gb (never shrunk)."""
    base_size = virtual_size(base_disk)
    size_args: list[str] = []
    if size_gb:
        if size_gb * GIB < base_size:
            raise ValueError(
                f"osDiskSizeGB {size_gb} is smaller than the source image "
                f"({base_size / GIB:g} GiB); a disk can only grow"
            )
        size_args = [str(size_gb * GIB)]
    backing = ["-b", str(base_disk.absolute()), "-F", image_format(base_disk)]
    with atomic_output(overlay) as tmp:
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", *backing, tmp, *size_args])


def create_data_disk(path: Path, size_gb: int) -> None:
    """An empty qcow2 data disk of size_gb GiB (sparse: it takes space as it is written)."""
    with atomic_output(path) as tmp:
        run_tool(["qemu-img", "create", "-q", "-f", "qcow2", tmp, str(size_gb * GIB)])


def free_port() -> int:
    """A loopback TCP port free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def accelerator(cache_root: Path | None = None, disk: Path | None = None) -> list[str]:
    """KVM args if a test boot under KVM works here, else TCG; the verdict is cached."""
    root = cache_root or baseimage.default_cache_root()
    verdict_path = root / ACCEL_VERDICT
    host = platform.release()
    with contextlib.suppress(OSError, ValueError):
        verdict = json.loads(verdict_path.read_text())
        if verdict.get("host_kernel") == host:
            return list(KVM_ARGS if verdict["kvm"] else TCG_ARGS)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        kvm = False
    else:
        disk = disk or _cached_disk(root)
        if disk is None:
            return list(TCG_ARGS)  # nothing to test-boot yet; decide next time
        kvm = _kvm_boots(disk, root)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_output(verdict_path) as tmp:
        tmp.write_text(
            json.dumps({"kvm": kvm, "host_kernel": host, "checked": datetime.now(UTC).isoformat()})
        )
    log.info("accelerator verdict: %s", "kvm" if kvm else "tcg")
    return list(KVM_ARGS if kvm else TCG_ARGS)


def _cached_disk(cache_root: Path) -> Path | None:
    release = baseimage.DEFAULT_RELEASE
    images = baseimage.list_images(
        cache_root, baseimage.PUBLISHER, baseimage.offer(release), release
    )
    return images[-1].disk_path if images else None


def _kvm_boots(disk: Path, cache_root: Path) -> bool:
    """Boot the disk (unchanged: -snapshot) under KVM: a working KVM runs its kernel to init."""
    serial = cache_root / ".kvm-probe.log"
    serial.unlink(missing_ok=True)
    argv = [QEMU, *KVM_ARGS, "-m", "512", "-nodefaults", "-display", "none", "-no-reboot"]
    argv += ["-snapshot", "-drive", f"file={disk},if=virtio,format={image_format(disk)}"]
    argv += ["-serial", f"file:{serial}"]
    try:
        proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, ToolError):
        return False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if KVM_PROBE_MARKER in serial.read_text(errors="replace"):
                    return True
            time.sleep(0.5)
        return False
    finally:
        kill_group(proc)
        serial.unlink(missing_ok=True)


def firmware_args(generation: Literal["V1", "V2"], state_dir: Path) -> list[str]:
    """V2: OVMF with this VM's own UEFI variables (kept in state_dir); V1: SeaBIOS."""
    if generation == "V1":
        return []  # SeaBIOS is QEMU's default firmware
    variables = state_dir / UEFI_VARS
    if not variables.exists():
        with atomic_output(variables) as tmp:
            shutil.copyfile(OVMF_VARS, tmp)
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={variables}",
    ]


def disk_args(os_disk: Path, data_disks: Sequence[Path]) -> list[str]:
    """The OS disk, then each data disk with serial lun<N> (/dev/disk/by-id/virtio-lun<N>),
    all qcow2. Each is an explicit device, in this order, so the OS disk is the guest's first
    disk (vda) as on Azure: QEMU places `-device`s ahead of `-drive if=virtio` ones, which
    made a data disk vda."""
    disks = [
        ("os", os_disk, ""),
        *((f"lun{n}", p, f",serial=lun{n}") for n, p in enumerate(data_disks)),
    ]
    argv: list[str] = []
    for drive, path, serial in disks:
        argv += ["-drive", f"file={path},if=none,id={drive},format=qcow2,discard=unmap"]
        argv += ["-device", f"virtio-blk-pci,drive={drive}{serial}"]
    return argv


def _qemu_argv(spec: VmSpec, port: int) -> list[str]:
    d = spec.state_dir
    argv = [QEMU, "-name", spec.name, "-machine", "q35", *spec.accel]
    argv += ["-m", str(spec.memory_mb), "-smp", str(spec.cpus)]
    argv += ["-nodefaults", "-display", "none", "-vga", "none"]
    argv += firmware_args(spec.generation, d)
    argv += disk_args(spec.disk, spec.data_disks)
    if spec.seed_iso:
        argv += ["-drive", f"file={spec.seed_iso},if=virtio,format=raw,readonly=on"]
    argv += ["-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"]
    argv += [*NIC_ARGS, "-device", "virtio-rng-pci"]
    argv += ["-serial", f"file:{d / SERIAL_LOG}"]
    argv += ["-qmp", f"unix:{d / QMP_SOCKET},server=on,wait=off"]
    argv += ["-pidfile", str(d / PIDFILE), "-daemonize"]
    return argv


def start(spec: VmSpec) -> VmHandle:
    """Start the VM daemonized, or return the one already running from spec.state_dir."""
    if running := find(spec.state_dir):
        return running
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if spec.ssh_port else 3  # a port picked by free_port() can be taken meanwhile
    for attempt in range(attempts):
        port = spec.ssh_port or free_port()
        try:
            # the VM outlives the operator (daemonized, found again by pid file)
            run_tool(_qemu_argv(spec, port), timeout=120, outlive_operator=True)
            break
        except ToolError as exc:
            if "host forwarding" not in str(exc) or attempt == attempts - 1:
                raise
    handle = find(spec.state_dir)
    if handle is None:
        raise ToolError(f"qemu started but no running VM found in {spec.state_dir}")
    log.info("started VM %s pid %s ssh port %s", handle.name, handle.pid, handle.ssh_port)
    return handle


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def find(state_dir: Path) -> VmHandle | None:
    """The VM running from state_dir, if its pid file names a live qemu started with it."""
    state_dir = state_dir.absolute()
    pidfile = state_dir / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    if not argv or not Path(argv[0]).name.startswith("qemu-system"):
        return None
    if _arg(argv, "-pidfile") != str(pidfile):
        return None
    port = _HOSTFWD.search(_arg(argv, "-netdev") or "")
    return VmHandle(
        name=_arg(argv, "-name") or "",
        pid=pid,
        state_dir=state_dir,
        pidfile=pidfile,
        qmp_socket=state_dir / QMP_SOCKET,
        serial_log=state_dir / SERIAL_LOG,
        ssh_port=int(port[1]) if port else 0,
    )


def is_running(handle: VmHandle) -> bool:
    """True while the handle's qemu process lives (pid reuse is ruled out by find())."""
    found = find(handle.state_dir)
    return found is not None and found.pid == handle.pid


async def _qmp_read(reader: asyncio.StreamReader) -> dict[str, object]:
    """The next reply or greeting; asynchronous events are skipped."""
    while True:
        line = await reader.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        message = json.loads(line)
        if "event" not in message:
            return message


async def qmp_command(
    handle: VmHandle, command: str, arguments: dict[str, object] | None = None
) -> object:
    """Run one QMP command: greeting, qmp_capabilities, then the command."""
    reader, writer = await asyncio.open_unix_connection(str(handle.qmp_socket))
    try:
        if "QMP" not in await _qmp_read(reader):
            raise QmpError("no QMP greeting")
        result: object = None
        for execute, args in (("qmp_capabilities", None), (command, arguments)):
            request: dict[str, object] = {"execute": execute}
            if args:
                request["arguments"] = args
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            reply = await _qmp_read(reader)
            if "error" in reply:
                raise QmpError(f"QMP {execute} failed: {reply['error']}")
            result = reply.get("return")
        return result
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def powerdown(handle: VmHandle, timeout: float = 120.0) -> bool:
    """ACPI power button via QMP, wait for qemu to exit; SIGKILL after timeout.

    Returns True when the guest shut down by itself.
    """
    if not is_running(handle):
        return True
    try:
        await asyncio.wait_for(qmp_command(handle, "system_powerdown"), 15)
    except (OSError, TimeoutError, QmpError, ValueError) as exc:
        log.warning("QMP powerdown of %s failed: %s", handle.name, exc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(handle):
            return True
        await asyncio.sleep(0.5)
    log.warning("VM %s did not power off in %.0fs; killing it", handle.name, timeout)
    kill(handle)
    return False


def kill(handle: VmHandle) -> None:
    """SIGKILL the VM (only if the pid is still that VM) and wait until it is gone."""
    if is_running(handle):
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_running(handle) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_running(handle):
        raise ToolError(f"VM {handle.name} (pid {handle.pid}) survived SIGKILL")
    handle.pidfile.unlink(missing_ok=True)
