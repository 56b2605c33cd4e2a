"""Platform images for the local provider, built offline from Debian packages.

No cloud image can be downloaded here, so Debian 11, 12 and 13 are assembled with
mmdebstrap and named like Azure's marketplace images (Debian / debian-12 / 12 or 12-gen2 /
0.YYYYMMDD.N), so templates written for Azure resolve unchanged. Each image is a real
disk, as Debian's own cloud images are: GPT with a BIOS boot partition (Gen1 SKUs boot
through SeaBIOS) and an EFI system partition (Gen2 SKUs boot through OVMF), GRUB from
Debian's packages, the console on tty0 and ttyS0, cloud-init with the NoCloud and Azure
datasources, and the Azure Linux agent, so the same disk boots anywhere by firmware alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kiln.providers.local import gptdisk
from kiln.providers.local.disks import ToolError, run_tool, sha256_file, virtual_size
from kiln.versions import version_key

log = logging.getLogger(__name__)

PUBLISHER = "Debian"
RELEASES = {"11": "bullseye", "12": "bookworm", "13": "trixie"}
DEFAULT_RELEASE = "12"
DISK_SIZE = 4 << 30
MANIFEST = "manifest.json"
# A new cache key for GPT disks: "images/" holds the old whole-disk ext4 images, which
# boot only with their kernel beside them.
IMAGES_DIR = "disk-images"
ROOT_LABEL = "rootfs"
# The consoles Azure's serial console and Debian's cloud images use.
KERNEL_ARGS = "console=tty0 console=ttyS0,115200n8 earlyprintk=ttyS0,115200"
# The host's own Debian sources (its mirror or proxy), with the suites renamed for the
# release built; without them mmdebstrap uses Debian's default mirror.
HOST_DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
HOST_OS_RELEASE = Path("/etc/os-release")
PACKAGES = [
    "openssh-server",
    "systemd-sysv",
    "udev",
    "dbus",
    "sudo",
    "iproute2",
    "cloud-init",
    "cloud-guest-utils",  # growpart: cloud-init grows the root partition into a bigger disk
    "fdisk",  # sfdisk, which growpart uses on GPT
    "ca-certificates",
    "e2fsprogs",  # resize2fs for cloud-init's resizefs, fsck for the root file system
    "grub-pc-bin",  # GRUB for BIOS (Gen1) ...
    "grub-efi-amd64-bin",  # ... and for UEFI (Gen2): the binaries, no grub-install hook
    "grub2-common",  # update-grub, should an image's owner want it
    "waagent",  # the Azure Linux agent; runs only on Hyper-V (see FILES)
]
# The cloud kernel, with the Hyper-V drivers Azure needs (see _kernel_package).
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
_KERNEL_DEPENDENCY = re.compile(r"\blinux-image-[0-9][\w.+~-]*-cloud-amd64\b")
# Debian's default mirror, where the host has no deb822 Debian sources of its own.
DEFAULT_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: {codename} {codename}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {codename}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# networkd alone leaves /etc/resolv.conf without name servers; before Debian 12 resolved
# is part of systemd.
RESOLVED_PACKAGE = {"bookworm": "systemd-resolved", "trixie": "systemd-resolved"}
# Units that only cost boot time on a short-lived build VM (or its image), where present.
DISABLED_UNITS = [
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "remote-fs.target",
]
# A small initrd unpacks much faster under TCG than MODULES=most; gzip because zstd is
# only a recommended package. virtio for QEMU, Hyper-V's storage and network and NVMe
# for Azure.
INITRAMFS_MODULES = [
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "hv_vmbus",
    "hv_storvsc",
    "hv_netvsc",
    "nvme",
    "sd_mod",
    "ext4",
]
INITRAMFS_FILES = {
    "etc/initramfs-tools/conf.d/kiln.conf": "MODULES=list\nCOMPRESS=gzip\n",
    "usr/share/initramfs-tools/modules.d/kiln": "".join(f"{m}\n" for m in INITRAMFS_MODULES),
}
FILES = {
    "etc/hostname": "localhost\n",
    # Already what the seed's `ssh_pwauth: false` writes here, so sshd is not restarted.
    "etc/ssh/sshd_config.d/50-cloud-init.conf": "PasswordAuthentication no\n",
    # QEMU names its NICs en*, Hyper-V's synthetic NIC is eth0; Azure's accelerated
    # networking VFs are bonded to it by the kernel and must not get their own DHCP.
    "etc/systemd/network/50-kiln-dhcp.network": (
        "[Match]\nName=en* eth*\nDriver=!mlx4_core mlx4_en mlx5_core mana\n\n"
        "[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\nLinkLocalAddressing=no\n"
    ),
    "etc/cloud/cloud.cfg.d/91-kiln.cfg": (
        "# A NoCloud seed (Kiln's build VMs), Azure, or nothing: no other cloud is probed.\n"
        "datasource_list: [ NoCloud, Azure, None ]\n"
        "# The image's own systemd-networkd file configures DHCP.\n"
        "network: {config: disabled}\n"
        "# C.UTF-8 is built into glibc and needs no locale-gen (/etc/default/locale); the\n"
        "# locale module would only rewrite it (seconds of each first boot under TCG).\n"
        "locale: false\n"
        "# GRUB is installed by the image build, not by grub-pc's debconf questions.\n"
        "grub_dpkg: {enabled: false}\n"
    ),
    "etc/default/locale": "LANG=C.UTF-8\n",
    # The agent does Azure's extensions and reporting; cloud-init provisions.
    "etc/systemd/system/walinuxagent.service.d/50-kiln.conf": (
        "[Unit]\n# Azure's agent has nothing to talk to outside Hyper-V.\n"
        "ConditionVirtualization=microsoft\n"
    ),
    "etc/default/grub.d/50-kiln.cfg": (
        "# update-grub keeps what the image was built with.\n"
        "GRUB_TIMEOUT=0\n"
        f'GRUB_CMDLINE_LINUX="{KERNEL_ARGS}"\n'
        'GRUB_CMDLINE_LINUX_DEFAULT=""\n'
        'GRUB_TERMINAL="console serial"\n'
        'GRUB_SERIAL_COMMAND="serial --speed=115200"\n'
    ),
}
# Azure's guide for images provisioned by cloud-init.
WAAGENT_SETTINGS = {
    "Provisioning.Agent": "cloud-init",
    "ResourceDisk.Format": "n",
    "ResourceDisk.EnableSwap": "n",
}
GRUB_PLATFORMS = {"bios": "i386-pc", "uefi": "x86_64-efi"}
# What grub-install embeds: enough to find the root file system; the rest is loaded from
# /boot/grub/<platform>/ there.
GRUB_EMBEDDED = {
    "i386-pc": ["biosdisk", "part_gpt", "ext2", "search"],
    "x86_64-efi": ["part_gpt", "ext2", "search"],
}
_VERSION = re.compile(r"^0\.(\d{8})\.(\d+)$")
_GRUB_CFG = """\
set default=0
set timeout=0
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
menuentry 'Debian GNU/Linux' {{
    insmod gzio
    insmod part_gpt
    insmod ext2
    search --no-floppy --fs-uuid --set=root {uuid}
    linux /vmlinuz root=UUID={uuid} ro {args}
    initrd /initrd.img
}}
"""
# Embedded in GRUB's core image: the root file system holds /boot/grub.
_GRUB_EARLY_CFG = "search --no-floppy --fs-uuid --set=root {uuid}\nset prefix=($root)/boot/grub\n"


class ImageNotFound(LookupError):
    """No cached platform image matches the requested reference."""


class BaseImage(BaseModel):
    """A cached platform image; manifest.json in its directory holds this model."""

    publisher: str
    offer: str
    skus: list[str]
    version: str
    disk: str = "disk.qcow2"
    root_uuid: str
    disk_sha256: str
    disk_virtual_size: int
    created: datetime
    recipe: str = ""  # recipe_digest() of the build; empty before images recorded it
    directory: Path = Field(default=Path(), exclude=True)

    @property
    def disk_path(self) -> Path:
        return self.directory / self.disk


def generation(sku: str) -> Literal["V1", "V2"]:
    """Azure's naming: a -gen2 SKU boots by UEFI (V2), the others by BIOS (V1)."""
    return "V2" if sku.lower().endswith("-gen2") else "V1"


