"""`local build vs packer`: the demo template built by Kiln (ImageBuildRun created to
Succeeded) and by Packer's qemu builder, alternately, on the same base image."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from bench import packer
from bench.env import Body, Cluster, Watcher, vm_lock, wait_until
from bench.report import Figure, Goal, median, seconds
from kiln.api.template import ImageTemplateSpec, PlatformImageSource
from kiln.kube import RUNS, TEMPLATES
from kiln.providers.local import baseimage

DEMO = Path(__file__).resolve().parents[1] / "examples" / "debian-12-base.yaml"
BUILD_GOAL = 0.8  # x Packer's wall time
BUILD_TIMEOUT = 3600.0
TERMINAL = {"Succeeded", "PartiallySucceeded", "Failed", "Canceled"}


def demo_template() -> Body:
    return yaml.safe_load(DEMO.read_text())


class RunTimes:
    """Monotonic times of a run's step transitions, as the watch delivers them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps: dict[tuple[str, str], float] = {}
        self.state = ""
        self.ended_at = 0.0
        self.status: Body = {}

    def observe(self, _type: str, body: Body, now: float) -> None:
        if body["metadata"]["name"] != self.name:
            return
        self.status = body.get("status") or {}
        for step in self.status.get("steps") or []:
            self.steps.setdefault((step["name"], step["state"]), now)
        self.state = self.status.get("runState", "")
        if self.state in TERMINAL and not self.ended_at:
            self.ended_at = now


def kiln_build(cluster: Cluster, template: str, rep: int) -> dict[str, Any]:
    """One ImageBuildRun of the template, from create to Succeeded."""
    name = f"bench-{template}-{rep}-{time.time_ns() % 10**6}"
    times = RunTimes(name)
    run = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImageBuildRun",
        "metadata": {"name": name},
        "spec": {"templateRef": {"name": template}},
    }
    with Watcher(cluster, RUNS, times.observe) as watcher:
        started = time.monotonic()
        cluster.create(RUNS, run)
        wait_until(lambda: bool(times.ended_at), BUILD_TIMEOUT, f"run {name}", watcher)
    if times.state != "Succeeded":
        raise RuntimeError(f"run {name} ended {times.state}: {times.status.get('message')}")
    cluster.delete(RUNS, name)
    vm = [
        times.steps[("vm", state)]
        for state in ("Running", "Succeeded")
        if ("vm", state) in times.steps
    ]
    boot = times.steps[("connect", "Succeeded")] - min(vm)
    steps = {
        step: ended - times.steps.get((step, "Running"), ended)
        for (step, state), ended in times.steps.items()
        if state == "Succeeded"
    }
    return {"total": times.ended_at - started, "boot_to_ssh": boot, "steps": steps}


def packer_build(spec: ImageTemplateSpec, base: baseimage.BaseImage, work: Path, **vm: Any):
    shutil.rmtree(work, ignore_errors=True)
    template = packer.write_template(spec, base, work, **vm)
    try:
        return packer.build(template, BUILD_TIMEOUT).model_dump()
    finally:
        shutil.rmtree(work / "output", ignore_errors=True)


def run(
    cluster: Cluster,
    work: Path,
    repeats: int,
    *,
    lock: Path | None,
    memory_mb: int,
    cache_root: Path,
) -> list[Figure]:
    """Kiln then Packer, `repeats` times each, every build under the VM lock."""
    body = demo_template()
    name = body["metadata"]["name"]
    cluster.delete(TEMPLATES, name)
    wait_until(lambda: name not in cluster.names(TEMPLATES), 300, f"old {name} gone")
    cluster.create(TEMPLATES, {**body, "metadata": {"name": name}})
    spec = ImageTemplateSpec.model_validate(body["spec"])
    assert isinstance(spec.source, PlatformImageSource)
    base = packer.base_image(spec.source, cache_root)
    samples: dict[str, list[dict[str, Any]]] = {"kiln": [], "packer": []}
    for rep in range(repeats):
        with vm_lock(lock):
            samples["kiln"].append(kiln_build(cluster, name, rep))
        with vm_lock(lock):
            samples["packer"].append(
                packer_build(
                    spec, base, work / "packer", memory_mb=memory_mb, cache_root=cache_root
                )
            )
    cluster.delete(TEMPLATES, name)

    def med(peer: str, key: str) -> float:
        return median([s[key] for s in samples[peer]])

    total = med("kiln", "total") / med("packer", "total")
    boot = med("kiln", "boot_to_ssh") / med("packer", "boot_to_ssh")
    return [
        Figure(
            name="local build vs packer",
            parts=[
                seconds("kiln", med("kiln", "total")),
                seconds("packer", med("packer", "total")),
            ],
            ratio=total,
            goals=[Goal(what="ratio", value=total, limit=BUILD_GOAL)],
            raw={"samples": samples, "base_image": str(base.disk_path)},
        ),
        Figure(
            name="boot to ssh vs packer",
            parts=[
                seconds("kiln", med("kiln", "boot_to_ssh")),
                seconds("packer", med("packer", "boot_to_ssh")),
            ],
            ratio=boot,
        ),
    ]
