"""An ImageTemplate's status, decided from its spec, its runs and the operator's settings."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kiln.api.template import Provider
from kiln.reconcile.conditions import find, is_true
from kiln.reconcile.templates import (
    auto_run_enabled,
    auto_run_name,
    effective_spec,
    is_building,
    problems_of,
    spec_hash,
    template_status,
)
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec

Body = dict[str, Any]
NOW = "2024-05-01T10:00:00Z"
LATER = "2024-05-01T11:00:00Z"

VALID_SPEC: Body = valid_spec()
LOCAL = OperatorSettings(default_provider=Provider.local)


def template(spec: Body | None = None, generation: int = 1, **status: Any) -> Body:
    return {
        "metadata": {
            "name": "debian",
            "namespace": "images",
            "uid": "abcdef12-3456-7890-abcd-ef1234567890",
            "generation": generation,
            "creationTimestamp": "2024-04-01T00:00:00Z",
        },
        "spec": copy.deepcopy(VALID_SPEC if spec is None else spec),
        **({"status": status} if status else {}),
    }


def auto_template(generation: int = 1) -> Body:
    return template({**VALID_SPEC, "autoRun": {"state": "Enabled"}}, generation=generation)


def run(name: str, created: str, state: str | None = None, **status: Any) -> Body:
    body: Body = {
        "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": {"templateRef": {"name": "debian"}},
    }
    if state or status:
        body["status"] = {**({"runState": state} if state else {}), **status}
    return body


def status_of(tpl: Body, runs: list[Body] | None = None) -> Body:
    return template_status(tpl, runs or [], LOCAL, "/staging/debian", NOW)


def condition(status: Body, type_: str) -> Body:
    found = find(status["conditions"], type_)
    assert found is not None, f"no {type_} condition"
    return found


# --- effective_spec -------------------------------------------------------------------------


def test_effective_spec_fills_defaults_from_settings() -> None:
    settings = OperatorSettings(
        default_provider=Provider.azure,
        location="westeurope",
        resource_group="images-rg",
        subscription_id="0000-1111",
    )
    spec = effective_spec(VALID_SPEC, settings)
    assert spec["provider"] == "azure"
    assert spec["location"] == "westeurope"
    assert spec["resourceGroup"] == "images-rg"
    assert spec["subscriptionId"] == "0000-1111"


def test_effective_spec_never_overrides_the_spec() -> None:
    settings = OperatorSettings(
        default_provider=Provider.azure,
        location="westeurope",
        resource_group="images-rg",
        subscription_id="0000-1111",
    )
    raw = {
        **VALID_SPEC,
        "provider": "local",
        "location": "northeurope",
        "resourceGroup": "mine",
        "subscriptionId": "2222",
    }
    spec = effective_spec(raw, settings)
    assert {k: spec[k] for k in ("provider", "location", "resourceGroup", "subscriptionId")} == {
        "provider": "local",
        "location": "northeurope",
        "resourceGroup": "mine",
        "subscriptionId": "2222",
    }


def test_effective_spec_local_provider_gets_local_place() -> None:
    spec = effective_spec(VALID_SPEC, LOCAL)
    assert spec["provider"] == "local"
    assert spec["location"] == "local"
    assert spec["resourceGroup"] == "local"
    assert "subscriptionId" not in spec


def test_effective_spec_azure_without_settings_leaves_place_unset() -> None:
    settings = OperatorSettings(
        default_provider=Provider.azure, azure_communicator_source="203.0.113.7/32"
    )
    spec = effective_spec(VALID_SPEC, settings)
    assert spec["provider"] == "azure"
    assert "location" not in spec
    assert "resourceGroup" not in spec
    paths = {p.path for p in problems_of(spec, settings)}
    assert paths == {"spec.location", "spec.resourceGroup", "spec.subscriptionId"}


def test_effective_spec_does_not_mutate_its_input() -> None:
    raw = copy.deepcopy(VALID_SPEC)
    effective_spec(raw, OperatorSettings(location="x", resource_group="y"))
    assert raw == VALID_SPEC


def test_problems_of_unknown_provider() -> None:
    [problem] = problems_of({**VALID_SPEC, "provider": "gcp"}, LOCAL)
    assert problem.path == "spec.provider"
    assert "azure or local" in problem.message


# --- spec_hash ------------------------------------------------------------------------------


def test_spec_hash_is_stable_under_key_order() -> None:
    one = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    two = {"b": {"y": "z", "x": [1, 2]}, "a": 1}
    assert spec_hash(one) == spec_hash(two)
    assert len(spec_hash(one)) == 64


@pytest.mark.parametrize(
    "other",
    [
        {"a": 2, "b": {"x": [1, 2], "y": "z"}},
        {"a": 1, "b": {"x": [2, 1], "y": "z"}},
        {"a": 1, "b": {"x": [1, 2], "y": "z"}, "c": None},
    ],
)
def test_spec_hash_changes_with_content(other: Body) -> None:
    assert spec_hash({"a": 1, "b": {"x": [1, 2], "y": "z"}}) != spec_hash(other)


# --- template_status ------------------------------------------------------------------------


def test_invalid_spec_is_stalled_and_not_accepted() -> None:
    bad = {**VALID_SPEC, "customize": [{"type": "Shell"}]}
    status = status_of(template(bad, generation=3))
    accepted = condition(status, "Accepted")
    assert accepted["status"] == "False"
    assert accepted["reason"] == "InvalidSpec"
    assert "spec.customize[0]" in accepted["message"]
    stalled = condition(status, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "InvalidSpec")
    assert "spec.customize[0]" in stalled["message"]
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert condition(status, "Reconciling")["status"] == "False"
    assert status["observedGeneration"] == 3
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_invalid_spec_from_pydantic_names_the_field() -> None:
    status = status_of(template({**VALID_SPEC, "distribute": [{"type": "VHD"}]}))
    assert "spec.distribute[0].runOutputName" in condition(status, "Ready")["message"]


def test_valid_spec_without_auto_run_is_ready() -> None:
    status = status_of(template())
    assert (condition(status, "Accepted")["status"], condition(status, "Accepted")["reason"]) == (
        "True",
        "SpecValid",
    )
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "SpecValid")
    assert condition(status, "Stalled")["status"] == "False"
    assert condition(status, "Reconciling")["status"] == "False"
    assert status["provider"] == "local"
    assert status["exactStagingResourceGroup"] == "/staging/debian"
    assert status["lastRun"] is None
    assert status["latestOutputs"] is None


def test_auto_run_without_a_run_is_reconciling() -> None:
    status = status_of(auto_template())
    assert condition(status, "Reconciling")["status"] == "True"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Building")
    assert "Queued" in ready["message"]


def test_auto_run_with_an_active_run_is_reconciling() -> None:
    tpl = auto_template(generation=2)
    active = run(auto_run_name(tpl), NOW, "Running", runSubState="Customizing")
    status = status_of(tpl, [active])
    assert condition(status, "Reconciling")["status"] == "True"
    ready = condition(status, "Ready")
    assert ready["status"] == "False"
    assert auto_run_name(tpl) in ready["message"]
    assert "Customizing" in ready["message"]


def test_auto_run_ignores_runs_of_other_generations() -> None:
    tpl = auto_template(generation=2)
    old = run(auto_run_name(auto_template(generation=1)), NOW, "Succeeded")
    status = status_of(tpl, [old])
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Reconciling")["status"] == "True"


def test_auto_run_succeeded_is_ready_image_built() -> None:
    tpl = auto_template()
    status = status_of(tpl, [run(auto_run_name(tpl), NOW, "Succeeded")])
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ImageBuilt")
    assert condition(status, "Stalled")["status"] == "False"
    assert condition(status, "Reconciling")["status"] == "False"


@pytest.mark.parametrize("state", ["Failed", "Canceled"])
def test_auto_run_failed_is_stalled_build_failed(state: str) -> None:
    tpl = auto_template()
    failed = run(auto_run_name(tpl), NOW, state, message="customizer exited 1.")
    status = status_of(tpl, [failed])
    stalled = condition(status, "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "BuildFailed")
    assert "customizer exited 1." in stalled["message"]
    assert state in stalled["message"]
    assert condition(status, "Ready")["status"] == "False"
    assert condition(status, "Reconciling")["status"] == "False"


def test_transition_times_survive_a_repeated_pass() -> None:
    tpl = template()
    first = template_status(tpl, [], LOCAL, None, NOW)
    tpl["status"] = first
    second = template_status(tpl, [], LOCAL, None, LATER)
    assert second == first


def test_last_run_is_the_newest_by_creation_time() -> None:
    runs = [
        run("b-middle", "2024-05-01T09:00:00Z", "Failed"),
        run("c-newest", "2024-05-01T09:30:00Z", "Running"),
        run("a-oldest", "2024-05-01T08:00:00Z", "Succeeded"),
    ]
    status = status_of(template(), runs)
    assert status["lastRun"] == {"name": "c-newest", "runState": "Running"}


def test_last_run_without_a_status_has_no_state() -> None:
    status = status_of(template(), [run("fresh", NOW)])
    assert status["lastRun"] == {"name": "fresh", "runState": None}


def test_latest_outputs_come_from_the_newest_successful_run() -> None:
    def outputs(name: str) -> list[Body]:
        return [{"runOutputName": "vhd", "artifactUri": f"/out/{name}.vhd"}]

    runs = [
        run("r3", "2024-05-01T03:00:00Z", "PartiallySucceeded", runOutputs=outputs("r3")),
        run("r1", "2024-05-01T01:00:00Z", "Succeeded", runOutputs=outputs("r1")),
        run("r4", "2024-05-01T04:00:00Z", "Failed", runOutputs=outputs("r4")),
        run("r2", "2024-05-01T02:00:00Z", "Succeeded", runOutputs=outputs("r2")),
    ]
    status = status_of(template(), runs)
    assert status["latestOutputs"] == outputs("r3")
    assert status["lastRun"]["name"] == "r4"


def test_no_latest_outputs_without_a_successful_run() -> None:
    status = status_of(template(), [run("r1", NOW, "Failed"), run("r2", LATER, "Canceled")])
    assert status["latestOutputs"] is None


def _all_branches() -> list[tuple[Body, list[Body]]]:
    auto = auto_template()
    name = auto_run_name(auto)
    return [
        (template({**VALID_SPEC, "distribute": []}), []),
        (template(), []),
        (auto, []),
        (auto, [run(name, NOW, "Running")]),
        (auto, [run(name, NOW, "Succeeded")]),
        (auto, [run(name, NOW, "Failed")]),
    ]


@pytest.mark.parametrize(("tpl", "runs"), _all_branches())
def test_conditions_are_coherent_and_have_messages(tpl: Body, runs: list[Body]) -> None:
    conditions = status_of(tpl, runs)["conditions"]
    assert not (is_true(conditions, "Ready") and is_true(conditions, "Stalled"))
    assert {c["type"] for c in conditions} == {"Accepted", "Ready", "Reconciling", "Stalled"}
    for item in conditions:
        assert item["message"].strip(), item
        assert item["reason"]


# --- helpers --------------------------------------------------------------------------------


def test_auto_run_name_is_stable_per_generation() -> None:
    assert auto_run_name(auto_template(1)) == auto_run_name(auto_template(1))
    assert auto_run_name(auto_template(1)) != auto_run_name(auto_template(2))
    assert auto_run_name(auto_template(7)) == "debian-g7-abcde"


def test_auto_run_name_differs_between_templates_of_the_same_name() -> None:
    one, two = auto_template(), auto_template()
    two["metadata"]["uid"] = "99999999-0000-0000-0000-000000000000"
    assert auto_run_name(one) != auto_run_name(two)


def test_auto_run_name_fits_a_kubernetes_name() -> None:
    long = auto_template(123456)
    long["metadata"]["name"] = "x" * 253
    assert len(auto_run_name(long)) <= 253


@pytest.mark.parametrize(
    ("spec", "enabled"),
    [
        ({}, False),
        ({"autoRun": None}, False),
        ({"autoRun": {}}, False),
        ({"autoRun": {"state": "Disabled"}}, False),
        ({"autoRun": {"state": "Enabled"}}, True),
    ],
)
def test_auto_run_enabled(spec: Body, enabled: bool) -> None:
    assert auto_run_enabled(spec) is enabled


@pytest.mark.parametrize(
    ("body", "building"),
    [
        (run("queued", NOW, "Running"), False),
        (run("started", NOW, "Running", templateSnapshot={"x": 1}), True),
        (run("canceling", NOW, "Canceling", templateSnapshot={"x": 1}), True),
        (run("done", NOW, "Succeeded", templateSnapshot={"x": 1}), False),
        (run("failed", NOW, "Failed", templateSnapshot={"x": 1}), False),
        (run("new", NOW), False),
    ],
)
def test_is_building(body: Body, building: bool) -> None:
    assert is_building(body) is building


def test_an_invalid_edit_keeps_the_staging_an_earlier_generation_made() -> None:
    """Deleting the template reads the staging from status: an invalid edit must not lose it."""
    invalid = {**VALID_SPEC, "distribute": [{"type": "VHD"}]}
    built = template(invalid, generation=2, provider="local", exactStagingResourceGroup="/old")
    status = template_status(built, [], LOCAL, None, NOW)
    assert condition(status, "Stalled")["status"] == "True"
    assert (status["provider"], status["exactStagingResourceGroup"]) == ("local", "/old")
    never_built = template(invalid)
    assert template_status(never_built, [], LOCAL, None, NOW)["exactStagingResourceGroup"] is None
