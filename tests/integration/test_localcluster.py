"""The local control plane against the real etcd and kube-apiserver binaries."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from kiln_devtools import localcluster

pytestmark = pytest.mark.integration

GROUP = "test.kiln.dev"
ALL_PROCESSES = {"etcd", "kube-apiserver", "kube-controller-manager"}


def crd_manifest(extra_column: bool = False) -> dict:
    """A small valid v1 CRD, Widget, with a status subresource and a printer column."""
    columns = [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]
    if extra_column:
        columns.append({"name": "Colour", "type": "string", "jsonPath": ".spec.colour"})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["size"],
                                    "properties": {
                                        "size": {"type": "integer", "minimum": 1},
                                        "colour": {"type": "string"},
                                    },
                                },
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def pids_gone(pids: dict[str, int]) -> bool:
    """No such process any more, or only a zombie nobody has reaped yet."""
    for pid in pids.values():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return False
    return True


@pytest.fixture
def second_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir for an extra cluster; always torn down, even when the test fails."""
    state_dir = tmp_path / "second"
    yield state_dir
    localcluster.down(state_dir)


def test_server_answers_through_kubeconfig(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    names = {ns.metadata.name for ns in core.list_namespace().items}
    assert {"default", "kube-system"} <= names

    name = unique("cm")
    core.create_namespaced_config_map(
        "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"k": "v"})
    )
    assert core.read_namespaced_config_map(name, "default").data == {"k": "v"}
    core.delete_namespaced_config_map(name, "default")


def test_kubeconfig_verifies_tls_and_keeps_token_private(control_plane) -> None:
    data = yaml.safe_load(control_plane.kubeconfig.read_text())
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert data["clusters"][0]["cluster"]["server"] == control_plane.server
    assert control_plane.kubeconfig.stat().st_mode & 0o077 == 0
    text = localcluster.status(control_plane.state_dir)
    assert "ready" in text and control_plane.server in text
    assert data["users"][0]["user"]["token"] not in text


def test_up_twice_reuses_the_running_processes(control_plane, kube_api) -> None:
    before = localcluster.read_pids(control_plane.state_dir)
    assert set(before) == ALL_PROCESSES

    again = localcluster.up(control_plane.state_dir)

    assert again == control_plane.kubeconfig
    assert localcluster.read_pids(control_plane.state_dir) == before
    version = client.VersionApi(kube_api).get_code()
    assert version.git_version == f"v{localcluster.kubernetes_version()}"


def test_crd_is_installed_established_and_usable(control_plane, kube_api, tmp_path: Path) -> None:
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "widgets.yaml").write_text(yaml.safe_dump(crd_manifest()))
    (crds / "notes.txt").write_text("not a CRD and not *.yaml\n")

    localcluster.up(control_plane.state_dir, crds_dir=crds)

    ext = client.ApiextensionsV1Api(kube_api)
    crd = localcluster.read_crd(ext, f"widgets.{GROUP}")
    assert localcluster.crd_established(crd)

    objects = client.CustomObjectsApi(kube_api)
    name = unique("w")
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}}
    objects.create_namespaced_custom_object(
        GROUP, "v1", "default", "widgets", {**body, "spec": {"size": 3}}
    )
    got = objects.get_namespaced_custom_object(GROUP, "v1", "default", "widgets", name)
    assert got["spec"] == {"size": 3}
    with pytest.raises(client.ApiException) as invalid:  # the schema is enforced
        objects.create_namespaced_custom_object(
            GROUP,
            "v1",
            "default",
            "widgets",
            {**body, "metadata": {"name": unique("w")}, "spec": {"size": 0}},
        )
    assert invalid.value.status == 422

    # Applying a changed CRD replaces the stored one.
    (crds / "widgets.yaml").write_text(yaml.safe_dump(crd_manifest(extra_column=True)))
    localcluster.up(control_plane.state_dir, crds_dir=crds)
    crd = localcluster.read_crd(ext, f"widgets.{GROUP}")
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Size", "Colour"]


def test_second_cluster_coexists_and_stops(control_plane, second_state_dir: Path) -> None:
    kubeconfig = localcluster.up(second_state_dir, crds_dir=tmp_crds_dir(second_state_dir))
    pids = localcluster.read_pids(second_state_dir)
    first_pids = localcluster.read_pids(control_plane.state_dir)
    assert set(pids) == ALL_PROCESSES
    assert set(pids.values()).isdisjoint(first_pids.values())

    first_ports = localcluster.read_ports(control_plane.state_dir)
    second_ports = localcluster.read_ports(second_state_dir)
    assert first_ports and second_ports
    assert set(first_ports.model_dump().values()).isdisjoint(second_ports.model_dump().values())

    name = unique("only-in-second")
    with config.new_client_from_config(config_file=str(kubeconfig)) as second:
        client.CoreV1Api(second).create_namespaced_config_map(
            "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name))
        )
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as first:
        listed = client.CoreV1Api(first).list_namespaced_config_map("default").items
        assert name not in {cm.metadata.name for cm in listed}

    localcluster.down(second_state_dir)
    assert pids_gone(pids)
    assert localcluster.read_pids(second_state_dir) == {}
    assert not list(second_state_dir.glob("*.pid"))
    assert "not running" in localcluster.status(second_state_dir)
    localcluster.down(second_state_dir)  # harmless when nothing runs

    assert localcluster.read_pids(control_plane.state_dir) == first_pids


def test_restart_after_crash_keeps_objects(second_state_dir: Path) -> None:
    kubeconfig = localcluster.up(second_state_dir)
    name = unique("survivor")
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        client.CoreV1Api(api).create_namespaced_config_map(
            "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name))
        )
    crashed = localcluster.read_pids(second_state_dir)
    for pid in crashed.values():  # as if the machine had rebooted: stale pid files remain
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not pids_gone(crashed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids_gone(crashed)
    assert len(list(second_state_dir.glob("*.pid"))) == len(ALL_PROCESSES)

    kubeconfig = localcluster.up(second_state_dir)

    restarted = localcluster.read_pids(second_state_dir)
    assert set(restarted) == ALL_PROCESSES
    assert set(restarted.values()).isdisjoint(crashed.values())
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        cm = client.CoreV1Api(api).read_namespaced_config_map(name, "default")
        assert cm.metadata.name == name


def tmp_crds_dir(state_dir: Path) -> Path:
    """An empty CRD directory: up() must cope with nothing to install."""
    crds = state_dir.parent / "empty-crds"
    crds.mkdir(parents=True, exist_ok=True)
    return crds
