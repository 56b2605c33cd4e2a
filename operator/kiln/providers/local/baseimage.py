"""Platform images for the local provider, built offline from Debian packages.

No cloud image can be downloaded here, so Debian 12 is assembled with mmdebstrap and
named like Azure's marketplace image (Debian / debian-12 / 12 or 12-gen2 / 0.YYYYMMDD.N),
so templates written for Azure resolve unchanged. The disk is a whole-disk ext4 file
system without a bootloader; VMs boot it with the kernel and initrd kept beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from kiln.providers.local.disks import run_tool, sha256_file, virtual_size
from kiln.versions import version_key

PUBLISHER = "Debian"
OFFER = "debian-12"
SKUS = ["12", "12-gen2"]
CMDLINE = "root=/dev/vda rw console=ttyS0"
DISK_SIZE = "4G"
MANIFEST = "manifest.json"
# The host's own Debian sources (its mirror or proxy); without them mmdebstrap uses
# Debian's default mirror with the updates and security suites.
HOST_DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
PACKAGES = [
    "linux-image-cloud-amd64",
    "openssh-server",
    "systemd-sysv",
    "udev",
    "dbus",
    "sudo",
    "iproute2",
    "cloud-init",
    "ca-certificates",
    "e2fsprogs",  # resize2fs for cloud-init's resizefs, fsck for the root file system
    "systemd-resolved",  # networkd alone leaves /etc/resolv.conf without name servers
]
# Units that only cost boot time on a short-lived build VM (or its image).
DISABLED_UNITS = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "remote-fs.target",
]
# A small initrd unpacks much faster under TCG than MODULES=most; gzip because zstd is
# only a recommended package.
INITRAMFS_FILES = {
    "etc/initramfs-tools/conf.d/kiln.conf": "MODULES=list\nCOMPRESS=gzip\n",
    "usr/share/initramfs-tools/modules.d/kiln": "virtio_pci\nvirtio_blk\nvirtio_scsi\n",
}
FILES = {
    "etc/fstab": "LABEL=rootfs / ext4 rw,discard,errors=remount-ro 0 1\n",
    "etc/hostname": "localhost\n",
    # Already what the seed's `ssh_pwauth: false` writes here, so sshd is not restarted.
    "etc/ssh/sshd_config.d/50-cloud-init.conf": "PasswordAuthentication no\n",
    "etc/systemd/network/50-kiln-dhcp.network": (
        "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\nLinkLocalAddressing=no\n"
    ),
    "etc/cloud/cloud.cfg.d/91-kiln.cfg": (
        "# Only a NoCloud seed (or nothing): never probe other clouds and wait.\n"
        "datasource_list: [ NoCloud, None ]\n"
        "# The image's own systemd-networkd file configures DHCP.\n"
        "network: {config: disabled}\n"
        "# No locales package: C.UTF-8 is built into glibc, other locales would fail.\n"
        "locale: C.UTF-8\n"
    ),
}
_VERSION = re.compile(r"^0\.(\d{8})\.(\d+)$")


class ImageNotFound(LookupError):
    """No cached platform image matches the requested reference."""


class BaseImage(BaseModel):
    """A cached platform image; manifest.json in its directory holds this model."""

    publisher: str
    offer: str
    skus: list[str]
    version: str
    disk: str = "disk.qcow2"
    kernel: str = "vmlinuz"
    initrd: str = "initrd.img"
    cmdline: str = CMDLINE
    disk_sha256: str
    disk_virtual_size: int
    created: datetime
    directory: Path = Field(default=Path(), exclude=True)

    @property
    def disk_path(self) -> Path:
        return self.directory / self.disk

    @property
    def kernel_path(self) -> Path:
        return self.directory / self.kernel

    @property
    def initrd_path(self) -> Path:
        return self.directory / self.initrd


def default_cache_root() -> Path:
    """${KILN_CACHE:-~/.cache/kiln}."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def _offer_dir(cache_root: Path, publisher: str, offer: str) -> Path:
    return cache_root / "images" / publisher / offer


def _load(directory: Path) -> BaseImage | None:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    image = BaseImage.model_validate_json(manifest.read_text())
    return image.model_copy(update={"directory": directory})


def list_images(cache_root: Path, publisher: str, offer: str, sku: str) -> list[BaseImage]:
    """Complete cached images for publisher/offer/sku (case-insensitive), oldest first."""
    images_root = cache_root / "images"
    if not images_root.is_dir():
        return []
    found = []
    for pub in images_root.iterdir():
        if pub.name.lower() != publisher.lower() or not pub.is_dir():
            continue
        for off in pub.iterdir():
            if off.name.lower() != offer.lower() or not off.is_dir():
                continue
            images = (_load(d) for d in off.iterdir() if not d.name.startswith("."))
            found += [i for i in images if i and sku.lower() in (s.lower() for s in i.skus)]
    return sorted(found, key=lambda i: version_key(i.version))


