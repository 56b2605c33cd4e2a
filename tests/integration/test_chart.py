"""The Helm chart through the real Helm engine (helm-python-sdk): lint, render, install."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from kubernetes import client

from conftest import REPO_ROOT, ControlPlane

CHART = REPO_ROOT / "charts" / "kiln"


def rendered(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The chart's objects by kind, as helm would render them for release 'kiln'."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="kiln", namespace="kiln-system")
    objects = [
        doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc is not None
    ]
    return {obj["kind"]: obj for obj in objects}


def operator_env(objects: dict[str, dict[str, Any]]) -> dict[str, str]:
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return {entry["name"]: entry.get("value", "") for entry in container["env"]}


def test_the_chart_lints_clean_in_strict_mode() -> None:
    report = helm_python.lint(CHART, strict=True, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_defaults_render_a_local_operator_without_azure_settings() -> None:
    objects = rendered()
    assert set(objects) == {
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    env = operator_env(objects)
    assert env["KILN_DEFAULT_PROVIDER"] == "local"
    assert not any(name.startswith("KILN_AZURE_") for name in env)
    assert "annotations" not in objects["ServiceAccount"]["metadata"]
    spec = objects["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "Recreate" and spec["replicas"] == 1
    assert spec["template"]["spec"]["serviceAccountName"] == "kiln"


def test_azure_settings_and_workload_identity_reach_the_operator() -> None:
    objects = rendered(
        {
            "settings": {
                "defaultProvider": "azure",
                "subscriptionId": "00000000-0000-0000-0000-000000000001",
                "azure": {
                    "armEndpoint": "https://management.usgovcloudapi.net",
                    "authority": "login.microsoftonline.us",
                    "communicatorSource": "203.0.113.7/32",
                },
            },
            "serviceAccount": {"annotations": {"azure.workload.identity/client-id": "cid"}},
            "podLabels": {"azure.workload.identity/use": "true"},
            "extraEnv": [{"name": "AZURE_LOG_LEVEL", "value": "warning"}],
        }
    )
    env = operator_env(objects)
    assert env["KILN_DEFAULT_PROVIDER"] == "azure"
    assert env["KILN_AZURE_ARM_ENDPOINT"] == "https://management.usgovcloudapi.net"
    assert env["KILN_AZURE_AUTHORITY"] == "login.microsoftonline.us"
    assert env["KILN_AZURE_COMMUNICATOR_SOURCE"] == "203.0.113.7/32"
    assert env["AZURE_LOG_LEVEL"] == "warning"
    assert "KILN_AZURE_CREDENTIALS_SECRET" not in env
    labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true"
    annotations = objects["ServiceAccount"]["metadata"]["annotations"]
    assert annotations == {"azure.workload.identity/client-id": "cid"}


def test_the_chart_carries_the_generated_crds() -> None:
    with helm_python.Chart.load(CHART) as chart:
        packaged = {Path(crd["name"]).name: crd["data"] for crd in chart.crds}
    generated = {path.name: path.read_text() for path in (REPO_ROOT / "crds").glob("*.yaml")}
    assert packaged == generated


@pytest.mark.integration
def test_the_chart_installs_and_uninstalls_on_the_api_server(
    control_plane: ControlPlane, kube_api: client.ApiClient
) -> None:
    release, namespace = "kiln-chart", "kiln-chart"
    with helm_python.Config(kubeconfig_path=control_plane.kubeconfig, namespace=namespace) as cfg:
        cfg.install(CHART, release, {"settings": {"namespaces": "nowhere"}}, create_namespace=True)
        try:
            apps, rbac = client.AppsV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
            deployment = apps.read_namespaced_deployment(release, namespace)
            assert deployment.spec.template.spec.service_account_name == release
            client.CoreV1Api(kube_api).read_namespaced_service_account(release, namespace)
            role = rbac.read_cluster_role(release)
            assert any("imagebuildruns/status" in rule.resources for rule in role.rules)
            assert cfg.status(release)["status"] == "deployed"
        finally:
            cfg.uninstall(release)
    with pytest.raises(client.ApiException) as gone:
        client.AppsV1Api(kube_api).read_namespaced_deployment(release, namespace)
    assert gone.value.status == 404
