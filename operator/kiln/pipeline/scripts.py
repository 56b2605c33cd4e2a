"""Customize and validate: the template's steps, run one by one on the build VM.

Scripts run as detached jobs, so a long script survives an operator restart; each pass
starts the current job (a no-op if it is started already), reads its new log lines and
moves on when it has an exit code. The index of the current step is checkpointed, and
so is a Windows step's progress (restarts, update cycles: pipeline/windows.py).
"""

from __future__ import annotations

from kiln import reasons
from kiln.api.run import RunSubState
from kiln.api.template import FileStep, PowerShellStep, ShellStep, State
from kiln.customizers.linux import shell_script
from kiln.customizers.sources import FetchError, fetch, redact
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.jobs import run_job
from kiln.pipeline.logs import RunLogs
from kiln.pipeline.windows import WindowsStep, run_windows_step
from kiln.providers.base import RunContext

AnyStep = ShellStep | WindowsStep


def _title(phase: str, index: int, step: AnyStep) -> str:
    label = f" {step.name!r}" if step.name else ""
    return f"{phase}[{index}] {step.type}{label}"


class ScriptPhase:
    """Shared by customize and validate; they differ in their steps and failure reason."""

    name: str
    sub_state: RunSubState
    failure_reason: str

    def steps(self, ctx: RunContext) -> list[AnyStep]:
        raise NotImplementedError

    def applies(self, ctx: RunContext) -> bool:
        return bool(self.steps(ctx))

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        steps = self.steps(ctx)
        logs = RunLogs(ctx.run_dir)
        done = ctx.checkpoint.script_index
        while (index := done.get(self.name, 0)) < len(steps):
            step = steps[index]
            title = _title(self.name, index, step)
            job_id = f"{self.name}-{index:02d}"
            await logs.astart(job_id, title)
            try:
                outcome = await self._run_step(ctx, env, logs, job_id, step)
            except FetchError as error:
                return Outcome.failed(f"{title}: {error}", self.failure_reason)
            if outcome is not None:
                if outcome.kind == "failed":
                    outcome.message = f"{title}: {outcome.message}"
                return outcome
            done[self.name] = index + 1
            ctx.checkpoint.windows = None
        return Outcome.done(f"{len(steps)} step(s) succeeded")

    async def _run_step(
        self,
        ctx: RunContext,
        env: StepEnv,
        logs: RunLogs,
        job_id: str,
        step: AnyStep,
    ) -> Outcome | None:
        """None when the step finished well; otherwise what to tell the driver."""
        if ctx.windows and not isinstance(step, ShellStep):
            return await run_windows_step(ctx, env, logs, job_id, step, self.failure_reason)
        communicator = await env.communicator(ctx)
        token = env.storage_token(ctx)
        if isinstance(step, FileStep):
            data = await fetch(step.source_uri, env.policy, step.sha256_checksum, token=token)
            await communicator.upload(data, step.destination)
            await logs.aappend(
                job_id, f"uploaded {redact(step.source_uri)} to {step.destination}\n".encode()
            )
            return None
        if not isinstance(step, ShellStep):  # the provider refuses these on Linux VMs
            return Outcome.failed(f"{step.type} needs a Windows build VM", self.failure_reason)
        script = await shell_script(step, env.policy, token)
        return await run_job(communicator, logs, job_id, script, self.failure_reason)

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Jobs live on the build VM and go with it."""


class CustomizeStep(ScriptPhase):
    name = "customize"
    sub_state = RunSubState.Customizing
    failure_reason = reasons.CUSTOMIZER_FAILED

    def steps(self, ctx: RunContext) -> list[AnyStep]:
        validate = ctx.spec.validate_
        if validate and validate.source_validation_only:
            return []
        return [*(ctx.spec.customize or []), *workload_steps(ctx)]


def workload_steps(ctx: RunContext) -> list[AnyStep]:
    """optimize.workload: AIB runs its script on the customized image; here it is the
    last customization (PowerShell, elevated, on Windows), its checksum checked like any
    scriptUri."""
    workload = ctx.spec.optimize.workload if ctx.spec.optimize else None
    if workload is None or workload.state != State.Enabled or not workload.script_uri:
        return []
    fields = {
        "name": "optimize.workload",
        "script_uri": workload.script_uri,
        "sha256_checksum": workload.sha256_checksum,
    }
    if ctx.windows:
        return [PowerShellStep(type="PowerShell", run_elevated=True, **fields)]
    return [ShellStep(type="Shell", **fields)]


class ValidateStep(ScriptPhase):
    name = "validate"
    sub_state = RunSubState.Validating
    failure_reason = reasons.VALIDATION_FAILED

    def steps(self, ctx: RunContext) -> list[AnyStep]:
        validate = ctx.spec.validate_
        return list((validate.in_vm_validations if validate else None) or [])
