"""`python -m bench`: run the figures, print one line each, write the raw numbers as JSON.

python -m bench                 full size (what `make bench` runs)
python -m bench --size quick    fewer repetitions, 100 templates (`make bench-quick`)
python -m bench --only capture,fleet --templates 300
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench import boot, builds, capture, fleet, queue
from bench.env import Cluster, Operator
from bench.report import Figure, write_json
from kiln.providers.local import baseimage, qemu
from kiln.settings import load_settings

FIGURES = ("boot", "build", "capture", "fleet", "queue")


class Sizes(BaseModel):
    """How big each figure is; the presets are below, every field can be overridden."""

    boot_repeats: int = Field(default=3, ge=1, description="Boots of each kind.")
    build_repeats: int = Field(default=3, ge=1, description="Kiln and Packer builds each.")
    capture_repeats: int = Field(default=3, ge=1)
    templates: int = Field(default=1000, ge=1)
    invalid: int = Field(default=200, ge=0)
    idle_seconds: float = Field(default=60, gt=0)
    slots: int = Field(default=2, ge=1)
    queued: int = Field(default=20, ge=1)
    window_seconds: float = Field(default=60, gt=0, description="Per queue length.")
    settle_seconds: float = Field(default=15, ge=0)
    capture_disk: Path | None = Field(
        default=None, description="Disk to capture; default an overlay on the base image."
    )


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        "boot_repeats": 1,
        "build_repeats": 1,
        "capture_repeats": 1,
        "templates": 100,
        "invalid": 20,
        "idle_seconds": 20,
        "queued": 8,
        "window_seconds": 20,
        "settle_seconds": 5,
    },
    "smoke": {
        "boot_repeats": 1,
        "build_repeats": 1,
        "capture_repeats": 1,
        "templates": 4,
        "invalid": 2,
        "idle_seconds": 2,
        "slots": 1,
        "queued": 2,
        "window_seconds": 3,
        "settle_seconds": 1,
    },
}


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = Path("/proc/meminfo").read_text().split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory) / 1024**2, 1),
        "kernel": platform.release(),
        "accelerator": " ".join(qemu.accelerator()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _capture_disk(sizes: Sizes, work: Path) -> Path:
    if sizes.capture_disk:
        return sizes.capture_disk
    base = baseimage.ensure_image()
    overlay = work / "capture-overlay.qcow2"
    overlay.unlink(missing_ok=True)
    qemu.create_overlay(base.disk_path, overlay)
    return overlay


def run(only: list[str], sizes: Sizes, work: Path, lock: Path | None) -> list[Figure]:
    """The figures asked for, printed as they come; the control plane only when needed."""
    figures: list[Figure] = []

    def report(new: list[Figure]) -> None:
        for figure in new:
            print(figure.line(), flush=True)
            for line in figure.goal_lines():
                print(line, flush=True)
        figures.extend(new)

    if "boot" in only:
        report(boot.run(work / "boot", sizes.boot_repeats, lock))
    if "capture" in only:
        report(capture.run(_capture_disk(sizes, work), work / "capture", sizes.capture_repeats))
    if not {"build", "fleet", "queue"} & set(only):
        return figures
    settings = load_settings()
    cluster = Cluster(work / "cluster")
    try:
        if "fleet" in only:
            operator = Operator(cluster.state_dir, KILN_DATA=str(work / "data"))
            operator.start()
            try:
                report(
                    fleet.run(cluster, operator, sizes.templates, sizes.invalid, sizes.idle_seconds)
                )
            finally:
                operator.stop()
        build_settings = {"KILN_DATA": str(work / "data"), "KILN_MAX_ACTIVE_RUNS": str(sizes.slots)}
        operator = Operator(cluster.state_dir, **build_settings)
        operator.start()
        try:
            if "build" in only:
                report(
                    builds.run(
                        cluster,
                        work,
                        sizes.build_repeats,
                        lock=lock,
                        memory_mb=settings.vm_memory_mb,
                        cache_root=settings.cache_root,
                    )
                )
            if "queue" in only:
                report(
                    queue.run(
                        cluster,
                        sizes.slots,
                        sizes.queued,
                        sizes.window_seconds,
                        sizes.settle_seconds,
                        lock,
                    )
                )
        finally:
            operator.stop()
    finally:
        cluster.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="full")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"of {','.join(FIGURES)}")
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument(
        "--vm-lock", type=Path, help="flock this file around every VM boot (shared machines)"
    )
    for name, field in Sizes.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=str, help=field.description)
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(only) - set(FIGURES):
        parser.error(f"--only: unknown figure(s) {sorted(unknown)}; choose from {FIGURES}")
    overrides = {n: getattr(args, n) for n in Sizes.model_fields if getattr(args, n) is not None}
    sizes = Sizes.model_validate({**PRESETS[args.size], **overrides})
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        figures = run(only, sizes, work.absolute(), args.vm_lock)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    meta = {**machine(), "size": args.size, "sizes": sizes.model_dump(mode="json")}
    write_json(args.json, figures, meta)
    print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
