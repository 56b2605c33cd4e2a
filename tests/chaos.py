"""The chaos suite: many builds at once while the operator is SIGKILLed at seeded random
moments and restarted, build VMs are frozen (SIGSTOP) or killed, runs are canceled, and
the ARM emulator fails a share of requests (429 with Retry-After, 5xx, 409 conflicts).

Every run must end, and end truthfully:

- clean: nothing fatal injected (operator kills and cloud faults are survivable): Succeeded.
- freeze: the build VM is frozen mid-customization (or while it boots, on a busy machine),
  and the customization outlasts the run's short buildTimeoutInMinutes anyway: Failed
  with Stalled reason TimedOut, ending within WATCH_SLACK of its timeout (counted from
  startTime), the VM killed and cleaned up.
- kill-vm: the build VM's QEMU is SIGKILLed mid-customization (or booting): Failed,
  cleaned up (Succeeded if the VM was never reached to be killed).
- cancel: spec.cancel at a seeded moment: Canceled (Succeeded only if the run had already
  recorded its ending when the cancel came).

It reports runs ended correctly / total, build VMs per run (distinct QEMU processes seen
for the run's VM directory, or VM creations the ARM emulator counted), what is left
(QEMU processes, host tools still running on a run's disks (a qemu-img of a killed
operator), VM state directories, key Secrets; Azure VMs, disks, NICs, public IPs,
NSGs, vnets, vaults, soft-deleted vaults) and duplicate gallery versions (more than one
version under a run's own gallery image). The targets: all, exactly 1, 0, 0.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException

from azurehelpers import BUILD_RESOURCE_TYPES
from conftest import OPERATOR_NAMESPACE, OperatorProcess
from kiln.naming import run_secret_name
from kubehelpers import TERMINAL, Kiln, condition, run, template
from processes import live

Body = dict[str, Any]
GALLERY = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/chaos"
    "/providers/Microsoft.Compute/galleries/chaos/images"
)
FREEZE_TIMEOUT_MINUTES = 4
BOOT_GRACE = 120.0  # a VM not customizing this long after it appeared is acted on booting
WATCH_SLACK = 90.0  # how long past its timeout a frozen run may take to end (a kill too)
RUN_TAG = "kiln-run-uid"  # what Kiln tags every Azure build resource with


@dataclass
class Plan:
    """How much chaos: builds per provider, the mix of cases, how often the operator dies."""

    seed: int
    local: list[str]  # case kinds: clean, freeze, kill-vm, cancel
    azure: list[str]  # clean, cancel
    kill_every: tuple[float, float] = (45.0, 150.0)  # seconds between local operator kills
    azure_kill_every: tuple[float, float] = (25.0, 75.0)  # azure builds take a few minutes
    down_for: tuple[float, float] = (0.5, 4.0)  # seconds the operator stays dead
    fault_rate: float = 0.1
    deadline: float = 3600.0  # the whole suite; a run not ended by then is stuck

    @classmethod
    def short(cls, seed: int = 7) -> Plan:
        return cls(seed, local=["clean", "freeze", "kill-vm"], azure=["clean", "clean", "cancel"])

    @classmethod
    def full(cls, seed: int = 2026, local: int = 20, azure: int = 10) -> Plan:
        rng = random.Random(seed)
        kinds = ["clean"] * 10 + ["freeze"] * 4 + ["kill-vm"] * 3 + ["cancel"] * 3
        mix = [kinds[i % len(kinds)] for i in range(local)]
        rng.shuffle(mix)
        azure_mix = ["clean"] * (azure - azure // 5) + ["cancel"] * (azure // 5)
        rng.shuffle(azure_mix)
        return cls(seed, local=mix, azure=azure_mix, deadline=5400.0)


@dataclass
class Case:
    """One run and what chaos does to it."""

    name: str
    provider: str
    kind: str
    act_after: float  # seconds into customization (freeze, kill-vm) or after creation (cancel)
    uid: str = ""
    created: float = 0.0
    acted_at: float | None = None
    cancel_after_ending: bool = False  # the cancel came when the ending was recorded
    body: Body | None = None
    pids: set[int] = field(default_factory=set)
    customizing_since: float | None = None
    vm_seen: float | None = None
    frozen_pid: int | None = None

    @property
    def status(self) -> Body:
        return (self.body or {}).get("status") or {}

    @property
    def ended(self) -> bool:
        return self.status.get("runState") in TERMINAL


@dataclass
class Fleet:
    """One provider's operator (killed and restarted) and its runs."""

    provider: str
    kiln: Kiln
    operator: OperatorProcess
    cases: list[Case]
    kills: int = 0
    next_kill: float = 0.0
    restart_at: float | None = None


