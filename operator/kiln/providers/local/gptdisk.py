"""GPT disks that boot by firmware alone, assembled in a plain file without any mount.

The layout is Debian's cloud images': partition 14 is a BIOS boot partition holding GRUB's
core image (SeaBIOS, Azure Gen1), 15 the EFI system partition with GRUB at the removable
media path (OVMF, Azure Gen2), 1 the root file system, last on the disk so that
cloud-init's growpart can grow it into a larger OS disk. mke2fs and mkfs.fat write their
file systems at the partitions' offsets, mtools copies files into the FAT, and the MBR
boot code is GRUB's boot.img patched the way grub-bios-setup patches it.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

from pydantic import BaseModel, Field

from kiln.providers.local.disks import MIB, run_tool

SECTOR = 512
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
BIOS_BOOT_MIB = (1, 3)  # start, size: sectors 2048-8191 as in Debian's images
ESP_MIB = (4, 124)
ROOT_START_MIB = 128
GPT_BACKUP_MIB = 1  # the backup GPT lives in the last MiB, outside every partition
ROOT_PARTITION, BIOS_PARTITION, ESP_PARTITION = 1, 14, 15

# grub-core/boot/i386/pc/boot.S and util/setup.c (GRUB 2.06): where grub-bios-setup
# writes into boot.img and into the first sector (diskboot.img) of core.img.
BOOT_BPB = slice(0x03, 0x5A)  # a file system's BPB: kept from the disk
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
BOOT_DRIVE_CHECK = 0x66
BOOT_NT_MAGIC = 0x1B8  # disk signature and partition table: kept from the disk
BOOT_SIGNATURE = b"\x55\xaa"
CORE_BLOCKLIST = struct.Struct("<QHH")  # start sector, sector count, load segment
CORE_LOAD_SEGMENT = 0x820  # GRUB_BOOT_I386_PC_KERNEL_SEG + one sector


class GptError(ValueError):
    """A layout that cannot hold what it must, or boot code that does not fit."""


class Partition(BaseModel):
    """One GPT entry, in bytes (Kiln's boundaries are whole MiB; growpart's need not be)."""

    number: int = Field(ge=1, le=128)
    name: str
    type_guid: str
    start: int = Field(ge=0)
    size: int = Field(gt=0)
    uuid: str = Field(default_factory=lambda: str(uuid.uuid4()).upper())

    @property
    def end(self) -> int:
        return self.start + self.size


class DiskLayout(BaseModel):
    """A whole disk: its size and its partitions, root first (it is partition 1)."""

    size: int
    disk_guid: str = Field(default_factory=lambda: str(uuid.uuid4()).upper())
    partitions: list[Partition]

    def partition(self, number: int) -> Partition:
        return next(p for p in self.partitions if p.number == number)

    @property
    def root(self) -> Partition:
        return self.partition(ROOT_PARTITION)

    @property
    def esp(self) -> Partition:
        return self.partition(ESP_PARTITION)

    @property
    def bios_boot(self) -> Partition:
        return self.partition(BIOS_PARTITION)


def hybrid_layout(disk_size: int) -> DiskLayout:
    """BIOS boot + ESP + root filling the disk up to the backup GPT's MiB."""
    if disk_size % MIB:
        raise GptError(f"disk size {disk_size} is not a whole number of MiB")
    root_size = disk_size - (ROOT_START_MIB + GPT_BACKUP_MIB) * MIB
    if root_size < 64 * MIB:
        raise GptError(f"a {disk_size / MIB:g} MiB disk leaves no room for a root partition")
    entries = {  # number: name, type, start, size
        ROOT_PARTITION: ("root", LINUX_ROOT_X86_64_TYPE, ROOT_START_MIB * MIB, root_size),
        BIOS_PARTITION: ("bios", BIOS_BOOT_TYPE, BIOS_BOOT_MIB[0] * MIB, BIOS_BOOT_MIB[1] * MIB),
        ESP_PARTITION: ("esp", ESP_TYPE, ESP_MIB[0] * MIB, ESP_MIB[1] * MIB),
    }
    return DiskLayout(
        size=disk_size,
        partitions=[
            Partition(number=number, name=name, type_guid=type_guid, start=start, size=size)
            for number, (name, type_guid, start, size) in entries.items()
        ],
    )


def sfdisk_script(layout: DiskLayout) -> str:
    """The layout in sfdisk's input format (sectors)."""
    lines = ["label: gpt", f"label-id: {layout.disk_guid}", "unit: sectors", ""]
    for p in layout.partitions:
        lines.append(
            f"{p.number} : start={p.start // SECTOR}, size={p.size // SECTOR}, "
            f'type={p.type_guid}, uuid={p.uuid}, name="{p.name}"'
        )
    return "\n".join(lines) + "\n"


