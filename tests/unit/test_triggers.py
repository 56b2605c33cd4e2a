"""Schedule and SourceImage triggers: when a run is due and what it is called."""

from __future__ import annotations

from datetime import datetime

import pytest

from kiln.api.template import ImageTemplateSpec
from kiln.reconcile.triggers import (
    has_source_trigger,
    parse_time,
    schedule_due,
    schedule_trigger,
    scheduled_run_name,
    source_changed,
    source_run_name,
)
from kubehelpers import valid_spec

DAILY_3AM = "0 3 * * *"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("schedule", "last", "created", "now", "expected"),
    [
        # due after creation
        (DAILY_3AM, None, "2024-05-01 00:00", "2024-05-01 03:30", "2024-05-01 03:00"),
        # not before the first time after creation
        (DAILY_3AM, None, "2024-05-01 00:00", "2024-05-01 02:59", None),
        # a schedule time before creation does not count
        (DAILY_3AM, None, "2024-05-01 03:30", "2024-05-01 04:00", None),
        (DAILY_3AM, None, "2024-05-01 03:30", "2024-05-02 02:00", None),
        # not again once it ran
        (DAILY_3AM, "2024-05-01 03:00", "2024-05-01 00:00", "2024-05-01 04:00", None),
        (DAILY_3AM, "2024-05-01 03:00", "2024-05-01 00:00", "2024-05-02 02:59", None),
        # the next time after the last run
        (DAILY_3AM, "2024-05-01 03:00", "2024-05-01 00:00", "2024-05-02 03:01", "2024-05-02 03:00"),
        # missed times collapse into the latest one
        (DAILY_3AM, "2024-05-01 03:00", "2024-05-01 00:00", "2024-05-05 12:00", "2024-05-05 03:00"),
        (DAILY_3AM, None, "2024-04-01 00:00", "2024-05-05 12:00", "2024-05-05 03:00"),
        # weekly, Mondays (2024-05-06 is a Monday)
        ("0 3 * * 1", None, "2024-05-01 00:00", "2024-05-06 03:00:01", "2024-05-06 03:00"),
        ("0 3 * * 1", None, "2024-05-01 00:00", "2024-05-05 23:00", None),
        # every 15 minutes
        (
            "*/15 * * * *",
            "2024-05-01 10:15",
            "2024-05-01 00:00",
            "2024-05-01 10:44",
            "2024-05-01 10:30",
        ),
    ],
)
def test_schedule_due(
    schedule: str, last: str | None, created: str, now: str, expected: str | None
) -> None:
    due = schedule_due(schedule, at(last) if last else None, at(created), at(now))
    assert due == (at(expected) if expected else None)


def test_schedule_due_the_result_becomes_the_last_time() -> None:
    created, now = at("2024-05-01 00:00"), at("2024-05-03 05:00")
    due = schedule_due(DAILY_3AM, None, created, now)
    assert due == at("2024-05-03 03:00")
    assert schedule_due(DAILY_3AM, due, created, now) is None


def test_parse_time() -> None:
    assert parse_time("2024-05-01T03:04:05Z") == datetime(2024, 5, 1, 3, 4, 5)
    with pytest.raises(ValueError):
        parse_time("2024-05-01 03:04:05")


@pytest.mark.parametrize(
    ("recorded", "current", "changed"),
    [
        (None, "12.1.0", False),  # first sighting: only recorded
        ("", "12.1.0", False),
        ("12.1.0", "12.1.0", False),
        ("12.1.0", "12.2.0", True),
        ("12.1.0", None, False),  # could not resolve now: no run
        (None, None, False),
    ],
)
def test_source_changed(recorded: str | None, current: str | None, changed: bool) -> None:
    assert source_changed(recorded, current) is changed


def test_scheduled_run_name_is_stable_and_distinct() -> None:
    one = scheduled_run_name("debian", at("2024-05-01 03:00"))
    assert one == "debian-sched-202405010300"
    assert one == scheduled_run_name("debian", at("2024-05-01 03:00"))
    assert one != scheduled_run_name("debian", at("2024-05-02 03:00"))
    assert one != scheduled_run_name("debian", at("2024-05-01 03:15"))
    assert one != scheduled_run_name("ubuntu", at("2024-05-01 03:00"))


def test_source_run_name_is_stable_and_distinct() -> None:
    one = source_run_name("debian", "12.20240501.1")
    assert one == source_run_name("debian", "12.20240501.1")
    assert one.startswith("debian-src-")
    assert len(one) == len("debian-src-") + 10
    assert one != source_run_name("debian", "12.20240502.1")
    assert one != source_run_name("ubuntu", "12.20240501.1")


def test_run_names_fit_a_kubernetes_name() -> None:
    assert len(scheduled_run_name("t" * 253, at("2024-05-01 03:00"))) <= 253
    assert len(source_run_name("t" * 253, "1.0.0")) <= 253


def _spec(triggers: list[dict] | None) -> ImageTemplateSpec:
    extra = {"triggers": triggers} if triggers is not None else {}
    return ImageTemplateSpec.model_validate({**valid_spec(), **extra})


def test_schedule_trigger_and_source_trigger_lookup() -> None:
    both = _spec([{"kind": "SourceImage"}, {"kind": "Schedule", "schedule": DAILY_3AM}])
    trigger = schedule_trigger(both)
    assert trigger is not None
    assert trigger.schedule == DAILY_3AM
    assert has_source_trigger(both)

    schedule_only = _spec([{"kind": "Schedule", "schedule": DAILY_3AM}])
    assert not has_source_trigger(schedule_only)

    source_only = _spec([{"kind": "SourceImage"}])
    assert schedule_trigger(source_only) is None

    none = _spec(None)
    assert schedule_trigger(none) is None
    assert not has_source_trigger(none)
