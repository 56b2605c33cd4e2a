"""GPT disks assembled in a file: the hybrid layout, file systems at partition offsets,
GRUB's BIOS boot code, and the fixed VHD made of such a disk (real sfdisk, mke2fs,
mkfs.fat, mtools, debugfs and qemu-img on sparse files; no VM)."""

from __future__ import annotations

import itertools
import struct
import subprocess
from pathlib import Path

import pytest

from kiln.providers.local import gptdisk
from kiln.providers.local.disks import MIB, check_fixed_vhd, image_format, to_fixed_vhd
from kiln.providers.local.gptdisk import SECTOR, DiskLayout, GptError

DISK = 256 * MIB


@pytest.fixture
def layout() -> DiskLayout:
    return gptdisk.hybrid_layout(DISK)


@pytest.fixture
def disk(tmp_path: Path, layout: DiskLayout) -> Path:
    raw = tmp_path / "disk.raw"
    gptdisk.create(raw, layout)
    return raw


def _run(*argv: str | Path) -> str:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_hybrid_layout_is_debians(layout: DiskLayout) -> None:
    sectors = {p.number: (p.start // SECTOR, p.end // SECTOR - 1) for p in layout.partitions}
    assert sectors[14] == (2048, 8191)  # BIOS boot
    assert sectors[15] == (8192, 262143)  # EFI system partition
    assert sectors[1] == (262144, DISK // SECTOR - 2048 - 1)  # root, last, to the final MiB
    assert layout.bios_boot.type_guid == gptdisk.BIOS_BOOT_TYPE
    assert layout.esp.type_guid == gptdisk.ESP_TYPE
    spans = sorted((p.start, p.end) for p in layout.partitions)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert all(p.start % MIB == 0 and p.size % MIB == 0 for p in layout.partitions)


@pytest.mark.parametrize(
    ("size", "message"),
    [(DISK + 512, "not a whole number of MiB"), (160 * MIB, "no room for a root partition")],
)
def test_impossible_layouts_are_refused(size: int, message: str) -> None:
    with pytest.raises(GptError, match=message):
        gptdisk.hybrid_layout(size)


def test_partition_table_reads_back(disk: Path, layout: DiskLayout) -> None:
    assert disk.stat().st_size == DISK
    assert disk.stat().st_blocks * 512 < MIB  # sparse: only the tables are written
    assert gptdisk.read_partitions(disk) == layout
    assert "No errors detected" in _run("sfdisk", "--verify", disk)
    mbr = disk.read_bytes()[:SECTOR]
    assert mbr[0x1C2] == 0xEE and mbr[-2:] == b"\x55\xaa"  # the protective MBR


def test_root_file_system_at_its_partition(disk: Path, layout: DiskLayout, tmp_path: Path) -> None:
    source = tmp_path / "rootfs"
    (source / "etc").mkdir(parents=True)
    (source / "etc/hostname").write_text("kiln\n")
    fs_uuid = "d20ea56d-45a8-418e-891f-9cba6d6adedd"
    gptdisk.write_ext4(disk, layout.root, source, fs_uuid=fs_uuid, label="rootfs")
    part = tmp_path / "root.img"
    with open(disk, "rb") as src, open(part, "wb") as dst:
        src.seek(layout.root.start)
        dst.write(src.read(layout.root.size))
    assert _run("debugfs", "-R", "cat /etc/hostname", part) == "kiln\n"
    info = _run("dumpe2fs", "-h", part)
    assert f"Filesystem UUID:          {fs_uuid}" in info
    blocks = int(info.split("Block count:")[1].split()[0])
    block_size = int(info.split("Block size:")[1].split()[0])
    assert blocks * block_size == layout.root.size
    assert gptdisk.read_partitions(disk) == layout  # the backup GPT is intact


def test_esp_holds_the_boot_loader(disk: Path, layout: DiskLayout, tmp_path: Path) -> None:
    loader = tmp_path / "BOOTX64.EFI"
    loader.write_bytes(b"MZ pretend EFI binary")
    gptdisk.write_fat(disk, layout.esp, {"EFI/BOOT/BOOTX64.EFI": loader}, volume_id="1234-ABCD")
    image = f"{disk}@@{layout.esp.start}"
    content = subprocess.run(
        ["mtype", "-i", image, "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True, check=True
    ).stdout
    assert content == loader.read_bytes()
    assert "Volume Serial Number is 1234-ABCD" in _run("mdir", "-i", image, "::/")
    boot_sector = disk.read_bytes()[layout.esp.start : layout.esp.start + SECTOR]
    assert boot_sector[0x52:0x5A] == b"FAT32   "
    assert struct.unpack_from("<I", boot_sector, 0x1C)[0] == layout.esp.start // SECTOR


def _core_img(sectors: int) -> bytes:
    """A stand-in for GRUB's core.img: diskboot's default blocklist ends its first sector."""
    core = bytearray(b"\xcc" * (sectors * SECTOR - 100))
    core[SECTOR - 12 : SECTOR] = struct.pack("<QHH", 2, 0, gptdisk.CORE_LOAD_SEGMENT)
    return bytes(core)


BOOT_IMG = b"\xeb\x63\x90" + b"\xaa" * (SECTOR - 5) + b"\x55\xaa"


def test_bios_boot_code_points_at_core(disk: Path, layout: DiskLayout) -> None:
    table_before = disk.read_bytes()[gptdisk.BOOT_NT_MAGIC : SECTOR]
    core = _core_img(60)
    gptdisk.install_bios_boot(disk, layout, BOOT_IMG, core)
    data = disk.read_bytes()
    mbr = data[:SECTOR]
    assert struct.unpack_from("<Q", mbr, gptdisk.BOOT_KERNEL_SECTOR)[0] == 2048
    assert mbr[gptdisk.BOOT_DRIVE] == 0xFF
    assert mbr[gptdisk.BOOT_DRIVE_CHECK : gptdisk.BOOT_DRIVE_CHECK + 2] == b"\x90\x90"
    assert mbr[: gptdisk.BOOT_BPB.start] == BOOT_IMG[: gptdisk.BOOT_BPB.start]
    assert mbr[gptdisk.BOOT_NT_MAGIC :] == table_before  # the protective MBR is kept
    written = data[layout.bios_boot.start : layout.bios_boot.start + 60 * SECTOR]
    assert struct.unpack_from("<QHH", written, SECTOR - 12) == (2049, 59, 0x820)
    assert written[SECTOR:] == core[SECTOR:] + b"\0" * 100
    assert gptdisk.read_partitions(disk) == layout


@pytest.mark.parametrize(
    ("boot", "core", "message"),
    [
        (BOOT_IMG[:-2] + b"\0\0", _core_img(2), "one 512-byte boot sector"),
        (BOOT_IMG, _core_img(6145), "does not fit"),
        (BOOT_IMG, b"\0" * 2048, "diskboot blocklist"),
    ],
)
def test_bios_boot_code_that_cannot_boot_is_refused(
    disk: Path, layout: DiskLayout, boot: bytes, core: bytes, message: str
) -> None:
    before = disk.read_bytes()
    with pytest.raises(GptError, match=message):
        gptdisk.install_bios_boot(disk, layout, boot, core)
    assert disk.read_bytes() == before  # nothing written


def test_fixed_vhd_keeps_the_partition_table(
    disk: Path, layout: DiskLayout, tmp_path: Path
) -> None:
    vhd = tmp_path / "disk.vhd"
    to_fixed_vhd(disk, vhd)
    footer = check_fixed_vhd(vhd)
    assert footer.current_size == DISK == vhd.stat().st_size - 512
    assert image_format(vhd) == "vpc"  # read through its footer, never as raw
    back = tmp_path / "back.raw"
    _run("qemu-img", "convert", "-f", image_format(vhd), "-O", "raw", vhd, back)
    assert gptdisk.read_partitions(back).partitions == layout.partitions
