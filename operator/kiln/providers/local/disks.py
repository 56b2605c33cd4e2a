"""Disk files for the local provider: host tool runs, captures to qcow2 and Azure fixed VHD.

Every output is written under a temporary name and renamed into place, so a crash never
leaves a truncated artifact that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

MIB = 1024 * 1024
VHD_FOOTER_SIZE = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")


class ToolError(RuntimeError):
    """A host tool (qemu-img, mke2fs, ...) failed; the message carries its stderr."""


class VhdError(ValueError):
    """A file is not the fixed VHD Azure accepts."""


def run_tool(argv: Sequence[str | os.PathLike[str]], *, timeout: float | None = None) -> str:
    """Run a host tool and return its stdout; raise ToolError with its stderr on failure."""
    args = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]} is not installed on this host") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ToolError(f"{' '.join(args[:3])} ... exited {proc.returncode}: {detail}")
    return proc.stdout


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Yield a temporary sibling of dst; rename it to dst only if the block succeeds."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """qemu-img info as a dict (format, virtual-size, backing file...)."""
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    return json.loads(run_tool([*argv, path]))


def image_format(path: Path) -> str:
    """The format qemu-img detects, but vpc for a fixed VHD (which qemu-img calls raw:
    read as raw, its footer would be a last sector of the disk)."""
    detected = str(image_info(path)["format"])
    if detected == "raw" and path.stat().st_size >= VHD_FOOTER_SIZE:
        with contextlib.suppress(VhdError):
            check_fixed_vhd(path)
            return "vpc"
    return detected


def virtual_size(path: Path, fmt: str | None = None) -> int:
    """The disk size a VM sees, in bytes."""
    return int(image_info(path, fmt)["virtual-size"])


def round_up_mib(size: int) -> int:
    """Azure needs VHD sizes that are whole MiB."""
    return -(-size // MIB) * MIB


def to_qcow2(src: Path, dst: Path, *, compressed: bool = False) -> None:
    """Write a standalone qcow2 (backing chain flattened) of src."""
    argv = ["qemu-img", "convert", "-f", image_format(src), "-O", "qcow2"]
    if compressed:
        argv.append("-c")
    with atomic_output(dst) as tmp:
        run_tool([*argv, src, tmp])


def to_fixed_vhd(src: Path, dst: Path) -> None:
    """Write the fixed VHD Azure accepts: raw, grown to whole MiB, then vpc fixed."""
    raw = dst.with_name(f".{dst.name}.raw-{os.getpid()}")
    try:
        run_tool(["qemu-img", "convert", "-f", image_format(src), "-O", "raw", src, raw])
        size = virtual_size(raw, "raw")
        if size % MIB:
            run_tool(["qemu-img", "resize", "-f", "raw", raw, str(round_up_mib(size))])
        with atomic_output(dst) as tmp:
            fixed = ["-O", "vpc", "-o", "subformat=fixed,force_size"]
            run_tool(["qemu-img", "convert", "-f", "raw", *fixed, raw, tmp])
            check_fixed_vhd(tmp)
    finally:
        raw.unlink(missing_ok=True)


class VhdFooter(BaseModel):
    """The 512-byte VHD footer (big-endian), as the VHD specification lays it out."""

    cookie: bytes
    features: int
    format_version: int
    data_offset: int
    timestamp: int
    creator_application: bytes
    creator_version: int
    creator_host_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors_per_track: int
    disk_type: int
    checksum: int
    unique_id: bytes
    saved_state: int
    checksum_valid: bool


def _footer_checksum(raw: bytes) -> int:
    """Ones' complement of the byte sum with the checksum field (64..67) zeroed."""
    return ~sum(raw[:64] + b"\0\0\0\0" + raw[68:]) & 0xFFFFFFFF


def read_vhd_footer(path: Path) -> VhdFooter:
    """Parse the footer at the end of a VHD file."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < VHD_FOOTER_SIZE:
            raise VhdError(f"{path} is shorter than a VHD footer ({fh.tell()} bytes)")
        fh.seek(-VHD_FOOTER_SIZE, os.SEEK_END)
        raw = fh.read(VHD_FOOTER_SIZE)
    fields = _FOOTER.unpack_from(raw)
    names = [n for n in VhdFooter.model_fields if n != "checksum_valid"]
    footer = dict(zip(names, fields, strict=True))
    return VhdFooter(**footer, checksum_valid=_footer_checksum(raw) == footer["checksum"])


def check_fixed_vhd(path: Path) -> VhdFooter:
    """Return the footer if path is a fixed VHD Azure accepts, else raise VhdError."""
    footer = read_vhd_footer(path)
    data_size = path.stat().st_size - VHD_FOOTER_SIZE
    problems = []
    if footer.cookie != VHD_COOKIE:
        problems.append(f"cookie is {footer.cookie!r}, expected {VHD_COOKIE!r}")
    if footer.disk_type != VHD_FIXED:
        problems.append(f"disk type is {footer.disk_type}, expected {VHD_FIXED} (fixed)")
    if footer.current_size != data_size:
        problems.append(f"current size {footer.current_size} != file size - 512 ({data_size})")
    if footer.current_size % MIB:
        problems.append(f"size {footer.current_size} is not a whole number of MiB")
    if not footer.checksum_valid:
        problems.append("footer checksum does not match")
    if problems:
        raise VhdError(f"{path} is not a valid fixed VHD: " + "; ".join(problems))
    return footer


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (disks are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()
