"""The orphan sweeper: build resources whose run is gone (or ended without them) go.

A crash, a bug or a cleanup that gave up can leave a build VM behind; nothing else would
ever remove it. At start and every SWEEP_SECONDS the sweeper asks each provider to remove
build resources that no unfinished run (or kept VM) owns: by state directories and pid
files locally, by Kiln's run tag on Azure; and per-run key Secrets in the operator's
namespace whose run is gone (kiln.reconcile.keysweeper).

Race-free with runs being created: each sweep lists its candidates first and reads the
runs after (a provider calls `owners` once it has listed; a key Secret's run is read
after the Secrets are listed). A run exists before anything is made for it, so every
candidate's run is in the later read, and what a new run makes meanwhile is no candidate.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kiln.api.run import TERMINAL_RUN_STATES
from kiln.kube import RUNS
from kiln.reconcile.keysweeper import sweep_key_secrets
from kiln.runtime import Runtime

log = logging.getLogger(__name__)
SWEEP_SECONDS = 600.0
SWEEP_TIMEOUT = 300.0


def owners(runs: list[dict[str, Any]]) -> set[str]:
    """Run UIDs whose build resources must stay: unfinished runs, and kept VMs."""
    keep = set()
    for run in runs:
        status = run.get("status") or {}
        kept = (status.get("checkpoint") or {}).get("vmKept")
        if status.get("runState") not in TERMINAL_RUN_STATES or kept:
            keep.add(run["metadata"]["uid"])
    return keep


async def sweep_once(runtime: Runtime) -> list[str]:
    """What was removed (IDs, paths); a provider that fails is logged, not fatal."""

    async def current_owners() -> set[str]:
        return owners(await runtime.kube.list_all(RUNS))

    removed: list[str] = []
    for name, provider in runtime.providers.made().items():
        try:
            removed += await asyncio.wait_for(provider.sweep(current_owners), SWEEP_TIMEOUT)
        except Exception:
            log.warning("the orphan sweep of the %s provider failed", name, exc_info=True)
    try:
        removed += await sweep_key_secrets(runtime.kube, runtime.settings.secrets_namespace)
    except Exception:
        log.warning("sweeping key Secrets failed", exc_info=True)
    for item in removed:
        log.warning("removed an orphaned build resource: %s", item)
    return removed


async def sweep_forever(runtime: Runtime) -> None:
    while True:
        try:
            await sweep_once(runtime)
        except Exception:
            log.warning("the orphan sweep failed", exc_info=True)
        await asyncio.sleep(SWEEP_SECONDS)
