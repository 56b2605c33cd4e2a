"""Decisions about runs: when one may start, which step is next, how it ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from kiln import GROUP, VERSION, reasons
from kiln.api.distribution import TargetState
from kiln.api.run import TERMINAL_RUN_STATES, Checkpoint, RunPhase, RunState, StepState
from kiln.api.validation import SpecProblem
from kiln.reconcile.conditions import kstatus
from kiln.reconcile.templates import (
    LABEL_GENERATION,
    LABEL_TEMPLATE,
    LABEL_TEMPLATE_UID,
    LABEL_TRIGGER,
    describe_problems,
    is_building,
)

Body = dict[str, Any]
ACTIVE_STATES = (RunState.Running, RunState.Canceling)
DEFAULT_TIMEOUT_MINUTES = 240
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
CLEANUP_ATTEMPTS = 5
CLEANUP_FIRST_BACKOFF_SECONDS = 10.0
CLEANUP_MAX_BACKOFF_SECONDS = 300.0


def run_manifest(template: Body, name: str, trigger: str) -> Body:
    """A run that Kiln starts itself (autoRun, Schedule, SourceImage), owned by its template."""
    meta = template["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageBuildRun",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
                LABEL_TEMPLATE: label_value(meta["name"]),
                LABEL_TEMPLATE_UID: meta["uid"],
                LABEL_TRIGGER: trigger,
                LABEL_GENERATION: str(meta.get("generation", "")),
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ImageTemplate",
                    "name": meta["name"],
                    "uid": meta["uid"],
                }
            ],
        },
        "spec": {"templateRef": {"name": meta["name"]}},
    }


def label_value(text: str) -> str:
    """At most 63 characters, ending in a letter or digit, as label values must."""
    return text[:63].rstrip("-_.")


class Admission(BaseModel):
    start: bool
    reason: str
    message: str


def _state(run: Body) -> str | None:
    return (run.get("status") or {}).get("runState")


def admit(
    run: Body, template: Body | None, siblings: list[Body], problems: list[SpecProblem]
) -> Admission:
    """May this queued run start now? Only one active run per template; oldest first."""
    template_name = run["spec"]["templateRef"]["name"]
    if template is None or template["metadata"].get("deletionTimestamp"):
        return Admission(
            start=False,
            reason=reasons.TEMPLATE_NOT_FOUND,
            message=f"ImageTemplate {template_name} does not exist (or is being deleted); "
            "the run starts when it does.",
        )
    if problems:
        return Admission(
            start=False,
            reason=reasons.TEMPLATE_INVALID,
            message=f"ImageTemplate {template_name} is invalid: {describe_problems(problems)}",
        )
    others = [s for s in siblings if s["metadata"]["uid"] != run["metadata"]["uid"]]
    building = [s for s in others if is_building(s)]
    if building:
        name = building[0]["metadata"]["name"]
        return Admission(
            start=False,
            reason=reasons.WAITING_FOR_ACTIVE_RUN,
            message=f"run {name} is building template {template_name}; this run starts when "
            "it ends.",
        )
    key = (run["metadata"].get("creationTimestamp", ""), run["metadata"]["name"])
    older = [
        s
        for s in others
        if _state(s) not in TERMINAL_RUN_STATES
        and (s["metadata"].get("creationTimestamp", ""), s["metadata"]["name"]) < key
        and not (s.get("spec") or {}).get("cancel")
    ]
    if older:
        name = older[0]["metadata"]["name"]
        return Admission(
            start=False,
            reason=reasons.WAITING_FOR_ACTIVE_RUN,
            message=f"run {name} was queued first for template {template_name}.",
        )
    return Admission(start=True, reason=reasons.RUNNING, message="building")


def next_step(records: list[Body]) -> int | None:
    """Index of the first step still to do; a Failed step that was let through counts as done."""
    for index, record in enumerate(records):
        if record["state"] in (StepState.Pending, StepState.Running):
            return index
    return None


def final_state(checkpoint: Checkpoint) -> tuple[RunState, str, str]:
    """runState, reason and message once every step has run."""
    targets = checkpoint.distribution.targets if checkpoint.distribution else []
    failed = [t for t in targets if t.state == TargetState.Failed]
    if checkpoint.validation_failure:
        return (
            RunState.Failed,
            reasons.VALIDATION_FAILED,
            f"validation failed ({checkpoint.validation_failure}); the image was distributed "
            "because continueDistributeOnFailure is true.",
        )
    if failed:
        detail = "; ".join(f"{t.run_output_name}: {t.message or ''}" for t in failed)
        return (
            RunState.PartiallySucceeded,
            reasons.PARTIALLY_SUCCEEDED,
            f"{len(targets) - len(failed)} of {len(targets)} outputs distributed; failed: "
            f"{detail}. Fix the failed targets (status.distribution says why) and run again.",
        )
    return RunState.Succeeded, reasons.SUCCEEDED, "the image was built and distributed."


def run_conditions(
    previous: list[Body] | None,
    state: RunState,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[Body]:
    """kstatus for runs: Ready only when Succeeded, Stalled once nothing more will happen."""
    terminal = state in TERMINAL_RUN_STATES
    return kstatus(
        previous,
        ready=state == RunState.Succeeded,
        reconciling=not terminal,
        stalled=terminal and state != RunState.Succeeded,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )


def phase(status: Body) -> RunPhase:
    """The state machine's state, from what the status persisted (nothing in memory)."""
    if status.get("runState") in TERMINAL_RUN_STATES:
        return RunPhase.Done
    if not status.get("templateSnapshot"):
        return RunPhase.Queued
    if (status.get("checkpoint") or {}).get("ending"):
        return RunPhase.CleaningUp
    if not status.get("startTime"):
        return RunPhase.WaitingForSlot
    return RunPhase.Building


