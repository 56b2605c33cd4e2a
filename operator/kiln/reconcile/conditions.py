"""metav1.Condition bookkeeping as pure functions over plain status dicts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from kiln import reasons

ConditionList = list[dict[str, Any]]
Status = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: ConditionList | None,
    type_: str,
    status: Status,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> ConditionList:
    """A new list with one condition set; lastTransitionTime moves only when status changes."""
    existing = {c["type"]: c for c in conditions or []}
    previous = existing.get(type_)
    transition = (
        previous["lastTransitionTime"] if previous and previous["status"] == status else now
    )
    existing[type_] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }
    return list(existing.values())


def find(conditions: ConditionList | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: ConditionList | None, type_: str) -> bool:
    condition = find(conditions, type_)
    return bool(condition and condition.get("status") == "True")


def kstatus(
    conditions: ConditionList | None,
    *,
    ready: bool,
    reconciling: bool,
    stalled: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> ConditionList:
    """Ready/Reconciling/Stalled together, so they never contradict one another."""
    if ready and stalled:
        raise ValueError("an object cannot be Ready and Stalled at once")
    result = set_condition(
        conditions, reasons.READY, "True" if ready else "False", reason, message, generation, now
    )
    result = set_condition(
        result,
        reasons.RECONCILING,
        "True" if reconciling else "False",
        reason,
        message if reconciling else "Nothing is in progress.",
        generation,
        now,
    )
    return set_condition(
        result,
        reasons.STALLED,
        "True" if stalled else "False",
        reason,
        message if stalled else "Nothing blocks progress.",
        generation,
        now,
    )
