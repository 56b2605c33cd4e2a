"""Where `kiln logs` finds a run's log, and what it says when the log is elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.commands.logs import LogsError, log_path


def run(checkpoint: dict[str, Any] | None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "app-1", "namespace": "images"},
        "status": {"checkpoint": checkpoint, **status},
    }


def test_a_run_not_yet_staged_has_no_log(tmp_path: Path) -> None:
    queued = run({"logPath": str(tmp_path / "app-1" / "customization.log")}, runState="Queued")
    with pytest.raises(LogsError, match=r"has no log yet \(state: Queued"):
        log_path(queued)


def test_the_log_on_this_machine_is_read(tmp_path: Path) -> None:
    (tmp_path / "app-1").mkdir()
    log = tmp_path / "app-1" / "customization.log"
    assert log_path(run({"logPath": str(log), "staging": "x"})) == log


def test_a_log_on_another_machine_says_how_to_read_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "operator-node" / "app-1" / "customization.log"
    with pytest.raises(LogsError) as local:
        log_path(run({"logPath": str(elsewhere), "staging": "x"}))
    assert f"the log is on the operator's machine ({elsewhere}), not this one" in str(local.value)
    assert "kubectl exec -n <namespace> deploy/kiln -- kiln logs app-1 -n images" in str(
        local.value
    )
    uri = "https://kiln0123.blob.core.windows.net/packerlogs/app-1/customization.log"
    with pytest.raises(LogsError, match=f"a copy is at {uri}"):
        log_path(run({"logPath": str(elsewhere), "staging": "x", "logUri": uri}))
