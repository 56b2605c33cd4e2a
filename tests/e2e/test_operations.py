"""Operating Kiln: metrics after real builds, events, exported outputs, and the `kiln`
CLI (run --wait; logs through the API server's service proxy, where RBAC decides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conftest import ControlPlane, OperatorProcess, sample
from kubehelpers import Kiln, template
from operations import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    SERVICE,
    api,
    kiln_cli,
    ops_operator,
    user_kubeconfig,
)

__all__ = ["api", "ops_operator"]  # the shared fixtures

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def built(
    control_plane: ControlPlane, api: client.ApiClient, ops_operator: OperatorProcess
) -> dict[str, Any]:
    """One real build started and followed by `kiln run --wait`."""
    kiln = Kiln(api, NAMESPACE)
    manifest = template(
        "app",
        customize=[{"type": "Shell", "name": "hello", "inline": ["echo ops-log-marker"]}],
        exportOutputs={"configMapName": "app-image"},
    )
    kiln.create("imagetemplates", manifest)
    result = kiln_cli(control_plane.kubeconfig, "run", "app", "-n", NAMESPACE, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    name = result.stdout.split()[0].split("/", 1)[1]
    body = kiln.get("imagebuildruns", name)
    assert body is not None
    return {"run": body, "output": result.stdout}


def test_kiln_run_wait_follows_the_build_to_its_end(built: dict[str, Any]) -> None:
    lines = built["output"].splitlines()
    assert lines[0].startswith("imagebuildrun.kiln.dev/app-")
    assert "step customize Succeeded: " in built["output"]
    assert lines[-1].startswith("Succeeded")
    assert built["run"]["status"]["runState"] == "Succeeded"


def test_metrics_moved_as_the_build_did(
    ops_operator: OperatorProcess, built: dict[str, Any]
) -> None:
    metrics = ops_operator.metrics()
    runs = "kiln_build_runs_total"
    assert sample(metrics, runs, provider="local", result="Succeeded") == 1
    assert sample(metrics, "kiln_build_runs_in_flight", provider="local") == 0
    assert sample(metrics, "kiln_build_queue_wait_seconds_count") >= 1
    built_steps = [s for s in built["run"]["status"]["steps"] if s["state"] != "Skipped"]
    for step in built_steps:
        count = sample(
            metrics, "kiln_build_step_duration_seconds_count", provider="local", step=step["name"]
        )
        assert count == 1, step["name"]  # the other runs here never got past source
    customize = sample(
        metrics, "kiln_build_step_duration_seconds_sum", provider="local", step="customize"
    )
    assert customize > 0
    assert sample(metrics, "kiln_cloud_api_throttled_total") == 0


def test_events_tell_the_story_with_stable_reasons(
    api: client.ApiClient, ops_operator: OperatorProcess, built: dict[str, Any]
) -> None:
    name = built["run"]["metadata"]["name"]
    events = (
        client.CoreV1Api(api)
        .list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}")
        .items
    )
    reasons = [e.reason for e in events]
    assert "Started" in reasons and "Succeeded" in reasons
    stepped = [e.message for e in events if e.reason == "StepSucceeded"]
    assert any(m.startswith("customize: ") for m in stepped), stepped
    assert not any("Handler" in (e.message or "") for e in events)  # kopf's own lines
    operator_log = ops_operator.log()
    assert "Handler 'reconcile_template" not in operator_log, "kopf's lines stay at DEBUG"
    assert "is processed:" not in operator_log


def test_the_latest_outputs_are_exported_to_a_config_map(
    api: client.ApiClient, built: dict[str, Any]
) -> None:
    outputs = {o["runOutputName"]: o for o in built["run"]["status"]["runOutputs"]}
    kiln = Kiln(api, NAMESPACE)
    config_map = kiln.wait_for(
        "imagetemplates",
        "app",
        lambda _: _config_map(api) is not None,
        60,
        "exported",
    )
    assert config_map is not None
    data = _config_map(api).data
    assert data["vhd_artifactUri"] == outputs["vhd"]["artifactUri"]
    assert data["run"] == built["run"]["metadata"]["name"]
    owner = _config_map(api).metadata.owner_references[0]
    assert (owner.kind, owner.name) == ("ImageTemplate", "app")


def _config_map(api: client.ApiClient) -> Any:
    try:
        return client.CoreV1Api(api).read_namespaced_config_map("app-image", NAMESPACE)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def test_kiln_logs_through_the_service_proxy_and_rbac(
    control_plane: ControlPlane,
    api: client.ApiClient,
    built: dict[str, Any],
    tmp_path: Path,
) -> None:
    name = built["run"]["metadata"]["name"]
    proxy = [
        {
            "apiGroups": [""],
            "resources": ["services/proxy"],
            "verbs": ["get"],
            "resourceNames": [SERVICE, f"{SERVICE}:http"],
        }
    ]
    reader = user_kubeconfig(control_plane, api, "log-reader", proxy, tmp_path / "reader")
    stranger = user_kubeconfig(control_plane, api, "stranger", [], tmp_path / "stranger")
    args = ("logs", name, "-n", NAMESPACE, "--operator-namespace", OPERATOR_NAMESPACE, "--remote")
    allowed = kiln_cli(reader, *args, "-f", timeout=120)
    assert allowed.returncode == 0, allowed.stderr
    assert "ops-log-marker" in allowed.stdout
    local = Path(built["run"]["status"]["checkpoint"]["logPath"]).read_text()
    assert allowed.stdout == local
    refused = kiln_cli(stranger, *args, timeout=120)
    assert refused.returncode == 1
    assert "403" in refused.stderr or "forbidden" in refused.stderr.lower()
    assert "ops-log-marker" not in refused.stdout