def skus(release: str) -> list[str]:
    return [release, f"{release}-gen2"]


def offer(release: str) -> str:
    return f"debian-{release}"


def release_of(publisher: str, offer_name: str, sku: str) -> str | None:
    """The Debian release ("12") a marketplace reference names, if Kiln builds it."""
    if publisher.lower() != PUBLISHER.lower():
        return None
    release = offer_name.lower().removeprefix("debian-")
    if release not in RELEASES or sku.lower() not in skus(release):
        return None
    return release


def default_cache_root() -> Path:
    """${KILN_CACHE:-~/.cache/kiln}."""
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def _offer_dir(cache_root: Path, publisher: str, offer_name: str) -> Path:
    return cache_root / IMAGES_DIR / publisher / offer_name


def _load(directory: Path) -> BaseImage | None:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None
    image = BaseImage.model_validate_json(manifest.read_text())
    return image.model_copy(update={"directory": directory})


def list_images(cache_root: Path, publisher: str, offer_name: str, sku: str) -> list[BaseImage]:
    """Complete cached images for publisher/offer/sku (case-insensitive), oldest first."""
    images_root = cache_root / IMAGES_DIR
    if not images_root.is_dir():
        return []
    found = []
    for pub in images_root.iterdir():
        if pub.name.lower() != publisher.lower() or not pub.is_dir():
            continue
        for off in pub.iterdir():
            if off.name.lower() != offer_name.lower() or not off.is_dir():
                continue
            images = (_load(d) for d in off.iterdir() if not d.name.startswith("."))
            found += [i for i in images if i and sku.lower() in (s.lower() for s in i.skus)]
    return sorted(found, key=lambda i: version_key(i.version))


