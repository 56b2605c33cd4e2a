"""ImageBuildRun handlers: one daemon per run drives it; deletion cleans up what is left."""

from __future__ import annotations

from typing import Any

import kopf

from kiln import GROUP, VERSION
from kiln.kube import RUNS
from kiln.reconcile.driver import RunDriver
from kiln.runtime import Runtime


@kopf.daemon(GROUP, VERSION, RUNS, cancellation_timeout=30)
async def drive_run(
    body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Runs for as long as the build does; on an operator restart it starts again and resumes."""
    runtime: Runtime = memo.runtime
    await RunDriver(runtime, body.metadata.namespace, body.metadata.name, stopped).drive()


@kopf.on.delete(GROUP, VERSION, RUNS)
async def delete_run(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    await RunDriver(runtime, body.metadata.namespace, body.metadata.name).delete(dict(body))
