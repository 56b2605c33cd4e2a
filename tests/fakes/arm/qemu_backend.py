"""QemuVmBackend: the ARM emulator's VMs as real QEMU machines, SSH-reachable as on Azure.

    backend = QemuVmBackend(tmp_path / "arm-vms")
    with ArmEmulator(backend=backend, marketplace=debian12_marketplace()) as arm:
        ...  # a VM created through azure-mgmt-compute answers SSH on <its public IP>:22

- create: the marketplace reference resolves to the cached local Debian 12 image
  (kiln.providers.local.baseimage), an image id to a disk this backend captured earlier.
  The OS disk is a qcow2 overlay (grown to the VM's diskSizeGB); a NoCloud seed creates
  the admin user with its SSH keys (passwordless sudo, no password login) and merges the
  VM's customData when it is a `#cloud-config` document (a script runs as a second
  part); customData is also written to /var/lib/waagent/CustomData, as the Azure agent
  does. QEMU forwards `tcp:<public IP>:22` and `tcp:<private IP>:22` to the guest, so a
  client connects to the VM's address on port 22. The create (and start) operation ends
  when sshd answers there, like Azure's provisioning; else it fails OSProvisioningTimedOut.
- power_off / deallocate: ACPI shutdown, disk kept; start: boots the same disk again;
  generalize: recorded; delete: the QEMU process and its state go, the OS disk stays
  until the disk resource is deleted (`delete_disk`), as in Azure.
- capture: a managed image or gallery image version becomes a standalone qcow2; it boots
  by firmware alone, SeaBIOS for Gen1 (V1) and OVMF for Gen2 (V2), as the source did.
  A VM's data disks (empty qcow2s, or overlays on an image's data disks) are virtio disks
  with serial lun<N> (/dev/disk/by-id/virtio-lun<N>); capture copies them beside the OS disk.
- disk_vhd: the OS disk as a fixed VHD (converted once per disk content), which the
  emulator serves at the disk's accessSAS URL.

Every failure becomes an ArmError, so the operation fails the way Azure's would.
Files live under work_dir: vms/<key>/ (pid file, QMP socket, serial log), disks/<key>/,
images/<key>/, with <key> a hash of the ARM id (short enough for unix socket paths).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.mime.multipart
import email.mime.text
import hashlib
import logging
import math
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from kiln.providers.local import baseimage, qemu
from kiln.providers.local.disks import ToolError, atomic_output, run_tool, to_fixed_vhd, to_qcow2
from kiln.providers.local.seed import write_cidata

from .errors import ArmError
from .models import DEFAULT_MARKETPLACE, DataDiskInfo, MarketplaceImage, VmInfo
from .winrm_guest import FakeWindowsGuest, WindowsGuestBackend

log = logging.getLogger("fakes.arm.qemu")

GIB = 1024**3
SSH_PORT = 22
BOOT_TIMEOUT = 300.0
SHUTDOWN_TIMEOUT = 120.0
CUSTOM_DATA_PATH = "/var/lib/waagent/CustomData"
Generation = Literal["V1", "V2"]


def debian12_marketplace(
    cache_root: Path | None = None, *, build: bool = True
) -> list[MarketplaceImage]:
    """What to pass as the emulator's `marketplace=`: Debian:debian-12:{12,12-gen2} with the
    versions cached locally, so `latest` resolves to the image this backend boots.

    build: build the base image first when none is cached (needs root and a few minutes).
    """
    root = cache_root or baseimage.default_cache_root()
    if build:
        baseimage.ensure_image("12", root)
    offer = baseimage.offer("12")
    images = baseimage.list_images(root, baseimage.PUBLISHER, offer, "12")
    if not images:
        raise baseimage.ImageNotFound(f"no cached Debian 12 image under {root}")
    size_gb = math.ceil(max(i.disk_virtual_size for i in images) / GIB)
    return [
        MarketplaceImage(
            publisher=baseimage.PUBLISHER,
            offer=offer,
            sku=sku,
            versions=[i.version for i in images],
            hyper_v_generation=baseimage.generation(sku),
            disk_size_gb=size_gb,
        )
        for sku in baseimage.skus("12")
    ]


def debian12_marketplace_entry(cache_root: Path | None = None) -> MarketplaceImage:
    """The Debian:debian-12:12-gen2 entry alone (see debian12_marketplace)."""
    return next(m for m in debian12_marketplace(cache_root) if m.sku.endswith("gen2"))


# --- records kept on disk (a restarted emulator with the same work_dir finds them) ---------


class DiskRecord(BaseModel):
    id: str
    vm_id: str | None = None
    backing: str  # the image disk the overlay is on
    generation: Generation = "V2"
    generalized: bool = False


class VmRecord(BaseModel):
    id: str
    name: str
    disk_id: str
    addresses: list[str]
    data_disk_ids: list[str] = []  # in LUN order; each disk's file is data.qcow2


class ImageRecord(BaseModel):
    id: str
    source_id: str
    generation: Generation = "V2"
    deleted: bool = False


class _Source(BaseModel):
    disk: Path
    generation: Generation


def _key(resource_id: str) -> str:
    return hashlib.sha256(resource_id.lower().encode()).hexdigest()[:16]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _read(model: type[Any], path: Path) -> Any:
    try:
        return model.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def _write(record: BaseModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(record.model_dump_json(indent=2))


# --- cloud-init seed ----------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """customData wins; lists (users, write_files, runcmd...) are concatenated."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(out.get(k), list) and isinstance(v, list):
            out[k] = [*out[k], *v]
        elif isinstance(out.get(k), dict) and isinstance(v, dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def user_data(vm: VmInfo) -> str:
    """The seed's user-data: the admin user and keys, merged with the VM's customData."""
    doc: dict[str, Any] = {
        "hostname": vm.computer_name,
        "manage_etc_hosts": True,
        "users": [
            {
                "name": vm.admin_username,
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [k.strip() for k in vm.ssh_public_keys],
            }
        ],
        "disable_root": True,
        "ssh_pwauth": False,
    }
    custom = vm.custom_data_bytes
    script: str | None = None
    if custom is not None:
        doc["write_files"] = [
            {
                "path": CUSTOM_DATA_PATH,
                "encoding": "b64",
                "content": vm.custom_data,
                "owner": "root:root",
                "permissions": "0600",
            }
        ]
        text = custom.decode(errors="replace")
        if text.lstrip().startswith("#cloud-config"):
            try:
                extra = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ArmError(
                    400, "InvalidParameter", f"customData is not valid cloud-config: {exc}"
                ) from None
            if isinstance(extra, dict):
                doc = _merge(doc, extra)
        elif text.startswith("#!"):
            script = text
    cloud_config = "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)
    if script is None:
        return cloud_config
    message = email.mime.multipart.MIMEMultipart()
    message.attach(email.mime.text.MIMEText(cloud_config, "cloud-config"))
    message.attach(email.mime.text.MIMEText(script, "x-shellscript"))
    return message.as_string()


def write_seed(vm: VmInfo, path: Path) -> None:
    """NoCloud `cidata` ISO; a new instance-id per VM makes cloud-init provision it."""
    meta = {"instance-id": f"{vm.name}-{uuid.uuid4().hex[:12]}", "local-hostname": vm.computer_name}
    write_cidata(user_data(vm), yaml.safe_dump(meta), path)


# --- the backend --------------------------------------------------------------------------


class QemuVmBackend:
    """A VmBackend (plus the capture/disk hooks) whose VMs are QEMU machines under TCG/KVM."""

    def __init__(
        self,
        work_dir: Path,
        cache_root: Path | None = None,
        memory_mb: int = 1024,
        *,
        cpus: int = 2,
        boot_timeout: float = BOOT_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        self.work_dir = Path(work_dir).absolute()
        self.cache_root = cache_root or baseimage.default_cache_root()
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.boot_timeout = boot_timeout
        self.shutdown_timeout = shutdown_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        for sub in ("vms", "disks", "images"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)

    # paths and records -------------------------------------------------------------------

    def vm_dir(self, vm_id: str) -> Path:
        return self.work_dir / "vms" / _key(vm_id)

    def disk_dir(self, disk_id: str) -> Path:
        return self.work_dir / "disks" / _key(disk_id)

    def image_dir(self, image_id: str) -> Path:
        return self.work_dir / "images" / _key(image_id)

    def _vm(self, vm_id: str) -> VmRecord | None:
        return _read(VmRecord, self.vm_dir(vm_id) / "vm.json")

    def _disk(self, disk_id: str) -> DiskRecord | None:
        return _read(DiskRecord, self.disk_dir(disk_id) / "disk.json")

    def _image(self, image_id: str) -> ImageRecord | None:
        rec = _read(ImageRecord, self.image_dir(image_id) / "image.json")
        return rec if rec is not None and not rec.deleted else None

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def handle(self, vm_id: str) -> qemu.VmHandle | None:
        """The running QEMU of a VM, if any."""
        return qemu.find(self.vm_dir(vm_id))

    def _disk_in_use(self, rec: DiskRecord) -> bool:
        return bool(rec.vm_id and self.handle(rec.vm_id))

    @contextlib.asynccontextmanager
    async def _arm_errors(self, what: str) -> AsyncIterator[None]:
        """Host failures become the ArmError that fails the operation."""
        try:
            yield
        except ArmError:
            raise
        except baseimage.ImageNotFound as exc:
            raise ArmError(404, "PlatformImageNotFound", str(exc)) from None
        except (ToolError, qemu.QmpError, OSError, ValueError) as exc:
            log.warning("QEMU backend: %s failed: %s", what, exc)
            raise ArmError(
                500, "InternalExecutionError", f"The host failed to {what}: {exc}"
            ) from None

    # VmBackend -----------------------------------------------------------------------------

    async def create(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"create VM {vm.name}"):
            if vm.os_type != "Linux":
                raise ArmError(
                    400, "InvalidParameter", "The QEMU VM backend runs Linux images only."
                )
            disk_id = vm.os_disk_id or f"{vm.id}/osDisk"
            async with self._lock(_key(disk_id)):
                await self._prepare_disk(vm, disk_id)
            for data_disk in vm.data_disks:
                await self._prepare_data_disk(vm, data_disk)
            addresses = [a for a in (vm.public_ip, vm.private_ip) if a]
            _write(
                VmRecord(
                    id=vm.id,
                    name=vm.name,
                    disk_id=disk_id,
                    addresses=addresses,
                    data_disk_ids=[self._data_disk_id(vm, d) for d in vm.data_disks],
                ),
                self.vm_dir(vm.id) / "vm.json",
            )
            await self._boot(vm)

    async def start(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"start VM {vm.name}"):
            rec = self._require_vm(vm)
            handle = self.handle(vm.id)
            if handle is not None:  # restart
                await qemu.powerdown(handle, self.shutdown_timeout)
            rec.addresses = [a for a in (vm.public_ip, vm.private_ip) if a]
            _write(rec, self.vm_dir(vm.id) / "vm.json")
            (self.disk_dir(rec.disk_id) / "export.vhd").unlink(missing_ok=True)
            await self._boot(vm)

    async def power_off(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"power off VM {vm.name}"):
            await self._shutdown(vm)

    async def deallocate(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"deallocate VM {vm.name}"):
            await self._shutdown(vm)

    async def generalize(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"generalize VM {vm.name}"):
            rec = self._require_vm(vm)
            disk = self._disk(rec.disk_id)
            if disk is not None:
                disk.generalized = True
                _write(disk, self.disk_dir(rec.disk_id) / "disk.json")

    async def delete(self, vm: VmInfo) -> None:
        async with self._arm_errors(f"delete VM {vm.name}"):
            handle = self.handle(vm.id)
            if handle is not None:
                await asyncio.to_thread(qemu.kill, handle)
            shutil.rmtree(self.vm_dir(vm.id), ignore_errors=True)

    # optional hooks: images, disks ----------------------------------------------------------

    async def capture(self, source_id: str, target_id: str) -> None:
        """Keep a standalone copy of source's disk as target_id."""
        async with self._arm_errors(f"capture {source_id}"):
            target = self.image_dir(target_id)
            if self._image(target_id) is not None:
                return
            image = self._image(source_id)
            if image is not None:
                src_dir = self.image_dir(source_id)
                files = _Source(disk=src_dir / "disk.qcow2", generation=image.generation)
                data = {p.name: p for p in src_dir.glob("data-lun*.qcow2")}
                copy = _link_or_copy
            else:
                files = self._disk_source(source_id)
                vm = self._vm(source_id)
                data = {
                    f"data-lun{lun}.qcow2": self.disk_dir(disk_id) / "data.qcow2"
                    for lun, disk_id in enumerate(vm.data_disk_ids if vm else [])
                }
                copy = to_qcow2
            tmp = target.with_name(f".tmp-{target.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(target, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                await asyncio.to_thread(copy, files.disk, tmp / "disk.qcow2")
                for name, path in data.items():  # the data disks, beside the OS disk
                    await asyncio.to_thread(copy, path, tmp / name)
                _write(
                    ImageRecord(id=target_id, source_id=source_id, generation=files.generation),
                    tmp / "image.json",
                )
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("captured %s as %s", source_id, target_id)

    def _disk_source(self, source_id: str) -> _Source:
        """The OS disk of a VM (or the disk itself), which must not be running."""
        vm = self._vm(source_id)
        disk_id = vm.disk_id if vm is not None else source_id
        rec = self._disk(disk_id)
        if rec is None:
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"The QEMU VM backend has no disk for '{source_id}' (only disks of its own VMs "
                "can be captured).",
            )
        if self._disk_in_use(rec):
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"The disk of '{source_id}' is in use by a running VM; deallocate it first.",
            )
        return _Source(disk=self.disk_dir(disk_id) / "os.qcow2", generation=rec.generation)

    async def discard(self, target_id: str) -> None:
        """The image or version was deleted; its files go once no disk is backed by them."""
        async with self._arm_errors(f"delete image {target_id}"):
            path = self.image_dir(target_id) / "image.json"
            rec = _read(ImageRecord, path)
            if rec is not None:
                rec.deleted = True
                _write(rec, path)
            self._collect_images()

    async def delete_disk(self, disk_id: str) -> None:
        async with self._arm_errors(f"delete disk {disk_id}"):
            rec = self._disk(disk_id)
            if rec is not None and rec.vm_id and (handle := self.handle(rec.vm_id)):
                await asyncio.to_thread(qemu.kill, handle)
            shutil.rmtree(self.disk_dir(disk_id), ignore_errors=True)
            self._locks.pop(_key(disk_id), None)
            self._collect_images()

    async def disk_vhd(self, disk_id: str) -> Path:
        """The OS disk as a fixed VHD (converted on first use after each change)."""
        async with self._arm_errors(f"export disk {disk_id}"):
            rec = self._disk(disk_id)
            if rec is None:
                raise ArmError(404, "BlobNotFound", "The specified blob does not exist.")
            if self._disk_in_use(rec):
                raise ArmError(
                    409,
                    "OperationNotAllowed",
                    "The disk is attached to a running VM; deallocate the VM to export it.",
                )
            d = self.disk_dir(disk_id)
            vhd, src = d / "export.vhd", d / "os.qcow2"
            async with self._lock(_key(disk_id)):
                if not vhd.exists() or vhd.stat().st_mtime_ns < src.stat().st_mtime_ns:
                    began = time.monotonic()
                    await asyncio.to_thread(to_fixed_vhd, src, vhd)
                    log.info("exported %s as VHD in %.1fs", disk_id, time.monotonic() - began)
            return vhd

    def _collect_images(self) -> None:
        backings = {
            rec.backing
            for p in (self.work_dir / "disks").glob("*/disk.json")
            if (rec := _read(DiskRecord, p)) is not None
        }
        for path in (self.work_dir / "images").glob("*/image.json"):
            rec = _read(ImageRecord, path)
            if rec is None or not rec.deleted:
                continue
            if not any(b.startswith(str(path.parent) + "/") for b in backings):
                shutil.rmtree(path.parent, ignore_errors=True)

    # test helpers ----------------------------------------------------------------------------

    def qemu_pids(self) -> list[int]:
        """Every QEMU process running from this backend's work_dir."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and Path(argv[0].decode(errors="replace")).name.startswith("qemu-system"):
                marker = str(self.work_dir).encode() + b"/"
                if any(marker in a for a in argv):
                    pids.append(int(proc.name))
        return sorted(pids)

    def serial_log(self, vm_id: str) -> str:
        """The VM's console output (for failure messages)."""
        path = self.vm_dir(vm_id) / qemu.SERIAL_LOG
        return path.read_text(errors="replace") if path.exists() else ""

    def shutdown(self) -> None:
        """Kill every VM this backend started (test teardown); disks and images stay."""
        for state in (self.work_dir / "vms").iterdir():
            handle = qemu.find(state)
            if handle is not None:
                with contextlib.suppress(ToolError):
                    qemu.kill(handle)
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # internals ---------------------------------------------------------------------------------

    def _require_vm(self, vm: VmInfo) -> VmRecord:
        rec = self._vm(vm.id)
        if rec is None:
            raise ArmError(
                409, "OperationNotAllowed", f"The QEMU VM backend has no machine for '{vm.id}'."
            )
        return rec

    def _resolve(self, vm: VmInfo) -> _Source:
        """The image disk a new OS disk is made from."""
        if vm.source_image_id:
            image = self._image(vm.source_image_id)
            if image is None:
                raise ArmError(
                    404,
                    "ImageNotFound",
                    f"The QEMU VM backend has no disk for image '{vm.source_image_id}' (only "
                    "images captured from its own VMs can be booted).",
                )
            d = self.image_dir(vm.source_image_id)
            return _Source(disk=d / "disk.qcow2", generation=image.generation)
        ref = vm.image_reference
        version = ref.get("exactVersion") or ref.get("version") or "latest"
        base = baseimage.resolve(
            self.cache_root,
            ref.get("publisher", ""),
            ref.get("offer", ""),
            ref.get("sku", ""),
            version,
        )
        return _Source(disk=base.disk_path, generation=baseimage.generation(ref.get("sku", "")))

    async def _prepare_disk(self, vm: VmInfo, disk_id: str) -> None:
        """Overlay and seed for a new OS disk (an attached disk has them)."""
        d = self.disk_dir(disk_id)
        rec = self._disk(disk_id)
        if rec is not None:
            if rec.vm_id != vm.id:
                rec.vm_id = vm.id
                _write(rec, d / "disk.json")
            return
        if not vm.image_reference and not vm.source_image_id:
            raise ArmError(
                404,
                "NotFound",
                f"The QEMU VM backend has no content for disk '{disk_id}' to attach.",
            )
        source = self._resolve(vm)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        await asyncio.to_thread(
            qemu.create_overlay, source.disk, d / "os.qcow2", vm.os_disk_size_gb
        )
        if vm.admin_username:
            write_seed(vm, d / "seed.iso")
        _write(
            DiskRecord(
                id=disk_id, vm_id=vm.id, backing=str(source.disk), generation=source.generation
            ),
            d / "disk.json",
        )

    @staticmethod
    def _data_disk_id(vm: VmInfo, data_disk: DataDiskInfo) -> str:
        return data_disk.id or f"{vm.id}/lun{data_disk.lun}"

    async def _prepare_data_disk(self, vm: VmInfo, data_disk: DataDiskInfo) -> None:
        """An empty qcow2 of the disk's size, or an overlay on the image's data disk at its
        LUN (FromImage); a disk that exists is kept."""
        disk_id = self._data_disk_id(vm, data_disk)
        if self._disk(disk_id) is not None:
            return
        d = self.disk_dir(disk_id)
        image = self.image_dir(vm.source_image_id) if vm.source_image_id else None
        backing = image / f"data-lun{data_disk.lun}.qcow2" if image else None
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        if backing is not None and backing.exists():
            await asyncio.to_thread(
                qemu.create_overlay, backing, d / "data.qcow2", data_disk.size_gb
            )
        else:
            size = f"{data_disk.size_gb}G"
            command = ["qemu-img", "create", "-q", "-f", "qcow2", str(d / "data.qcow2"), size]
            await asyncio.to_thread(run_tool, command)
        record = DiskRecord(id=disk_id, vm_id=vm.id, backing=str(backing or ""))
        _write(record, d / "disk.json")

    def _argv(self, vm: VmInfo, rec: VmRecord, disk: DiskRecord, accel: list[str]) -> list[str]:
        state, d = self.vm_dir(vm.id), self.disk_dir(rec.disk_id)
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in vm.name)
        argv = [qemu.QEMU, "-name", f"arm-{name}", "-machine", "q35", *accel]
        argv += ["-m", str(self.memory_mb), "-smp", str(self.cpus)]
        argv += ["-nodefaults", "-display", "none", "-vga", "none"]
        argv += qemu.firmware_args(disk.generation, state)
        data = [self.disk_dir(disk_id) / "data.qcow2" for disk_id in rec.data_disk_ids]
        argv += qemu.disk_args(d / "os.qcow2", data)
        if (d / "seed.iso").exists():
            argv += ["-drive", f"file={d / 'seed.iso'},if=virtio,format=raw,readonly=on"]
        forwards = "".join(f",hostfwd=tcp:{a}:{SSH_PORT}-:22" for a in rec.addresses)
        argv += ["-netdev", f"user,id=net0{forwards}"]
        argv += [*qemu.NIC_ARGS, "-device", "virtio-rng-pci"]
        argv += ["-serial", f"file:{state / qemu.SERIAL_LOG}"]
        argv += ["-qmp", f"unix:{state / qemu.QMP_SOCKET},server=on,wait=off"]
        argv += ["-pidfile", str(state / qemu.PIDFILE), "-daemonize"]
        return argv

    async def _boot(self, vm: VmInfo) -> None:
        rec = self._require_vm(vm)
        disk = self._disk(rec.disk_id)
        if disk is None:
            raise ArmError(404, "NotFound", f"The OS disk '{rec.disk_id}' has no content.")
        state = self.vm_dir(vm.id)
        if self.handle(vm.id) is None:
            (state / qemu.SERIAL_LOG).unlink(missing_ok=True)
            d = self.disk_dir(rec.disk_id)
            accel = await asyncio.to_thread(qemu.accelerator, self.cache_root, d / "os.qcow2")
            try:
                await asyncio.to_thread(run_tool, self._argv(vm, rec, disk, accel), timeout=120)
            except ToolError as exc:
                if "host forwarding" in str(exc) or "hostfwd" in str(exc):
                    raise ArmError(
                        409,
                        "AllocationFailed",
                        f"Port {SSH_PORT} of {', '.join(rec.addresses)} is taken on the host: "
                        f"{exc}",
                    ) from None
                raise
        handle = self.handle(vm.id)
        if handle is None:
            raise ArmError(
                500, "InternalExecutionError", f"QEMU for VM {vm.name} exited right away."
            )
        if rec.addresses:
            await self._wait_for_ssh(vm, rec.addresses[0], handle)

    async def _wait_for_ssh(self, vm: VmInfo, address: str, handle: qemu.VmHandle) -> None:
        """Until sshd greets on address:22 (cloud-init has run its network stage by then)."""
        began = time.monotonic()
        deadline = began + self.boot_timeout
        while time.monotonic() < deadline:
            if not qemu.is_running(handle):
                raise ArmError(
                    500,
                    "VMStartTimedOut",
                    f"VM {vm.name} stopped while booting: {self.serial_log(vm.id)[-1500:]}",
                )
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(address, SSH_PORT), 5
                )
                try:
                    banner = await asyncio.wait_for(reader.readline(), 10)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                if banner.startswith(b"SSH-"):
                    log.info("VM %s answers SSH after %.1fs", vm.name, time.monotonic() - began)
                    return
            await asyncio.sleep(1.0)
        raise ArmError(
            409,
            "OSProvisioningTimedOut",
            f"OS Provisioning for VM '{vm.name}' did not finish in the allotted time "
            f"({self.boot_timeout:.0f}s): no SSH answer on {address}:{SSH_PORT}.",
        )

    async def _shutdown(self, vm: VmInfo) -> None:
        handle = self.handle(vm.id)
        if handle is not None:
            clean = await qemu.powerdown(handle, self.shutdown_timeout)
            if not clean:
                log.warning("VM %s was killed after %ss", vm.name, self.shutdown_timeout)


