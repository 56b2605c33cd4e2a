"""What the operations tests share: an operator for namespace `ops` with its HTTP port
behind a Service (as the chart makes it), users with and without RBAC, the `kiln` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from conftest import ControlPlane, OperatorProcess
from kubehelpers import token_kubeconfig

NAMESPACE = "ops"
OPERATOR_NAMESPACE = "kiln-ops"
SERVICE = "kiln"
MISSING_IMAGE = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/ops/providers"
    "/Microsoft.Compute/images/missing"
)


def role(operator: OperatorProcess) -> str:
    """What the operator's /healthz says it is: active or standby."""
    return operator.http("/healthz").strip()


def wait_role(operator: OperatorProcess, wanted: str, timeout: float) -> float:
    """Seconds until the operator says it is `wanted` (active/standby)."""
    start = time.monotonic()
    while role(operator) != wanted:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"operator still {role(operator)} after {timeout} s")
        time.sleep(0.5)
    return time.monotonic() - start


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
        existing = {n.metadata.name for n in core.list_namespace().items}
        for name in {NAMESPACE, OPERATOR_NAMESPACE} - existing:
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
    # The API server proxies only to addresses that are a Pod's: a pod that never runs
    # (no kubelet here) whose status says it has this machine's address.
    address = host_address()
    pod = {
        "metadata": {"name": f"{SERVICE}-0"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "operator", "image": "kiln"}],
        },
    }
    deadline = time.monotonic() + 60
    while True:  # the namespace's default ServiceAccount comes a moment after it
        try:
            core.create_namespaced_pod(OPERATOR_NAMESPACE, pod)
            break
        except client.ApiException as error:
            if error.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(1)
    core.patch_namespaced_pod_status(
        f"{SERVICE}-0",
        OPERATOR_NAMESPACE,
        {"status": {"podIP": address, "podIPs": [{"ip": address}]}},
    )
    target = {"kind": "Pod", "name": f"{SERVICE}-0", "namespace": OPERATOR_NAMESPACE}
    core.create_namespaced_endpoints(
        OPERATOR_NAMESPACE,
        {
            "metadata": {"name": SERVICE},
            "subsets": [
                {
                    "addresses": [{"ip": address, "targetRef": target}],
                    "ports": [{"name": "http", "port": operator.metrics_port}],
                }
            ],
        },
    )
    yield operator
    operator.stop()
    core.delete_namespaced_endpoints(SERVICE, OPERATOR_NAMESPACE)
    core.delete_namespaced_pod(f"{SERVICE}-0", OPERATOR_NAMESPACE)
    core.delete_namespaced_service(SERVICE, OPERATOR_NAMESPACE)


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
