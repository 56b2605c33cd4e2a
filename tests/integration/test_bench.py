"""The benchmarks' smoke size: proves bench/ runs end to end on the real control plane
(and, for the VM figures, real QEMU builds and Packer); no number is judged here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import packer, queue
from bench.report import Figure, Goal, percentile
from kiln.api.template import ImageTemplateSpec, PlatformImageSource
from kiln.providers.local import baseimage, disks, qemu

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^[a-z0-9 ,.+-]+: .+, \d+\.\d\d x$")


def _bench(tmp_path: Path, *args: str, timeout: float) -> tuple[list[str], dict]:
    result = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "smoke", "--json", str(result), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "devtools")},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.splitlines(), json.loads(result.read_text())


def _figures(doc: dict) -> dict[str, dict]:
    return {figure["name"]: figure for figure in doc["figures"]}


def test_figure_line_has_the_ratio_last() -> None:
    figure = Figure(name="local build vs packer", parts=["kiln 84.1 s", "packer 101.3 s"])
    figure.ratio = 84.1 / 101.3
    assert figure.line() == "local build vs packer: kiln 84.1 s, packer 101.3 s, 0.83 x"
    assert Goal(what="ratio", value=0.83, limit=0.8).describe() == (
        "goal ratio <= 0.8 missed by 0.03 (4% over)"
    )
    assert percentile([float(i) for i in range(1, 1001)], 0.99) == 990.0


def test_queued_runs_wait_both_for_a_template_and_for_a_slot() -> None:
    holders, waiting = queue.plan(2, 6)
    assert holders == ["bench-queue-hold-0", "bench-queue-hold-1"]
    templates = [template for _, template in waiting]
    assert templates[0::2] == [holders[0], holders[1], holders[0]]  # behind a building run
    own = templates[1::2]  # admitted at once, then waiting for one of the 2 slots
    assert len(set(own)) == 3 and not set(own) & set(holders)
    assert len({name for name, _ in waiting}) == 6


def test_packer_peer_boots_what_kiln_boots(tmp_path: Path) -> None:
    """Packer's qemuargs are Kiln's own command line; `packer validate` accepts them."""
    spec = ImageTemplateSpec.model_validate(
        yaml.safe_load((REPO / "examples" / "debian-12-base.yaml").read_text())["spec"]
    )
    assert isinstance(spec.source, PlatformImageSource)
    cache = baseimage.default_cache_root()
    base = packer.base_image(spec.source, cache)
    template = packer.write_template(spec, base, tmp_path, memory_mb=1024, cache_root=cache)
    packer.validate(template)
    builder = json.loads(template.read_text())["builders"][0]
    flat = [arg for pair in builder["qemuargs"] for arg in pair]
    kiln = qemu._qemu_argv(
        packer.vm_spec(spec.source, base, tmp_path / "vm", tmp_path / "seed.iso", 1024, cache), 1
    )
    for flag in ("-machine", "-accel", "-cpu", "-m", "-smp"):
        assert flat[flat.index(flag) + 1] == kiln[kiln.index(flag) + 1], flag
    firmware = [arg for arg in kiln if arg.startswith("if=pflash")]
    assert firmware and all(arg in flat for arg in firmware)  # the same OVMF boot
    assert "-daemonize" not in flat and "-pidfile" not in flat
    assert any("{{ .SSHHostPort }}" in arg for arg in flat)
    assert f"file={tmp_path}/seed.iso,if=virtio,format=raw,readonly=on" in flat
    kinds = [p["type"] for p in json.loads(template.read_text())["provisioners"]]
    assert kinds == ["shell", "file", "shell", "shell", "shell"]  # 3 steps, validate, deprovision


@pytest.mark.integration
def test_bench_smoke_capture_and_templates(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    disks.run_tool(["qemu-img", "create", "-q", "-f", "qcow2", disk, "256M"])
    disks.run_tool(["qemu-io", "-c", "write -P 0x5a 0 8M", disk])
    lines, doc = _bench(
        tmp_path, "--only", "capture,fleet", "--capture-disk", str(disk), timeout=900
    )
    figures = _figures(doc)
    assert set(figures) == {
        "capture vs native",
        "vhd distribution copy vs cp --sparse",
        "operator at 4 templates",
    }
    for name in ("capture vs native", "vhd distribution copy vs cp --sparse"):
        line = next(line for line in lines if line.startswith(f"{name}: "))
        assert LINE.match(line), line
        allocated = figures[name]["raw"]["allocated_mib"]["kiln"]
        assert all(mib < 64 for mib in allocated.values()), allocated  # 256 MiB, 8 written
    fleet = figures["operator at 4 templates"]["raw"]
    assert len(fleet["latencies_s"]) == 6  # 4 valid, 2 invalid
    assert fleet["rss_mib"]["fresh"] > 0 and fleet["idle_cpu_s"] >= 0
    assert doc["machine"]["cores"] and doc["machine"]["size"] == "smoke"


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.slow
def test_bench_smoke_builds_and_queue(tmp_path: Path) -> None:
    """Three boots (UEFI, BIOS, direct kernel), one Kiln build, one Packer build, one slot
    holder with two runs queued behind it."""
    lines, doc = _bench(tmp_path, "--only", "boot,build,queue", timeout=3600)
    figures = _figures(doc)
    assert set(figures) == {
        "boot to ssh, firmware vs direct kernel",
        "local build vs packer",
        "boot to ssh vs packer",
        "queued runs",
    }
    for name in figures:
        line = next(line for line in lines if line.startswith(f"{name}: "))
        assert LINE.match(line), line
    samples = figures["local build vs packer"]["raw"]["samples"]
    assert samples["kiln"][0]["boot_to_ssh"] < samples["kiln"][0]["total"]
    assert samples["packer"][0]["boot_to_ssh"] < samples["packer"][0]["total"]
    boots = figures["boot to ssh, firmware vs direct kernel"]["raw"]["samples"]
    assert all(boot["ssh"] <= boot["cloud_init"] for peer in boots.values() for boot in peer)
    for peer in ("uefi", "bios"):  # firmware and GRUB take a while before the kernel runs
        assert 0 < boots[peer][0]["before_kernel"] < boots[peer][0]["ssh"], boots[peer]
    rates = figures["queued runs"]["raw"]["requests_per_minute"]
    assert set(rates) == {"0", "1", "2"} and all(rate > 0 for rate in rates.values())
