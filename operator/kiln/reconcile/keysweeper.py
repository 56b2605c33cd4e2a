"""The key Secret sweeper: deletes per-run key Secrets whose run is gone.

A run's key Secret lives in the operator's namespace, so no owner reference can tie it to
the run (they cannot cross namespaces) and Kubernetes' garbage collector never removes
it. The run's own cleanup deletes it; this catches what a crash left between the two.
It runs as part of the orphan sweep (kiln.reconcile.sweeper). Each Secret's run is read
after the Secrets are listed: a Secret made meanwhile (a new run's) is not looked at, and
a listed one's run existed before it, so only a run that is really gone loses its key.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.exceptions import ApiException

from kiln.kube import RUNS, Kube
from kiln.pipeline.machine import KEY_SECRET_RUN_NAME, KEY_SECRET_RUN_NAMESPACE, KEY_SECRET_RUN_UID

log = logging.getLogger(__name__)
Body = dict[str, Any]
SWEEP_SECONDS = 300.0


def owner_of(secret: Body) -> tuple[str, str, str] | None:
    """(namespace, name, uid) of the run a key Secret belongs to; None if not Kiln's."""
    meta = secret["metadata"]
    uid = (meta.get("labels") or {}).get(KEY_SECRET_RUN_UID)
    annotations = meta.get("annotations") or {}
    namespace, name = (
        annotations.get(KEY_SECRET_RUN_NAMESPACE),
        annotations.get(KEY_SECRET_RUN_NAME),
    )
    if not (uid and namespace and name):
        return None
    return namespace, name, uid


def is_orphan(run: Body | None, uid: str) -> bool:
    """The run was deleted, or another run now has its name."""
    return run is None or run["metadata"].get("uid") != uid


async def sweep_key_secrets(kube: Kube, namespace: str) -> list[str]:
    """Delete the orphaned key Secrets in the operator's namespace; their names."""
    deleted = []
    for secret in await kube.list_secrets(namespace, KEY_SECRET_RUN_UID):
        owner = owner_of(secret)
        if owner is None:
            continue
        run_namespace, run_name, uid = owner
        try:
            run = await kube.get(RUNS, run_namespace, run_name)
        except ApiException as error:  # e.g. 403: a namespace this operator does not watch
            log.info(
                "key Secret %s kept: cannot read its run (%s)",
                secret["metadata"]["name"],
                error.status,
            )
            continue
        if is_orphan(run, uid):
            name = secret["metadata"]["name"]
            await kube.delete_secret(namespace, name)
            log.info(
                "deleted key Secret %s/%s of the gone run %s/%s",
                namespace,
                name,
                run_namespace,
                run_name,
            )
            deleted.append(name)
    return deleted
