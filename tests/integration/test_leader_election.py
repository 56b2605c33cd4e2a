"""Leader election on the real API server, without build VMs: one of two operator
processes works, the other stands by and takes over within 30 s of the first one's death
(tests/e2e/test_standby.py does it in the middle of a build)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from conftest import ControlPlane, OperatorProcess
from kubehelpers import Kiln, condition_status, template
from operations import role, wait_role

pytestmark = pytest.mark.integration

NAMESPACE = "leader"


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api_client:
        core = client.CoreV1Api(api_client)
        if NAMESPACE not in [n.metadata.name for n in core.list_namespace().items]:
            core.create_namespace({"metadata": {"name": NAMESPACE}})
        yield api_client


def replica(control_plane: ControlPlane, data: Path, name: str) -> OperatorProcess:
    return OperatorProcess(
        control_plane.kubeconfig,
        data,
        data / f"operator-{name}.log",
        KILN_NAMESPACES=NAMESPACE,
        KILN_LEADER_ELECTION="true",
        KILN_LEADER_ELECTION_NAMESPACE=NAMESPACE,
        KILN_LEADER_ELECTION_NAME="kiln-it",
        KILN_POD_NAME=f"kiln-{name}",
    )


def test_the_standby_takes_over_within_30_seconds_and_works(
    control_plane: ControlPlane, api: client.ApiClient, tmp_path: Path
) -> None:
    first, second = replica(control_plane, tmp_path, "a"), replica(control_plane, tmp_path, "b")
    leases = client.CoordinationV1Api(api)
    first.start()
    try:
        wait_role(first, "active", 30)
        second.start()
        time.sleep(3)  # a few of the standby's attempts
        assert role(second) == "standby"
        assert leases.read_namespaced_lease("kiln-it", NAMESPACE).spec.holder_identity == "kiln-a"
        first.kill()
        assert wait_role(second, "active", 30) < 30
        lease = leases.read_namespaced_lease("kiln-it", NAMESPACE)
        assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("kiln-b", 1)
        kiln = Kiln(api, NAMESPACE)
        kiln.create("imagetemplates", template("after-takeover"))
        kiln.wait_for(
            "imagetemplates",
            "after-takeover",
            lambda b: condition_status(b, "Ready") == "True",
            60,
            "reconciled by the new leader",
        )
        assert "standing by: Lease leader/kiln-it is held" in second.log()
        second.stop()  # a clean shutdown gives the Lease up
        assert not leases.read_namespaced_lease("kiln-it", NAMESPACE).spec.holder_identity
    finally:
        first.stop()
        second.stop()
