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
    return {obj["kind"]: obj for obj in all_rendered(values)}


def all_rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (several of one kind, e.g. a Role per namespace)."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="kiln", namespace="kiln-system")
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc is not None
    ]


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
        "Service",
    }
    env = operator_env(objects)
    assert env["KILN_DEFAULT_PROVIDER"] == "local"
    assert not any(name.startswith("KILN_AZURE_") for name in env)
    assert "annotations" not in objects["ServiceAccount"]["metadata"]
    spec = objects["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "Recreate" and spec["replicas"] == 1
    assert spec["template"]["spec"]["serviceAccountName"] == "kiln"
    assert "KILN_LEADER_ELECTION" not in env
    assert env["KILN_METRICS_PORT"] == "8081"


def test_the_operator_runs_as_non_root_with_a_read_only_root_and_no_capabilities() -> None:
    pod = rendered()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/tmp", "/var/cache/kiln", "/var/lib/kiln"} <= mounts


def test_two_replicas_elect_a_leader_behind_a_disruption_budget() -> None:
    objects = all_rendered({"replicaCount": 2})
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("PodDisruptionBudget", "kiln") in kinds
    assert ("Role", "kiln-leader-election") in kinds
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = operator_env({"Deployment": deployment})
    assert env["KILN_LEADER_ELECTION"] == "true"
    assert env["KILN_LEADER_ELECTION_NAMESPACE"] == "kiln-system"
    assert env["KILN_HTTP_ADDRESS"] == "$(KILN_POD_IP):8081"
    role = next(o for o in objects if o["metadata"]["name"] == "kiln-leader-election")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]


def test_a_namespaced_install_grants_roles_only_in_the_watched_namespaces() -> None:
    objects = all_rendered({"rbac": {"namespaced": True}, "settings": {"namespaces": "a, b"}})
    roles = {o["metadata"]["namespace"] for o in objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding"}
    assert roles == bindings == {"a", "b"}
    cluster_role = next(o for o in objects if o["kind"] == "ClusterRole")
    assert [r["resources"] for r in cluster_role["rules"]] == [["customresourcedefinitions"]]
    with pytest.raises(Exception, match=r"rbac\.namespaced needs settings\.namespaces"):
        all_rendered({"rbac": {"namespaced": True}})


def test_the_image_is_pulled_by_digest_when_one_is_given() -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    objects = rendered({"image": {"repository": "registry.example/kiln", "digest": digest}})
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"registry.example/kiln@{digest}"


def test_scheduling_and_resources_reach_the_pod() -> None:
    values = {
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "images", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "resources": {"limits": {"memory": "2Gi"}},
    }
    pod = rendered(values)["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["containers"][0]["resources"]["limits"] == {"memory": "2Gi"}


def test_the_metrics_service_and_an_optional_service_monitor() -> None:
    service = rendered()["Service"]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8081, "targetPort": "http"}]
    assert "ServiceMonitor" not in rendered()
    monitor = rendered({"metrics": {"serviceMonitor": {"enabled": True}}})["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0] == {
        "port": "http",
        "path": "/metrics",
        "interval": "30s",
    }
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


@pytest.mark.parametrize(
    "values",
    [
        {"settings": {"logFormat": "xml"}},
        {"image": {"digest": "latest"}},
        {"replicaCount": 0},
        {"settings": {"defaultProvider": "aws"}},
        {"unknownKey": True},
    ],
)
def test_the_values_schema_refuses_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="schema"):
        rendered(values)


def test_notes_say_how_to_build_and_that_crds_are_applied_before_an_upgrade() -> None:
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render({"replicaCount": 2}, name="kiln", namespace="ops")[
            "kiln/templates/NOTES.txt"
        ]
    assert "kiln run" in notes and "Lease ops/kiln" in notes
    assert "kubectl apply --server-side" in notes


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
            client.CoreV1Api(kube_api).read_namespaced_service(release, namespace)
            role = rbac.read_cluster_role(release)
            assert any("imagebuildruns/status" in rule.resources for rule in role.rules)
            assert cfg.status(release)["status"] == "deployed"
        finally:
            cfg.uninstall(release)
    with pytest.raises(client.ApiException) as gone:
        client.AppsV1Api(kube_api).read_namespaced_deployment(release, namespace)
    assert gone.value.status == 404


@pytest.mark.integration
def test_a_namespaced_two_replica_install_on_the_api_server(
    control_plane: ControlPlane, kube_api: client.ApiClient
) -> None:
    release, namespace, watched = "kiln-ha", "kiln-ha", ["ha-images", "ha-builds"]
    core = client.CoreV1Api(kube_api)
    for name in watched:
        core.create_namespace({"metadata": {"name": name}})
    values = {
        "replicaCount": 2,
        "rbac": {"namespaced": True},
        "settings": {"namespaces": ",".join(watched)},
    }
    with helm_python.Config(kubeconfig_path=control_plane.kubeconfig, namespace=namespace) as cfg:
        cfg.install(CHART, release, values, create_namespace=True)
        try:
            rbac = client.RbacAuthorizationV1Api(kube_api)
            for name in watched:
                role = rbac.read_namespaced_role(release, name)
                assert any("imagebuildruns" in rule.resources for rule in role.rules)
                binding = rbac.read_namespaced_role_binding(release, name)
                assert binding.subjects[0].namespace == namespace
            assert rbac.read_cluster_role(release).rules[0].resources == [
                "customresourcedefinitions"
            ]
            rbac.read_namespaced_role(f"{release}-leader-election", namespace)
            budget = client.PolicyV1Api(kube_api).read_namespaced_pod_disruption_budget(
                release, namespace
            )
            assert budget.spec.min_available == 1
            deployment = client.AppsV1Api(kube_api).read_namespaced_deployment(release, namespace)
            assert deployment.spec.replicas == 2
        finally:
            cfg.uninstall(release)
    with pytest.raises(client.ApiException) as gone:
        client.RbacAuthorizationV1Api(kube_api).read_namespaced_role(release, watched[0])
    assert gone.value.status == 404
