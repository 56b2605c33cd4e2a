"""Operating Kiln without a build VM: events and metrics of runs that fail or are
canceled early, a template refused at runtime, and `kiln logs` through the API server's
service proxy where RBAC decides (tests/e2e/test_operations.py does it after a build)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conftest import ControlPlane, OperatorProcess, sample
from kubehelpers import Kiln, run, template, wait_ended
from operations import (
    MISSING_IMAGE,
    NAMESPACE,
    OPERATOR_NAMESPACE,
    api,
    kiln_cli,
    ops_operator,
    user_kubeconfig,
)

__all__ = ["api", "ops_operator"]  # the shared fixtures
pytestmark = pytest.mark.integration


def events_of(api: client.ApiClient, name: str) -> list[Any]:
    return (
        client.CoreV1Api(api)
        .list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}")
        .items
    )


def reasons_of(api: client.ApiClient, name: str) -> list[str]:
    return [e.reason for e in events_of(api, name)]


@pytest.fixture(scope="module")
def failed_and_canceled(api: client.ApiClient, ops_operator: OperatorProcess) -> None:
    kiln = Kiln(api, NAMESPACE)
    kiln.create(
        "imagetemplates",
        template("broken", source={"type": "ManagedImage", "imageId": MISSING_IMAGE}),
    )
    kiln.create("imagebuildruns", run("broken-1", "broken"))
    assert wait_ended(kiln, "broken-1", timeout=300)["status"]["runState"] == "Failed"
    kiln.create("imagebuildruns", run("orphan-1", "nowhere"))  # queued: no such template
    kiln.wait_for(
        "imagebuildruns",
        "orphan-1",
        lambda b: ((b or {}).get("status") or {}).get("runSubState") == "Queued",
        60,
        "queued",
    )
    kiln.patch("imagebuildruns", "orphan-1", {"spec": {"cancel": True}})
    wait_ended(kiln, "orphan-1", timeout=60)


def test_runs_that_end_early_post_their_events(
    api: client.ApiClient, failed_and_canceled: None
) -> None:
    kiln = Kiln(api, NAMESPACE)
    kiln.wait_for("imagebuildruns", "broken-1", lambda _: "Failed" in reasons_of(api, "broken-1"))
    broken = events_of(api, "broken-1")
    reasons = [e.reason for e in broken]
    assert {"Started", "StepSucceeded", "ProviderError", "Failed"} <= set(reasons), reasons
    assert any(e.type == "Warning" and "missing" in e.message for e in broken)
    assert not any("Handler" in (e.message or "") for e in broken)  # kopf's own lines
    orphan = reasons_of(api, "orphan-1")
    assert {"Queued", "Canceled"} <= set(orphan) and "Started" not in orphan, orphan


def test_metrics_count_the_runs_that_ended_early(
    ops_operator: OperatorProcess, failed_and_canceled: None
) -> None:
    metrics = ops_operator.metrics()
    runs = "kiln_build_runs_total"
    assert sample(metrics, runs, provider="local", result="Failed") == 1
    assert sample(metrics, runs, provider="unknown", result="Canceled") == 1
    assert sample(metrics, "kiln_build_queue_wait_seconds_count") == 1  # only broken-1 started
    steps = "kiln_build_step_duration_seconds_count"
    assert sample(metrics, steps, provider="local", step="staging") == 1
    assert sample(metrics, steps, provider="local", step="source") == 1  # it failed there
    assert sample(metrics, steps, provider="local", step="vm") == 0
    assert sample(metrics, "kiln_build_runs_in_flight", provider="local") == 0
    assert "Handler 'reconcile_template" not in ops_operator.log()
    assert "is processed:" not in ops_operator.log()


def test_a_template_invalid_at_runtime_gets_an_event(
    api: client.ApiClient, ops_operator: OperatorProcess
) -> None:
    kiln = Kiln(api, NAMESPACE)
    bad_cron = [{"kind": "Schedule", "schedule": "61 * * * *"}]  # only croniter knows
    kiln.create("imagetemplates", template("badcron", triggers=bad_cron))
    kiln.wait_for(
        "imagetemplates", "badcron", lambda _: "InvalidSpec" in reasons_of(api, "badcron")
    )
    message = next(e.message for e in events_of(api, "badcron") if e.reason == "InvalidSpec")
    assert "spec.triggers[0].schedule" in message


def test_rbac_decides_who_reads_logs_through_the_service_proxy(
    control_plane: ControlPlane, api: client.ApiClient, failed_and_canceled: None, tmp_path: Path
) -> None:
    proxy = [
        {
            "apiGroups": [""],
            "resources": ["services/proxy"],
            "verbs": ["get"],
            "resourceNames": ["kiln", "kiln:http"],
        }
    ]
    reader = user_kubeconfig(control_plane, api, "early-reader", proxy, tmp_path / "reader")
    stranger = user_kubeconfig(control_plane, api, "early-stranger", [], tmp_path / "stranger")
    args = ("logs", "broken-1", "-n", NAMESPACE, "--operator-namespace", OPERATOR_NAMESPACE)
    allowed = kiln_cli(reader, *args, "--remote", timeout=120)
    assert allowed.returncode == 0, allowed.stderr
    refused = kiln_cli(stranger, *args, "--remote", timeout=120)
    assert refused.returncode == 1
    assert "403" in refused.stderr, refused.stderr
    unknown = kiln_cli(reader, "logs", "no-such-run", "-n", NAMESPACE, "--remote", timeout=120)
    assert unknown.returncode != 0


GALLERY_VERSION = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ops/providers"
    "/Microsoft.Compute/galleries/g/images/app/versions/1.0.3"
)


def config_map(api: client.ApiClient, name: str) -> Any:
    try:
        return client.CoreV1Api(api).read_namespaced_config_map(name, NAMESPACE)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def test_the_latest_outputs_go_to_a_config_map_kiln_owns(
    api: client.ApiClient, ops_operator: OperatorProcess
) -> None:
    """A run that ended Succeeded (its status written here, as the operator would after a
    build; tests/e2e/test_operations.py does it with a real one) is exported when its
    template asks; a ConfigMap Kiln did not create is left alone."""
    kiln = Kiln(api, NAMESPACE)
    kiln.create("imagebuildruns", run("exported-1", "exported"))  # no template yet: queued
    kiln.wait_for(
        "imagebuildruns",
        "exported-1",
        lambda b: ((b or {}).get("status") or {}).get("runSubState") == "Queued",
        60,
        "queued",
    )
    outputs = [{"runOutputName": "gallery", "artifactId": GALLERY_VERSION}]
    kiln.api.patch_namespaced_custom_object_status(
        "kiln.dev",
        "v1alpha1",
        NAMESPACE,
        "imagebuildruns",
        "exported-1",
        {"status": {"runState": "Succeeded", "runOutputs": outputs}},
    )
    kiln.create(
        "imagetemplates", template("exported", exportOutputs={"configMapName": "exported-image"})
    )
    kiln.wait_for("imagetemplates", "exported", lambda _: config_map(api, "exported-image"), 60)
    exported = config_map(api, "exported-image")
    assert exported.data["gallery_artifactId"] == GALLERY_VERSION
    assert exported.data["gallery_version"] == "1.0.3"
    assert exported.data["run"] == "exported-1"
    owner = exported.metadata.owner_references[0]
    assert (owner.kind, owner.name) == ("ImageTemplate", "exported")
    assert "OutputsExported" in reasons_of(api, "exported")

    client.CoreV1Api(api).create_namespaced_config_map(
        NAMESPACE, {"metadata": {"name": "team-settings"}, "data": {"keep": "me"}}
    )
    kiln.patch(
        "imagetemplates",
        "exported",
        {"spec": {"exportOutputs": {"configMapName": "team-settings"}}},
    )
    kiln.wait_for(
        "imagetemplates", "exported", lambda _: "ExportFailed" in reasons_of(api, "exported"), 60
    )
    assert config_map(api, "team-settings").data == {"keep": "me"}
