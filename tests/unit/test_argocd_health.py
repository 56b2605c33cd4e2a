"""The Argo CD health script (integrations/argocd/health.lua) on the statuses Kiln writes,
as the operator's own status functions make them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln import reasons
from kiln.api.run import RunState
from kiln.reconcile.runs import run_conditions
from kiln.reconcile.templates import template_status
from kiln.settings import OperatorSettings
from kubehelpers import argocd_health as health
from kubehelpers import valid_spec

NOW = "2026-11-23T12:00:00Z"


def template(spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    body = {"metadata": {"name": "t", "namespace": "default", "generation": generation}}
    return body | {"spec": spec}


def with_status(body: dict[str, Any], runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    settings = OperatorSettings(data_root=Path("/nonexistent"))
    return body | {"status": template_status(body, runs or [], settings, None, NOW)}


def test_a_valid_template_is_healthy() -> None:
    result = health(with_status(template({**valid_spec(), "provider": "local"})))
    assert result == {
        "status": "Healthy",
        "message": "The template is valid; create an ImageBuildRun to build it.",
    }


def test_an_invalid_template_is_degraded_with_the_field_to_fix() -> None:
    spec = {**valid_spec(), "provider": "local", "buildTimeoutInMinutes": 5000}
    result = health(with_status(template(spec)))
    assert result["status"] == "Degraded"
    assert "spec.buildTimeoutInMinutes" in result["message"]


def test_a_template_building_its_auto_run_is_progressing() -> None:
    spec = {**valid_spec(), "provider": "local", "autoRun": {"state": "Enabled"}}
    result = health(with_status(template(spec)))
    assert result["status"] == "Progressing" and "autoRun" in result["message"]


def test_a_change_kiln_has_not_seen_is_progressing() -> None:
    body = with_status(template({**valid_spec(), "provider": "local"}))
    body["metadata"]["generation"] = 2
    assert health(body) == {
        "status": "Progressing",
        "message": "Waiting for Kiln to observe generation 2",
    }


def test_an_object_without_status_is_progressing() -> None:
    assert health(template(valid_spec()))["status"] == "Progressing"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (RunState.Running, "Progressing"),
        (RunState.Succeeded, "Healthy"),
        (RunState.PartiallySucceeded, "Degraded"),
        (RunState.Failed, "Degraded"),
        (RunState.Canceled, "Degraded"),
    ],
)
def test_runs_follow_their_state(state: RunState, expected: str) -> None:
    message = f"the run is {state}"
    conditions = run_conditions(None, state, reasons.BUILDING, message, 1, NOW)
    run = {"metadata": {"name": "r", "generation": 1}}
    run |= {"status": {"observedGeneration": 1, "conditions": conditions, "runState": state}}
    result = health(run)
    assert result["status"] == expected
    assert result["message"] == message