def windows_marketplace() -> list[MarketplaceImage]:
    """The Windows Server entries of the default catalogue (their VMs are WinRM guests)."""
    return [m for m in DEFAULT_MARKETPLACE if m.os_type == "Windows"]


class QemuWindowsVmBackend(QemuVmBackend):
    """QEMU for Linux VMs; Windows VMs are WinRM guests (fakes.arm.winrm_guest).

    Still a QemuVmBackend (qemu_pids, handle, serial_log, vm_dir... work as before), with
    `windows` (the WindowsGuestBackend routing by os_type) and `guest(vm_id)`.
    """

    def __init__(self, work_dir: Path, cache_root: Path | None = None, **kwargs: Any) -> None:
        super().__init__(work_dir, cache_root, **kwargs)
        # the inner backend is this object's QEMU half, so Linux calls do not loop back here
        self.windows = WindowsGuestBackend(super(), self.work_dir / "windows")

    def guest(self, vm_id: str) -> FakeWindowsGuest:
        return self.windows.guest(vm_id)

    def attach(self, emulator: Any) -> None:
        self.windows.attach(emulator)

    async def detach(self) -> None:
        await self.windows.detach()

    async def create(self, vm: VmInfo) -> None:
        await self.windows.create(vm)

    async def start(self, vm: VmInfo) -> None:
        await self.windows.start(vm)

    async def power_off(self, vm: VmInfo) -> None:
        await self.windows.power_off(vm)

    async def deallocate(self, vm: VmInfo) -> None:
        await self.windows.deallocate(vm)

    async def generalize(self, vm: VmInfo) -> None:
        await self.windows.generalize(vm)

    async def delete(self, vm: VmInfo) -> None:
        await self.windows.delete(vm)

    async def capture(self, source_id: str, target_id: str) -> None:
        await self.windows.capture(source_id, target_id)

    async def discard(self, target_id: str) -> None:
        await self.windows.discard(target_id)

    async def delete_disk(self, disk_id: str) -> None:
        await self.windows.delete_disk(disk_id)

    async def disk_vhd(self, disk_id: str) -> Path:
        return await self.windows.disk_vhd(disk_id)
