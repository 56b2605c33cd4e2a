"""Drives one ImageBuildRun to its end, one pass at a time.

Each pass reads the run as it is in the API server, decides (with the pure functions in
kiln.reconcile.runs) and does the next thing, and writes status. Nothing lives only in
memory: the open SSH connection is a cache, so a restarted operator picks up where the
status and the world say the run is.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncssh
import kopf
from kubernetes.client.exceptions import ApiException

from kiln import metrics, reasons
from kiln.api.run import TERMINAL_RUN_STATES, RunState, RunSubState, StepState
from kiln.api.template import ImageTemplateSpec, OnError
from kiln.communicators.ssh import CommunicatorError
from kiln.kube import RUNS, TEMPLATES, refusal, template_runs
from kiln.naming import run_secret_name
from kiln.pipeline import STEPS, STEPS_BY_NAME, CleanupStep, delete_all
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.logs import COMBINED
from kiln.pipeline.machine import decode_keys
from kiln.providers.base import ProviderError, RunContext, TemplateIdentity
from kiln.reconcile import runs as decide
from kiln.reconcile.conditions import now_rfc3339
from kiln.reconcile.sync import refresh_template, template_identity
from kiln.reconcile.templates import effective_spec, problems_of, spec_hash
from kiln.runtime import Runtime

log = logging.getLogger(__name__)
Body = dict[str, Any]
QUEUE_POLL_SECONDS = 5.0
DEFAULT_TIMEOUT_MINUTES = 240
MAX_CONNECTION_ERRORS = 10
MAX_STEP_ERRORS = 3
LOG_PUBLISH_SECONDS = 30.0
CLEANUP_RETRY_SECONDS = 15.0
RETRYING = "retrying: "


def _status(run: Body) -> Body:
    return run.get("status") or {}


class RunDriver:
    def __init__(self, runtime: Runtime, namespace: str, name: str) -> None:
        self.runtime = runtime
        self.kube = runtime.kube
        self.namespace = namespace
        self.name = name
        self.env: StepEnv | None = None
        self._log_published = (0.0, -1)  # (monotonic time, size) of the last upload

    async def get(self) -> Body | None:
        run = await self.kube.get(RUNS, self.namespace, self.name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return None
        return run

    async def write(self, run: Body, status: Body) -> None:
        status["observedGeneration"] = run["metadata"].get("generation")
        await self.kube.patch_status(RUNS, self.namespace, self.name, status)

    # --- queue ---------------------------------------------------------------------------

    async def queue_pass(self, run: Body) -> float | None:
        """Start the run if it may start; the seconds to wait before asking again if not."""
        now = now_rfc3339()
        generation = run["metadata"].get("generation")
        if (run.get("spec") or {}).get("cancel"):
            await self.finish(run, RunState.Canceled, reasons.CANCELED, "canceled before it began.")
            return None
        template_name = run["spec"]["templateRef"]["name"]
        async with self.runtime.template_locks[f"{self.namespace}/{template_name}"]:
            template = await self.kube.get(TEMPLATES, self.namespace, template_name)
            spec = effective_spec((template or {}).get("spec") or {}, self.runtime.settings)
            problems = problems_of(spec, self.runtime.settings) if template else []
            siblings = await template_runs(self.kube, template) if template else []
            admission = decide.admit(run, template, siblings, problems)
            status = _status(run)
            if not admission.start:
                if status.get("message") != admission.message:
                    kopf.info(run, reason=reasons.EVENT_QUEUED, message=admission.message)
                    await self.write(
                        run,
                        {
                            "runState": RunState.Running,
                            "runSubState": RunSubState.Queued,
                            "message": admission.message,
                            "conditions": decide.run_conditions(
                                status.get("conditions"),
                                RunState.Running,
                                admission.reason,
                                admission.message,
                                generation,
                                now,
                            ),
                        },
                    )
                    if template:
                        await refresh_template(self.runtime, self.namespace, template_name)
                return QUEUE_POLL_SECONDS
            assert template is not None
            await self.start(run, template, spec, now)
        await refresh_template(self.runtime, self.namespace, template_name)
        return 0

    async def start(self, run: Body, template: Body, spec: Body, now: str) -> None:
        """Snapshot the template; from here on the run builds the snapshot, not the template."""
        parsed = ImageTemplateSpec.model_validate(spec)
        identity = template_identity(template)
        ctx = self._context(run, parsed, identity, {"template": identity.model_dump()})
        steps = [
            {"name": s.name, "state": StepState.Pending if s.applies(ctx) else StepState.Skipped}
            for s in STEPS
        ]
        message = f"building {template['metadata']['name']} (generation "
        message += f"{template['metadata'].get('generation')})"
        await self.write(
            run,
            {
                "runState": RunState.Running,
                "runSubState": RunSubState.Building,
                "message": message,
                "startTime": now,
                "provider": spec["provider"],
                "templateGeneration": template["metadata"].get("generation"),
                "templateHash": spec_hash(spec),
                "templateSnapshot": spec,
                "steps": steps,
                "checkpoint": {"template": identity.model_dump(), "logPath": str(ctx.log_path)},
                "conditions": decide.run_conditions(
                    _status(run).get("conditions"),
                    RunState.Running,
                    reasons.RUNNING,
                    message,
                    run["metadata"].get("generation"),
                    now,
                ),
            },
        )
        kopf.info(run, reason=reasons.EVENT_STARTED, message=message)
        metrics.run_started(run["metadata"].get("creationTimestamp"), now)

    # --- build ---------------------------------------------------------------------------

    def _context(
        self, run: Body, spec: ImageTemplateSpec, template: TemplateIdentity, checkpoint: Body
    ) -> RunContext:
        provider = self.runtime.provider(spec.provider or "")
        return RunContext(
            namespace=self.namespace,
            run_name=self.name,
            run_uid=run["metadata"]["uid"],
            template=template,
            spec=spec,
            checkpoint=checkpoint,
            run_dir=provider.run_dir(template, spec, self.name),
            key_namespace=self.runtime.settings.secrets_namespace,
        )

    async def context(self, run: Body) -> RunContext:
        status = _status(run)
        checkpoint = dict(status.get("checkpoint") or {})
        spec = ImageTemplateSpec.model_validate(status["templateSnapshot"])
        template = TemplateIdentity.model_validate(checkpoint["template"])
        ctx = self._context(run, spec, template, checkpoint)
        keys = await self.kube.read_secret(ctx.key_namespace, run_secret_name(ctx.run_uid))
        if keys:
            decode_keys(keys, ctx)
        if self.env is None:
            self.env = StepEnv(
                provider=self.runtime.provider(spec.provider or ""),
                kube=self.kube,
                policy=self.runtime.settings.tenancy_policy,
            )
        return ctx

    async def build_pass(self, run: Body) -> float | None:
        """One step forward; the seconds to wait before the next pass, None when ended."""
        status = _status(run)
        try:
            ctx = await self.context(run)
        except ProviderError as error:
            await self.finish(run, RunState.Failed, reasons.PROVIDER_ERROR, str(error))
            return None
        assert self.env is not None
        records: list[Body] = [dict(r) for r in status["steps"]]
        if ctx.checkpoint.get("ending"):
            return await self.conclude(run, ctx, records)
        if (run.get("spec") or {}).get("cancel"):
            message = "canceled; build resources removed."
            return await self.end(run, ctx, records, RunState.Canceled, reasons.CANCELED, message)
        if self._timed_out(run, ctx):
            minutes = ctx.spec.build_timeout_in_minutes or DEFAULT_TIMEOUT_MINUTES
            message = (
                f"the build took longer than buildTimeoutInMinutes ({minutes}); raise it or "
                "make the build faster"
            )
            return await self.end(run, ctx, records, RunState.Failed, reasons.TIMED_OUT, message)
        index = decide.next_step(records)
        if index is None:
            state, reason, message = decide.final_state(ctx.checkpoint)
            await self.finish(run, state, reason, message, ctx)
            return None
        step = STEPS_BY_NAME[records[index]["name"]]
        record = records[index]
        if record["state"] == StepState.Pending:
            record.update(state=StepState.Running, startTime=now_rfc3339())
        outcome = await self._reconcile_step(step.name, ctx)
        await self._stream_logs(ctx)
        if outcome.message.startswith(RETRYING) and outcome.message != record.get("message"):
            kopf.warn(run, reason=reasons.EVENT_RETRYING, message=f"{step.name}: {outcome.message}")
        record["message"] = outcome.message
        if outcome.kind == "wait":
            progress = self._progress(ctx, records, step.sub_state, outcome.message)
            if any(status.get(key) != value for key, value in progress.items()):
                await self.write(run, progress)  # polling a running job writes nothing new
            return outcome.delay
        record.update(endTime=now_rfc3339())
        metrics.step_ended(ctx.spec.provider, step.name, record.get("startTime"), record["endTime"])
        if outcome.kind == "done":
            record["state"] = StepState.Succeeded
            kopf.info(
                run, reason=reasons.EVENT_STEP_SUCCEEDED, message=f"{step.name}: {outcome.message}"
            )
            await self.write(run, self._progress(ctx, records, step.sub_state, outcome.message))
            return 0
        record.update(state=StepState.Failed, exitCode=outcome.exit_code, logTail=outcome.log_tail)
        validate = ctx.spec.validate_
        if step.name == "validate" and validate and validate.continue_distribute_on_failure:
            ctx.checkpoint["validationFailure"] = outcome.message
            await self.write(run, self._progress(ctx, records, step.sub_state, outcome.message))
            return 0
        return await self.fail(run, ctx, records, outcome, self._keep_vm(ctx, step.name))

    async def _reconcile_step(self, name: str, ctx: RunContext) -> Outcome:
        """A step's reconcile, with provider and connection errors turned into outcomes."""
        assert self.env is not None
        try:
            outcome = await STEPS_BY_NAME[name].reconcile(ctx, self.env)
            ctx.checkpoint.pop("connectionErrors", None)
            ctx.checkpoint.pop("stepErrors", None)
            return outcome
        except ProviderError as error:
            if error.fatal:
                return Outcome.failed(str(error), reasons.PROVIDER_ERROR)
            if error.retry_kind:
                metrics.reconcile_error(error.retry_kind)
                return Outcome.wait(f"{RETRYING}{error}", error.retry_after)
            return Outcome.wait(str(error), error.retry_after)
        except (CommunicatorError, asyncssh.Error, OSError) as error:
            metrics.reconcile_error("connection")
            await self.env.disconnect(ctx)
            return _retry_or_fail(
                ctx,
                "connectionErrors",
                MAX_CONNECTION_ERRORS,
                f"lost the connection to the build VM: {error}",
                delay=5,
            )
        except Exception as error:  # retried a few times (an RBAC fix may come), never forever
            if isinstance(error, ApiException):
                metrics.reconcile_error("kubernetes")
                message = f"step {name}: Kubernetes refused: {refusal(error)}"
            else:  # a bug or an unforeseen failure
                metrics.reconcile_error("unexpected")
                log.exception("step %s of run %s/%s failed", name, self.namespace, self.name)
                message = f"step {name} failed: {type(error).__name__}: {error}"
            return _retry_or_fail(ctx, "stepErrors", MAX_STEP_ERRORS, message, delay=10)

    def _progress(
        self, ctx: RunContext, records: list[Body], sub_state: RunSubState, message: str
    ) -> Body:
        return {
            "runSubState": sub_state,
            "message": message,
            "steps": records,
            "checkpoint": ctx.checkpoint,
            "exactSource": ctx.checkpoint.get("exactSource"),
            "runOutputs": _outputs(ctx),
        }

    @staticmethod
    def _keep_vm(ctx: RunContext, step: str) -> bool:
        handling = ctx.spec.error_handling
        if handling is None:
            return False
        policy = {
            "customize": handling.on_customizer_error,
            "validate": handling.on_validation_error,
        }
        return policy.get(step) == OnError.abort

    @staticmethod
    def _timed_out(run: Body, ctx: RunContext) -> bool:
        started = _status(run).get("startTime")
        if not started:
            return False
        minutes = ctx.spec.build_timeout_in_minutes or DEFAULT_TIMEOUT_MINUTES
        begun = datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return datetime.now(UTC) > begun + timedelta(minutes=minutes)

    # --- endings -------------------------------------------------------------------------

    async def fail(
        self, run: Body, ctx: RunContext, records: list[Body], outcome: Outcome, keep_vm: bool
    ) -> float | None:
        assert self.env is not None
        message = outcome.message
        tail = "".join(f"\n{line}" for line in outcome.log_tail or [])
        kopf.warn(run, reason=outcome.reason or reasons.FAILED, message=f"{message}{tail}")
        if keep_vm:
            message += f" errorHandling is abort, so {self.env.provider.describe_vm(ctx)}."
        reason = outcome.reason or reasons.FAILED
        return await self.end(run, ctx, records, RunState.Failed, reason, message, keep_vm)

    async def end(
        self,
        run: Body,
        ctx: RunContext,
        records: list[Body],
        state: RunState,
        reason: str,
        message: str,
        keep_vm: bool = False,
    ) -> float | None:
        """Record how the run ends before cleaning up, so a restart finishes the cleanup."""
        ctx.checkpoint["ending"] = {
            "state": state,
            "reason": reason,
            "message": message,
            "keepVm": keep_vm,
        }
        patch: Body = {"steps": records, "checkpoint": ctx.checkpoint, "message": message}
        if state == RunState.Canceled:
            patch["runState"] = RunState.Canceling
        await self.write(run, patch)
        return await self.conclude(run, ctx, records)

    async def conclude(self, run: Body, ctx: RunContext, records: list[Body]) -> float | None:
        """Clean up (retried until it works), then write the final state."""
        ending = ctx.checkpoint["ending"]
        try:
            await self.clean_up(run, ctx, records, keep_vm=ending["keepVm"])
        except Exception as error:  # the build's resources must not leak: try again later
            log.exception("cleanup of run %s/%s failed", self.namespace, self.name)
            metrics.reconcile_error("cleanup")
            kopf.warn(run, reason=reasons.EVENT_CLEANUP_FAILED, message=f"retrying: {error}")
            await self.write(
                run, {"message": f"{ending['message']} Cleanup failed, retrying: {error}"}
            )
            return CLEANUP_RETRY_SECONDS
        await self.finish(run, RunState(ending["state"]), ending["reason"], ending["message"], ctx)
        return None

    async def clean_up(
        self, run: Body, ctx: RunContext, records: list[Body], *, keep_vm: bool
    ) -> None:
        """Every step's delete() in reverse, recorded as the cleanup step."""
        assert self.env is not None
        await delete_all(ctx, self.env, keep_vm=keep_vm)
        now = now_rfc3339()
        for record in records:
            if record["state"] == StepState.Running:
                record.update(state=StepState.Failed, endTime=now, message="stopped")
            if record["name"] == CleanupStep.name:
                kept = "; the build VM is kept (errorHandling abort)" if keep_vm else ""
                record.update(
                    state=StepState.Succeeded,
                    startTime=record.get("startTime") or now,
                    endTime=now,
                    message=f"build resources removed{kept}",
                )
        ctx.checkpoint["vmKept"] = keep_vm
        await self.write(run, {"steps": records, "checkpoint": ctx.checkpoint})

    async def finish(
        self,
        run: Body,
        state: RunState,
        reason: str,
        message: str,
        ctx: RunContext | None = None,
    ) -> None:
        status = _status(run)
        patch: Body = {
            "runState": state,
            "message": message,
            "endTime": now_rfc3339(),
            "conditions": decide.run_conditions(
                status.get("conditions"),
                state,
                reason,
                message,
                run["metadata"].get("generation"),
                now_rfc3339(),
            ),
        }
        if ctx is not None:
            patch |= {"checkpoint": ctx.checkpoint, "runOutputs": _outputs(ctx)}
            await self._publish_logs(ctx)
        await self.write(run, patch)
        if self.env is not None and ctx is not None:
            await self.env.disconnect(ctx)
        post = kopf.info if state == RunState.Succeeded else kopf.warn
        post(run, reason=str(state), message=message)
        metrics.run_ended(status.get("provider"), str(state))
        await refresh_template(self.runtime, self.namespace, run["spec"]["templateRef"]["name"])

    async def _stream_logs(self, ctx: RunContext) -> None:
        """While a run builds, its log reaches the provider's store (AIB's packerlogs) at
        most every LOG_PUBLISH_SECONDS when it grew, not only when the run ends."""
        log_file = ctx.run_dir / COMBINED
        size = log_file.stat().st_size if log_file.exists() else 0
        published_at, published_size = self._log_published
        if size == published_size or time.monotonic() - published_at < LOG_PUBLISH_SECONDS:
            return
        self._log_published = (time.monotonic(), size)
        await self._publish_logs(ctx)

    async def _publish_logs(self, ctx: RunContext) -> None:
        """Best effort: a log that could not be uploaded must not change how the run ended."""
        assert self.env is not None
        try:
            await self.env.provider.publish_logs(ctx)
        except Exception:
            log.warning(
                "could not publish the log of run %s/%s", self.namespace, self.name, exc_info=True
            )

    # --- the loop ------------------------------------------------------------------------

    async def drive(self, stopped: kopf.DaemonStopped) -> None:
        """Queue until admitted, then build holding one of the operator's build slots."""
        run: Body | None = None
        while not stopped:
            run = await self.get()
            if run is None or _status(run).get("runState") in TERMINAL_RUN_STATES:
                return
            if _status(run).get("templateSnapshot"):
                break
            delay = await self.queue_pass(run)
            if delay is None:
                return
            await stopped.wait(delay)
        slots = self.runtime.build_slots
        if slots.locked() and (run := await self.get()):
            limit = self.runtime.settings.max_active_runs
            await self.write(run, {"message": f"waiting for a build slot ({limit} at a time)"})
        provider = _status(run).get("provider") if run else None
        async with slots:
            with metrics.in_flight(provider).track_inprogress():
                while not stopped:
                    run = await self.get()
                    if run is None or _status(run).get("runState") in TERMINAL_RUN_STATES:
                        return
                    delay = await self.build_pass(run)
                    if delay is None:
                        return
                    await stopped.wait(delay)

    async def delete(self, run: Body) -> None:
        """The run is being deleted: remove whatever of its build is left (a kept VM too)."""
        if not _status(run).get("templateSnapshot"):
            return
        ctx = await self.context(run)
        assert self.env is not None
        await delete_all(ctx, self.env, keep_vm=False)


def _retry_or_fail(
    ctx: RunContext, counter: str, limit: int, message: str, delay: float
) -> Outcome:
    """Retry a failing step a few times (counted in the checkpoint), then give up."""
    errors = ctx.checkpoint.get(counter, 0) + 1
    ctx.checkpoint[counter] = errors
    if errors > limit:
        return Outcome.failed(f"{message} ({errors} attempts)", reasons.PROVIDER_ERROR)
    return Outcome.wait(f"{RETRYING}{message}", delay=delay * errors)


def _outputs(ctx: RunContext) -> list[Body] | None:
    outputs = ctx.checkpoint.get("outputs") or {}
    return [outputs[key] for key in sorted(outputs, key=int)] or None
