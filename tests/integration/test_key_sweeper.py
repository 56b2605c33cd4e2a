"""The key Secret sweeper on the real API server: only Secrets whose run is gone go."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes import client

from conftest import OPERATOR_NAMESPACE
from kiln.kube import Kube
from kiln.naming import run_secret_name
from kiln.pipeline.machine import key_secret_metadata
from kiln.reconcile.keysweeper import sweep_key_secrets
from kubehelpers import Kiln, run, template

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
