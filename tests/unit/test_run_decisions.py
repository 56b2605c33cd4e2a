"""Decisions about ImageBuildRuns: admission, the next step, the end state and conditions."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.api.run import Checkpoint, RunState, StepState
from kiln.api.validation import SpecProblem
from kiln.reconcile.conditions import find
from kiln.reconcile.runs import (
    admit,
    final_state,
    merge_patch,
    next_step,
    run_conditions,
    run_manifest,
)

Body = dict[str, Any]
NOW = "2024-05-01T10:00:00Z"

TEMPLATE: Body = {
    "metadata": {
        "name": "debian",
        "namespace": "images",
        "uid": "tpl-uid-1",
        "generation": 4,
    },
    "spec": {},
}


def run(
    name: str,
    created: str,
    state: str | None = None,
    *,
    building: bool = False,
    cancel: bool = False,
) -> Body:
    body: Body = {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": {"templateRef": {"name": "debian"}, **({"cancel": True} if cancel else {})},
    }
    status: Body = {}
    if state:
        status["runState"] = state
    if building:
        status["templateSnapshot"] = {"provider": "local"}
    if status:
        body["status"] = status
    return body


ME = run("me", "2024-05-01T10:00:00Z", "Running")


# --- admit ----------------------------------------------------------------------------------


def test_admit_without_template() -> None:
    decision = admit(ME, None, [], [])
    assert not decision.start
    assert decision.reason == "TemplateNotFound"
    assert "debian" in decision.message


def test_admit_template_being_deleted() -> None:
    deleting = {**TEMPLATE, "metadata": {**TEMPLATE["metadata"], "deletionTimestamp": NOW}}
    decision = admit(ME, deleting, [ME], [])
    assert not decision.start
    assert decision.reason == "TemplateNotFound"


def test_admit_invalid_template() -> None:
    problems = [SpecProblem(path="spec.customize[0]", message="give exactly one")]
    decision = admit(ME, TEMPLATE, [ME], problems)
    assert not decision.start
    assert decision.reason == "TemplateInvalid"
    assert "spec.customize[0]: give exactly one" in decision.message


def test_admit_waits_for_a_building_run() -> None:
    other = run("other", "2024-05-01T11:00:00Z", "Running", building=True)
    decision = admit(ME, TEMPLATE, [ME, other], [])
    assert not decision.start
    assert decision.reason == "WaitingForActiveRun"
    assert "other" in decision.message


def test_admit_waits_for_an_older_queued_run() -> None:
    older = run("older", "2024-05-01T09:00:00Z", "Running")
    decision = admit(ME, TEMPLATE, [older, ME], [])
    assert not decision.start
    assert decision.reason == "WaitingForActiveRun"
    assert "older" in decision.message


def test_admit_breaks_creation_time_ties_by_name() -> None:
    same_time = run("aaa", ME["metadata"]["creationTimestamp"])
    assert not admit(ME, TEMPLATE, [same_time, ME], []).start
    assert admit(same_time, TEMPLATE, [same_time, ME], []).start


def test_admit_a_canceled_older_queued_run_does_not_block() -> None:
    older = run("older", "2024-05-01T09:00:00Z", "Running", cancel=True)
    decision = admit(ME, TEMPLATE, [older, ME], [])
    assert decision.start


@pytest.mark.parametrize("state", ["Succeeded", "PartiallySucceeded", "Failed", "Canceled"])
def test_admit_ended_runs_do_not_block(state: str) -> None:
    older = run("older", "2024-05-01T09:00:00Z", state, building=True)
    assert admit(ME, TEMPLATE, [older, ME], []).start


def test_admit_a_newer_queued_run_does_not_block() -> None:
    newer = run("newer", "2024-05-01T11:00:00Z")
    assert admit(ME, TEMPLATE, [ME, newer], []).start


def test_admit_starts() -> None:
    decision = admit(ME, TEMPLATE, [ME], [])
    assert decision.start
    assert decision.reason == "Running"


def test_admit_ignores_itself_even_when_building() -> None:
    me = run("me", "2024-05-01T10:00:00Z", "Running", building=True)
    assert admit(me, TEMPLATE, [me], []).start


# --- next_step ------------------------------------------------------------------------------


def _records(*states: StepState) -> list[Body]:
    return [{"name": f"step{i}", "state": s} for i, s in enumerate(states)]


S = StepState


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ((), None),
        ((S.Pending, S.Pending), 0),
        ((S.Succeeded, S.Running, S.Pending), 1),
        ((S.Succeeded, S.Skipped, S.Pending), 2),
        ((S.Succeeded, S.Failed, S.Pending), 2),
        ((S.Skipped, S.Succeeded, S.Failed), None),
        ((S.Succeeded, S.Succeeded), None),
        ((S.Pending, S.Running), 0),
    ],
)
def test_next_step(states: tuple[StepState, ...], expected: int | None) -> None:
    assert next_step(_records(*states)) == expected


def test_next_step_accepts_plain_strings() -> None:
    assert next_step([{"state": "Succeeded"}, {"state": "Running"}]) == 1


# --- final_state ----------------------------------------------------------------------------


def _targets(*targets: tuple[str, str, str | None]) -> Body:
    """A distribution plan whose targets (name, state, message) ended as given."""
    planned = [
        {"index": i, "runOutputName": name, "type": "VHD", "state": state}
        | ({"message": message} if message else {})
        for i, (name, state, message) in enumerate(targets)
    ]
    return {"distribution": {"targets": planned}}


def _checkpoint(wire: Body) -> Checkpoint:
    """A checkpoint as status holds it (wire names), read back as the driver reads it."""
    template = {"namespace": "images", "name": "debian", "uid": "tpl-uid-1"}
    return Checkpoint.model_validate({"template": template, **wire})


def test_final_state_succeeded() -> None:
    checkpoint = _targets(("vhd", "Succeeded", None))
    state, reason, message = final_state(_checkpoint(checkpoint))
    assert state == RunState.Succeeded
    assert reason == "Succeeded"
    assert message


def test_final_state_succeeded_without_outputs() -> None:
    assert final_state(_checkpoint({}))[0] == RunState.Succeeded


def test_final_state_partially_succeeded_lists_failed_outputs() -> None:
    checkpoint = _targets(
        ("vhd", "Succeeded", None), ("sig", "Failed", "quota"), ("mi", "Failed", "denied")
    )
    state, reason, message = final_state(_checkpoint(checkpoint))
    assert state == RunState.PartiallySucceeded
    assert reason == "PartiallySucceeded"
    assert "1 of 3 outputs distributed" in message
    assert "sig: quota" in message
    assert "mi: denied" in message
    assert "vhd" not in message


def test_final_state_failed_when_validation_failed() -> None:
    checkpoint = {"validationFailure": "check.sh exited 3", **_targets(("vhd", "Succeeded", None))}
    state, reason, message = final_state(_checkpoint(checkpoint))
    assert state == RunState.Failed
    assert reason == "ValidationFailed"
    assert "check.sh exited 3" in message


def test_final_state_validation_failure_wins_over_failed_outputs() -> None:
    checkpoint = {"validationFailure": "bad", **_targets(("vhd", "Failed", "no space"))}
    assert final_state(_checkpoint(checkpoint))[0] == RunState.Failed


# --- run_conditions -------------------------------------------------------------------------


def _flags(conditions: list[Body]) -> tuple[str, str, str]:
    return tuple(find(conditions, t)["status"] for t in ("Ready", "Stalled", "Reconciling"))  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("state", "ready", "stalled", "reconciling"),
    [
        (RunState.Succeeded, "True", "False", "False"),
        (RunState.Failed, "False", "True", "False"),
        (RunState.Canceled, "False", "True", "False"),
        (RunState.PartiallySucceeded, "False", "True", "False"),
        (RunState.Running, "False", "False", "True"),
        (RunState.Canceling, "False", "False", "True"),
    ],
)
def test_run_conditions(state: RunState, ready: str, stalled: str, reconciling: str) -> None:
    conditions = run_conditions(None, state, "Why", "what happened", 2, NOW)
    assert _flags(conditions) == (ready, stalled, reconciling)
    for condition in conditions:
        assert condition["reason"] == "Why"
        assert condition["observedGeneration"] == 2
        assert condition["message"].strip()


def test_run_conditions_keep_transition_time_while_running() -> None:
    first = run_conditions(None, RunState.Running, "Running", "building", 1, NOW)
    later = run_conditions(
        first, RunState.Running, "Running", "customizing", 1, "2024-05-02T00:00:00Z"
    )
    assert find(later, "Reconciling")["lastTransitionTime"] == NOW
    assert find(later, "Reconciling")["message"] == "customizing"


# --- run_manifest ---------------------------------------------------------------------------


def test_run_manifest() -> None:
    manifest = run_manifest(TEMPLATE, "debian-g4-tpl-u", "autoRun")
    assert manifest["apiVersion"] == "kiln.dev/v1alpha1"
    assert manifest["kind"] == "ImageBuildRun"
    meta = manifest["metadata"]
    assert meta["name"] == "debian-g4-tpl-u"
    assert meta["namespace"] == "images"
    assert meta["labels"] == {
        "kiln.dev/template": "debian",
        "kiln.dev/template-uid": "tpl-uid-1",
        "kiln.dev/trigger": "autoRun",
        "kiln.dev/template-generation": "4",
    }
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ImageTemplate",
            "name": "debian",
            "uid": "tpl-uid-1",
        }
    ]
    assert manifest["spec"] == {"templateRef": {"name": "debian"}}


def test_run_manifest_label_values_fit_63_characters() -> None:
    long = {**TEMPLATE, "metadata": {**TEMPLATE["metadata"], "name": "t" * 100}}
    manifest = run_manifest(long, "r", "Schedule")
    assert all(len(v) <= 63 for v in manifest["metadata"]["labels"].values())
    assert manifest["spec"]["templateRef"]["name"] == "t" * 100
    assert manifest["metadata"]["ownerReferences"][0]["name"] == "t" * 100


def test_a_checkpoint_patch_removes_what_the_checkpoint_dropped() -> None:
    stored = {
        "scriptIndex": {"customize": 3},
        "windows": {"step": "customize-03", "update": {"pending": {"a": 1, "b": 2}}},
        "azure": {"operations": {"vm": "token", "nic": "done"}},
    }
    new = {"scriptIndex": {"customize": 4}, "azure": {"operations": {"nic": "done"}}}
    assert merge_patch(stored, new) == {
        "scriptIndex": {"customize": 4},
        "azure": {"operations": {"nic": "done", "vm": None}},
        "windows": None,
    }
    assert merge_patch(None, new) == new
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
