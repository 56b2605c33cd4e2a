"""The run driver's state machine as pure decisions: phase, interruptions, cleanup
backoff, retry reasons, and which runs own build resources (the sweeper's view)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kiln import reasons
from kiln.api.run import RunPhase, RunState
from kiln.api.template import ConcurrencyPolicy
from kiln.reconcile import runs as decide
from kiln.reconcile.sweeper import owners
from kiln.reconcile.triggers import schedule_action

Body = dict[str, Any]
STARTED = "2024-05-01T10:00:00Z"
START = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, RunPhase.Queued),
        ({"runState": "Running", "runSubState": "Queued"}, RunPhase.Queued),
        ({"runState": "Running", "templateSnapshot": {"a": 1}}, RunPhase.WaitingForSlot),
        (
            {"runState": "Running", "templateSnapshot": {"a": 1}, "startTime": STARTED},
            RunPhase.Building,
        ),
        (
            {
                "runState": "Canceling",
                "templateSnapshot": {"a": 1},
                "startTime": STARTED,
                "checkpoint": {"ending": {"state": "Canceled"}},
            },
            RunPhase.CleaningUp,
        ),
        (  # canceled while waiting for a slot: ending recorded without a startTime
            {"templateSnapshot": {"a": 1}, "checkpoint": {"ending": {"state": "Canceled"}}},
            RunPhase.CleaningUp,
        ),
        ({"runState": "Failed", "checkpoint": {"ending": {}}}, RunPhase.Done),
        ({"runState": "Succeeded"}, RunPhase.Done),
    ],
)
def test_phase(status: Body, phase: RunPhase) -> None:
    assert decide.phase(status) == phase


def test_the_build_timeout_counts_from_the_slot() -> None:
    assert not decide.timed_out(None, 1, START + timedelta(days=1))  # queued: never
    assert not decide.timed_out(STARTED, 2, START + timedelta(minutes=1, seconds=59))
    assert decide.timed_out(STARTED, 2, START + timedelta(minutes=2, seconds=1))
    default = decide.DEFAULT_TIMEOUT_MINUTES
    assert not decide.timed_out(STARTED, None, START + timedelta(minutes=default - 1))
    assert decide.timed_out(STARTED, None, START + timedelta(minutes=default + 1))


def _run(**status: Any) -> Body:
    spec: Body = {"templateRef": {"name": "t"}}
    meta: Body = {"name": "r", "uid": "u"}
    if status.pop("cancel", False):
        spec["cancel"] = True
    if status.pop("deleting", False):
        meta["deletionTimestamp"] = STARTED
    return {"metadata": meta, "spec": spec, "status": status}


def test_interruptions() -> None:
    later = START + timedelta(minutes=5)
    assert decide.interruption(_run(startTime=STARTED), 10, later) is None
    gone = decide.interruption(None, 10, later)
    assert gone is not None and gone.state is None
    deleting = decide.interruption(_run(deleting=True, cancel=True), 10, later)
    assert deleting is not None and deleting.state is None  # deletion wins: no ending
    canceled = decide.interruption(_run(cancel=True, startTime=STARTED), 1, later)
    assert canceled is not None
    assert (canceled.state, canceled.reason) == (RunState.Canceled, reasons.CANCELED)
    late = decide.interruption(_run(startTime=STARTED), 2, later)
    assert late is not None and (late.state, late.reason) == (RunState.Failed, reasons.TIMED_OUT)
    assert "buildTimeoutInMinutes (2)" in late.message


def test_cleanup_backoff_grows_and_ends() -> None:
    delays = [decide.cleanup_backoff(attempt) for attempt in range(1, 10)]
    assert delays[: decide.CLEANUP_ATTEMPTS - 1] == [10.0, 20.0, 40.0, 80.0]
    assert all(d is None for d in delays[decide.CLEANUP_ATTEMPTS - 1 :])


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("TooManyRequests", "RetryingTooManyRequests"),
        ("AllocationFailed", "RetryingAllocationFailed"),
        ("503", "Retrying503"),
        ("Unreachable", "RetryingUnreachable"),
        ("not-a camel", "RetryingNotACamel"),
    ],
)
def test_retry_reason_names_the_code(code: str, reason: str) -> None:
    assert reasons.retry_reason(code) == reason


def test_owners_are_unfinished_runs_and_kept_vms() -> None:
    runs = [
        {"metadata": {"uid": "queued"}},
        {"metadata": {"uid": "building"}, "status": {"runState": "Running"}},
        {"metadata": {"uid": "cleaning"}, "status": {"runState": "Canceling"}},
        {"metadata": {"uid": "done"}, "status": {"runState": "Succeeded"}},
        {"metadata": {"uid": "failed"}, "status": {"runState": "Failed"}},
        {
            "metadata": {"uid": "kept"},
            "status": {"runState": "Failed", "checkpoint": {"vmKept": True}},
        },
    ]
    assert owners(runs) == {"queued", "building", "cleaning", "kept"}


def _ended(name: str, state: str, end: str) -> Body:
    return {
        "metadata": {"name": name, "creationTimestamp": end},
        "status": {"runState": state, "endTime": end},
    }


def test_history_limits_keep_the_newest_of_each_outcome() -> None:
    runs = [
        _ended("ok-1", "Succeeded", "2024-05-01T10:01:00Z"),
        _ended("ok-2", "Succeeded", "2024-05-01T10:02:00Z"),
        _ended("bad-1", "Failed", "2024-05-01T10:03:00Z"),
        _ended("ok-3", "Succeeded", "2024-05-01T10:04:00Z"),
        _ended("cancel-1", "Canceled", "2024-05-01T10:05:00Z"),
        _ended("ok-4", "Succeeded", "2024-05-01T10:06:00Z"),
        _ended("part-1", "PartiallySucceeded", "2024-05-01T10:07:00Z"),
        {"metadata": {"name": "running"}, "status": {"runState": "Running"}},
        {"metadata": {"name": "queued"}},
    ]
    assert decide.runs_to_prune(runs, None, None) == ["ok-1", "bad-1", "cancel-1"]
    assert decide.runs_to_prune(runs, 1, 2) == ["ok-1", "ok-2", "bad-1", "ok-3"]
    assert decide.runs_to_prune(runs, 10, 10) == []


@pytest.mark.parametrize(
    ("policy", "unfinished", "action"),
    [
        (None, 0, "create"),
        (None, 2, "create"),
        (ConcurrencyPolicy.Allow, 1, "create"),
        (ConcurrencyPolicy.Forbid, 0, "create"),
        (ConcurrencyPolicy.Forbid, 1, "skip"),
        (ConcurrencyPolicy.Replace, 0, "create"),
        (ConcurrencyPolicy.Replace, 1, "replace"),
    ],
)
def test_schedule_concurrency_policy(
    policy: ConcurrencyPolicy | None, unfinished: int, action: str
) -> None:
    assert schedule_action(policy, unfinished) == action


def test_the_index_keeps_what_admission_needs() -> None:
    full = {
        "metadata": {"name": "r", "uid": "u", "creationTimestamp": STARTED, "labels": {"a": "b"}},
        "spec": {"templateRef": {"name": "t"}, "cancel": True},
        "status": {"runState": "Running", "templateSnapshot": {"big": "spec"}, "steps": []},
    }
    entry = decide.index_entry(full)
    assert entry == {
        "metadata": {"name": "r", "uid": "u", "creationTimestamp": STARTED},
        "spec": {"cancel": True},
        "status": {
            "runState": "Running",
            "runSubState": None,
            "message": None,
            "endTime": None,
            "templateSnapshot": True,
            "runOutputs": None,
        },
    }
    other = {"metadata": {"name": "o", "uid": "o", "creationTimestamp": "2024-05-01T09:00:00Z"}}
    other |= {"spec": {"templateRef": {"name": "t"}}}
    # a run building (per the index) holds back a queued one, exactly as with full bodies
    queued = decide.admit(other, {"metadata": {"name": "t"}}, [entry], [])
    assert not queued.start and "is building" in queued.message
