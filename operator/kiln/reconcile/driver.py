"""Drives one ImageBuildRun to its end: an explicit state machine, one pass at a time.

The states (kiln.api.run.RunPhase) are derived from what status persisted: Queued (no
snapshot) -> WaitingForSlot (snapshot, no startTime) -> Building (holds one of the
operator's build slots; startTime set, so the build timeout counts from here) ->
CleaningUp (the ending is recorded, cleanup runs outside the slot with bounded retries)
-> Done (a terminal runState). Each decision is written before the action it leads to,
so a restarted operator picks up where the status and the world say the run is; the
open SSH connection is only a cache.

Every step pass runs as a task under a deadline, watched every WATCH_SECONDS: a cancel,
the build timeout, the run's deletion or the operator stopping interrupts it in flight.
Metrics and tracing hook in at _step_started/_step_ended and finish().
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncssh
import kopf
from kubernetes.client.exceptions import ApiException

from kiln import distribution, metrics, reasons
from kiln.api.run import (
    Checkpoint,
    CheckpointUnreadable,
    Ending,
    RunPhase,
    RunState,
    RunSubState,
    StepState,
    load_checkpoint,
)
from kiln.api.template import ImageTemplateSpec, OnError
from kiln.communicators.ssh import CommunicatorError
from kiln.kube import RUNS, TEMPLATES, refusal
from kiln.naming import run_secret_name
from kiln.pipeline import STEPS, STEPS_BY_NAME, CleanupStep, delete_all, pass_deadline
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.logs import COMBINED, RunLogs
from kiln.pipeline.machine import decode_keys
from kiln.providers.base import ProviderError, RunContext
from kiln.reconcile import runs as decide
from kiln.reconcile.conditions import now_rfc3339, set_condition
from kiln.reconcile.sync import refresh_template, template_identity
from kiln.reconcile.templates import effective_spec, problems_of, spec_hash
from kiln.runtime import Runtime

log = logging.getLogger(__name__)
Body = dict[str, Any]
QUEUE_POLL_SECONDS = 5.0
WATCH_SECONDS = 5.0  # how often a step in flight checks for cancel, timeout and deletion
STOP_GRACE_SECONDS = 20.0  # how long an interrupted step may take to unwind
CLEANUP_PASS_SECONDS = 300.0
MAX_CONNECTION_ERRORS = 10
MAX_STEP_ERRORS = 3
MAX_CLOUD_RETRIES = 12  # consecutive retryable cloud errors before the run fails
LOG_PUBLISH_SECONDS = 30.0
RETRYING = "retrying: "  # a step's unexpected or connection error, retried a few times


def _status(run: Body) -> Body:
    return run.get("status") or {}


class Stopped(Exception):
    """The run is being deleted or the operator is stopping: leave the run as it is."""


class RunDriver:
    def __init__(
        self,
        runtime: Runtime,
        namespace: str,
        name: str,
        stopped: kopf.DaemonStopped | None = None,
        live: Mapping[str, Any] | None = None,
    ) -> None:
        self.runtime = runtime
        self.kube = runtime.kube
        self.namespace = namespace
        self.name = name
        self.stopped = stopped
        # The daemon's view of the run, kept current by kopf's watch; it may lag this
        # driver's own last write by a moment, so waits read it only for cancel/deletion.
        self.live = live
        self.env: StepEnv | None = None
        self._log_published = (0.0, -1)  # (monotonic time, size) of the last upload
        self._queued_message: str | None = None  # the last Queued message written

    async def get(self) -> Body | None:
        run = await self.kube.get(RUNS, self.namespace, self.name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return None
        return run

    async def write(self, run: Body, status: Body) -> None:
        status["observedGeneration"] = run["metadata"].get("generation")
        if "checkpoint" in status:  # what the checkpoint dropped must go from status too
            checkpoint = status["checkpoint"]
            status["checkpoint"] = decide.merge_patch(_status(run).get("checkpoint"), checkpoint)
            if isinstance(run.get("status"), dict):
                run["status"]["checkpoint"] = checkpoint  # what the next write compares with
        await self.kube.patch_status(RUNS, self.namespace, self.name, status)

    def _halted(self, uid: str) -> bool:
        return bool(self.stopped) or uid in self.runtime.deleting_runs

    # --- the loop ------------------------------------------------------------------------

    async def drive(self) -> None:
        """Each pass reads the run and does what its phase needs, until it is Done."""
        while not (self.stopped or False):
            run = await self.get()
            if run is None:
                return
            phase = decide.phase(_status(run))
            if phase == RunPhase.Done or run["metadata"]["uid"] in self.runtime.deleting_runs:
                return
            try:
                if phase == RunPhase.Queued:
                    delay = await self.queue_pass(run)
                elif phase == RunPhase.CleaningUp:
                    delay = await self.cleanup_pass(run)
                else:
                    delay = await self.build(run)
            except Stopped:
                return
            if delay:
                await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        if self.stopped is not None:
            await self.stopped.wait(seconds)
        else:
            await asyncio.sleep(seconds)

    # --- queue ---------------------------------------------------------------------------

    def _live_run(self) -> Body | None:
        """A copy of the live view; None when there is none or the run is being deleted."""
        if self.live is None:
            return None
        run = copy.deepcopy(dict(self.live))
        return None if run["metadata"].get("deletionTimestamp") else run

    async def queue_pass(self, run: Body) -> float:
        """Start the run when it may start. Until then it waits here, deciding again every
        QUEUE_POLL_SECONDS from kopf's indexes and the live view of the run: a queued run
        costs the API server nothing but the writes that say why it waits. A cancel seen on
        the live view goes back to drive(), which reads the run before ending it."""
        while True:
            if (run.get("spec") or {}).get("cancel"):
                message = "canceled before it began."
                await self.finish(run, RunState.Canceled, reasons.CANCELED, message)
                return 0
            if await self._admit_or_queue(run):
                return 0
            await self._sleep(QUEUE_POLL_SECONDS)
            if self._halted(run["metadata"]["uid"]):
                raise Stopped
            if (live := self._live_run()) is None:
                return 0  # no live view, or the run is being deleted: drive() reads it
            run = live

    async def _admission(self, run: Body, template: Body | None) -> tuple[decide.Admission, Body]:
        spec = effective_spec((template or {}).get("spec") or {}, self.runtime.settings)
        problems = problems_of(spec, self.runtime.settings) if template else []
        name = run["spec"]["templateRef"]["name"]
        siblings = await self.runtime.runs_of(self.namespace, name) if template else []
        return decide.admit(run, template, siblings, problems), spec

    async def _admit_or_queue(self, run: Body) -> bool:
        """True when the run was admitted; else its Queued status says why (written when
        the reason changes). The snapshot is taken from the template as the API server has
        it now; the wait decides from the index."""
        template_name = run["spec"]["templateRef"]["name"]
        async with self.runtime.template_locks[f"{self.namespace}/{template_name}"]:
            template = await self.runtime.template_of(self.namespace, template_name)
            admission, spec = await self._admission(run, template)
            if admission.start:
                template = await self.kube.get(TEMPLATES, self.namespace, template_name)
                admission, spec = await self._admission(run, template)
            if admission.start:
                assert template is not None
                await self.admit(run, template, spec)
            elif (self._queued_message or _status(run).get("message")) != admission.message:
                kopf.info(run, reason=reasons.EVENT_QUEUED, message=admission.message)
                await self.write(
                    run,
                    {
                        "runState": RunState.Running,
                        "runSubState": RunSubState.Queued,
                        "message": admission.message,
                        "conditions": self._running_conditions(
                            run, admission.message, admission.reason
                        ),
                    },
                )
                self._queued_message = admission.message
            else:
                return False
        if template is not None:
            await refresh_template(self.runtime, self.namespace, template_name)
        return admission.start

    async def admit(self, run: Body, template: Body, spec: Body) -> None:
        """Snapshot the template; from here on the run builds the snapshot, not the template.
        startTime waits for the build slot."""
        parsed = ImageTemplateSpec.model_validate(spec)
        identity = template_identity(template)
        ctx = self._context(run, parsed, Checkpoint(template=identity))
        ctx.checkpoint.log_path = str(ctx.log_path)
        steps = [
            {"name": s.name, "state": StepState.Pending if s.applies(ctx) else StepState.Skipped}
            for s in STEPS
        ]
        limit = self.runtime.settings.max_active_runs
        message = f"waiting for a build slot ({limit} build(s) at a time)"
        await self.write(
            run,
            {
                "runState": RunState.Running,
                "runSubState": RunSubState.Queued,
                "message": message,
                "provider": spec["provider"],
                "templateGeneration": template["metadata"].get("generation"),
                "templateHash": spec_hash(spec),
                "templateSnapshot": spec,
                "steps": steps,
                "checkpoint": ctx.checkpoint.wire(),
                "conditions": self._running_conditions(run, message, reasons.WAITING_FOR_SLOT),
            },
        )

    # --- build ---------------------------------------------------------------------------

    async def build(self, run: Body) -> float:
        """Hold a build slot for as long as the run builds; cancel works while waiting."""
        slots = self.runtime.build_slots
        while True:
            try:
                await asyncio.wait_for(slots.acquire(), WATCH_SECONDS)
                break
            except TimeoutError:
                pass
            if self._halted(run["metadata"]["uid"]):
                raise Stopped
            if self.live is not None:  # the wait reads the live view, not the API server
                live = self._live_run()
                if live is None:
                    raise Stopped
                if not (live.get("spec") or {}).get("cancel"):
                    continue
            fresh = await self.get()
            if fresh is None:
                raise Stopped
            if (fresh.get("spec") or {}).get("cancel"):
                message = "canceled while waiting for a build slot."
                await self.finish(fresh, RunState.Canceled, reasons.CANCELED, message)
                return 0
        try:
            with metrics.in_flight(_status(run).get("provider")).track_inprogress():
                return await self._hold_slot(run)
        finally:
            slots.release()

    async def _hold_slot(self, run: Body) -> float:
        """Build passes, one after another, while the run has its slot."""
        while not self._halted(run["metadata"]["uid"]):
            fresh = await self.get()
            if fresh is None:
                raise Stopped
            if decide.phase(_status(fresh)) not in (RunPhase.WaitingForSlot, RunPhase.Building):
                return 0
            if not _status(fresh).get("startTime"):
                await self._start_building(fresh)
                continue
            delay = await self.build_pass(fresh)
            if delay is None:
                return 0
            if delay:
                await self._pause(fresh, delay)
        raise Stopped

    async def _start_building(self, run: Body) -> None:
        template = _status(run)["checkpoint"]["template"]["name"]
        generation = _status(run).get("templateGeneration")
        message = f"building {template} (generation {generation})"
        now = now_rfc3339()
        await self.write(
            run,
            {
                "runSubState": RunSubState.Building,
                "message": message,
                "startTime": now,
                "conditions": self._running_conditions(run, message),
            },
        )
        kopf.info(run, reason=reasons.EVENT_STARTED, message=message)
        metrics.run_started(run["metadata"].get("creationTimestamp"), now)

    def _context(self, run: Body, spec: ImageTemplateSpec, checkpoint: Checkpoint) -> RunContext:
        provider = self.runtime.provider(spec.provider or "")
        return RunContext(
            namespace=self.namespace,
            run_name=self.name,
            run_uid=run["metadata"]["uid"],
            template=checkpoint.template,
            spec=spec,
            checkpoint=checkpoint,
            run_dir=provider.run_dir(checkpoint.template, spec, self.name),
            key_namespace=self.runtime.settings.secrets_namespace,
        )

    async def context(self, run: Body) -> RunContext:
        status = _status(run)
        checkpoint = load_checkpoint(status.get("checkpoint") or {})
        spec = ImageTemplateSpec.model_validate(status["templateSnapshot"])
        ctx = self._context(run, spec, checkpoint)
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
        except CheckpointUnreadable as error:
            await self.finish(run, RunState.Failed, reasons.FAILED, str(error))
            return None
        assert self.env is not None
        records: list[Body] = [dict(r) for r in status["steps"]]
        if ctx.checkpoint.ending is not None:  # an upgraded checkpoint that cannot go on
            ending = ctx.checkpoint.ending
            return await self.end(run, ctx, records, ending.state, ending.reason, ending.message)
        interrupted = decide.interruption(run, ctx.spec.build_timeout_in_minutes, _now())
        if interrupted is not None:
            return await self._interrupted(run, ctx, records, interrupted)
        index = decide.next_step(records)
        if index is None:
            state, reason, message = decide.final_state(ctx.checkpoint)
            return await self.end(run, ctx, records, state, reason, message, quiet=True)
        step = STEPS_BY_NAME[records[index]["name"]]
        record = records[index]
        if record["state"] == StepState.Pending:
            record.update(state=StepState.Running, startTime=now_rfc3339())
            self._step_started(ctx, step.name)
        outcome, interrupted = await self._watched(
            run, ctx, self._reconcile_step(step.name, ctx), pass_deadline(step)
        )
        if interrupted is not None:
            return await self._interrupted(run, ctx, records, interrupted)
        assert outcome is not None
        await self._stream_logs(ctx)
        if outcome.message.startswith(RETRYING) and outcome.message != record.get("message"):
            kopf.warn(run, reason=reasons.EVENT_RETRYING, message=f"{step.name}: {outcome.message}")
        record["message"] = outcome.message
        if outcome.kind == "wait":
            progress = self._progress(ctx, records, step.sub_state, outcome.message)
            if outcome.reason:  # a retry: Reconciling says what is awaited and the code
                progress["conditions"] = self._running_conditions(
                    run, outcome.message, outcome.reason
                )
                kopf.warn(run, reason=reasons.EVENT_RETRYING, message=outcome.message)
            elif _reason(status, reasons.RECONCILING) != reasons.RUNNING:
                progress["conditions"] = self._running_conditions(run, outcome.message)
            if any(status.get(key) != value for key, value in progress.items()):
                await self.write(run, progress)  # polling a running job writes nothing new
            return outcome.delay
        record.update(endTime=now_rfc3339())
        self._step_ended(run, ctx, record, outcome)
        if outcome.kind == "done":
            record["state"] = StepState.Succeeded
            progress = self._progress(ctx, records, step.sub_state, outcome.message)
            if _reason(status, reasons.RECONCILING) != reasons.RUNNING:
                progress["conditions"] = self._running_conditions(run, outcome.message)
            await self.write(run, progress)
            return 0
        record.update(state=StepState.Failed, exitCode=outcome.exit_code, logTail=outcome.log_tail)
        validate = ctx.spec.validate_
        if step.name == "validate" and validate and validate.continue_distribute_on_failure:
            ctx.checkpoint.validation_failure = outcome.message
            await self.write(run, self._progress(ctx, records, step.sub_state, outcome.message))
            return 0
        return await self.fail(run, ctx, records, outcome, self._keep_vm(ctx, step.name))

    @staticmethod
    def _running_conditions(run: Body, message: str, reason: str = reasons.RUNNING) -> list[Body]:
        """The conditions of a run still under way (Reconciling True) with this reason."""
        return decide.run_conditions(
            _status(run).get("conditions"),
            RunState.Running,
            reason,
            message,
            run["metadata"].get("generation"),
            now_rfc3339(),
        )

    async def _watched(
        self, run: Body, ctx: RunContext, work: Awaitable[Outcome], deadline: float
    ) -> tuple[Outcome | None, decide.Interruption | None]:
        """Run one step pass as a task; stop it when the run is interrupted or the pass
        runs past its deadline. The task is registered so that deleting the run stops it."""
        uid = run["metadata"]["uid"]
        if self._halted(uid):
            raise Stopped
        task = asyncio.ensure_future(work)
        self.runtime.steps_in_flight[uid] = task
        ends = time.monotonic() + deadline
        try:
            while True:
                remaining = ends - time.monotonic()
                await asyncio.wait({task}, timeout=max(0.0, min(WATCH_SECONDS, remaining)))
                if task.cancelled():  # stopped from outside: the run is being deleted
                    raise Stopped
                if task.done():
                    return task.result(), None
                if self._halted(uid):
                    await _stop(task)
                    raise Stopped
                if time.monotonic() >= ends:
                    await _stop(task)
                    message = f"a pass of the step ran past its deadline ({deadline:.0f}s)"
                    return _retry_or_fail(ctx, "step_errors", MAX_STEP_ERRORS, message, 5), None
                fresh = await self.kube.get(RUNS, self.namespace, self.name)
                interrupted = decide.interruption(fresh, ctx.spec.build_timeout_in_minutes, _now())
                if interrupted is not None:
                    await _stop(task)
                    return None, interrupted
        finally:
            self.runtime.steps_in_flight.pop(uid, None)

    async def _pause(self, run: Body, seconds: float) -> None:
        """Wait between passes, still answering a cancel or the build timeout promptly."""
        ends = time.monotonic() + seconds
        while (remaining := ends - time.monotonic()) > 0:
            await self._sleep(min(WATCH_SECONDS, remaining))
            if self._halted(run["metadata"]["uid"]):
                raise Stopped
            if remaining > WATCH_SECONDS:
                fresh = await self.kube.get(RUNS, self.namespace, self.name)
                timeout = (_status(run).get("templateSnapshot") or {}).get("buildTimeoutInMinutes")
                if decide.interruption(fresh, timeout, _now()) is not None:
                    return

    async def _interrupted(
        self, run: Body, ctx: RunContext, records: list[Body], why: decide.Interruption
    ) -> float | None:
        if why.state is None:
            raise Stopped
        return await self.end(run, ctx, records, why.state, why.reason, why.message)

    async def _reconcile_step(self, name: str, ctx: RunContext) -> Outcome:
        """A step's reconcile, with provider and connection errors turned into outcomes."""
        assert self.env is not None
        try:
            outcome = await STEPS_BY_NAME[name].reconcile(ctx, self.env)
            ctx.checkpoint.connection_errors = 0
            ctx.checkpoint.step_errors = 0
            ctx.checkpoint.cloud_retries = 0
            return outcome
        except ProviderError as error:
            if error.fatal:
                return Outcome.failed(str(error), reasons.PROVIDER_ERROR)
            if error.retry_kind is None:  # an operation still running: plain waiting
                return Outcome.wait(str(error), error.retry_after)
            metrics.reconcile_error(error.retry_kind)
            return _cloud_retry(ctx, name, error)
        except (CommunicatorError, asyncssh.Error, OSError) as error:
            metrics.reconcile_error("connection")
            await self.env.disconnect(ctx)
            if lost := await self.env.provider.vm_lost(ctx):  # no use retrying
                return Outcome.failed(f"step {name}: {lost}", reasons.PROVIDER_ERROR)
            return _retry_or_fail(
                ctx,
                "connection_errors",
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
            return _retry_or_fail(ctx, "step_errors", MAX_STEP_ERRORS, message, delay=10)

    def _step_started(self, ctx: RunContext, step: str) -> None:
        log.info("run %s/%s: step %s started", self.namespace, self.name, step)

    def _step_ended(self, run: Body, ctx: RunContext, record: Body, outcome: Outcome) -> None:
        log.info("run %s/%s: step %s %s", self.namespace, self.name, record["name"], outcome.kind)
        metrics.step_ended(
            ctx.spec.provider, record["name"], record.get("startTime"), record["endTime"]
        )
        if outcome.kind == "done":
            message = f"{record['name']}: {outcome.message}"
            kopf.info(run, reason=reasons.EVENT_STEP_SUCCEEDED, message=message)

    def _progress(
        self, ctx: RunContext, records: list[Body], sub_state: RunSubState, message: str
    ) -> Body:
        return {
            "runSubState": sub_state,
            "message": message,
            "steps": records,
            "checkpoint": ctx.checkpoint.wire(),
            "exactSource": ctx.checkpoint.exact_source,
            **_outputs(ctx),
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
        *,
        quiet: bool = False,
    ) -> None:
        """Record how the run ends (persist intent); cleanup follows outside the slot."""
        ctx.checkpoint.ending = Ending(state=state, reason=reason, message=message, keep_vm=keep_vm)
        now = now_rfc3339()
        for record in records:
            if record["state"] == StepState.Running:
                record.update(state=StepState.Failed, endTime=now, message="stopped")
        patch: Body = {"steps": records, "checkpoint": ctx.checkpoint.wire(), "message": message}
        if state == RunState.Canceled:
            patch["runState"] = RunState.Canceling
        await self.write(run, patch)
        if self.env is not None:
            await self.env.disconnect(ctx)
        if not quiet:
            log.info("run %s/%s ends %s: %s", self.namespace, self.name, state, message)
        return None

    async def cleanup_pass(self, run: Body) -> float:
        """Every step's delete() in reverse, bounded; retried with backoff, then reported."""
        try:
            ctx = await self.context(run)
        except CheckpointUnreadable as error:
            message = f"{error}; the orphan sweeper removes its build resources"
            await self.finish(run, RunState.Failed, reasons.FAILED, message)
            return 0
        assert self.env is not None
        records: list[Body] = [dict(r) for r in _status(run)["steps"]]
        ending = ctx.checkpoint.ending
        assert ending is not None
        keep_vm = ending.keep_vm
        try:
            await asyncio.wait_for(delete_all(ctx, self.env, keep_vm=keep_vm), CLEANUP_PASS_SECONDS)
        except Exception as error:  # the build's resources must not leak: try again later
            if isinstance(error, TimeoutError):
                error = TimeoutError(f"cleanup took longer than {CLEANUP_PASS_SECONDS:.0f}s")
            log.warning("cleanup of run %s/%s failed: %s", self.namespace, self.name, error)
            attempt = ending.cleanup_attempts = ending.cleanup_attempts + 1
            ending.cleanup_error = str(error)[:500]
            metrics.reconcile_error("cleanup")
            backoff = decide.cleanup_backoff(attempt)
            if backoff is not None:
                kopf.warn(
                    run,
                    reason=reasons.EVENT_CLEANUP_FAILED,
                    message=f"attempt {attempt}, retrying in {backoff:.0f}s: "
                    f"{ending.cleanup_error}",
                )
                await self.write(
                    run,
                    {
                        "checkpoint": ctx.checkpoint.wire(),
                        "message": f"{ending.message} Cleanup attempt {attempt} of "
                        f"{decide.CLEANUP_ATTEMPTS} failed, retrying in {backoff:.0f}s: "
                        f"{ending.cleanup_error}",
                    },
                )
                return backoff
            leftovers = await self._leftovers(ctx)
            self._record_cleanup(records, StepState.Failed, f"left behind: {', '.join(leftovers)}")
            await self.write(run, {"steps": records, "checkpoint": ctx.checkpoint.wire()})
            await self.finish(run, ending.state, ending.reason, ending.message, ctx, leftovers)
            return 0
        kept = "; the build VM is kept (errorHandling abort)" if keep_vm else ""
        self._record_cleanup(records, StepState.Succeeded, f"build resources removed{kept}")
        ctx.checkpoint.vm_kept = keep_vm
        await self.write(run, {"steps": records, "checkpoint": ctx.checkpoint.wire()})
        await self.finish(run, ending.state, ending.reason, ending.message, ctx)
        return 0

    @staticmethod
    def _record_cleanup(records: list[Body], state: StepState, message: str) -> None:
        now = now_rfc3339()
        for record in records:
            if record["name"] == CleanupStep.name:
                record.update(
                    state=state,
                    startTime=record.get("startTime") or now,
                    endTime=now,
                    message=message,
                )

    async def _leftovers(self, ctx: RunContext) -> list[str]:
        """What cleanup could not remove, as resource IDs and paths (best effort)."""
        assert self.env is not None
        try:
            found = await asyncio.wait_for(self.env.provider.leftovers(ctx), 60)
        except Exception as error:
            return [f"(could not list what is left: {error})"]
        return found or ["(nothing found, but cleanup did not succeed)"]

    async def finish(
        self,
        run: Body,
        state: RunState,
        reason: str,
        message: str,
        ctx: RunContext | None = None,
        leftovers: list[str] | None = None,
    ) -> None:
        status = _status(run)
        now = now_rfc3339()
        conditions = decide.run_conditions(
            status.get("conditions"), state, reason, message, run["metadata"].get("generation"), now
        )
        if leftovers:
            cleanup = (
                f"cleanup gave up after {decide.CLEANUP_ATTEMPTS} attempts; remove by hand: "
                + ", ".join(leftovers)
            )
            conditions = set_condition(
                conditions,
                reasons.CLEANUP_FAILED,
                "True",
                reasons.CLEANUP_FAILED,
                cleanup,
                run["metadata"].get("generation"),
                now,
            )
            kopf.warn(run, reason=reasons.CLEANUP_FAILED, message=cleanup)
        patch: Body = {
            "runState": state,
            "message": message,
            "endTime": now,
            "conditions": conditions,
        }
        if ctx is not None:
            patch |= {"checkpoint": ctx.checkpoint.wire(), **_outputs(ctx)}
            await self._publish_logs(ctx, final=True)
        await self.write(run, patch)
        if self.env is not None and ctx is not None:
            await self.env.disconnect(ctx)
        post = kopf.info if state == RunState.Succeeded else kopf.warn
        post(run, reason=str(state), message=message)
        metrics.run_ended(_status(run).get("provider"), str(state))
        template = run["spec"]["templateRef"]["name"]
        await refresh_template(self.runtime, self.namespace, template)
        try:
            await self._prune_history(template)
        except ApiException as error:  # best effort: the next run's end prunes again
            log.warning("pruning the runs of %s/%s: %s", self.namespace, template, refusal(error))

    async def _prune_history(self, template_name: str) -> None:
        """Finished runs beyond the template's history limits go (CronJob's limits)."""
        template = await self.kube.get(TEMPLATES, self.namespace, template_name)
        spec = (template or {}).get("spec") or {}
        runs = await self.runtime.runs_of(self.namespace, template_name)
        for name in decide.runs_to_prune(
            runs,
            spec.get("successfulRunsHistoryLimit"),
            spec.get("failedRunsHistoryLimit"),
        ):
            log.info("run %s/%s: deleted by the history limit", self.namespace, name)
            await self.kube.delete(RUNS, self.namespace, name)

    async def _stream_logs(self, ctx: RunContext) -> None:
        """While a run builds, its log reaches the provider's store (AIB's packerlogs) at
        most every LOG_PUBLISH_SECONDS when it grew, not only when the run ends."""
        size = await asyncio.to_thread(_size, ctx.run_dir / COMBINED)
        published_at, published_size = self._log_published
        if size == published_size or time.monotonic() - published_at < LOG_PUBLISH_SECONDS:
            return
        self._log_published = (time.monotonic(), size)
        await self._publish_logs(ctx)

    async def _publish_logs(self, ctx: RunContext, final: bool = False) -> None:
        """Best effort: a log that could not be uploaded must not change how the run ended.
        The final upload first brings every step's kept tail into the log (the cap)."""
        assert self.env is not None
        try:
            if final:
                await RunLogs(ctx.run_dir).aflush_all()
            await asyncio.wait_for(self.env.provider.publish_logs(ctx), 120)
        except Exception:
            log.warning(
                "could not publish the log of run %s/%s", self.namespace, self.name, exc_info=True
            )

    # --- deletion ------------------------------------------------------------------------

    async def delete(self, run: Body) -> None:
        """The run is being deleted: stop its step in flight first (so nothing starts after
        the cleanup), then remove whatever of its build is left (a kept VM too)."""
        uid = run["metadata"]["uid"]
        self.runtime.deleting_runs.add(uid)
        task = self.runtime.steps_in_flight.get(uid)
        if task is not None:
            await _stop(task)
        if not _status(run).get("templateSnapshot"):
            return
        ctx = await self.context(run)
        assert self.env is not None
        await asyncio.wait_for(delete_all(ctx, self.env, keep_vm=False), CLEANUP_PASS_SECONDS)
        self.runtime.deleting_runs.discard(uid)


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel a step pass and give it a moment to unwind (work it shields ends first)."""
    task.cancel()
    await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("an interrupted step ended with %r", task.exception())


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _now() -> datetime:
    return datetime.now(UTC)


def _reason(status: Body, type_: str) -> str | None:
    condition = next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)
    return condition.get("reason") if condition else None


def _retry_or_fail(
    ctx: RunContext, counter: str, limit: int, message: str, delay: float
) -> Outcome:
    """Retry a failing step a few times (counted in the checkpoint), then give up."""
    errors = getattr(ctx.checkpoint, counter) + 1
    setattr(ctx.checkpoint, counter, errors)
    if errors > limit:
        return Outcome.failed(f"{message} ({errors} attempts)", reasons.PROVIDER_ERROR)
    return Outcome.wait(f"{RETRYING}{message}", delay=delay * errors)


def _cloud_retry(ctx: RunContext, step: str, error: ProviderError) -> Outcome:
    """A retryable cloud error: visible (reason and event name the code), within a budget
    of consecutive retries, after which the run fails with the last error."""
    assert error.code is not None
    retries = ctx.checkpoint.cloud_retries = ctx.checkpoint.cloud_retries + 1
    if retries > MAX_CLOUD_RETRIES:
        return Outcome.failed(
            f"step {step}: gave up after {MAX_CLOUD_RETRIES} retries: {error}",
            reasons.PROVIDER_ERROR,
        )
    delay = error.retry_after
    return Outcome.wait(
        f"step {step}: retry {retries} of {MAX_CLOUD_RETRIES} in {delay:.0f}s: {error}",
        delay=delay,
        reason=reasons.retry_reason(error.code),
    )


def _outputs(ctx: RunContext) -> Body:
    """runOutputs and the per-target distribution status, from the plan."""
    plan = ctx.checkpoint.distribution
    if plan is None:
        return {"runOutputs": None, "distribution": None}
    return {
        "runOutputs": [o.wire() for o in distribution.run_outputs(plan)] or None,
        "distribution": [t.wire() for t in distribution.statuses(plan)] or None,
    }
