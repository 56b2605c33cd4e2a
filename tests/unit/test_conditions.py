"""metav1.Condition bookkeeping: transition times, independence of types, kstatus coherence."""

from __future__ import annotations

import itertools
import re

import pytest

from kiln import reasons
from kiln.api.status import Condition
from kiln.reconcile.conditions import find, is_true, kstatus, now_rfc3339, set_condition

T0 = "2024-05-01T10:00:00Z"
T1 = "2024-05-01T11:00:00Z"
T2 = "2024-05-01T12:00:00Z"


def _by_type(conditions: list[dict]) -> dict[str, dict]:
    return {c["type"]: c for c in conditions}


def test_new_condition_gets_now_and_all_fields() -> None:
    [condition] = set_condition(None, "Ready", "True", "SpecValid", "fine", 3, T0)
    assert condition == {
        "type": "Ready",
        "status": "True",
        "reason": "SpecValid",
        "message": "fine",
        "observedGeneration": 3,
        "lastTransitionTime": T0,
    }
    Condition.model_validate(condition)  # the shape the CRD declares


def test_transition_time_kept_when_status_unchanged() -> None:
    first = set_condition(None, "Ready", "False", "Building", "one", 1, T0)
    second = set_condition(first, "Ready", "False", "BuildFailed", "two", 2, T1)
    [condition] = second
    assert condition["lastTransitionTime"] == T0
    # Everything but the transition time follows the new call.
    assert condition["reason"] == "BuildFailed"
    assert condition["message"] == "two"
    assert condition["observedGeneration"] == 2


@pytest.mark.parametrize(
    ("before", "after"), [("False", "True"), ("True", "False"), ("Unknown", "True")]
)
def test_transition_time_moves_when_status_changes(before: str, after: str) -> None:
    first = set_condition(None, "Ready", before, "A", "m", 1, T0)  # type: ignore[arg-type]
    [condition] = set_condition(first, "Ready", after, "B", "m", 1, T1)  # type: ignore[arg-type]
    assert condition["status"] == after
    assert condition["lastTransitionTime"] == T1


def test_transition_time_kept_across_many_unchanged_passes() -> None:
    conditions = set_condition(None, "Stalled", "True", "X", "m", 1, T0)
    for now in (T1, T2):
        conditions = set_condition(conditions, "Stalled", "True", "X", "m", 1, now)
    assert find(conditions, "Stalled")["lastTransitionTime"] == T0


def test_other_conditions_are_untouched() -> None:
    accepted = {
        "type": "Accepted",
        "status": "True",
        "reason": "SpecValid",
        "message": "ok",
        "observedGeneration": 1,
        "lastTransitionTime": T0,
        "extra": "kept as is",
    }
    previous = [dict(accepted)]
    result = set_condition(previous, "Ready", "False", "Building", "m", 2, T1)
    assert _by_type(result)["Accepted"] == accepted
    assert [c["type"] for c in result] == ["Accepted", "Ready"]


def test_input_list_is_not_mutated() -> None:
    previous = set_condition(None, "Ready", "False", "A", "m", 1, T0)
    snapshot = [dict(c) for c in previous]
    set_condition(previous, "Ready", "True", "B", "n", 2, T1)
    assert previous == snapshot


def test_order_of_existing_conditions_is_kept_when_updating() -> None:
    conditions = set_condition(None, "A", "True", "R", "m", 1, T0)
    conditions = set_condition(conditions, "B", "True", "R", "m", 1, T0)
    conditions = set_condition(conditions, "A", "False", "R", "m", 1, T1)
    assert [c["type"] for c in conditions] == ["A", "B"]


def test_find_and_is_true() -> None:
    conditions = set_condition(None, "Ready", "True", "R", "m", 1, T0)
    conditions = set_condition(conditions, "Stalled", "Unknown", "R", "m", 1, T0)
    assert find(conditions, "Ready")["status"] == "True"
    assert find(conditions, "Missing") is None
    assert find(None, "Ready") is None
    assert is_true(conditions, "Ready")
    assert not is_true(conditions, "Stalled")
    assert not is_true(conditions, "Missing")
    assert not is_true(None, "Ready")


def test_now_is_rfc3339_utc() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_rfc3339())


FLAGS = list(itertools.product([False, True], repeat=3))
# What callers may ask for: Ready and Stalled together is a contradiction.
CONSISTENT = [(ready, rec, stalled) for ready, rec, stalled in FLAGS if not (ready and stalled)]


def _kstatus(ready: bool, reconciling: bool, stalled: bool, message: str = "msg") -> list[dict]:
    return kstatus(
        None,
        ready=ready,
        reconciling=reconciling,
        stalled=stalled,
        reason="Why",
        message=message,
        generation=4,
        now=T0,
    )


@pytest.mark.parametrize(("ready", "reconciling", "stalled"), CONSISTENT)
def test_kstatus_sets_the_three_conditions(ready: bool, reconciling: bool, stalled: bool) -> None:
    conditions = _by_type(_kstatus(ready, reconciling, stalled))
    assert set(conditions) == {reasons.READY, reasons.RECONCILING, reasons.STALLED}
    assert conditions["Ready"]["status"] == str(ready)
    assert conditions["Reconciling"]["status"] == str(reconciling)
    assert conditions["Stalled"]["status"] == str(stalled)
    for condition in conditions.values():
        assert condition["reason"] == "Why"
        assert condition["observedGeneration"] == 4
    assert conditions["Ready"]["message"] == "msg"
    assert (conditions["Reconciling"]["message"] == "msg") is reconciling
    assert (conditions["Stalled"]["message"] == "msg") is stalled


@pytest.mark.parametrize(("ready", "reconciling", "stalled"), FLAGS)
def test_kstatus_never_ready_and_stalled(ready: bool, reconciling: bool, stalled: bool) -> None:
    """Ready True with Stalled True contradicts itself: refuse it or resolve it."""
    try:
        conditions = _kstatus(ready, reconciling, stalled)
    except ValueError:
        return
    assert not (is_true(conditions, "Ready") and is_true(conditions, "Stalled"))


@pytest.mark.parametrize(("ready", "reconciling", "stalled"), CONSISTENT)
def test_kstatus_messages_are_never_empty(ready: bool, reconciling: bool, stalled: bool) -> None:
    for condition in _kstatus(ready, reconciling, stalled):
        assert isinstance(condition["message"], str)
        assert condition["message"].strip(), condition


def test_kstatus_keeps_other_conditions_and_transition_times() -> None:
    accepted = set_condition(None, "Accepted", "True", "SpecValid", "ok", 1, T0)
    first = kstatus(
        accepted,
        ready=False,
        reconciling=True,
        stalled=False,
        reason="Building",
        message="building",
        generation=1,
        now=T0,
    )
    second = _by_type(
        kstatus(
            first,
            ready=True,
            reconciling=False,
            stalled=False,
            reason="ImageBuilt",
            message="built",
            generation=1,
            now=T1,
        )
    )
    assert second["Accepted"] == accepted[0]
    assert second["Ready"]["lastTransitionTime"] == T1  # False -> True
    assert second["Reconciling"]["lastTransitionTime"] == T1  # True -> False
    assert second["Stalled"]["lastTransitionTime"] == T0  # False -> False
