"""Small helpers for tests that talk to the real API server."""

from __future__ import annotations

import base64
import functools
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes.client import ApiClient, CustomObjectsApi, RbacAuthorizationV1Api
from kubernetes.client.exceptions import ApiException
from lupa import LuaRuntime

from kiln_devtools import localcluster

GROUP, VERSION = "kiln.dev", "v1alpha1"
Body = dict[str, Any]
ARGOCD_HEALTH = Path(__file__).resolve().parents[1] / "integrations" / "argocd" / "health.lua"


def argocd_health(obj: Body) -> dict[str, str]:
    """What Argo CD shows for the object with Kiln's health script: the object is the
    global `obj`, the script's return value the health."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(ARGOCD_HEALTH.read_text())
    return {"status": result["status"], "message": result["message"]}


REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _kstatus_binary() -> str:
    """tests/kstatus built (once, cached by its sources) by scripts/build-kstatus.sh."""
    script = REPO / "scripts" / "build-kstatus.sh"
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=1800, check=True
    )
    return result.stdout.strip().splitlines()[-1]


def kstatus(*objects: Body) -> list[dict[str, str]]:
    """What the kstatus library (kubectl wait, Flux, cli-utils) computes for each object:
    {"status": Current | InProgress | Failed | ..., "message": ...}."""
    result = subprocess.run(
        [_kstatus_binary()],
        input=json.dumps(list(objects)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def condition(body: Body | None, type_: str) -> Body | None:
    conditions = ((body or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), None)


def condition_status(body: Body | None, type_: str) -> str | None:
    found = condition(body, type_)
    return found["status"] if found else None


class Kiln:
    """Create, read, wait for and delete Kiln objects in one namespace."""

    def __init__(self, client: ApiClient, namespace: str = "default") -> None:
        self.api = CustomObjectsApi(client)
        self.namespace = namespace

    def create(self, plural: str, body: Body) -> Body:
        return self.api.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, body
        )

    def get(self, plural: str, name: str) -> Body | None:
        try:
            return self.api.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch(self, plural: str, name: str, patch: Body) -> Body:
        return self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural, name, patch
        )

    def delete(self, plural: str, name: str) -> None:
        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def wait_for(
        self,
        plural: str,
        name: str,
        predicate: Callable[[Body | None], bool],
        timeout: float = 60,
        what: str = "",
    ) -> Body | None:
        deadline = time.monotonic() + timeout
        body = self.get(plural, name)
        while not predicate(body):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{plural}/{name} never became {what or 'as expected'}; last seen: "
                    f"{(body or {}).get('status')}"
                )
            time.sleep(0.5)
            body = self.get(plural, name)
        return body


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll predicate every half second, failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.5)


DEBIAN_12: Body = {
    "type": "PlatformImage",
    "publisher": "Debian",
    "offer": "debian-12",
    "sku": "12-gen2",
    "version": "latest",
}


def valid_spec() -> Body:
    """A valid spec for any provider (a fresh copy each time)."""
    return {
        "source": dict(DEBIAN_12),
        "customize": [{"type": "Shell", "name": "hello", "inline": ["echo hello"]}],
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
    }


def template(name: str, **spec: Any) -> Body:
    """A valid local template; keyword arguments replace or add spec fields."""
    base = {**valid_spec(), "provider": "local"}
    base.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageTemplate",
        "metadata": {"name": name},
        "spec": base,
    }


def run(name: str, template_name: str, **spec: Any) -> Body:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageBuildRun",
        "metadata": {"name": name},
        "spec": {"templateRef": {"name": template_name}, **spec},
    }


def kubectl(
    kubeconfig: Path, *args: str, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl of the control plane's own release."""
    return subprocess.run(
        [str(localcluster.binary(localcluster.KUBECTL)), f"--kubeconfig={kubeconfig}", *args],
        input=input_text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def server_dry_run(kubeconfig: Path, body: Body) -> subprocess.CompletedProcess[str]:
    """kubectl apply --dry-run=server without client-side checks: the API server's own
    verdict, as GitOps tools meet it."""
    return kubectl(
        kubeconfig,
        "apply",
        "--dry-run=server",
        "--validate=false",
        "-f",
        "-",
        input_text=json.dumps(body),
    )


TERMINAL = {"Succeeded", "PartiallySucceeded", "Failed", "Canceled"}


def ended(body: Body | None) -> bool:
    return ((body or {}).get("status") or {}).get("runState") in TERMINAL


def wait_ended(kiln: Kiln, name: str, timeout: float = 1500) -> Body:
    """Wait for a run to end (a real build takes minutes without KVM)."""
    body = kiln.wait_for("imagebuildruns", name, ended, timeout, "ended")
    assert body is not None
    return body


def token_kubeconfig(admin_kubeconfig: Path, user: str, token: str, path: Path) -> Path:
    """The admin kubeconfig's cluster, signed in with a bearer token (a ServiceAccount's)."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
                "current-context": user,
            }
        )
    )
    return path


def cluster_ca_file(kubeconfig: Path, directory: Path) -> Path:
    """The CA of the API server's serving certificate, as a file (from the kubeconfig)."""
    cluster = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
    if "certificate-authority" in cluster:
        return Path(cluster["certificate-authority"])
    path = directory / "cluster-ca.crt"
    path.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    return path


RBAC = "rbac.authorization.k8s.io"


def publish_issuer(api: ApiClient, server: str, ca: Path) -> str:
    """Let anyone read the service-account issuer's discovery documents (as an AKS
    cluster's OIDC issuer is public for Entra ID); the issuer they name."""
    binding = {
        "metadata": {"name": "kiln-test-issuer-discovery"},
        "roleRef": {
            "apiGroup": RBAC,
            "kind": "ClusterRole",
            "name": "system:service-account-issuer-discovery",
        },
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": "system:unauthenticated",
            }
        ],
    }
    try:
        RbacAuthorizationV1Api(api).create_cluster_role_binding(binding)
    except ApiException as error:
        if error.status != 409:
            raise
    discovery = requests.get(f"{server}/.well-known/openid-configuration", verify=ca, timeout=10)
    discovery.raise_for_status()
    return str(discovery.json()["issuer"])
