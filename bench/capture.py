"""`capture vs native`: Kiln's capture code against the plain commands on the same disk."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Figure, Goal, median, seconds
from kiln.providers.local import disks

CAPTURE_GOAL = 1.1  # x the native commands
FIXED_VHD = ["-O", "vpc", "-o", "subformat=fixed,force_size"]


def kiln_capture(src: Path, out: Path) -> None:
    disks.capture_disk(src, out / "disk.qcow2", out / "disk.vhd")


def native_capture(src: Path, out: Path) -> None:
    fmt = disks.image_format(src)
    disks.run_tool(["qemu-img", "convert", "-f", fmt, "-O", "qcow2", src, out / "disk.qcow2"])
    disks.run_tool(["qemu-img", "convert", "-f", fmt, *FIXED_VHD, src, out / "disk.vhd"])
    disks.run_tool(["sha256sum", out / "disk.qcow2"])


def kiln_copy(vhd: Path, out: Path) -> None:
    disks.copy_sparse(vhd, out / "copy.vhd")


def native_copy(vhd: Path, out: Path) -> None:
    disks.run_tool(["cp", "--sparse=always", vhd, out / "copy.vhd"])
    disks.run_tool(["sha256sum", out / "copy.vhd"])


def _allocated_mib(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_blocks * 512 / disks.MIB for p in sorted(directory.iterdir())}


def _alternate(
    peers: dict[str, Callable[[Path, Path], None]], src: Path, work: Path, repeats: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Each peer once untimed (warm caches), then A/B alternately `repeats` times each."""
    times: dict[str, list[float]] = {name: [] for name in peers}
    allocated: dict[str, dict[str, float]] = {}
    for rep in range(repeats + 1):
        for name, job in peers.items():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            started = time.perf_counter()
            job(src, out)
            if rep:
                times[name].append(time.perf_counter() - started)
            allocated[name] = _allocated_mib(out)
            shutil.rmtree(out)
    return times, allocated


def _figure(name: str, times: dict[str, list[float]], raw: dict[str, object]) -> Figure:
    kiln, native = median(times["kiln"]), median(times["native"])
    ratio = kiln / native
    return Figure(
        name=name,
        parts=[seconds("kiln", kiln), seconds("native", native)],
        ratio=ratio,
        goals=[Goal(what="ratio", value=ratio, limit=CAPTURE_GOAL)],
        raw={"seconds": times, **raw},
    )


def run(disk: Path, work: Path, repeats: int) -> list[Figure]:
    """Both figures on `disk` (a qcow2 overlay or any image qemu-img reads)."""
    work.mkdir(parents=True, exist_ok=True)
    peers = {"kiln": kiln_capture, "native": native_capture}
    times, allocated = _alternate(peers, disk, work, repeats)
    info = disks.image_info(disk)
    capture = _figure(
        "capture vs native",
        times,
        {"disk": str(disk), "virtual_size": info["virtual-size"], "allocated_mib": allocated},
    )
    vhd = work / "source.vhd"
    disks.to_fixed_vhd(disk, vhd)
    try:
        peers = {"kiln": kiln_copy, "native": native_copy}
        times, allocated = _alternate(peers, vhd, work, repeats)
    finally:
        vhd.unlink()
    copy = _figure("vhd distribution copy vs cp --sparse", times, {"allocated_mib": allocated})
    return [capture, copy]
