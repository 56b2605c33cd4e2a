"""When a template's triggers start a run: pure functions of spec, status and time."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

from croniter import croniter

from kiln.api.template import (
    ConcurrencyPolicy,
    ImageTemplateSpec,
    ScheduleTrigger,
    SourceImageTrigger,
)

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, TIME_FORMAT)


def schedule_due(
    schedule: str, last: datetime | None, created: datetime, now: datetime
) -> datetime | None:
    """The latest scheduled time not yet run (after creation and the last run), if any.

    Missed times while the operator was down collapse into one run, as CronJob does.
    """
    due: datetime = croniter(schedule, now).get_prev(datetime)
    floor = max(t for t in (last, created) if t is not None)
    return due if due > floor else None


def schedule_trigger(spec: ImageTemplateSpec) -> ScheduleTrigger | None:
    return next((t for t in spec.triggers or [] if isinstance(t, ScheduleTrigger)), None)


def has_source_trigger(spec: ImageTemplateSpec) -> bool:
    return any(isinstance(t, SourceImageTrigger) for t in spec.triggers or [])


def source_changed(recorded: str | None, current: str | None) -> bool:
    """A run is due when 'latest' moved; the first version seen is only recorded."""
    return bool(recorded and current and recorded != current)


def scheduled_run_name(template: str, due: datetime) -> str:
    return f"{template[:200]}-sched-{due:%Y%m%d%H%M}"


def source_run_name(template: str, version: str) -> str:
    return f"{template[:200]}-src-{hashlib.sha256(version.encode()).hexdigest()[:10]}"


ScheduleAction = Literal["create", "skip", "replace"]


def schedule_action(policy: ConcurrencyPolicy | None, unfinished: int) -> ScheduleAction:
    """What a due schedule does, given the template's unfinished runs (CronJob's rules)."""
    if unfinished == 0 or policy in (None, ConcurrencyPolicy.Allow):
        return "create"
    return "skip" if policy == ConcurrencyPolicy.Forbid else "replace"