def create(raw: Path, layout: DiskLayout) -> None:
    """A sparse file of the layout's size with its protective MBR and GPT (both copies)."""
    with open(raw, "wb") as fh:
        fh.truncate(layout.size)
    script = raw.with_name(raw.name + ".sfdisk")
    script.write_text(sfdisk_script(layout))
    try:
        run_tool(["sh", "-c", 'sfdisk -q --no-reread --no-tell-kernel "$0" < "$1"', raw, script])
    finally:
        script.unlink()


def read_partitions(raw: Path) -> DiskLayout:
    """The partition table as sfdisk reads it back (what firmware and the kernel see)."""
    table = json.loads(run_tool(["sfdisk", "--json", raw]))["partitiontable"]
    if table.get("label") != "gpt":
        raise GptError(f"{raw} has no GPT (label {table.get('label')!r})")
    parts = []
    for entry in table["partitions"]:
        number = int(entry["node"].removeprefix(str(raw)))
        parts.append(
            Partition(
                number=number,
                name=entry.get("name", ""),
                type_guid=entry["type"],
                start=entry["start"] * SECTOR,
                size=entry["size"] * SECTOR,
                uuid=entry["uuid"],
            )
        )
    return DiskLayout(size=raw.stat().st_size, disk_guid=table["id"], partitions=parts)


def write_ext4(raw: Path, part: Partition, source_dir: Path, *, fs_uuid: str, label: str) -> None:
    """ext4 filling the partition, populated from source_dir (mke2fs -d at an offset)."""
    opts = f"offset={part.start},nodiscard,root_owner=0:0"
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-U", fs_uuid, "-E", opts]
    run_tool([*argv, "-d", source_dir, raw, f"{part.size // 1024}k"], timeout=1800)


def write_fat(raw: Path, part: Partition, files: dict[str, Path], *, volume_id: str) -> None:
    """FAT32 filling the partition with files at the given paths (`EFI/BOOT/BOOTX64.EFI`).

    One sector per cluster, or a small ESP has too few clusters for FAT32 (mkfs.fat sizes
    clusters for the whole file, not the partition)."""
    first, sectors = part.start // SECTOR, part.size // SECTOR
    mkfs = ["mkfs.fat", "-F", "32", "-s", "1", "-n", "EFI", "-i", volume_id.replace("-", "")]
    run_tool([*mkfs, "-h", str(first), "--offset", str(first), raw, str(sectors // 2)])
    image = f"{raw}@@{part.start}"
    made: set[str] = set()
    for dest, src in sorted(files.items()):
        parents = Path(dest).parents
        for folder in reversed([str(p) for p in parents if str(p) != "."]):
            if folder not in made:
                run_tool(["mmd", "-i", image, f"::/{folder}"])
                made.add(folder)
        run_tool(["mcopy", "-i", image, src, f"::/{dest}"])


def install_bios_boot(raw: Path, layout: DiskLayout, boot_img: bytes, core_img: bytes) -> None:
    """GRUB for BIOS: core.img in the BIOS boot partition, boot.img as the MBR's code.

    What grub-bios-setup does for a GPT disk: boot.img learns the sector core.img starts
    at, the BIOS's drive number is trusted, the disk's partition table is kept; the
    blocklist at the end of core.img's first sector loads the rest of it.
    """
    part = layout.bios_boot
    if len(boot_img) != SECTOR or boot_img[-2:] != BOOT_SIGNATURE:
        raise GptError(f"boot.img must be one {SECTOR}-byte boot sector")
    padded = core_img + b"\0" * (-len(core_img) % SECTOR)
    if len(padded) > part.size:
        raise GptError(f"core.img ({len(core_img)} bytes) does not fit in {part.size} bytes")
    first = part.start // SECTOR
    core = bytearray(padded)
    tail = SECTOR - CORE_BLOCKLIST.size
    if CORE_BLOCKLIST.unpack_from(core, tail)[2] != CORE_LOAD_SEGMENT:
        raise GptError("core.img does not start with GRUB's diskboot blocklist")
    CORE_BLOCKLIST.pack_into(core, tail, first + 1, len(padded) // SECTOR - 1, CORE_LOAD_SEGMENT)
    with open(raw, "r+b") as fh:
        mbr = bytearray(fh.read(SECTOR))
        code = bytearray(boot_img)
        code[BOOT_BPB] = mbr[BOOT_BPB]
        code[BOOT_NT_MAGIC:] = mbr[BOOT_NT_MAGIC:]
        struct.pack_into("<Q", code, BOOT_KERNEL_SECTOR, first)
        code[BOOT_DRIVE] = 0xFF
        code[BOOT_DRIVE_CHECK : BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
        fh.seek(0)
        fh.write(code)
        fh.seek(part.start)
        fh.write(core)
        fh.flush()
        os.fsync(fh.fileno())
