"""ImageTemplate handlers: thin, the decisions are in kiln.reconcile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from kiln import GROUP, VERSION, reasons
from kiln.api.template import ImageTemplateSpec, ScheduleTrigger
from kiln.kube import RUNS, TEMPLATES
from kiln.reconcile import templates as decide
from kiln.reconcile import triggers
from kiln.reconcile.runs import run_manifest
from kiln.reconcile.sync import refresh_template, template_identity
from kiln.runtime import Runtime

DELETE_WAIT = timedelta(minutes=20)


@kopf.index(GROUP, VERSION, TEMPLATES)
def templates_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(body.metadata.namespace, body.metadata.name): decide.index_entry(dict(body))}


@kopf.on.resume(GROUP, VERSION, TEMPLATES)
@kopf.on.create(GROUP, VERSION, TEMPLATES)
@kopf.on.update(GROUP, VERSION, TEMPLATES)
async def reconcile_template(
    body: kopf.Body,
    memo: kopf.Memo,
    runs_by_template: kopf.Index[tuple[str, str], dict[str, Any]],
    **_: Any,
) -> None:
    runtime: Runtime = memo.runtime
    runtime.runs_index = runs_by_template
    spec = decide.effective_spec(dict(body.spec), runtime.settings)
    problems = decide.problems_of(spec, runtime.settings)
    if problems:
        kopf.warn(body, reason=reasons.INVALID_SPEC, message=decide.describe_problems(problems))
    elif decide.auto_run_enabled(spec):
        manifest = run_manifest(dict(body), decide.auto_run_name(dict(body)), "autoRun")
        await runtime.kube.create(RUNS, body.metadata.namespace, manifest)
    await refresh_template(runtime, body.metadata.namespace, body.metadata.name, dict(body))


@kopf.on.delete(GROUP, VERSION, TEMPLATES)
async def delete_template(body: kopf.Body, memo: kopf.Memo, runtime: timedelta, **_: Any) -> None:
    """Cancels the template's unfinished runs and waits while they end (a cancel stops a
    step within seconds and cleanup retries are bounded), then removes the staging. After
    DELETE_WAIT the staging goes regardless: deletion is never blocked for good."""
    kiln: Runtime = memo.runtime
    namespace = body.metadata.namespace
    runs = await kiln.runs_of(namespace, body.metadata.name)
    unfinished = [r for r in runs if not decide.has_ended(r)]
    for run in unfinished:
        if not (run.get("spec") or {}).get("cancel"):
            await kiln.kube.patch(
                RUNS, namespace, run["metadata"]["name"], {"spec": {"cancel": True}}
            )
    if unfinished:
        names = ", ".join(r["metadata"]["name"] for r in unfinished)
        if runtime < DELETE_WAIT:
            raise kopf.TemporaryError(f"waiting for canceled run(s) {names} to end", delay=10)
        kopf.warn(
            dict(body),
            reason="DeletedWithActiveRuns",
            message=f"run(s) {names} did not end in {DELETE_WAIT}; the staging is removed anyway",
        )
    status = body.status or {}
    staging = status.get("exactStagingResourceGroup")
    provider = kiln.providers.get(status.get("provider") or "")
    if staging and provider:
        spec = body.spec or {}
        await provider.delete_staging(
            template_identity(dict(body)),
            staging,
            keep_group=bool(spec.get("stagingResourceGroup")),
            service_account=spec.get("serviceAccountName"),
        )


async def _fire_schedule(
    runtime: Runtime, body: kopf.Body, schedule: ScheduleTrigger, due: datetime
) -> None:
    """Create the scheduled run, as the trigger's concurrencyPolicy says."""
    namespace, name = body.metadata.namespace, body.metadata.name
    unfinished = [r for r in await runtime.runs_of(namespace, name) if not decide.has_ended(r)]
    action = triggers.schedule_action(schedule.concurrency_policy, len(unfinished))
    names = ", ".join(r["metadata"]["name"] for r in unfinished)
    if action == "skip":
        kopf.info(
            dict(body),
            reason="ScheduleSkipped",
            message=f"the {due:%Y-%m-%d %H:%M} run was skipped (concurrencyPolicy Forbid): "
            f"{names} not finished",
        )
        return
    if action == "replace":
        for run in unfinished:
            await runtime.kube.patch(
                RUNS, namespace, run["metadata"]["name"], {"spec": {"cancel": True}}
            )
        kopf.info(dict(body), reason="ScheduleReplaced", message=f"canceled {names}")
    run = triggers.scheduled_run_name(name, due)
    await runtime.kube.create(RUNS, namespace, run_manifest(dict(body), run, "Schedule"))


def _has_triggers(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("triggers"))


@kopf.timer(GROUP, VERSION, TEMPLATES, interval=30, initial_delay=10, when=_has_triggers)
async def fire_triggers(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Schedule and SourceImage triggers: each creates a run with a name derived from
    what fired it, so firing twice (after a restart) creates one run."""
    runtime: Runtime = memo.runtime
    spec_body = decide.effective_spec(dict(body.spec), runtime.settings)
    if not spec_body.get("triggers") or decide.problems_of(spec_body, runtime.settings):
        return
    spec = ImageTemplateSpec.model_validate(spec_body)
    status = dict(body.status or {})
    namespace, name = body.metadata.namespace, body.metadata.name
    record: dict[str, Any] = {}
    now = datetime.now(UTC).replace(tzinfo=None)
    if (schedule := triggers.schedule_trigger(spec)) is not None:
        last = status.get("lastScheduledTime")
        due = triggers.schedule_due(
            schedule.schedule,
            triggers.parse_time(last) if last else None,
            triggers.parse_time(body.metadata.creation_timestamp),
            now,
        )
        if due is not None:
            await _fire_schedule(runtime, body, schedule, due)
            record["lastScheduledTime"] = due.strftime(triggers.TIME_FORMAT)
    if triggers.has_source_trigger(spec):
        provider = runtime.providers.get(spec.provider or "")
        current = await provider.latest_source_version(spec, namespace) if provider else None
        if triggers.source_changed(status.get("sourceImageVersion"), current):
            assert current is not None
            run = triggers.source_run_name(name, current)
            await runtime.kube.create(RUNS, namespace, run_manifest(dict(body), run, "SourceImage"))
        if current and current != status.get("sourceImageVersion"):
            record["sourceImageVersion"] = current
    if record:
        await runtime.kube.patch_status(TEMPLATES, namespace, name, record)
