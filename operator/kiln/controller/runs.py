"""ImageBuildRun handlers: one daemon per run drives it; deletion cleans up what is left.

runs_by_template is a kopf index (namespace, template) -> a slim view of each run, kept
current by the watch: queue admission, history limits and schedule triggers read it
instead of listing runs (templates_by_name, in controller.templates, is its peer).
"""

from __future__ import annotations

from typing import Any

import kopf

from kiln import GROUP, VERSION
from kiln.kube import RUNS
from kiln.reconcile.driver import RunDriver
from kiln.reconcile.runs import index_entry
from kiln.runtime import Runtime


@kopf.index(GROUP, VERSION, RUNS)
def runs_by_template(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (body.metadata.namespace, body.spec.get("templateRef", {}).get("name", "")): index_entry(
            dict(body)
        )
    }


@kopf.daemon(GROUP, VERSION, RUNS, cancellation_timeout=30)
async def drive_run(
    body: kopf.Body,
    memo: kopf.Memo,
    stopped: kopf.DaemonStopped,
    runs_by_template: kopf.Index[tuple[str, str], dict[str, Any]],
    templates_by_name: kopf.Index[tuple[str, str], dict[str, Any]],
    **_: Any,
) -> None:
    """Runs for as long as the build does; on an operator restart it starts again and resumes.
    body is kopf's live view of the run (current with every watch event): a run waiting in
    the queue or for a build slot reads it instead of the API server."""
    runtime: Runtime = memo.runtime
    runtime.runs_index = runs_by_template
    runtime.templates_index = templates_by_name
    driver = RunDriver(runtime, body.metadata.namespace, body.metadata.name, stopped, live=body)
    await driver.drive()


@kopf.on.delete(GROUP, VERSION, RUNS)
async def delete_run(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    runtime: Runtime = memo.runtime
    await RunDriver(runtime, body.metadata.namespace, body.metadata.name).delete(dict(body))