def resolve(cache_root: Path, publisher: str, offer_name: str, sku: str, version: str) -> BaseImage:
    """Find the cached image for a marketplace reference; `latest` means the newest."""
    images = list_images(cache_root, publisher, offer_name, sku)
    if version.lower() == "latest" and images:
        return images[-1]
    for image in images:
        if image.version == version:
            return image
    available = ", ".join(i.version for i in images) or "none"
    releases = ", ".join(f"{PUBLISHER}:{offer(r)}:{'|'.join(skus(r))}" for r in RELEASES)
    raise ImageNotFound(
        f"no cached image {publisher}:{offer_name}:{sku}:{version} under "
        f"{cache_root / IMAGES_DIR} (available versions: {available}); Kiln builds "
        f"{releases} (`kiln images ensure --release N`)"
    )


@contextlib.contextmanager
def _build_lock(cache_root: Path) -> Iterator[None]:
    """One image build at a time per cache, across processes."""
    lock_path = cache_root / IMAGES_DIR / ".build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def recipe_digest(release: str) -> str:
    """What an image of release is made of: a change to the recipe makes a new image."""
    recipe = {
        "codename": RELEASES.get(release),
        "packages": PACKAGES,
        "resolved": RESOLVED_PACKAGE,
        "kernel": KERNEL_METAPACKAGE,
        "disabled_units": DISABLED_UNITS,
        "initramfs": INITRAMFS_FILES,
        "files": FILES,
        "waagent": WAAGENT_SETTINGS,
        "grub": [GRUB_EMBEDDED, _GRUB_CFG, _GRUB_EARLY_CFG, KERNEL_ARGS],
        "disk_size": DISK_SIZE,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def current_images(images: list[BaseImage], release: str) -> list[BaseImage]:
    """The images made by today's recipe of release, oldest first."""
    return [i for i in images if i.recipe == recipe_digest(release)]


def ensure_image(release: str = DEFAULT_RELEASE, cache_root: Path | None = None) -> BaseImage:
    """The newest cached image of a Debian release made by today's recipe, built first if
    there is none (images of older recipes stay resolvable by their version)."""
    root = cache_root or default_cache_root()
    with _build_lock(root):
        current = current_images(list_images(root, PUBLISHER, offer(release), release), release)
        return current[-1] if current else _build(root, release)


def build_image(release: str = DEFAULT_RELEASE, cache_root: Path | None = None) -> BaseImage:
    """Build a new image version of a Debian release into the cache (a few minutes)."""
    root = cache_root or default_cache_root()
    with _build_lock(root):
        return _build(root, release)


def _build(cache_root: Path, release: str) -> BaseImage:
    """Build in a hidden temp dir, then rename it to its version: never a half image."""
    if release not in RELEASES:
        raise ImageNotFound(f"Debian {release} is not one of {', '.join(RELEASES)}")
    if os.geteuid() != 0:
        raise PermissionError("building a base image needs root (mmdebstrap --mode=root)")
    offer_dir = _offer_dir(cache_root, PUBLISHER, offer(release))
    offer_dir.mkdir(parents=True, exist_ok=True)
    for stale in offer_dir.glob(".build-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=offer_dir))
    try:
        scratch = work / "scratch"  # everything but the disk and its manifest
        rootfs = scratch / "rootfs"
        scratch.mkdir()
        layout = gptdisk.hybrid_layout(DISK_SIZE)
        root_uuid, esp_id = str(uuid.uuid4()), secrets.token_hex(4).upper()
        _bootstrap(RELEASES[release], rootfs, scratch)
        _customize(rootfs, root_uuid, f"{esp_id[:4]}-{esp_id[4:]}")
        grub = _grub_images(rootfs, scratch, root_uuid)
        _make_disk(rootfs, scratch, layout, root_uuid, esp_id, grub)
        os.rename(scratch / "disk.qcow2", work / "disk.qcow2")
        shutil.rmtree(scratch)
        return _publish(work, offer_dir, release, root_uuid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def debian_sources(host_sources: str, host_codename: str, codename: str) -> str:
    """The host's deb822 Debian sources with its release's suites renamed to codename
    (bookworm-security becomes trixie-security): the same mirror for every release."""
    suite = re.compile(rf"(?<![\w-]){re.escape(host_codename)}(?=-|\s|$)")
    lines = []
    for line in host_sources.splitlines():
        if line.lower().startswith("suites:"):
            key, _, value = line.partition(":")
            line = f"{key}:{suite.sub(codename, value)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _host_codename() -> str:
    for line in HOST_OS_RELEASE.read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise ToolError(f"{HOST_OS_RELEASE} names no VERSION_CODENAME")


def _sources(codename: str, work: Path) -> Path:
    """The deb822 sources every build of codename uses: the host's mirror, else Debian's."""
    if HOST_DEBIAN_SOURCES.is_file():
        text = debian_sources(HOST_DEBIAN_SOURCES.read_text(), _host_codename(), codename)
    else:
        text = DEFAULT_SOURCES.format(codename=codename)
    sources = work / "debian.sources"
    sources.write_text(text)
    return sources


def _kernel_package(sources: Path, work: Path) -> str:
    """The cloud kernel metapackage, or the versioned kernel it depends on where the mirror
    does not serve the metapackage itself (bullseye-security's has answered 404 while its
    kernel was there): asked of the mirror with apt, in a scratch directory."""
    state = work / "apt"
    (state / "lists/partial").mkdir(parents=True)
    (state / "cache/archives/partial").mkdir(parents=True)
    (state / "parts").mkdir()
    shutil.copy(sources, state / "parts" / sources.name)
    options = {
        "Dir::Etc::SourceList": "/dev/null",
        "Dir::Etc::SourceParts": state / "parts",
        "Dir::State::Lists": state / "lists",
        "Dir::Cache": state / "cache",
        "Dir::State::status": "/dev/null",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root",
        "APT::Architecture": "amd64",
    }
    apt = [f"-o{key}={value}" for key, value in options.items()]
    try:
        run_tool(["apt-get", *apt, "-q", "update"], timeout=600)
        try:
            download = f'cd "$0" && apt-get "$@" download {KERNEL_METAPACKAGE}'
            run_tool(["sh", "-c", download, state, *apt, "-q"], timeout=300)
            return KERNEL_METAPACKAGE
        except ToolError as error:
            show = run_tool(["apt-cache", *apt, "show", "--no-all-versions", KERNEL_METAPACKAGE])
            if not (kernel := kernel_dependency(show)):
                raise
            log.warning(
                "%s did not download (%s); installing %s", KERNEL_METAPACKAGE, error, kernel
            )
            return kernel
    finally:
        shutil.rmtree(state)


def kernel_dependency(apt_cache_show: str) -> str | None:
    """The versioned kernel the metapackage's `apt-cache show` record depends on."""
    for line in apt_cache_show.splitlines():
        if line.startswith("Depends:") and (kernel := _KERNEL_DEPENDENCY.search(line)):
            return kernel[0]
    return None


def _bootstrap(codename: str, rootfs: Path, work: Path) -> None:
    """mmdebstrap the root file system; the initramfs config must exist before the kernel."""
    overlay = work / "initramfs"  # files merged into the root before the kernel is installed
    for rel, text in INITRAMFS_FILES.items():
        (overlay / rel).parent.mkdir(parents=True, exist_ok=True)
        (overlay / rel).write_text(text)
    hook = f'cp -a {shlex.quote(str(overlay))}/. "$1/"'
    sources = _sources(codename, work)
    packages = [_kernel_package(sources, work), *PACKAGES]
    packages += [RESOLVED_PACKAGE[codename]] if codename in RESOLVED_PACKAGE else []
    argv = ["mmdebstrap", "--variant=apt", "--mode=root", "--format=directory"]
    argv += [f"--include={','.join(packages)}", f"--essential-hook={hook}"]
    run_tool([*argv, codename, rootfs, sources], timeout=1800)
    shutil.rmtree(overlay)


def _unit_exists(rootfs: Path, unit: str) -> bool:
    """Before Debian 12 /lib is not always merged into /usr/lib."""
    return any(
        (rootfs / d / unit).exists() for d in ("lib/systemd/system", "usr/lib/systemd/system")
    )


def _customize(rootfs: Path, root_uuid: str, esp_uuid: str) -> None:
    """Boot loader, network, cloud-init, Azure's agent, and no per-machine identity."""
    for link in ("vmlinuz", "initrd.img"):  # what grub.cfg boots; kernel upgrades move them
        if not (rootfs / link).exists():
            raise ToolError(f"the kernel package left no /{link} in the image (kernel-img.conf)")
    files = {
        **FILES,
        "etc/fstab": (
            f"UUID={root_uuid} / ext4 rw,discard,errors=remount-ro 0 1\n"
            f"UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 0\n"
        ),
        "boot/grub/grub.cfg": _GRUB_CFG.format(uuid=root_uuid, args=KERNEL_ARGS),
    }
    for rel, text in files.items():
        target = rootfs / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (rootfs / "boot/efi").mkdir(exist_ok=True)
    for platform in GRUB_PLATFORMS.values():  # what grub-install copies next to grub.cfg
        modules = rootfs / "usr/lib/grub" / platform
        (rootfs / "boot/grub" / platform).mkdir(exist_ok=True)
        for module in [*modules.glob("*.mod"), *modules.glob("*.lst")]:
            shutil.copy2(module, rootfs / "boot/grub" / platform / module.name)
    _configure_waagent(rootfs / "etc/waagent.conf")
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each VM gets its own host key from its seed
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    resolv = rootfs / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    run_tool(["systemctl", f"--root={rootfs}", "enable", "systemd-networkd", "systemd-resolved"])
    disabled = [u for u in DISABLED_UNITS if _unit_exists(rootfs, u)]
    run_tool(["systemctl", f"--root={rootfs}", "disable", *disabled])


def _configure_waagent(conf: Path) -> None:
    """Set WAAGENT_SETTINGS in waagent.conf, in place of the package's own values."""
    lines = [
        line
        for line in conf.read_text().splitlines()
        if line.split("=", 1)[0].strip() not in WAAGENT_SETTINGS
    ]
    lines += [f"{key}={value}" for key, value in WAAGENT_SETTINGS.items()]
    conf.write_text("\n".join(lines) + "\n")


class GrubImages(BaseModel):
    """GRUB's boot code for both firmwares, made by the image's own grub-mkimage."""

    boot_img: bytes  # the MBR boot code (BIOS)
    core_img: bytes  # for the BIOS boot partition
    efi: Path  # EFI/BOOT/BOOTX64.EFI


def _grub_images(rootfs: Path, work: Path, root_uuid: str) -> GrubImages:
    early = rootfs / "tmp/kiln-grub-early.cfg"
    early.write_text(_GRUB_EARLY_CFG.format(uuid=root_uuid))
    outputs = {}
    for platform in GRUB_PLATFORMS.values():
        out, modules = f"/tmp/kiln-grub-{platform}.img", GRUB_EMBEDDED[platform]
        mkimage = ["chroot", rootfs, "grub-mkimage", "-O", platform, "-o", out]
        run_tool([*mkimage, "-p", "/boot/grub", "-c", "/tmp/kiln-grub-early.cfg", *modules])
        outputs[platform] = work / Path(out).name
        shutil.move(rootfs / out.lstrip("/"), outputs[platform])
    early.unlink()
    return GrubImages(
        boot_img=(rootfs / "usr/lib/grub/i386-pc/boot.img").read_bytes(),
        core_img=outputs["i386-pc"].read_bytes(),
        efi=outputs["x86_64-efi"],
    )


def _make_disk(
    rootfs: Path,
    work: Path,
    layout: gptdisk.DiskLayout,
    root_uuid: str,
    esp_id: str,
    grub: GrubImages,
) -> None:
    """The GPT disk in a sparse raw file (no mounts), converted to qcow2."""
    raw = work / "disk.raw"
    gptdisk.create(raw, layout)
    gptdisk.write_ext4(raw, layout.root, rootfs, fs_uuid=root_uuid, label=ROOT_LABEL)
    gptdisk.write_fat(raw, layout.esp, {"EFI/BOOT/BOOTX64.EFI": grub.efi}, volume_id=esp_id)
    gptdisk.install_bios_boot(raw, layout, grub.boot_img, grub.core_img)
    run_tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, work / "disk.qcow2"])
    raw.unlink()


def _next_version(offer_dir: Path, now: datetime) -> str:
    day = now.strftime("%Y%m%d")
    taken = [m for d in offer_dir.iterdir() if (m := _VERSION.match(d.name)) and m[1] == day]
    return f"0.{day}.{max((int(m[2]) for m in taken), default=0) + 1}"


def _publish(work: Path, offer_dir: Path, release: str, root_uuid: str) -> BaseImage:
    """Write the manifest last, then rename the directory to its version atomically."""
    now = datetime.now(UTC)
    version = _next_version(offer_dir, now)
    disk = work / "disk.qcow2"
    image = BaseImage(
        publisher=PUBLISHER,
        offer=offer(release),
        skus=skus(release),
        version=version,
        root_uuid=root_uuid,
        disk_sha256=sha256_file(disk),
        disk_virtual_size=virtual_size(disk, "qcow2"),
        created=now,
        recipe=recipe_digest(release),
    )
    (work / MANIFEST).write_text(image.model_dump_json(indent=2))
    work.chmod(0o755)
    os.sync()  # contents durable before the rename makes the image visible
    final = offer_dir / version
    os.rename(work, final)
    return image.model_copy(update={"directory": final})
