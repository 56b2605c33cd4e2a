"""Two operator processes on the real API server: one active, one standing by on a Lease.
Killing the active one mid-build hands the run to the standby, which resumes it from its
checkpoint on the same VM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from conftest import ControlPlane, OperatorProcess
from kiln.providers.local import qemu
from kubehelpers import Kiln, run, template, wait_ended
from operations import role, wait_role

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAMESPACE = "standby"
TAKEOVER_SECONDS = 30


@pytest.fixture(scope="module")
def pair(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    """Two replicas sharing the data directory, as two pods of a node share its hostPath."""
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
    data = tmp_path_factory.mktemp("standby")
    replicas = tuple(
        OperatorProcess(
            control_plane.kubeconfig,
            data,
            data / f"operator-{name}.log",
            KILN_NAMESPACES=NAMESPACE,
            KILN_LEADER_ELECTION="true",
            KILN_LEADER_ELECTION_NAMESPACE=NAMESPACE,
            KILN_POD_NAME=f"kiln-{name}",
        )
        for name in ("a", "b")
    )
    first, second = replicas
    try:
        first.start()
        wait_role(first, "active", 30)
        second.start()
        yield first, second
    finally:
        for replica in replicas:
            replica.stop()
        # Both replicas share the data directory: its VMs are gone however the test ended.
        first.kill_build_vms()


def test_the_standby_takes_over_a_run_in_flight_on_the_same_vm(
    control_plane: ControlPlane, pair: tuple[OperatorProcess, OperatorProcess]
) -> None:
    active, standby = pair
    assert role(standby) == "standby"
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        kiln = Kiln(api, NAMESPACE)
        lease = client.CoordinationV1Api(api).read_namespaced_lease("kiln", NAMESPACE)
        assert lease.spec.holder_identity == "kiln-a"
        kiln.create(
            "imagetemplates",
            template(
                "ha",
                customize=[
                    {"type": "Shell", "inline": ["echo before", "sleep 40", "echo after-takeover"]}
                ],
            ),
        )
        kiln.create("imagebuildruns", run("ha-1", "ha"))
        body = kiln.wait_for(
            "imagebuildruns",
            "ha-1",
            lambda b: "running customize-00" in ((b or {}).get("status") or {}).get("message", ""),
            1200,
            "customizing",
        )
        assert body is not None
        vm_before = body["status"]["checkpoint"]["local"]["vm"]
        vm = qemu.find(active.data_dir / "vm" / body["metadata"]["uid"])
        assert vm is not None
        # The standby answers log requests by forwarding them to the active replica.
        assert "==> customize[0] Shell" in standby.http(f"/logs/{NAMESPACE}/ha-1")
        active.kill()
        assert qemu.is_running(vm), "the build VM outlives the operator"
        took = wait_role(standby, "active", TAKEOVER_SECONDS)
        assert took < TAKEOVER_SECONDS
        lease = client.CoordinationV1Api(api).read_namespaced_lease("kiln", NAMESPACE)
        assert lease.spec.holder_identity == "kiln-b"
        assert lease.spec.lease_transitions == 1
        body = wait_ended(kiln, "ha-1")
    status = body["status"]
    assert status["runState"] == "Succeeded", status["message"]
    assert status["checkpoint"]["local"]["vm"] == vm_before, "the same VM finished the build"
    assert not qemu.is_running(vm), "the replica that took over removed the build VM"
    log = Path(status["checkpoint"]["logPath"]).read_text()
    assert log.count("before") == 1 and log.count("after-takeover") == 1
    starts = [
        line
        for replica in pair
        for line in replica.log().splitlines()
        if "started VM kiln-ha-1" in line
    ]
    assert len(starts) == 1, starts
    assert "standing by" in standby.log()


def test_a_clean_shutdown_releases_the_lease_at_once(
    control_plane: ControlPlane,
    pair: tuple[OperatorProcess, OperatorProcess],
    tmp_path: Path,
) -> None:
    _, active = pair  # the replica that took over above
    third = OperatorProcess(
        control_plane.kubeconfig,
        active.data_dir,
        tmp_path / "operator-c.log",
        **{**active.settings, "KILN_POD_NAME": "kiln-c"},
    )
    third.start()
    try:
        assert role(third) == "standby"
        active.stop()  # SIGTERM: kopf stops, the Lease is released
        assert wait_role(third, "active", 10) < 10
    finally:
        third.stop()