def resolve(cache_root: Path, publisher: str, offer: str, sku: str, version: str) -> BaseImage:
    """Find the cached image for a marketplace reference; `latest` means the newest."""
    images = list_images(cache_root, publisher, offer, sku)
    if version.lower() == "latest" and images:
        return images[-1]
    for image in images:
        if image.version == version:
            return image
    available = ", ".join(i.version for i in images) or "none"
    raise ImageNotFound(
        f"no cached image {publisher}:{offer}:{sku}:{version} under {cache_root}/images "
        f"(available versions: {available}); build one with ensure_debian12()"
    )


@contextlib.contextmanager
def _build_lock(cache_root: Path) -> Iterator[None]:
    """One image build at a time per cache, across processes."""
    lock_path = cache_root / "images" / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_debian12(cache_root: Path | None = None) -> BaseImage:
    """The newest cached Debian 12 image, built first if there is none."""
    root = cache_root or default_cache_root()
    with _build_lock(root):
        images = list_images(root, PUBLISHER, OFFER, SKUS[0])
        return images[-1] if images else _build(root)


def build_debian12(cache_root: Path | None = None) -> BaseImage:
    """Build a new Debian 12 image version into the cache (about a minute with a fast mirror)."""
    root = cache_root or default_cache_root()
    with _build_lock(root):
        return _build(root)


def _build(cache_root: Path) -> BaseImage:
    """Build in a hidden temp dir, then rename it to its version: never a half image."""
    if os.geteuid() != 0:
        raise PermissionError("building a base image needs root (mmdebstrap --mode=root)")
    offer_dir = _offer_dir(cache_root, PUBLISHER, OFFER)
    offer_dir.mkdir(parents=True, exist_ok=True)
    for stale in offer_dir.glob(".build-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=offer_dir))
    try:
        rootfs = work / "rootfs"
        _bootstrap(rootfs, work)
        _customize(rootfs)
        _copy_boot_files(rootfs, work)
        _make_disk(rootfs, work)
        shutil.rmtree(rootfs)
        return _publish(work, offer_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bootstrap(rootfs: Path, work: Path) -> None:
    """mmdebstrap the root file system; the initramfs config must exist before the kernel."""
    overlay = work / "initramfs"  # files merged into the root before the kernel is installed
    for rel, text in INITRAMFS_FILES.items():
        (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
        (overlay / rel).write_text(text)
    hook = f'cp -a {shlex.quote(str(overlay))}/. "$1/"'
    argv = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory"]
    argv += [f"--include={','.join(PACKAGES)}", f"--essential-hook={hook}"]
    mirrors = [HOST_DEBIAN_SOURCES] if HOST_DEBIAN_SOURCES.is_file() else []
    run_tool([*argv, "bookworm", rootfs, *mirrors], timeout=1800)
    shutil.rmtree(overlay)


def _customize(rootfs: Path) -> None:
    """Network, cloud-init, boot-time trimming, and no per-machine identity in the image."""
    for rel, text in FILES.items():
        target = rootfs / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each VM gets its own host key from its seed
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    run_tool(["systemctl", f"--root={rootfs}", "enable", "systemd-networkd", "systemd-resolved"])
    run_tool(["systemctl", f"--root={rootfs}", "disable", *DISABLED_UNITS])


def _copy_boot_files(rootfs: Path, work: Path) -> None:
    """Keep the kernel and initrd beside the disk: there is no bootloader."""
    (kernel,) = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrd = kernel.with_name(kernel.name.replace("vmlinuz", "initrd.img"))
    shutil.copyfile(kernel, work / "vmlinuz")
    shutil.copyfile(initrd, work / "initrd.img")


def _make_disk(rootfs: Path, work: Path) -> None:
    """Whole-disk ext4 made from the directory (no mounts needed), converted to qcow2."""
    raw = work / "disk.raw"
    run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "rootfs", "-d", rootfs, raw, DISK_SIZE])
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / "disk.qcow2"])
    raw.unlink()


def _next_version(offer_dir: Path, now: datetime) -> str:
    day = now.strftime("%Y%m%d")
    taken = [m for d in offer_dir.iterdir() if (m := _VERSION.match(d.name)) and m[1] == day]
    return f"0.{day}.{max((int(m[2]) for m in taken), default=0) + 1}"


def _publish(work: Path, offer_dir: Path) -> BaseImage:
    """Write the manifest last, then rename the directory to its version atomically."""
    now = datetime.now(UTC)
    version = _next_version(offer_dir, now)
    disk = work / "disk.qcow2"
    image = BaseImage(
        publisher=PUBLISHER,
        offer=OFFER,
        skus=SKUS,
        version=version,
        disk_sha256=sha256_file(disk),
        disk_virtual_size=virtual_size(disk, "qcow2"),
        created=now,
    )
    (work / MANIFEST).write_text(image.model_dump_json(indent=2))
    work.chmod(0o755)
    os.sync()  # contents durable before the rename makes the image visible
    final = offer_dir / version
    os.rename(work, final)
    return image.model_copy(update={"directory": final})