@dataclass
class Report:
    total: int = 0
    correct: int = 0
    wrong: list[str] = field(default_factory=list)
    vms_per_run: dict[str, int] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    duplicate_versions: list[str] = field(default_factory=list)
    kills: dict[str, int] = field(default_factory=dict)
    faults: int = 0
    seconds: float = 0.0

    def vm_summary(self) -> str:
        counts: dict[int, int] = {}
        for n in self.vms_per_run.values():
            counts[n] = counts.get(n, 0) + 1
        return ", ".join(f"{n} VM x {runs} run(s)" for n, runs in sorted(counts.items()))

    def lines(self) -> list[str]:
        return [
            f"chaos: runs ended correctly {self.correct}/{self.total}",
            f"chaos: VMs created per built run: {self.vm_summary() or 'none'}",
            f"chaos: leaked resources: {len(self.leaks)}"
            + (f" ({'; '.join(self.leaks)})" if self.leaks else ""),
            f"chaos: duplicate gallery versions: {len(self.duplicate_versions)}"
            + (f" ({'; '.join(self.duplicate_versions)})" if self.duplicate_versions else ""),
            f"chaos: operator kills {self.kills}, injected cloud faults {self.faults}, "
            f"{self.seconds:.0f} s",
            *(f"chaos: WRONG {line}" for line in self.wrong),
        ]

    def on_target(self) -> bool:
        return (
            self.correct == self.total
            and all(n == 1 for n in self.vms_per_run.values())
            and not self.leaks
            and not self.duplicate_versions
        )


def local_template(case: Case) -> Body:
    """A small Linux build: a customization long enough to be frozen, killed or canceled in,
    published to its own gallery image (a second version would be a duplicate)."""
    name, kind = case.name, case.kind
    seconds = {"freeze": 900, "kill-vm": 300}.get(kind, 20)
    spec: Body = {
        "customize": [
            {"type": "Shell", "name": "work", "inline": ["echo chaos-start", f"sleep {seconds}"]}
        ],
        "distribute": [
            {
                "type": "SharedImage",
                "runOutputName": "gallery",
                "galleryImageId": f"{GALLERY}/{name}",
                "versioning": {"scheme": "Latest", "major": 1},
            }
        ],
    }
    if kind == "freeze":
        spec["buildTimeoutInMinutes"] = FREEZE_TIMEOUT_MINUTES
    return template(name, **spec)


