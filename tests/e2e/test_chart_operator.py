"""The operator running with exactly the permissions the Helm chart grants it.

The chart is installed with the real Helm engine; the operator then signs in with a token
of the chart's ServiceAccount (TokenRequest) and builds a Windows image against the ARM
emulator, the quickest whole build: templates, runs, status, events and the run's Secret.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
from kubernetes import client, config

from azurehelpers import operator_settings, windows_template
from conftest import REPO_ROOT, ControlPlane, OperatorProcess
from fakes.arm import ArmEmulator
from kubehelpers import Kiln, argocd_health, run, token_kubeconfig, wait_ended

pytestmark = [pytest.mark.e2e, pytest.mark.azure]

RELEASE = "kiln-rbac"
SECRETS_ROLE = f"{RELEASE}-secrets"
WATCHED = "chart-builds"
LOCATION = "westeurope"


def service_account_kubeconfig(control_plane: ControlPlane, path: Path) -> Path:
    """The admin kubeconfig's cluster, with a token of the chart's ServiceAccount."""
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        token = client.CoreV1Api(api).create_namespaced_service_account_token(
            RELEASE, RELEASE, {"spec": {"expirationSeconds": 7200}}
        )
    return token_kubeconfig(control_plane.kubeconfig, RELEASE, token.status.token, path)


@pytest.fixture(scope="module")
def chart_operator(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": WATCHED}})
    cfg = helm_python.Config(kubeconfig_path=control_plane.kubeconfig, namespace=RELEASE)
    cfg.install(
        REPO_ROOT / "charts" / "kiln",
        RELEASE,
        {"settings": {"namespaces": WATCHED, "defaultProvider": "azure"}},
        create_namespace=True,
    )
    data = tmp_path_factory.mktemp("chart-operator")
    operator = OperatorProcess(
        service_account_kubeconfig(control_plane, data / "kubeconfig"),
        data,
        data / "operator.log",
        **operator_settings(arm_qemu, WATCHED, LOCATION),
        KILN_OPERATOR_NAMESPACE=RELEASE,  # as the chart's downward API sets it
    )
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
        cfg.uninstall(RELEASE)
        cfg.close()


def last_run_succeeded(body: dict[str, Any] | None) -> bool:
    last_run = ((body or {}).get("status") or {}).get("lastRun") or {}
    return last_run.get("runState") == "Succeeded"


def test_the_charts_permissions_are_enough_for_a_whole_build(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, chart_operator: OperatorProcess
) -> None:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        kiln = Kiln(api, WATCHED)
        kiln.create(
            "imagetemplates", windows_template(arm_qemu, "win", "chartout", "kilnchart", LOCATION)
        )
        kiln.create("imagebuildruns", run("win-1", "win"))
        body = wait_ended(kiln, "win-1", timeout=600)
        assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
        assert argocd_health(body)["status"] == "Healthy"
        kiln.wait_for(  # the template's status is written too
            "imagetemplates", "win", last_run_succeeded, 60, "the template's lastRun"
        )
        events = client.CoreV1Api(api).list_namespaced_event(WATCHED).items
        assert any(e.involved_object.name == "win-1" for e in events)
    log = chart_operator.log()
    assert "Forbidden" not in log and " 403" not in log


def test_a_permission_missing_from_the_chart_is_named_in_the_run(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, chart_operator: OperatorProcess
) -> None:
    """The per-run key Secret is made in the operator's namespace, under the chart's Role:
    without its create verb the run fails naming what is missing."""
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        rbac = client.RbacAuthorizationV1Api(api)
        role = rbac.read_namespaced_role(SECRETS_ROLE, RELEASE)
        original = [rule.to_dict() for rule in role.rules]
        reduced = [
            {**rule, "verbs": [v for v in rule["verbs"] if v != "create"]} for rule in original
        ]
        rbac.patch_namespaced_role(SECRETS_ROLE, RELEASE, {"rules": [_camel(r) for r in reduced]})
        try:
            kiln = Kiln(api, WATCHED)
            kiln.create(
                "imagetemplates",
                windows_template(arm_qemu, "norbac", "chartout", "kilnchart", LOCATION),
            )
            kiln.create("imagebuildruns", run("norbac-1", "norbac"))
            body = wait_ended(kiln, "norbac-1", timeout=600)
        finally:
            rbac.patch_namespaced_role(
                SECRETS_ROLE, RELEASE, {"rules": [_camel(r) for r in original]}
            )
    assert body["status"]["runState"] == "Failed"
    assert argocd_health(body)["status"] == "Degraded"
    message = body["status"]["message"]
    assert 'cannot create resource "secrets"' in message, message
    assert "grant it to the operator's ServiceAccount" in message


def _camel(rule: dict[str, Any]) -> dict[str, Any]:
    """A V1PolicyRule's to_dict() back to the API's field names."""
    names = {"api_groups": "apiGroups", "resource_names": "resourceNames"}
    names |= {"non_resource_ur_ls": "nonResourceURLs"}
    return {names.get(k, k): v for k, v in rule.items() if v is not None}
