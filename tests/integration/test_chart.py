"""The Helm chart through the real Helm engine (helm-python-sdk): lint, render, install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from kubernetes import client

from conftest import REPO_ROOT, ControlPlane

CHART = REPO_ROOT / "charts" / "kiln"


LOCAL_PROFILE = yaml.safe_load((CHART / "values-local.yaml").read_text())


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


def test_defaults_render_an_azure_operator_without_azure_settings() -> None:
    objects = rendered()
    assert set(objects) == {
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "Role",
        "RoleBinding",
    }
    env = operator_env(objects)
    assert env["KILN_DEFAULT_PROVIDER"] == "azure"
    azure = {name for name in env if name.startswith("KILN_AZURE_")}
    assert azure == {"KILN_AZURE_OPERATOR_IDENTITY"}
    assert not any(name in env for name in ("KILN_FILE_SOURCE_ROOTS", "KILN_OUTPUT_ROOTS"))
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
    assert {"/tmp", "/var/lib/kiln"} <= mounts


def test_two_replicas_elect_a_leader_behind_a_disruption_budget() -> None:
    objects = all_rendered({"replicaCount": 2})
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("PodDisruptionBudget", "kiln") in kinds
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = operator_env({"Deployment": deployment})
    assert env["KILN_LEADER_ELECTION"] == "true"
    assert "KILN_LEADER_ELECTION_NAMESPACE" not in env  # the operator's own namespace
    assert env["KILN_HTTP_ADDRESS"] == "$(KILN_POD_IP):8081"
    role = next(o for o in objects if o["metadata"]["name"] == "kiln-secrets")
    assert role["metadata"]["namespace"] == "kiln-system"
    assert {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    } in role["rules"]


def test_a_namespaced_install_grants_roles_only_in_the_watched_namespaces() -> None:
    objects = all_rendered({"rbac": {"namespaced": True}, "settings": {"namespaces": "a, b"}})
    roles = {
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in objects if o["kind"] == "Role"
    }
    bindings = {
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in objects
        if o["kind"] == "RoleBinding"
    }
    assert roles == bindings == {("a", "kiln"), ("b", "kiln"), ("kiln-system", "kiln-secrets")}
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


def test_secrets_are_granted_in_the_release_namespace_only() -> None:
    objects = rendered()
    cluster_rules = objects["ClusterRole"]["rules"]
    assert not any("secrets" in rule["resources"] for rule in cluster_rules)
    role = objects["Role"]
    assert role["metadata"]["namespace"] == "kiln-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "create", "delete"]}
    ]
    binding = objects["RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kiln", "namespace": "kiln-system"}
    ]
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    [namespace] = [e for e in container["env"] if e["name"] == "KILN_OPERATOR_NAMESPACE"]
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_tenancy_settings_reach_the_operator() -> None:
    env = operator_env(
        rendered(
            {
                "settings": {
                    "fileSourceRoots": "/srv/kiln-files",
                    "outputRoots": "/srv/images",
                    "downloadBlockedRanges": "169.254.0.0/16,10.0.0.0/8",
                    "azure": {
                        "operatorIdentity": False,
                        "tenantId": "t",
                        "storageHosts": ".blob.core.windows.net,blob.example",
                    },
                }
            }
        )
    )
    assert env["KILN_FILE_SOURCE_ROOTS"] == "/srv/kiln-files"
    assert env["KILN_OUTPUT_ROOTS"] == "/srv/images"
    assert env["KILN_DOWNLOAD_BLOCKED_RANGES"] == "169.254.0.0/16,10.0.0.0/8"
    assert env["KILN_AZURE_OPERATOR_IDENTITY"] == "false"
    assert env["KILN_AZURE_TENANT_ID"] == "t"
    assert env["KILN_AZURE_STORAGE_HOSTS"] == ".blob.core.windows.net,blob.example"


def test_the_default_profile_is_restricted_and_the_local_one_mounts_the_host() -> None:
    pod = rendered()["Deployment"]["spec"]["template"]["spec"]
    assert all("hostPath" not in volume for volume in pod["volumes"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"] == {"drop": ["ALL"]}
    local = rendered(LOCAL_PROFILE)["Deployment"]["spec"]["template"]["spec"]
    host_paths = {v["hostPath"]["path"] for v in local["volumes"] if "hostPath" in v}
    assert host_paths == {"/var/lib/kiln", "/dev/kvm"}
    assert operator_env(rendered(LOCAL_PROFILE))["KILN_DEFAULT_PROVIDER"] == "local"
    assert "capabilities" not in local["containers"][0]["securityContext"]


def pod_from_chart(values: dict[str, Any] | None, namespace: str) -> dict[str, Any]:
    """A Pod made from the chart's Deployment template, as its ReplicaSet would make it."""
    template = rendered(values)["Deployment"]["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kiln-operator", "namespace": namespace, **template["metadata"]},
        "spec": template["spec"],
    }


@pytest.mark.integration
def test_the_azure_profile_passes_the_restricted_pod_security_standard(
    kube_api: client.ApiClient,
) -> None:
    """The API server's own PodSecurity admission judges the chart's Pod: the default
    profile is admitted to a restricted namespace, the local profile is not."""
    core = client.CoreV1Api(kube_api)
    namespace = "pss-restricted"
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    core.create_namespace({"metadata": {"name": namespace, "labels": labels}})
    try:
        core.create_namespaced_service_account(namespace, {"metadata": {"name": "kiln"}})
        core.create_namespaced_pod(namespace, pod_from_chart(None, namespace), dry_run="All")
        with pytest.raises(client.ApiException) as refused:
            core.create_namespaced_pod(
                namespace, pod_from_chart(LOCAL_PROFILE, namespace), dry_run="All"
            )
        assert refused.value.status == 403
        message = json.loads(refused.value.body)["message"]
        assert 'violates PodSecurity "restricted:' in message
        assert 'volumes "data", "kvm" use restricted volume type "hostPath"' in message
    finally:
        core.delete_namespace(namespace)


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
            secrets_role = rbac.read_namespaced_role(f"{release}-secrets", namespace)
            assert any("leases" in rule.resources for rule in secrets_role.rules)
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