class Interruption(BaseModel):
    """Why a step in flight must stop now. state None: stop without ending the run (it
    is being deleted, or the operator is stopping and another one resumes it)."""

    state: RunState | None
    reason: str
    message: str


def timed_out(start_time: str | None, timeout_minutes: int | None, now: datetime) -> bool:
    """The build timeout counts from startTime, written when the run got its slot."""
    if not start_time:
        return False
    begun = datetime.strptime(start_time, TIME_FORMAT).replace(tzinfo=UTC)
    return now > begun + timedelta(minutes=timeout_minutes or DEFAULT_TIMEOUT_MINUTES)


def interruption(
    run: Body | None, timeout_minutes: int | None, now: datetime
) -> Interruption | None:
    """Deleted, canceled or past its build timeout: checked while a step is in flight."""
    if run is None or run["metadata"].get("deletionTimestamp"):
        return Interruption(state=None, reason="Deleted", message="the run is being deleted")
    if (run.get("spec") or {}).get("cancel"):
        return Interruption(
            state=RunState.Canceled,
            reason=reasons.CANCELED,
            message="canceled; build resources removed.",
        )
    if timed_out((run.get("status") or {}).get("startTime"), timeout_minutes, now):
        minutes = timeout_minutes or DEFAULT_TIMEOUT_MINUTES
        return Interruption(
            state=RunState.Failed,
            reason=reasons.TIMED_OUT,
            message=f"the build took longer than buildTimeoutInMinutes ({minutes}); raise it "
            "or make the build faster",
        )
    return None


def cleanup_backoff(attempt: int) -> float | None:
    """Seconds before cleanup attempt `attempt + 1`; None once the attempts are used up."""
    if attempt >= CLEANUP_ATTEMPTS:
        return None
    return min(CLEANUP_FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1), CLEANUP_MAX_BACKOFF_SECONDS)


DEFAULT_SUCCESSFUL_HISTORY = 3
DEFAULT_FAILED_HISTORY = 1


def runs_to_prune(
    runs: list[Body], successful_limit: int | None, failed_limit: int | None
) -> list[str]:
    """Names of finished runs beyond the template's history limits, oldest first: the
    newest `limit` succeeded runs stay, and the newest failed (or canceled) ones."""

    def newest_first(run: Body) -> tuple[str, str]:
        status = run.get("status") or {}
        return (status.get("endTime") or "", run["metadata"].get("creationTimestamp") or "")

    ended = sorted((r for r in runs if _state(r) in TERMINAL_RUN_STATES), key=newest_first)
    ended.reverse()
    succeeded = [r for r in ended if _state(r) == RunState.Succeeded]
    others = [r for r in ended if _state(r) != RunState.Succeeded]
    keep_ok = successful_limit or DEFAULT_SUCCESSFUL_HISTORY
    keep_failed = failed_limit or DEFAULT_FAILED_HISTORY
    prune = succeeded[keep_ok:] + others[keep_failed:]
    return [r["metadata"]["name"] for r in sorted(prune, key=newest_first)]


def index_entry(run: Body) -> Body:
    """What admission, pruning, triggers and a template's status need of a run (the kopf
    index keeps this)."""
    meta, status = run["metadata"], run.get("status") or {}
    return {
        "metadata": {
            "name": meta["name"],
            "uid": meta["uid"],
            "creationTimestamp": meta.get("creationTimestamp"),
        },
        "spec": {"cancel": bool((run.get("spec") or {}).get("cancel"))},
        "status": {
            "runState": status.get("runState"),
            "runSubState": status.get("runSubState"),
            "message": status.get("message"),
            "endTime": status.get("endTime"),
            "templateSnapshot": bool(status.get("templateSnapshot")) or None,
            "runOutputs": status.get("runOutputs"),
        },
    }


def merge_patch(stored: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386, what a status patch is) that turns stored into new:
    a field or map key that new lacks is sent as null, else the API server keeps the old
    one, and a checkpoint reloaded after a restart would bring it back."""
    if not isinstance(stored, dict) or not isinstance(new, dict):
        return new
    patch = {key: merge_patch(stored.get(key), value) for key, value in new.items()}
    patch.update({key: None for key in stored if key not in new})
    return patch
