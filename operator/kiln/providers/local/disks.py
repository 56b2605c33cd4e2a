"""Disk files for the local provider: host tool runs, captures to qcow2 and Azure fixed VHD.

Every output is written under a temporary name and renamed into place, so a crash never
leaves a truncated artifact that looks complete. Captures run at the speed of the plain
qemu-img commands: one pass per output, sparse files stay sparse, and checksums are taken
while another output is written or while a file is copied, never in a pass of their own.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import PIPE
from typing import Any

from pydantic import BaseModel

MIB = 1024 * 1024
VHD_FOOTER_SIZE = 512
VHD_COOKIE = b"conectix"
VHD_FIXED = 2
_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")


class ToolError(RuntimeError):
    """A host tool (qemu-img, mke2fs, ...) failed; the message carries its stderr."""


TOOL_TIMEOUT = 1800.0  # a disk conversion of a large image on a busy host


class VhdError(ValueError):
    """A file is not the fixed VHD Azure accepts."""


# A host tool dies with the operator, even with one that is SIGKILLed: it leads a process
# group of its own under a small shell that setpriv gives a parent-death signal
# (PR_SET_PDEATHSIG, set in the child before anything runs; Python's preexec_fn is not safe
# in a threaded process). When the operator dies the kernel signals that shell, and the
# shell kills its whole group: the tool and whatever the tool started (mmdebstrap's apt
# and dpkg, an sh -c pipeline). A shell whose operator is gone by the time it starts runs
# nothing. QEMU build VMs are the exception (outlive_operator): they daemonize into a
# session of their own and outlive the operator on purpose, found again by pid file.
_DIE_WITH_OPERATOR = 'trap "kill -s KILL 0" TERM; [ "$PPID" = "$0" ] || exit 137; "$@" & wait $!'


def spawn(
    argv: Sequence[str | os.PathLike[str]], *, outlive_operator: bool = False, **popen: Any
) -> subprocess.Popen[Any]:
    """Start a host tool as the leader of its own process group (kill_group ends it and
    what it started); it dies with the operator unless outlive_operator."""
    args = [os.fspath(a) for a in argv]
    if shutil.which(args[0]) is None:
        raise ToolError(f"{args[0]} is not installed on this host")
    if not outlive_operator:
        guard = ["setpriv", "--pdeathsig", "TERM", "--", "sh", "-c", _DIE_WITH_OPERATOR]
        args = [*guard, str(os.getpid()), *args]
    try:
        return subprocess.Popen(args, process_group=0, stdin=subprocess.DEVNULL, **popen)
    except FileNotFoundError as exc:  # setpriv (util-linux) itself
        raise ToolError(f"{args[0]} is not installed on this host") from exc


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL a spawned tool and everything in its process group, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def run_tool(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = TOOL_TIMEOUT,
    outlive_operator: bool = False,
) -> str:
    """Run a host tool and return its stdout; raise ToolError with its stderr on failure.
    A tool that runs past its timeout is killed with all it started (every wait is
    bounded), and so is one whose operator dies (spawn)."""
    args = [os.fspath(a) for a in argv]
    proc = spawn(args, outlive_operator=outlive_operator, stdout=PIPE, stderr=PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise ToolError(f"{' '.join(args[:3])} ... was killed after {timeout:.0f}s") from None
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode != 0:
        detail = (stderr or stdout).strip()[-2000:]
        raise ToolError(f"{' '.join(args[:3])} ... exited {proc.returncode}: {detail}")
    return stdout


@contextlib.contextmanager
def atomic_output(dst: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of dst; rename it to dst only if the block succeeds.

    fsync=False for files qemu-img wrote: it flushes its output when it closes it.
    """
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if fsync:
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
    with atomic_output(dst, fsync=False) as tmp:
        run_tool([*argv, src, tmp])


def to_fixed_vhd(src: Path, dst: Path) -> None:
    """Write the fixed VHD Azure accepts in one pass: an empty (sparse) fixed VHD of the
    size rounded up to whole MiB, then the source converted into it, zeros skipped."""
    info = image_info(src)
    size = round_up_mib(int(info["virtual-size"]))
    with atomic_output(dst, fsync=False) as tmp:
        fixed = ["-f", "vpc", "-o", "subformat=fixed,force_size"]
        run_tool(["qemu-img", "create", "-q", *fixed, tmp, str(size)])
        into = ["-n", "--target-is-zero", "-f", str(info["format"]), "-O", "vpc"]
        run_tool(["qemu-img", "convert", *into, src, tmp])
        check_fixed_vhd(tmp)


def capture_disk(src: Path, qcow2: Path, vhd: Path | None) -> str:
    """The captured image: a standalone qcow2, optionally a fixed VHD; returns the qcow2's
    sha256, read while the VHD is being written (the two passes overlap)."""
    if not qcow2.exists():
        to_qcow2(src, qcow2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, qcow2)
        if vhd is not None and not vhd.exists():
            to_fixed_vhd(src, vhd)
        if vhd is not None:
            check_fixed_vhd(vhd)
        return digest.result()


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


_CHUNK = 4 * MIB
_ZEROS = memoryview(bytes(_CHUNK))


def _extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_data) runs covering the file, from SEEK_DATA/SEEK_HOLE; a file
    system without them reports one data run."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole is left
                data = size
            elif error.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                data = offset
            else:
                raise
        if data > offset:
            yield offset, data - offset, False
        if data >= size:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, hole - data, True
        offset = hole


def _hash_zeros(digest: Any, length: int) -> None:
    while length > 0:
        step = min(length, _CHUNK)
        digest.update(_ZEROS[:step])
        length -= step


def _hash_sparse(path: Path, digest: Any) -> Iterator[tuple[int, memoryview]]:
    """Feed every byte of the file to digest (holes as zeros, without reading them) and
    yield the data read, with its offset. A chunk is only valid until the next one."""
    buffer = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as fh:
        fd = fh.fileno()
        for offset, length, is_data in _extents(fd, os.fstat(fd).st_size):
            if not is_data:
                _hash_zeros(digest, length)
                continue
            position, end = offset, offset + length
            while position < end:
                got = os.preadv(fd, [buffer[: min(end - position, _CHUNK)]], position)
                if not got:
                    raise OSError(f"{path} shrank while it was read")
                digest.update(buffer[:got])
                yield position, buffer[:got]
                position += got


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (disks are large); holes are not read."""
    digest = hashlib.sha256()
    for _ in _hash_sparse(path, digest):
        pass
    return digest.hexdigest()


def copy_sparse(src: Path, dst: Path) -> str:
    """Copy src to dst keeping its holes (a fixed VHD is mostly holes) and return the
    sha256 of what was copied, computed in the same pass."""
    digest = hashlib.sha256()
    with open(dst, "wb") as out:
        for offset, chunk in _hash_sparse(src, digest):
            if os.pwrite(out.fileno(), chunk, offset) != len(chunk):
                raise OSError(f"short write to {dst} (is the disk full?)")
        out.truncate(src.stat().st_size)
    return digest.hexdigest()
