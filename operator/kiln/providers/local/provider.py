"""The local provider: build VMs are QEMU processes, images go to a directory gallery.

Everything a run makes lives in two places: its run directory in the template's staging
directory (logs, the captured image, default VHD outputs) and a short VM directory
(pid file, QMP socket, overlay, seed), short because unix socket paths are.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from kiln.api.distribution import PlannedTarget, TargetKind
from kiln.api.run import BootFiles, CapturedDataDisk, LocalVm
from kiln.api.status import RunOutput
from kiln.api.template import (
    ImageTemplateSpec,
    ManagedImageSource,
    PlatformImageSource,
    SharedImageVersionSource,
    VhdDistributor,
)
from kiln.api.tenancy import Refused
from kiln.api.vmsizes import VmShape, capped, unknown_size_message, vm_shape
from kiln.communicators.ssh import SshCommunicator
from kiln.distribution import existing_version_message
from kiln.naming import staging_group_name
from kiln.providers.base import Endpoint, Owners, ProviderError, RunContext, TemplateIdentity
from kiln.providers.local import baseimage, qemu
from kiln.providers.local.disks import (
    ToolError,
    VhdError,
    capture_disk,
    check_fixed_vhd,
    copy_sparse,
    sha256_file,
)
from kiln.providers.local.gallery import (
    GalleryError,
    ImageManifest,
    LocalGallery,
    VersionExists,
)
from kiln.providers.local.seed import SeedConfig, write_seed_iso
from kiln.settings import OperatorSettings

BUILD_USER = "packer"
OWNER_MARKER = ".kiln-template"
IMAGE_DIR = "image"
DATA_DISK_DIR = "data-disks"  # the build VM's data disks, while it runs
DISK = "disk.qcow2"
STOP_GRACE_SECONDS = 180
T = TypeVar("T")


class LocalProvider:
    name = "local"

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.gallery = LocalGallery(settings.gallery)

    # --- staging ---------------------------------------------------------------------------

    def staging_id(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        if spec.staging_resource_group:
            name = spec.staging_resource_group.rstrip("/").rsplit("/", 1)[-1]
        else:
            name = staging_group_name(spec.resource_group or "local", template.name, template.uid)
        return str(self.settings.staging_root / name)

    def run_dir(self, template: TemplateIdentity, spec: ImageTemplateSpec, run: str) -> Path:
        return Path(self.staging_id(template, spec)) / run

    async def ensure_staging(self, ctx: RunContext) -> str:
        staging = Path(self.staging_id(ctx.template, ctx.spec))
        marker = staging / OWNER_MARKER
        if staging.is_dir() and not marker.is_file() and any(staging.iterdir()):
            raise ProviderError(
                f"staging directory {staging} is not empty and not Kiln's; "
                "spec.stagingResourceGroup must name an empty or new group"
            )
        if marker.is_file() and marker.read_text().strip() != ctx.template.uid:
            raise ProviderError(
                f"staging directory {staging} belongs to another template; "
                "give this template its own spec.stagingResourceGroup"
            )
        staging.mkdir(parents=True, exist_ok=True)
        marker.write_text(ctx.template.uid)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        return str(staging)

    async def delete_staging(
        self,
        template: TemplateIdentity,
        staging: str,
        *,
        keep_group: bool,
        service_account: str | None = None,
    ) -> None:
        directory = Path(staging)
        marker = directory / OWNER_MARKER
        if not marker.is_file() or marker.read_text().strip() != template.uid:
            return  # never delete what Kiln did not make
        if not keep_group:
            await asyncio.to_thread(shutil.rmtree, directory)
            return
        for child in directory.iterdir():
            if child.name == OWNER_MARKER:
                continue
            if child.is_dir():
                await asyncio.to_thread(shutil.rmtree, child)
            else:
                child.unlink()
        marker.unlink()

    # --- source ------------------------------------------------------------------------------

    async def resolve_source(self, ctx: RunContext) -> str:
        source = ctx.spec.source
        try:
            if isinstance(source, PlatformImageSource):
                image = await asyncio.to_thread(self._platform_image, source)
                disk, generation = image.disk_path, baseimage.generation(source.sku)
                exact = ":".join((source.publisher, source.offer, source.sku, image.version))
            elif isinstance(source, ManagedImageSource):
                directory = self.gallery.resolve_managed_image(source.image_id)
                disk, generation = self._gallery_disk(directory)
                exact = source.image_id
            else:
                exact, directory = self.gallery.resolve_version(source.image_version_id)
                disk, generation = self._gallery_disk(directory)
        except (baseimage.ImageNotFound, GalleryError) as error:
            raise ProviderError(str(error)) from error
        ctx.checkpoint.local.source = BootFiles(disk=str(disk), hyper_v_generation=generation)
        ctx.checkpoint.source_version = exact.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
        return exact

    def _platform_image(self, source: PlatformImageSource) -> baseimage.BaseImage:
        """Debian images Kiln builds itself are built on first use of `latest`."""
        cache = self.settings.cache_root
        release = baseimage.release_of(source.publisher, source.offer, source.sku)
        if release and source.version.lower() == "latest":
            baseimage.ensure_image(release, cache)
        return baseimage.resolve(cache, source.publisher, source.offer, source.sku, source.version)

    def _gallery_disk(self, directory: Path) -> tuple[Path, str]:
        """The disk of a gallery artifact and the firmware generation it was built for."""
        return directory / DISK, self.gallery.manifest(directory).hyper_v_generation

    async def latest_source_version(self, spec: ImageTemplateSpec, namespace: str) -> str | None:
        source = spec.source
        try:
            if isinstance(source, PlatformImageSource):
                images = baseimage.list_images(
                    self.settings.cache_root, source.publisher, source.offer, source.sku
                )
                return images[-1].version if images else None
            if isinstance(source, SharedImageVersionSource):
                return self.gallery.resolve_version(source.image_version_id)[0]
        except GalleryError:
            return None
        return None

    # --- build VM ----------------------------------------------------------------------------

    def vm_dir(self, ctx: RunContext) -> Path:
        return self.settings.data_root / "vm" / ctx.run_uid

    async def create_vm(self, ctx: RunContext) -> Endpoint:
        directory = self.vm_dir(ctx)
        handle = qemu.find(directory)
        if handle is None:
            if lost := await self.vm_lost(ctx):
                raise ProviderError(lost)
            handle = await _uninterrupted(asyncio.to_thread(self._start_vm, ctx, directory))
            ctx.checkpoint.local.vm_started = True
        ctx.checkpoint.local.vm = LocalVm(pid=handle.pid, ssh_port=handle.ssh_port)
        return Endpoint(host="127.0.0.1", port=handle.ssh_port, user=BUILD_USER)

    def _start_vm(self, ctx: RunContext, directory: Path) -> qemu.VmHandle:
        directory.mkdir(parents=True, exist_ok=True)
        source = ctx.checkpoint.local.source
        assert source is not None
        overlay, seed = directory / "os.qcow2", directory / "seed.iso"
        size = ctx.spec.vm_profile.os_disk_size_gb if ctx.spec.vm_profile else None
        try:
            if not overlay.exists():
                qemu.create_overlay(Path(source.disk), overlay, size or None)
        except ValueError as error:
            raise ProviderError(f"spec.vmProfile.osDiskSizeGB: {error}") from error
        if not seed.exists():
            write_seed_iso(
                SeedConfig(
                    instance_id=ctx.run_uid,
                    hostname="kiln-build",
                    user=BUILD_USER,
                    authorized_key=ctx.client_public_key,
                    host_private_key=ctx.host_private_key,
                    host_public_key=ctx.host_public_key,
                ),
                seed,
            )
        shape = self._shape(ctx)
        spec = qemu.VmSpec(
            name=f"kiln-{ctx.run_name}"[:60].rstrip("-."),
            state_dir=directory,
            disk=overlay,
            data_disks=self._data_disks(ctx),
            seed_iso=seed,
            generation=source.hyper_v_generation,
            memory_mb=shape.memory_mb,
            cpus=shape.cpus,
            accel=qemu.accelerator(self.settings.cache_root, Path(source.disk)),
        )
        return qemu.start(spec)

    def _shape(self, ctx: RunContext) -> VmShape:
        """vmProfile.vmSize's vCPUs and memory, capped by the host; unset: the operator's
        default. What the VM got is noted for the run's status."""
        size = ctx.spec.vm_profile.vm_size if ctx.spec.vm_profile else None
        if not size:
            return VmShape(
                cpus=qemu.VmSpec.model_fields["cpus"].default, memory_mb=self.settings.vm_memory_mb
            )
        shape = vm_shape(size)
        if shape is None:  # refused at apply time; a template from before the table grew
            raise ProviderError(f"spec.vmProfile.vmSize {unknown_size_message(self.name)}")
        got, ctx.checkpoint.vm_note = capped(size, shape, *_host_resources())
        return got

    @staticmethod
    def _data_disks(ctx: RunContext) -> list[Path]:
        """Empty qcow2 disks of additionalDataDisks, in the run's directory (LUN = index)."""
        directory = ctx.run_dir / DATA_DISK_DIR
        directory.mkdir(parents=True, exist_ok=True)
        disks = []
        for lun, disk in enumerate(ctx.spec.additional_data_disks or []):
            path = directory / f"lun{lun}.qcow2"
            if not path.exists():
                qemu.create_data_disk(path, disk.size_gb)
            disks.append(path)
        return disks

    async def collect_from_vm(self, ctx: RunContext, communicator: SshCommunicator) -> None:
        """The disk boots by firmware alone: nothing to fetch beside it."""

    async def vm_lost(self, ctx: RunContext) -> str | None:
        """The VM was started and its QEMU process is gone (killed, crashed, powered off)."""
        directory = self.vm_dir(ctx)
        if not ctx.checkpoint.local.vm_started or qemu.find(directory) is not None:
            return None
        return f"the build VM stopped unexpectedly; its serial log is {directory / qemu.SERIAL_LOG}"

    async def stop_vm(self, ctx: RunContext) -> bool:
        handle = qemu.find(self.vm_dir(ctx))
        if handle is None:
            return True
        if ctx.checkpoint.local.stop_requested_at is None:
            ctx.checkpoint.local.stop_requested_at = time.time()
        since = ctx.checkpoint.local.stop_requested_at
        if time.time() - since > STOP_GRACE_SECONDS:
            await qemu.powerdown(handle, timeout=60)
            return True
        return False

    def describe_vm(self, ctx: RunContext) -> str:
        handle = qemu.find(self.vm_dir(ctx))
        if handle is None:
            return "the build VM is not running"
        return (
            f"the build VM is kept running: ssh -p {handle.ssh_port} {BUILD_USER}@127.0.0.1 "
            f"with the key in the operator's Secret {ctx.key_secret} (ssh-privatekey); "
            f"serial log {handle.serial_log}; delete the run to remove it"
        )

    async def publish_logs(self, ctx: RunContext) -> None:
        """The log is written in the staging directory already."""

    async def storage_token(self, ctx: RunContext) -> str | None:
        """No Azure identity here: private blobs need the azure provider (or a SAS URL)."""
        return None

    async def close(self) -> None:
        """Nothing is held open between passes."""

    async def delete_vm(self, ctx: RunContext) -> None:
        """The build is over (captured, failed or canceled): a VM still running is killed,
        not shut down, so one that no longer answers goes as fast as one that does."""
        await asyncio.to_thread(remove_vm_dir, self.vm_dir(ctx))
        await asyncio.to_thread(shutil.rmtree, ctx.run_dir / IMAGE_DIR, True)
        await asyncio.to_thread(shutil.rmtree, ctx.run_dir / DATA_DISK_DIR, True)

    async def sweep(self, owners: Owners) -> list[str]:
        """VM state directories (named by run UID, the VM found by its pid file) that no
        run owns, listed before the owners are read."""
        root = self.settings.data_root / "vm"
        if not root.is_dir():
            return []
        candidates = [d for d in root.iterdir() if d.is_dir()]
        keep = await owners()
        orphans = [d for d in candidates if d.name not in keep]
        for directory in orphans:
            await asyncio.to_thread(remove_vm_dir, directory)
        return [str(d) for d in orphans]

    async def leftovers(self, ctx: RunContext) -> list[str]:
        directory = self.vm_dir(ctx)
        found = []
        if (handle := qemu.find(directory)) is not None:
            found.append(f"QEMU process {handle.pid}")
        if directory.exists():
            found.append(str(directory))
        return found

    # --- capture and distribution --------------------------------------------------------------

    async def capture(self, ctx: RunContext) -> None:
        try:
            await asyncio.to_thread(self._capture, ctx)
        except (ToolError, VhdError) as error:
            raise ProviderError(f"capturing the image failed: {error}") from error

    def _capture(self, ctx: RunContext) -> None:
        overlay = self.vm_dir(ctx) / "os.qcow2"
        image_dir = ctx.run_dir / IMAGE_DIR
        image_dir.mkdir(parents=True, exist_ok=True)  # the captured disks' directory
        wants_vhd = any(isinstance(d, VhdDistributor) for d in ctx.spec.distribute)
        vhd = image_dir / "disk.vhd" if wants_vhd else None
        ctx.checkpoint.local.disk_sha256 = capture_disk(overlay, image_dir / DISK, vhd)
        ctx.checkpoint.local.data_disks = [
            _capture_data_disk(lun, disk, image_dir)
            for lun, disk in enumerate(self._data_disks(ctx))
        ]

    async def gallery_versions(self, ctx: RunContext, target: PlannedTarget) -> list[str]:
        assert target.gallery_image_id is not None
        try:
            return await asyncio.to_thread(self.gallery.version_names, target.gallery_image_id)
        except GalleryError as error:
            raise ProviderError(str(error)) from error

    async def distribute(self, ctx: RunContext, target: PlannedTarget) -> RunOutput:
        """Local failures (a missing definition, a destination that cannot be written)
        do not go away by waiting: they fail the target."""
        try:
            return await asyncio.to_thread(self._distribute, ctx, target)
        except (GalleryError, OSError, ToolError, VhdError) as error:
            raise ProviderError(f"{target.path}: {error}") from error

    def _manifest(self, ctx: RunContext, target: PlannedTarget, **extra: object) -> ImageManifest:
        source = ctx.checkpoint.local.source
        assert source is not None  # resolved before anything is distributed
        return ImageManifest.model_validate(
            {
                "id": target.artifact_id,
                "location": target.location,
                "source": ctx.checkpoint.exact_source or "",
                "run": f"{ctx.namespace}/{ctx.run_name}",
                "disk_sha256": ctx.checkpoint.local.disk_sha256,
                "hyper_v_generation": source.hyper_v_generation,
                "data_disks": ctx.checkpoint.local.data_disks,
                "tags": target.tags,
                **extra,
            }
        )

    def _distribute(self, ctx: RunContext, target: PlannedTarget) -> RunOutput:
        image_dir = ctx.run_dir / IMAGE_DIR
        assert target.artifact_id is not None or target.type == TargetKind.VHD
        if target.type == TargetKind.ManagedImage:
            directory = self.gallery.managed_image_dir(target.artifact_id or "")
            self.gallery.publish(directory, image_dir, self._manifest(ctx, target), replace=True)
        elif target.type == TargetKind.SharedImage:
            assert target.gallery_image_id is not None and target.version is not None
            manifest = self._manifest(
                ctx,
                target,
                exclude_from_latest=target.exclude_from_latest,
                regions={r.name: r.replica_count for r in target.regions},
            )
            directory = self.gallery.definition_dir(target.gallery_image_id) / target.version
            try:
                self.gallery.publish(directory, image_dir, manifest, replace=False)
            except VersionExists:
                raise ProviderError(
                    existing_version_message(target), code="GalleryImageVersionExists"
                ) from None
        else:
            return self._distribute_vhd(ctx, target, image_dir)
        return _output(target.run_output_name, target.artifact_id or "", directory)

    def _distribute_vhd(self, ctx: RunContext, target: PlannedTarget, image_dir: Path) -> RunOutput:
        """The VHD is written again on a resumed pass (under a temporary name, then
        renamed): a file already there may be an earlier run's, never taken for this one."""
        if target.artifact_id:
            try:  # validated with the template; checked again as symlinks may have moved
                destination = self.settings.tenancy_policy.check_output_path(
                    target.artifact_id.removeprefix("file://")
                )
            except Refused as refusal:
                raise ProviderError(f"{target.path}.uri {target.artifact_id}: {refusal}") from None
        else:
            destination = ctx.run_dir / f"{target.run_output_name}.vhd"
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_name(f".{destination.name}.tmp")
        digest = copy_sparse(image_dir / "disk.vhd", tmp)
        check_fixed_vhd(tmp)
        tmp.rename(destination)
        checksum = destination.with_name(destination.name + ".sha256")
        checksum.write_text(f"{digest}  {destination.name}\n")
        return RunOutput(
            run_output_name=target.run_output_name,
            artifact_id=str(destination),
            artifact_uri=destination.as_uri(),
            provisioning_state="Succeeded",
        )


