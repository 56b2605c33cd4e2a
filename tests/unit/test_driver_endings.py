"""The run driver's endings as logic, with an in-memory stand-in for the API server (the
same behaviours on the real API server and VMs are in tests/integration and tests/e2e):
a step in flight is interrupted by a cancel or a deletion within seconds, cleanup is
retried a bounded number of times outside the build slot and then reported."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from pathlib import Path
from typing import Any

import kopf
import pytest

from kiln import reasons
from kiln.pipeline import STEPS_BY_NAME
from kiln.pipeline.base import Outcome, StepEnv
from kiln.providers.base import RunContext
from kiln.reconcile import driver as driver_module
from kiln.reconcile import runs as decide
from kiln.reconcile.driver import RunDriver
from kiln.runtime import Runtime
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec

Body = dict[str, Any]
RUNS, TEMPLATES = "imagebuildruns", "imagetemplates"


def merge(target: Body, patch: Body) -> None:
    """A JSON merge patch (RFC 7386), as the API server applies it: null removes a key."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class MemoryKube:
    """Objects in a dict; status patches merge as the API server's merge patch does."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Body] = {}
        self.secrets: dict[str, dict[str, str]] = {}

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        found = self.objects.get((plural, name))
        return copy.deepcopy(found) if found else None

    async def list(self, plural: str, namespace: str, label_selector: str = "") -> list[Body]:
        return [copy.deepcopy(o) for (p, _), o in self.objects.items() if p == plural]

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> Body:
        target = self.objects[(plural, name)].setdefault("status", {})
        merge(target, status)
        return target

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        self.objects[(plural, name)]["spec"].update(patch.get("spec", {}))
        return self.objects[(plural, name)]

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        self.objects.pop((plural, name), None)

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    async def create_secret(self, namespace: str, body: Body) -> None:
        self.secrets[body["metadata"]["name"]] = body["data"]

    async def delete_secret(self, namespace: str, name: str) -> None:
        self.secrets.pop(name, None)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Runtime, MemoryKube]:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "info", lambda _b, reason, message: events.append((reason, message)))
    monkeypatch.setattr(kopf, "warn", lambda _b, reason, message: events.append((reason, message)))

    async def no_refresh(*_: Any) -> None:
        return None

    monkeypatch.setattr(driver_module, "refresh_template", no_refresh)
    monkeypatch.setattr(driver_module, "WATCH_SECONDS", 0.2)
    kube = MemoryKube()
    runtime = Runtime(OperatorSettings(data_root=tmp_path, max_active_runs=1), kube)  # type: ignore[arg-type]
    runtime.events = events  # type: ignore[attr-defined]
    kube.objects[(TEMPLATES, "t")] = {
        "metadata": {"name": "t", "namespace": "ns", "uid": "t-uid", "generation": 1},
        "spec": valid_spec(),
    }
    return runtime, kube


def add_run(kube: MemoryKube, name: str) -> None:
    kube.objects[(RUNS, name)] = {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": f"2024-01-01T00:00:0{len(kube.objects)}Z",
        },
        "spec": {"templateRef": {"name": "t"}},
    }


def hang_in(monkeypatch: pytest.MonkeyPatch, step: str) -> asyncio.Event:
    """The step never returns (a frozen VM); the event is set when it was cancelled."""
    cancelled = asyncio.Event()

    async def hang(ctx: RunContext, env: StepEnv) -> Outcome:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    monkeypatch.setattr(STEPS_BY_NAME[step], "reconcile", hang)
    return cancelled


def status(kube: MemoryKube, name: str) -> Body:
    return kube.objects[(RUNS, name)]["status"]


async def until(predicate: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def hanging_run(
    runtime: Runtime, kube: MemoryKube, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Future[None], asyncio.Event]:
    """Run r1 driven until its source step hangs in flight."""
    cancelled = hang_in(monkeypatch, "source")
    add_run(kube, "r1")
    drive = asyncio.ensure_future(RunDriver(runtime, "ns", "r1").drive())
    await until(lambda: "uid-r1" in runtime.steps_in_flight)
    return drive, cancelled


async def test_a_cancel_interrupts_the_step_in_flight_and_frees_the_slot(
    world: tuple[Runtime, MemoryKube], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, kube = world
    drive, cancelled = await hanging_run(runtime, kube, monkeypatch)
    kube.objects[(RUNS, "r1")]["spec"]["cancel"] = True
    began = time.monotonic()
    await asyncio.wait_for(drive, 10)
    assert time.monotonic() - began < 2 and cancelled.is_set()
    final = status(kube, "r1")
    assert final["runState"] == "Canceled"
    assert {s["name"]: s["state"] for s in final["steps"]}["source"] == "Failed"
    assert runtime.build_slots._value == 1  # the slot is free again


async def test_a_run_waiting_for_a_slot_can_be_canceled_and_never_starts_its_clock(
    world: tuple[Runtime, MemoryKube], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, kube = world
    hang_in(monkeypatch, "source")
    second = copy.deepcopy(kube.objects[(TEMPLATES, "t")])
    second["metadata"] |= {"name": "t2", "uid": "t2-uid"}
    kube.objects[(TEMPLATES, "t2")] = second
    add_run(kube, "busy")
    add_run(kube, "waiting")
    kube.objects[(RUNS, "waiting")]["spec"]["templateRef"]["name"] = "t2"
    busy = asyncio.ensure_future(RunDriver(runtime, "ns", "busy").drive())
    await until(lambda: (kube.objects[(RUNS, "busy")].get("status") or {}).get("startTime"))
    waiting = asyncio.ensure_future(RunDriver(runtime, "ns", "waiting").drive())
    await until(lambda: (kube.objects[(RUNS, "waiting")].get("status") or {}).get("steps"))
    assert decide.phase(status(kube, "waiting")) == "WaitingForSlot"
    kube.objects[(RUNS, "waiting")]["spec"]["cancel"] = True
    await asyncio.wait_for(waiting, 10)
    assert status(kube, "waiting")["runState"] == "Canceled"
    assert "startTime" not in status(kube, "waiting")
    kube.objects[(RUNS, "busy")]["spec"]["cancel"] = True
    await asyncio.wait_for(busy, 10)


async def test_deleting_a_run_stops_its_step_before_cleaning_up(
    world: tuple[Runtime, MemoryKube], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, kube = world
    drive, cancelled = await hanging_run(runtime, kube, monkeypatch)
    run = copy.deepcopy(kube.objects[(RUNS, "r1")])
    await RunDriver(runtime, "ns", "r1").delete(run)
    assert cancelled.is_set()  # stopped before delete() returned
    await asyncio.wait_for(drive, 10)
    assert "uid-r1" not in runtime.steps_in_flight


async def test_cleanup_retries_are_bounded_then_reported(
    world: tuple[Runtime, MemoryKube], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime, kube = world
    monkeypatch.setattr(decide, "cleanup_backoff", lambda n: 0.01 if n < 5 else None)
    provider = runtime.providers["local"]
    attempts = 0

    async def broken_delete(ctx: RunContext) -> None:
        nonlocal attempts
        attempts += 1
        raise OSError("device busy")

    async def leftovers(ctx: RunContext) -> list[str]:
        return ["/var/lib/kiln/vm/uid-r1"]

    monkeypatch.setattr(provider, "delete_vm", broken_delete)
    monkeypatch.setattr(provider, "leftovers", leftovers)
    drive, _ = await hanging_run(runtime, kube, monkeypatch)
    kube.objects[(RUNS, "r1")]["spec"]["cancel"] = True
    await asyncio.wait_for(drive, 20)
    assert attempts == decide.CLEANUP_ATTEMPTS
    final = status(kube, "r1")
    assert final["runState"] == "Canceled"
    failed = next(c for c in final["conditions"] if c["type"] == reasons.CLEANUP_FAILED)
    assert failed["status"] == "True" and "/var/lib/kiln/vm/uid-r1" in failed["message"]
    assert {s["name"]: s["state"] for s in final["steps"]}["cleanup"] == "Failed"
    assert any(reason == reasons.CLEANUP_FAILED for reason, _ in runtime.events)  # type: ignore[attr-defined]


async def test_a_run_an_older_operator_left_mid_distribution_ends_and_is_cleaned_up(
    world: tuple[Runtime, MemoryKube], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator is replaced by a newer one while the run is in flight."""
    runtime, kube = world
    drive, _ = await hanging_run(runtime, kube, monkeypatch)
    drive.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drive
    checkpoint = status(kube, "r1")["checkpoint"]
    checkpoint.update(version=1, outputs={"0": {"runOutputName": "img", "artifactId": "/i"}})
    cleaned: list[str] = []

    async def delete_vm(ctx: RunContext) -> None:
        cleaned.append(ctx.run_name)

    upgraded = Runtime(runtime.settings, kube)  # type: ignore[arg-type]
    monkeypatch.setattr(upgraded.providers["local"], "delete_vm", delete_vm)
    await asyncio.wait_for(RunDriver(upgraded, "ns", "r1").drive(), 20)
    final = status(kube, "r1")
    assert final["runState"] == "Failed"
    assert "upgraded while this run was distributing" in final["message"]
    assert cleaned == ["r1"]
    assert "outputs" not in final["checkpoint"]
