"""`queued runs`: runs waiting behind busy build slots must cost the API server nothing:
requests per minute (apiserver_request_total) stay flat as more runs queue."""

from __future__ import annotations

import time
from pathlib import Path

from bench.builds import TERMINAL, demo_template
from bench.env import Body, Cluster, vm_lock, wait_until
from bench.report import Figure, Goal
from kiln.kube import RUNS, TEMPLATES

FLAT_GOAL = 1.1  # requests/min with every run queued, x with none queued
HOLD = "sleep 3600"  # the slot holders customize for an hour, until they are canceled


def _template(name: str) -> Body:
    body = demo_template()
    spec = {**body["spec"], "customize": [{"type": "Shell", "name": "hold", "inline": [HOLD]}]}
    spec.pop("validate", None)
    return {**body, "metadata": {"name": name}, "spec": spec}


def _run(name: str, template: str) -> Body:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ImageBuildRun",
        "metadata": {"name": name},
        "spec": {"templateRef": {"name": template}},
    }


def plan(slots: int, queued: int) -> tuple[list[str], list[tuple[str, str]]]:
    """The slot holders' templates (one each: a template builds one run at a time), and
    (run, template) for the queued runs: every other one waits behind a holder's template,
    the others have a template of their own and wait for a build slot."""
    holders = [f"bench-queue-hold-{i}" for i in range(slots)]
    waiting = [
        (
            f"bench-queued-{i:03d}",
            holders[(i // 2) % slots] if i % 2 == 0 else f"bench-queue-own-{i:03d}",
        )
        for i in range(queued)
    ]
    return holders, waiting


def _status(cluster: Cluster, name: str) -> Body:
    return cluster.get(RUNS, name).get("status") or {}


def _customizing(cluster: Cluster, name: str) -> bool:
    steps = _status(cluster, name).get("steps") or []
    return any(s["name"] == "customize" and s["state"] == "Running" for s in steps)


def levels(queued: int) -> list[int]:
    """How many runs wait at each measurement: none, then a quarter, half, all."""
    return sorted({0, queued // 4, queued // 2, queued})


def _rate(cluster: Cluster, window: float) -> float:
    before = cluster.requests_total()
    time.sleep(window)
    return (cluster.requests_total() - before - 1) * 60 / window


def run(
    cluster: Cluster, slots: int, queued: int, window: float, settle: float, lock: Path | None
) -> list[Figure]:
    holder_templates, planned = plan(slots, queued)
    templates = holder_templates + sorted({t for _, t in planned} - set(holder_templates))
    for name in templates:
        cluster.create(TEMPLATES, _template(name))
    holders = [f"{name}-run" for name in holder_templates]
    waiting: list[str] = []
    rates: dict[int, float] = {}
    try:
        with vm_lock(lock):
            for name, template in zip(holders, holder_templates, strict=True):
                cluster.create(RUNS, _run(name, template))
            for name in holders:
                wait_until(lambda n=name: _customizing(cluster, n), 900, f"{name} customizing")
            for level in levels(queued):
                while len(waiting) < level:
                    name, template = planned[len(waiting)]
                    cluster.create(RUNS, _run(name, template))
                    waiting.append(name)
                time.sleep(settle)
                rates[level] = _rate(cluster, window)
            not_waiting = [n for n in waiting if _status(cluster, n).get("runSubState") != "Queued"]
            for name in waiting:  # before a slot frees up and one of them boots a VM
                cluster.delete(RUNS, name)
            wait_until(lambda: not set(waiting) & set(cluster.names(RUNS)), 600, "queued gone")
            for name in holders:
                cluster.patch(RUNS, name, {"spec": {"cancel": True}})
            for name in holders:
                wait_until(
                    lambda n=name: _status(cluster, n).get("runState") in TERMINAL,
                    600,
                    f"{name} canceled",
                )
    finally:
        for name in holders + waiting:
            cluster.delete(RUNS, name)
        wait_until(lambda: not cluster.names(RUNS), 600, "queue runs deleted")
        for name in templates:
            cluster.delete(TEMPLATES, name)
    if not_waiting:
        raise RuntimeError(f"runs {not_waiting} did not wait for a slot (slots {slots})")
    base, full = rates[0], rates[max(rates)]
    ratio = full / base
    return [
        Figure(
            name="queued runs",
            parts=[f"{level} queued {rate:.0f} req/min" for level, rate in rates.items()],
            ratio=ratio,
            goals=[Goal(what="ratio", value=ratio, limit=FLAT_GOAL)],
            raw={"slots": slots, "window_s": window, "requests_per_minute": rates},
        )
    ]
