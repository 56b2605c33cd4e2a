"""Operating Kiln: metrics after real builds, events, exported outputs, and the `kiln`
CLI (run --wait; logs through the API server's service proxy, where RBAC decides)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from conftest import ControlPlane, OperatorProcess, sample
from kubehelpers import Kiln, run, template, token_kubeconfig, wait_ended

pytestmark = pytest.mark.e2e

NAMESPACE = "ops"
OPERATOR_NAMESPACE = "kiln-ops"
SERVICE = "kiln"
MISSING_IMAGE = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ops/providers"
    "/Microsoft.Compute/images/missing"
)


def host_address() -> str:
    """An address of this machine that is not loopback: the API server refuses to proxy
    to loopback, as it would to a node's."""
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return out.split()[3].split("/")[0]


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api_client:
        core = client.CoreV1Api(api_client)
        for name in (NAMESPACE, OPERATOR_NAMESPACE):
            core.create_namespace({"metadata": {"name": name}})
        yield api_client


@pytest.fixture(scope="module")
def ops_operator(
    control_plane: ControlPlane, api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    data = tmp_path_factory.mktemp("ops-operator")
    operator = OperatorProcess(
        control_plane.kubeconfig, data, data / "operator.log", KILN_NAMESPACES=NAMESPACE
    )
    operator.start()
    # The operator's Service as the chart makes it, its endpoint this machine's address.
    core = client.CoreV1Api(api)
    core.create_namespaced_service(
        OPERATOR_NAMESPACE,
        {"metadata": {"name": SERVICE}, "spec": {"ports": [{"name": "http", "port": 8081}]}},
    )
    core.create_namespaced_endpoints(
        OPERATOR_NAMESPACE,
        {
            "metadata": {"name": SERVICE},
            "subsets": [
                {
                    "addresses": [{"ip": host_address()}],
                    "ports": [{"name": "http", "port": operator.metrics_port}],
                }
            ],
        },
    )
    yield operator
    operator.stop()


def kiln_cli(kubeconfig: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        env=dict(os.environ, KUBECONFIG=str(kubeconfig)),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def user_kubeconfig(
    control_plane: ControlPlane, api: client.ApiClient, name: str, rules: list[dict], path: Path
) -> Path:
    """A ServiceAccount with a Role of these rules in the operator's namespace (and reading
    runs in theirs), as a kubeconfig with its token."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(OPERATOR_NAMESPACE, {"metadata": {"name": name}})
    subject = [{"kind": "ServiceAccount", "name": name, "namespace": OPERATOR_NAMESPACE}]
    reader = [{"apiGroups": ["kiln.dev"], "resources": ["imagebuildruns"], "verbs": ["get"]}]
    for namespace, role_rules in ((OPERATOR_NAMESPACE, rules), (NAMESPACE, reader)):
        if not role_rules:
            continue
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": role_rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subject,
            },
        )
    token = core.create_namespaced_service_account_token(
        name, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    return token_kubeconfig(control_plane.kubeconfig, name, token, path)


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


def test_metrics_moved_as_the_builds_did(
    api: client.ApiClient, ops_operator: OperatorProcess, built: dict[str, Any]
) -> None:
    kiln = Kiln(api, NAMESPACE)
    broken = template("broken", source={"type": "ManagedImage", "imageId": MISSING_IMAGE})
    kiln.create("imagetemplates", broken)
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

    metrics = ops_operator.metrics()
    runs = "kiln_build_runs_total"
    assert sample(metrics, runs, provider="local", result="Succeeded") == 1
    assert sample(metrics, runs, provider="local", result="Failed") == 1
    assert sample(metrics, runs, provider="unknown", result="Canceled") == 1
    assert sample(metrics, "kiln_build_runs_in_flight", provider="local") == 0
    assert sample(metrics, "kiln_build_queue_wait_seconds_count") == 2  # the two that started
    built_steps = [s for s in built["run"]["status"]["steps"] if s["state"] != "Skipped"]
    for step in built_steps:
        count = sample(
            metrics, "kiln_build_step_duration_seconds_count", provider="local", step=step["name"]
        )
        expected = 2 if step["name"] in ("staging", "source") else 1  # broken-1 failed there
        assert count == expected, step["name"]
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


def test_a_template_invalid_at_runtime_gets_an_event(
    api: client.ApiClient, ops_operator: OperatorProcess
) -> None:
    kiln = Kiln(api, NAMESPACE)
    bad_cron = [{"kind": "Schedule", "schedule": "every monday"}]
    kiln.create("imagetemplates", template("badcron", triggers=bad_cron))
    core = client.CoreV1Api(api)

    def invalid_events() -> list[Any]:
        return [
            e
            for e in core.list_namespaced_event(
                NAMESPACE, field_selector="involvedObject.name=badcron"
            ).items
            if e.reason == "InvalidSpec"
        ]

    kiln.wait_for("imagetemplates", "badcron", lambda _: bool(invalid_events()), 60, "refused")
    assert "spec.triggers[0].schedule" in invalid_events()[0].message


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


def test_a_config_map_kiln_did_not_create_is_left_alone(
    api: client.ApiClient, built: dict[str, Any]
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        NAMESPACE, {"metadata": {"name": "team-settings"}, "data": {"keep": "me"}}
    )
    kiln = Kiln(api, NAMESPACE)
    kiln.patch(
        "imagetemplates", "app", {"spec": {"exportOutputs": {"configMapName": "team-settings"}}}
    )
    kiln.wait_for(
        "imagetemplates",
        "app",
        lambda _: any(
            e.reason == "ExportFailed"
            for e in core.list_namespaced_event(
                NAMESPACE, field_selector="involvedObject.name=app"
            ).items
        ),
        60,
        "refused to export",
    )
    assert core.read_namespaced_config_map("team-settings", NAMESPACE).data == {"keep": "me"}


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