class Chaos:
    """Runs a Plan over the fleets and judges the outcome; see the module docstring."""

    def __init__(self, plan: Plan, log: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.log = log
        self.fleets: list[Fleet] = []
        self.arm: Any = None
        self.gallery_root: Path | None = None
        self.azure_versions: Callable[[str], int] | None = None
        self.vaults_before: set[str] = set()

    # --- setup -----------------------------------------------------------------------------

    def cases(self, provider: str, kinds: list[str]) -> list[Case]:
        out = []
        for index, kind in enumerate(kinds):
            if kind == "cancel":
                act = self.rng.uniform(5, 240 if provider == "local" else 60)
            else:
                act = self.rng.uniform(2, 30)
            out.append(Case(f"chaos-{provider[:2]}-{index:02d}-{kind}", provider, kind, act))
        return out

    def add_fleet(
        self,
        provider: str,
        kiln: Kiln,
        operator: OperatorProcess,
        make_template: Callable[[Case], Body],
    ) -> Fleet:
        """Create every case's template and run (all at once: the operator queues them)."""
        kinds = self.plan.local if provider == "local" else self.plan.azure
        fleet = Fleet(provider, kiln, operator, self.cases(provider, kinds))
        for case in fleet.cases:
            kiln.create("imagetemplates", make_template(case))
        now = time.monotonic()
        for case in fleet.cases:
            created = kiln.create("imagebuildruns", run(case.name, case.name))
            case.uid, case.created = created["metadata"]["uid"], now
        fleet.next_kill = now + self.rng.uniform(*self.kill_every(fleet))
        self.fleets.append(fleet)
        return fleet

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> Report:
        started = time.monotonic()
        deadline = started + self.plan.deadline
        while time.monotonic() < deadline:
            qemu = qemu_processes()
            for fleet in self.fleets:
                self._operator_chaos(fleet)
                for case in fleet.cases:
                    self._observe(fleet, case, qemu)
            if all(c.ended for f in self.fleets for c in f.cases):
                break
            time.sleep(1.0)
        for fleet in self.fleets:  # the operator ends alive
            if fleet.restart_at is not None:
                self._start(fleet)
        if self.arm is not None:
            self.arm.clear_faults()
        report = self.judge()
        report.seconds = time.monotonic() - started
        return report

    def kill_every(self, fleet: Fleet) -> tuple[float, float]:
        return self.plan.kill_every if fleet.provider == "local" else self.plan.azure_kill_every

    def _start(self, fleet: Fleet) -> None:
        """Restart the operator; one slow to report healthy on a busy machine is left to
        come up (one that exited is started again on the next tick)."""
        try:
            fleet.operator.start()
        except RuntimeError as error:
            self.log(f"chaos: the {fleet.provider} operator is slow to start: {error}")

    def _operator_chaos(self, fleet: Fleet) -> None:
        now = time.monotonic()
        process = fleet.operator.process
        if fleet.restart_at is None and process is not None and process.poll() is not None:
            fleet.restart_at = now  # it exited by itself (or never came up): start it again
        if fleet.restart_at is not None and now >= fleet.restart_at:
            self._start(fleet)
            fleet.restart_at = None
            fleet.next_kill = now + self.rng.uniform(*self.kill_every(fleet))
            self.log(f"chaos: {fleet.provider} operator restarted")
        elif fleet.restart_at is None and now >= fleet.next_kill:
            if all(c.ended for c in fleet.cases):
                return
            fleet.operator.kill()
            fleet.kills += 1
            fleet.restart_at = now + self.rng.uniform(*self.plan.down_for)
            self.log(f"chaos: {fleet.provider} operator SIGKILLed (kill {fleet.kills})")

    def _observe(self, fleet: Fleet, case: Case, qemu: dict[int, str]) -> None:
        if case.ended:
            return
        try:
            case.body = fleet.kiln.get("imagebuildruns", case.name)
        except (ApiException, OSError) as error:
            self.log(f"chaos: reading {case.name}: {error}")
            return
        vm_dir = f"/vm/{case.uid}/"
        case.pids |= {pid for pid, args in qemu.items() if vm_dir in args}
        if case.ended:
            self.log(f"chaos: {case.name} ended {case.status.get('runState')}")
            return
        now = time.monotonic()
        if case.pids and case.vm_seen is None:
            case.vm_seen = now
        if case.customizing_since is None and "running customize-" in case.status.get(
            "message", ""
        ):
            case.customizing_since = now
        if case.acted_at is not None:
            return
        if case.kind == "cancel" and now - case.created >= case.act_after:
            patched = fleet.kiln.patch("imagebuildruns", case.name, {"spec": {"cancel": True}})
            status = patched.get("status") or {}
            ending = (status.get("checkpoint") or {}).get("ending")
            case.cancel_after_ending = bool(ending) or status.get("runState") in TERMINAL
            case.acted_at = now
            self.log(f"chaos: canceled {case.name}")
        elif case.kind in ("freeze", "kill-vm") and self._vm_due(case, now):
            pid = max(case.pids)
            sig = signal.SIGSTOP if case.kind == "freeze" else signal.SIGKILL
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            case.frozen_pid = pid if case.kind == "freeze" else None
            case.acted_at = now
            phase = "customizing" if case.customizing_since is not None else "booting"
            self.log(f"chaos: {sig.name} to the build VM of {case.name} (pid {pid}, {phase})")

    @staticmethod
    def _vm_due(case: Case, now: float) -> bool:
        """Act act_after seconds into customization, or (a VM slow to boot on a busy
        machine) BOOT_GRACE + act_after seconds after the VM appeared."""
        if case.customizing_since is not None:
            return now - case.customizing_since >= case.act_after
        return case.vm_seen is not None and now - case.vm_seen >= BOOT_GRACE + case.act_after

    # --- judging ---------------------------------------------------------------------------

    def judge(self) -> Report:
        report = Report()
        for fleet in self.fleets:
            report.kills[fleet.provider] = fleet.kills
            for case in fleet.cases:
                report.total += 1
                verdict = self.verdict(case)
                if verdict is None:
                    report.correct += 1
                else:
                    report.wrong.append(f"{case.name}: {verdict}")
                vms = self.vms(case)
                if vms is not None:
                    report.vms_per_run[case.name] = vms
                if case.frozen_pid is not None:  # never leave a stopped process behind
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(case.frozen_pid, signal.SIGCONT)
        report.leaks = self.leaks()
        report.duplicate_versions = self.duplicates()
        if self.arm is not None:
            report.faults = sum(1 for r in self.arm.requests if r.status in (429, 500, 503, 409))
        return report

    def verdict(self, case: Case) -> str | None:
        """None when the run ended as it should have; else what is wrong."""
        status = case.status
        state = status.get("runState")
        if state not in TERMINAL:
            return f"never ended (still {state}: {status.get('message')})"
        stalled = condition(case.body, "Stalled") or {}
        if case.kind == "clean" or (case.kind == "kill-vm" and case.acted_at is None):
            ok = state == "Succeeded"
            want = "Succeeded"
        elif case.kind == "cancel":
            ok = state == "Canceled" or (case.cancel_after_ending and state == "Succeeded")
            want = "Canceled"
        elif case.kind == "freeze":
            ok = state == "Failed" and stalled.get("reason") == "TimedOut"
            want = "Failed (TimedOut)"
            if ok and (over := _overrun(status)) > WATCH_SLACK:
                return f"ended TimedOut {over:.0f} s after its timeout"
        else:
            ok = state == "Failed"
            want = "Failed"
        if not ok:
            return f"ended {state} ({stalled.get('reason')}: {status.get('message')}), want {want}"
        steps = {s["name"]: s for s in status.get("steps") or []}
        if "cleanup" in steps and steps["cleanup"]["state"] not in ("Succeeded", "Skipped"):
            return f"cleanup {steps['cleanup']['state']}: {steps['cleanup'].get('message')}"
        return None

    def vms(self, case: Case) -> int | None:
        """Build VMs the run made; None for a run that never got to make one."""
        if case.provider == "local":
            started = bool(((case.status.get("checkpoint") or {}).get("local") or {}).get("vm"))
            return len(case.pids) if case.pids or started else None
        vm_id = ((case.status.get("checkpoint") or {}).get("azure") or {}).get("vmId")
        return self.arm.creation_count(vm_id) if vm_id else None

    def leaks(self) -> list[str]:
        found: list[str] = []
        uids = {c.uid for f in self.fleets for c in f.cases}
        for process in live():
            if any(f"/vm/{uid}/" in arg for arg in process.argv for uid in uids):
                tool = process.argv[0]
                found.append(
                    f"QEMU process {process.pid}"
                    if "qemu-system" in tool
                    else f"host tool process {process.pid} ({tool})"
                )
        for fleet in self.fleets:
            vm_root = fleet.operator.data_dir / "vm"
            if vm_root.is_dir():
                found += [f"VM directory {d}" for d in vm_root.iterdir() if d.name in uids]
            core = CoreV1Api(fleet.kiln.api.api_client)
            secrets = {
                s.metadata.name for s in core.list_namespaced_secret(OPERATOR_NAMESPACE).items
            }
            found += [
                f"Secret {OPERATOR_NAMESPACE}/{run_secret_name(c.uid)}"
                for c in fleet.cases
                if run_secret_name(c.uid) in secrets
            ]
        if self.arm is not None:
            for item in self.arm.inventory():
                if item.type in BUILD_RESOURCE_TYPES and item.tags.get(RUN_TAG) in uids:
                    found.append(item.id)
            found += [
                f"soft-deleted vault {v}"
                for v in set(self.arm.deleted_vaults()) - self.vaults_before
            ]
        return found

    def duplicates(self) -> list[str]:
        """Gallery images (one per case) holding more than one version."""
        found = []
        for fleet in self.fleets:
            for case in fleet.cases:
                versions = self.versions_of(case)
                if versions > 1:
                    found.append(f"{case.name}: {versions} versions")
        return found

    def versions_of(self, case: Case) -> int:
        if case.provider == "azure":
            assert self.azure_versions is not None
            return self.azure_versions(case.name)
        assert self.gallery_root is not None
        definitions = list(self.gallery_root.glob(f"galleries/*/*/chaos/{case.name.lower()}"))
        return sum(
            1 for d in definitions for v in d.iterdir() if v.is_dir() and not v.name.startswith(".")
        )


def qemu_processes() -> dict[int, str]:
    """Every QEMU process on the machine: pid -> command line."""
    return {p.pid: " ".join(p.argv) for p in live() if p.argv and "qemu-system" in p.argv[0]}


def _seconds(rfc3339: str) -> float:
    return time.mktime(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


def _overrun(status: Body) -> float:
    """Seconds a run ended past its build timeout, counted from its startTime."""
    if not status.get("startTime") or not status.get("endTime"):
        return 0.0
    took = _seconds(status["endTime"]) - _seconds(status["startTime"])
    return took - FREEZE_TIMEOUT_MINUTES * 60
