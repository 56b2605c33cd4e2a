"""Capture formats on real (small) disks made by qemu-img."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pytest

from kiln.providers.local import disks
from kiln.providers.local.disks import MIB, VhdError

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-utils")


def _raw(path: Path, size: int, pattern: bytes = b"kiln") -> Path:
    """A raw disk with a recognizable pattern at the start."""
    disks.run_tool(["qemu-img", "create", "-q", "-f", "raw", path, str(size)])
    with open(path, "r+b") as fh:
        fh.write(pattern * 1024)
    return path


def _rewrite_footer(path: Path, offset: int, fmt: str, value: object, fix_sum: bool) -> None:
    """Change one footer field, optionally recomputing the checksum."""
    with open(path, "r+b") as fh:
        fh.seek(-512, 2)
        footer = bytearray(fh.read(512))
        struct.pack_into(fmt, footer, offset, value)
        if fix_sum:
            footer[64:68] = b"\0\0\0\0"
            struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
        fh.seek(-512, 2)
        fh.write(footer)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, 0), (1, MIB), (MIB, MIB), (MIB + 1, 2 * MIB), (3 * MIB - 512, 3 * MIB)],
)
def test_round_up_mib(size: int, expected: int) -> None:
    assert disks.round_up_mib(size) == expected


def test_fixed_vhd_is_rounded_up_and_valid(tmp_path: Path) -> None:
    src = _raw(tmp_path / "src.raw", 3 * MIB + 512)
    vhd = tmp_path / "out.vhd"
    disks.to_fixed_vhd(src, vhd)

    footer = disks.check_fixed_vhd(vhd)
    assert footer.cookie == b"conectix"
    assert footer.disk_type == 2
    assert footer.current_size == 4 * MIB == vhd.stat().st_size - 512
    assert footer.checksum_valid
    assert disks.virtual_size(vhd, "vpc") == 4 * MIB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.vhd", "src.raw"]
    with open(vhd, "rb") as fh:
        assert fh.read(4) == b"kiln"


def test_fixed_vhd_from_qcow2_keeps_whole_mib_size(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    disks.to_qcow2(_raw(tmp_path / "a.raw", 2 * MIB), src)
    disks.to_fixed_vhd(src, tmp_path / "out.vhd")
    assert disks.check_fixed_vhd(tmp_path / "out.vhd").current_size == 2 * MIB


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "fix_sum", "problem"),
    [
        (0, ">8s", b"notavhd!", True, "cookie"),
        (60, ">I", 3, True, "disk type is 3"),
        (48, ">Q", 2 * MIB, True, "current size"),
        (48, ">Q", 4 * MIB + 512, True, "whole number of MiB"),
        (24, ">I", 12345, False, "checksum"),
    ],
)
def test_corrupted_vhd_is_rejected(
    tmp_path: Path, offset: int, fmt: str, value: object, fix_sum: bool, problem: str
) -> None:
    vhd = tmp_path / "bad.vhd"
    disks.to_fixed_vhd(_raw(tmp_path / "src.raw", 4 * MIB), vhd)
    _rewrite_footer(vhd, offset, fmt, value, fix_sum)
    with pytest.raises(VhdError, match=problem):
        disks.check_fixed_vhd(vhd)


def test_dynamic_vhd_is_not_fixed(tmp_path: Path) -> None:
    vhd = tmp_path / "dyn.vhd"
    disks.run_tool(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "4M"])
    assert disks.read_vhd_footer(vhd).disk_type == 3
    with pytest.raises(VhdError, match="expected 2"):
        disks.check_fixed_vhd(vhd)


def test_truncated_file_is_rejected(tmp_path: Path) -> None:
    stub = tmp_path / "stub.vhd"
    stub.write_bytes(b"conectix")
    with pytest.raises(VhdError, match="shorter than a VHD footer"):
        disks.read_vhd_footer(stub)


def test_qcow2_capture_flattens_the_backing_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    disks.to_qcow2(_raw(tmp_path / "base.raw", 8 * MIB), base)
    overlay = tmp_path / "overlay.qcow2"
    backing = ["-b", str(base), "-F", "qcow2"]
    disks.run_tool(["qemu-img", "create", "-q", "-f", "qcow2", *backing, overlay])

    for compressed in (False, True):
        out = tmp_path / f"out-{compressed}.qcow2"
        disks.to_qcow2(overlay, out, compressed=compressed)
        info = disks.image_info(out)
        assert info["format"] == "qcow2"
        assert "backing-filename" not in info
        disks.run_tool(["qemu-img", "compare", "-q", base, out])


def test_failed_capture_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(disks.ToolError):
        disks.to_fixed_vhd(tmp_path / "missing.qcow2", tmp_path / "out.vhd")
    with pytest.raises(disks.ToolError):
        disks.to_qcow2(tmp_path / "missing.qcow2", tmp_path / "out.qcow2")
    assert list(tmp_path.iterdir()) == []


def test_sha256_file(tmp_path: Path) -> None:
    data = b"x" * (5 * MIB + 3)
    (tmp_path / "f").write_bytes(data)
    assert disks.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def _sparse_disk(path: Path, size: int) -> bytes:
    """A sparse file with data at the start, in the middle and at the end; its bytes."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset in (0, size // 2, size - 4096):
            fh.seek(offset)
            fh.write(b"kiln" * 1024)
    return path.read_bytes()


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_sha256_of_a_sparse_file_counts_its_holes_as_zeros(tmp_path: Path) -> None:
    data = _sparse_disk(tmp_path / "sparse", 64 * MIB + 4096)
    assert disks.sha256_file(tmp_path / "sparse") == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert disks.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_sparse_copy_keeps_holes_and_returns_the_copy_checksum(tmp_path: Path) -> None:
    data = _sparse_disk(tmp_path / "src", 64 * MIB)
    digest = disks.copy_sparse(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()
    assert _allocated(tmp_path / "dst") < 4 * MIB  # 64 MiB long, a few KiB written


def test_fixed_vhd_is_written_sparse_in_one_pass(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    disks.to_qcow2(_raw(tmp_path / "a.raw", 64 * MIB + 512), src)
    vhd = tmp_path / "out.vhd"
    disks.to_fixed_vhd(src, vhd)
    assert disks.check_fixed_vhd(vhd).current_size == 65 * MIB
    assert _allocated(vhd) < 4 * MIB
    disks.run_tool(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "vpc", src, vhd])


def test_capture_writes_both_formats_and_checksums_the_qcow2(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    disks.to_qcow2(_raw(tmp_path / "a.raw", 8 * MIB), src)
    qcow2, vhd = tmp_path / "disk.qcow2", tmp_path / "disk.vhd"
    digest = disks.capture_disk(src, qcow2, vhd)
    assert digest == hashlib.sha256(qcow2.read_bytes()).hexdigest()
    disks.check_fixed_vhd(vhd)
    assert disks.capture_disk(src, qcow2, None) == digest  # a resumed capture
