"""The orphan sweep on the real API server: only key Secrets whose run is gone go, and a
run created while a sweep is under way keeps its build VM and its key Secret."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from conftest import OPERATOR_NAMESPACE
from kiln.kube import RUNS, Kube
from kiln.naming import run_secret_name
from kiln.pipeline.machine import key_secret_metadata
from kiln.providers.local import qemu
from kiln.reconcile.keysweeper import sweep_key_secrets
from kiln.reconcile.sweeper import sweep_once
from kiln.runtime import Runtime
from kiln.settings import OperatorSettings
from kubehelpers import Kiln, run, template
from vmboot import idle_qemu

pytestmark = pytest.mark.integration
NAMESPACE = "sweeper-team"


def key_secret(namespace: str, name: str, uid: str) -> dict[str, Any]:
    """A key Secret as the vm step writes it for a run."""
    metadata = key_secret_metadata(namespace, name, uid)
    return {"metadata": metadata, "stringData": {"ssh-privatekey": "k"}}


async def test_only_secrets_of_gone_runs_are_swept(kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    kiln = Kiln(kube_api, NAMESPACE)
    kiln.create("imagetemplates", template("t"))
    live = kiln.create("imagebuildruns", run("live", "t"))
    live_uid = live["metadata"]["uid"]
    gone_uid, renamed_uid = str(uuid.uuid4()), str(uuid.uuid4())
    kept_by_others = {"metadata": {"name": "unrelated", "labels": {"kiln.dev/run-uid": "x"}}}
    for body in (
        key_secret(NAMESPACE, "live", live_uid),
        key_secret(NAMESPACE, "gone", gone_uid),
        key_secret(NAMESPACE, "live", renamed_uid),  # an older run of the same name
        kept_by_others,  # the label alone does not make a Secret Kiln's
    ):
        core.create_namespaced_secret(OPERATOR_NAMESPACE, body)
    try:
        deleted = await sweep_key_secrets(Kube(kube_api), OPERATOR_NAMESPACE)
        assert sorted(deleted) == sorted([run_secret_name(gone_uid), run_secret_name(renamed_uid)])
        left = {s.metadata.name for s in core.list_namespaced_secret(OPERATOR_NAMESPACE).items}
        assert {run_secret_name(live_uid), "unrelated"} <= left
        assert not {run_secret_name(gone_uid), run_secret_name(renamed_uid)} & left
        assert await sweep_key_secrets(Kube(kube_api), OPERATOR_NAMESPACE) == []
    finally:
        for name in (run_secret_name(live_uid), "unrelated"):
            core.delete_namespaced_secret(name, OPERATOR_NAMESPACE)
        core.delete_namespace(NAMESPACE)


class CreatedAfterTheRunsAreListed(Kube):
    """The real API; once the sweep's listing of the runs has returned, a new run starts
    (made by `late`), so the runs the sweep acts on do not include it."""

    def __init__(self, api: client.ApiClient, late: Callable[[], None]) -> None:
        super().__init__(api)
        self.late: Callable[[], None] | None = late

    async def list_all(self, plural: str) -> list[dict[str, Any]]:
        listed = await super().list_all(plural)
        if plural == RUNS and self.late is not None:
            self.late, late = None, self.late
            late()
        return listed


async def test_a_run_created_during_a_sweep_keeps_its_vm_and_key(
    kube_api: client.ApiClient, tmp_path: Path
) -> None:
    """Before, the sweep read the runs first and listed VMs and Secrets after: a run created
    in between lost its new VM and key Secret. Now the candidates are listed first."""
    core = client.CoreV1Api(kube_api)
    namespace = "sweep-race"
    core.create_namespace({"metadata": {"name": namespace}})
    kiln = Kiln(kube_api, namespace)
    kiln.create("imagetemplates", template("t"))
    vms = tmp_path / "vm"
    gone_uid, late_uids = str(uuid.uuid4()), list[str]()
    handles = [idle_qemu(vms / gone_uid)]
    core.create_namespaced_secret(OPERATOR_NAMESPACE, key_secret(namespace, "gone", gone_uid))

    def start_late_run() -> None:  # what the run's vm step makes, in this order
        uid = kiln.create("imagebuildruns", run("late", "t"))["metadata"]["uid"]
        late_uids.append(uid)
        core.create_namespaced_secret(OPERATOR_NAMESPACE, key_secret(namespace, "late", uid))
        handles.append(idle_qemu(vms / uid))

    settings = OperatorSettings(data_root=tmp_path, operator_namespace=OPERATOR_NAMESPACE)
    runtime = Runtime(settings, CreatedAfterTheRunsAreListed(kube_api, start_late_run))
    try:
        removed = await sweep_once(runtime)
        [late_uid] = late_uids
        assert {str(vms / gone_uid), run_secret_name(gone_uid)} <= set(removed)
        assert not {str(vms / late_uid), run_secret_name(late_uid)} & set(removed)
        assert not qemu.is_running(handles[0]) and not (vms / gone_uid).exists()
        assert qemu.is_running(handles[1])
        left = {s.metadata.name for s in core.list_namespaced_secret(OPERATOR_NAMESPACE).items}
        assert run_secret_name(late_uid) in left and run_secret_name(gone_uid) not in left
        # the next sweep sees the late run, and keeps what it owns
        assert not {str(vms / late_uid), run_secret_name(late_uid)} & set(await sweep_once(runtime))
        assert qemu.is_running(handles[1])
    finally:
        for handle in handles:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
        for uid in late_uids:
            with contextlib.suppress(client.ApiException):
                core.delete_namespaced_secret(run_secret_name(uid), OPERATOR_NAMESPACE)
        core.delete_namespace(namespace)
