"""`kiln run --wait`: what it prints as a run moves, and when it stops."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest

from kiln.commands import run
from kiln.commands.serve import KopfInfoToDebug

QUEUED: dict[str, Any] = {"runState": "Running", "runSubState": "Queued", "message": "waiting"}
CUSTOMIZING = {
    "runState": "Running",
    "runSubState": "Customizing",
    "message": "running customize-00",
    "steps": [
        {"name": "staging", "state": "Succeeded", "message": "/staging"},
        {"name": "customize", "state": "Running", "message": "running customize-00"},
        {"name": "validate", "state": "Skipped"},
    ],
}
DONE = {
    "runState": "Succeeded",
    "message": "the image was built and distributed.",
    "steps": [
        {"name": "staging", "state": "Succeeded", "message": "/staging"},
        {"name": "customize", "state": "Succeeded", "message": "done"},
        {"name": "validate", "state": "Skipped"},
    ],
}


def test_each_change_is_one_line_and_skipped_steps_say_nothing() -> None:
    assert run.progress_lines(None, QUEUED) == ["Running/Queued: waiting"]
    assert run.progress_lines(QUEUED, CUSTOMIZING) == [
        "step staging Succeeded: /staging",
        "step customize Running: running customize-00",
        "Running/Customizing: running customize-00",
    ]
    assert run.progress_lines(CUSTOMIZING, CUSTOMIZING) == []
    assert run.progress_lines(CUSTOMIZING, DONE) == [
        "step customize Succeeded: done",
        "Succeeded: the image was built and distributed.",
    ]


def test_follow_returns_the_final_state() -> None:
    looks = iter([{"status": QUEUED}, {"status": CUSTOMIZING}, {"status": DONE}])
    out = io.StringIO()
    state = run.follow(lambda: next(looks), out, timeout=60, sleep=lambda _: None)
    assert state == "Succeeded"
    assert out.getvalue().splitlines()[-1].startswith("Succeeded")


def test_follow_gives_up_after_its_timeout() -> None:
    with pytest.raises(run.RunError, match="has not ended"):
        run.follow(lambda: {"status": QUEUED}, io.StringIO(), timeout=-1, sleep=lambda _: None)


def test_the_run_is_named_after_its_template_and_labelled() -> None:
    manifest = run.manifest("debian-12-base", "images")
    assert manifest["metadata"]["generateName"] == "debian-12-base-"
    assert manifest["metadata"]["labels"]["kiln.dev/trigger"] == "kiln-run"
    assert manifest["spec"] == {"templateRef": {"name": "debian-12-base"}}


@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_kopf_info_lines_become_debug(verbose: bool, shown: bool) -> None:
    record = logging.LogRecord(
        "kopf.objects", logging.INFO, "", 0, "Handler 'x' succeeded.", (), None
    )
    assert KopfInfoToDebug(verbose).filter(record) is shown
    assert record.levelno == logging.DEBUG
    warning = logging.LogRecord("kopf.objects", logging.WARNING, "", 0, "boom", (), None)
    assert KopfInfoToDebug(False).filter(warning) is True
