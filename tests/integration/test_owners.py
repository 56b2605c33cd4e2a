"""What kube-controller-manager gives the operator: namespaces that finish deleting and
dependents collected with their owner (the namespace and garbage-collector controllers)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import OperatorProcess
from kubehelpers import Kiln, ended, template, wait_until
from kubehelpers import run as run_manifest

pytestmark = pytest.mark.integration

MISSING_IMAGE = {
    "type": "ManagedImage",
    "imageId": "/subscriptions/0/resourceGroups/it/providers/Microsoft.Compute/images/none",
}


def namespace_gone(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespace(name)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


@pytest.fixture
def namespace(kube_api: client.ApiClient) -> Iterator[str]:
    name = f"owners-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    if not namespace_gone(core, name):
        core.delete_namespace(name)


def test_a_deleted_namespace_goes_away_with_its_objects(
    kube_api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c"), data={"k": "v"})
    )
    wait_until(  # the serviceaccount controller gives each namespace its default account
        lambda: any(
            sa.metadata.name == "default"
            for sa in core.list_namespaced_service_account(namespace).items
        ),
        30,
        "the default ServiceAccount",
    )
    core.delete_namespace(namespace)
    wait_until(lambda: namespace_gone(core, namespace), 60, f"namespace {namespace} deleted")


def test_a_namespace_with_kiln_objects_finishes_deleting(
    kube_api: client.ApiClient, control_plane: Any, namespace: str, tmp_path: Any
) -> None:
    """The operator's finalizers on templates and runs do not hold a namespace forever."""
    operator = OperatorProcess(
        control_plane.kubeconfig,
        tmp_path / "data",
        tmp_path / "operator.log",
        KILN_NAMESPACES=namespace,
    )
    operator.start()
    try:
        kiln = Kiln(kube_api, namespace)
        kiln.create("imagetemplates", template("t"))
        kiln.create("imagebuildruns", run_manifest("r", "absent"))
        wait_until(
            lambda: all(
                (kiln.get(plural, name) or {}).get("metadata", {}).get("finalizers")
                for plural, name in (("imagetemplates", "t"), ("imagebuildruns", "r"))
            ),
            30,
            "Kiln's finalizers",
        )
        core = client.CoreV1Api(kube_api)
        core.delete_namespace(namespace)
        wait_until(lambda: namespace_gone(core, namespace), 90, f"namespace {namespace} deleted")
    finally:
        operator.stop()


def test_runs_a_template_started_are_collected_with_it(kube_api: Any, kiln_operator: Any) -> None:
    kiln = Kiln(kube_api)
    name = f"owner-{uuid.uuid4().hex[:6]}"
    kiln.create(
        "imagetemplates", template(name, source=MISSING_IMAGE, autoRun={"state": "Enabled"})
    )
    runs: list[dict] = []

    def auto_run_ended() -> bool:
        items = kiln.api.list_namespaced_custom_object(
            "kiln.dev", "v1alpha1", "default", "imagebuildruns"
        )["items"]
        runs[:] = [r for r in items if r["spec"]["templateRef"]["name"] == name]
        return bool(runs) and ended(runs[0])

    wait_until(auto_run_ended, 60, "the autoRun run to end")
    owner = runs[0]["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("ImageTemplate", name)

    kiln.delete("imagetemplates", name)
    run_name = runs[0]["metadata"]["name"]
    wait_until(lambda: kiln.get("imagebuildruns", run_name) is None, 60, "the run collected")