def _capture_data_disk(lun: int, disk: Path, image_dir: Path) -> CapturedDataDisk:
    """A data disk as a standalone qcow2 and a fixed VHD, each with its sha256."""
    qcow2, vhd = f"datadisk-{lun}.qcow2", f"datadisk-{lun}.vhd"
    qcow2_sha256 = capture_disk(disk, image_dir / qcow2, image_dir / vhd)
    return CapturedDataDisk(
        lun=lun,
        qcow2=qcow2,
        qcow2_sha256=qcow2_sha256,
        vhd=vhd,
        vhd_sha256=sha256_file(image_dir / vhd),
    )


def _host_resources() -> tuple[int, int]:
    """CPUs this process may use, and the host's memory in MiB."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return len(os.sched_getaffinity(0)), memory // (1024 * 1024)


def remove_vm_dir(directory: Path) -> None:
    """Kill the VM running from directory (if any), then remove the directory."""
    handle = qemu.find(directory)
    if handle is not None:
        qemu.kill(handle)
    shutil.rmtree(directory, ignore_errors=True)


async def _uninterrupted(work: Awaitable[T]) -> T:
    """Work in a thread that must not be abandoned half way (a VM being started): a
    cancel waits for it, so cleanup after the cancel finds and removes what it made."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


def _output(name: str, artifact_id: str, directory: Path) -> RunOutput:
    return RunOutput(
        run_output_name=name,
        artifact_id=artifact_id,
        artifact_uri=directory.as_uri(),
        provisioning_state="Succeeded",
    )
