"""Steps that turn the build VM into images: deprovision, capture, distribute."""

from __future__ import annotations

from kiln import distribution, metrics, reasons
from kiln.api.distribution import PlannedTarget, TargetState
from kiln.api.run import RunSubState
from kiln.communicators import winrm_jobs
from kiln.customizers import windows
from kiln.customizers.linux import DEPROVISION_SCRIPT, final_shutdown_command
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.logs import RunLogs
from kiln.providers.base import ProviderError, RunContext

DEPROVISION_JOB = "deprovision"
Waiting = tuple[PlannedTarget, ProviderError]  # a target still under way, and why


def builds_image(ctx: RunContext) -> bool:
    validate = ctx.spec.validate_
    return not (validate and validate.source_validation_only)


async def _deprovisioning_failed(exit_code: int | None, logs: RunLogs) -> Outcome:
    return Outcome.failed(
        f"deprovisioning failed with exit code {exit_code}",
        reasons.CUSTOMIZER_FAILED,
        exit_code=exit_code,
        log_tail=await logs.atail(DEPROVISION_JOB),
    )


class DeprovisionStep:
    """AIB's deprovisioning (or /tmp/DeprovisioningScript.sh), then a clean power-off;
    on Windows sysprep (or C:\\DeprovisioningScript.ps1), and capture deallocates."""

    name = "deprovision"
    sub_state = RunSubState.Customizing
    pass_seconds = windows.SYSPREP_TIMEOUT_SECONDS + 60  # sysprep runs in one pass

    def applies(self, ctx: RunContext) -> bool:
        return builds_image(ctx)

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        if ctx.checkpoint.poweroff_requested:
            return Outcome.done("deprovisioned and powered off")
        if ctx.windows:
            return await self._sysprep(ctx, env)
        communicator = await env.communicator(ctx)
        if not ctx.checkpoint.collected:
            await env.provider.collect_from_vm(ctx, communicator)
            ctx.checkpoint.collected = True
        logs = RunLogs(ctx.run_dir)
        await logs.astart(DEPROVISION_JOB, "deprovision")
        await communicator.start_job(DEPROVISION_JOB, DEPROVISION_SCRIPT, elevated=True)
        status = await communicator.poll_job(DEPROVISION_JOB, await logs.aoffset(DEPROVISION_JOB))
        await logs.aappend(DEPROVISION_JOB, status.new_log)
        if status.running:
            return Outcome.wait("deprovisioning", delay=3)
        if status.exit_code != 0:
            return await _deprovisioning_failed(status.exit_code, logs)
        assert ctx.checkpoint.endpoint is not None
        user = ctx.checkpoint.endpoint.user
        await communicator.run(final_shutdown_command(user))
        ctx.checkpoint.poweroff_requested = True
        await env.disconnect(ctx)
        return Outcome.done("deprovisioned; powering off")

    async def _sysprep(self, ctx: RunContext, env: StepEnv) -> Outcome:
        """Runs to its end in one call (sysprep takes minutes; pypsrp runs in a thread).
        After a restart a VM already generalized is not sysprepped again."""
        communicator = await env.winrm(ctx)
        logs = RunLogs(ctx.run_dir)
        await logs.astart(DEPROVISION_JOB, "deprovision")
        state = await communicator.run_powershell(windows.IMAGE_STATE)
        if state.stdout.strip() == windows.GENERALIZED_STATE:
            await logs.aappend(DEPROVISION_JOB, b"the VM is generalized already\n")
            return await self._deprovisioned(ctx, env)
        await communicator.run_powershell(winrm_jobs.CLEANUP)  # Kiln's tasks stay out of the image
        override = await communicator.run_powershell(windows.HAS_OVERRIDE)
        script = windows.DEPROVISION_SCRIPT
        if override.stdout.strip() == "True":
            await logs.aappend(DEPROVISION_JOB, f"running {windows.OVERRIDE_PATH}\n".encode())
            script = windows.OVERRIDE_SCRIPT
        result = await communicator.run_powershell(script, windows.SYSPREP_TIMEOUT_SECONDS)
        await logs.aappend(DEPROVISION_JOB, (result.stdout + result.stderr).encode())
        if result.exit_status != 0:
            return await _deprovisioning_failed(result.exit_status, logs)
        return await self._deprovisioned(ctx, env)

    @staticmethod
    async def _deprovisioned(ctx: RunContext, env: StepEnv) -> Outcome:
        ctx.checkpoint.poweroff_requested = True
        await env.disconnect(ctx)
        return Outcome.done("sysprep done; capture deallocates the VM")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Nothing of its own: the VM step removes the VM."""


class CaptureStep:
    name = "capture"
    sub_state = RunSubState.Distributing
    pass_seconds = 3600.0  # disk conversions of a large image (each tool call is bounded)

    def applies(self, ctx: RunContext) -> bool:
        return builds_image(ctx)

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        if not await env.provider.stop_vm(ctx):
            return Outcome.wait("waiting for the build VM to power off", delay=3)
        await env.provider.capture(ctx)
        return Outcome.done("captured")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """The captured image is removed with the VM's files."""


class DistributeStep:
    """Every target is tried; one that fails is recorded and does not stop the others.

    The first pass only plans (kiln.distribution) and the next only decides gallery
    version numbers: each pass ends with the checkpoint persisted, so what a target
    publishes is saved before it is published and a resumed run publishes the same."""

    name = "distribute"
    sub_state = RunSubState.Distributing

    def applies(self, ctx: RunContext) -> bool:
        return builds_image(ctx)

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        checkpoint = ctx.checkpoint
        if checkpoint.distribution is None:
            checkpoint.distribution = distribution.plan(ctx.spec, checkpoint.source_version or "")
            count = len(checkpoint.distribution.targets)
            return Outcome.wait(f"planned the distribution of {count} target(s)", delay=0)
        plan = checkpoint.distribution
        pending = [t for t in plan.targets if not t.done]
        undecided = [t for t in pending if t.needs_version]
        waits: list[Waiting] = []
        for target in undecided:
            try:
                existing = await env.provider.gallery_versions(ctx, target)
            except ProviderError as error:
                _target_error(target, error, waits)
                continue
            distribution.decide_version(plan, target, existing)
        if undecided:
            decided = ", ".join(f"{t.run_output_name} {t.version}" for t in undecided if t.version)
            return _waiting(waits) or Outcome.wait(f"decided gallery version(s) {decided}", 0)
        for target in pending:
            try:
                output = await env.provider.distribute(ctx, target)
            except ProviderError as error:
                _target_error(target, error, waits)
                continue
            distribution.record_success(target, output)
        if waiting := _waiting(waits):
            return waiting
        failed = [t for t in plan.targets if t.state == TargetState.Failed]
        total = len(plan.targets)
        if failed and len(failed) == total:
            detail = "; ".join(f"{t.run_output_name}: {t.message}" for t in failed)
            return Outcome.failed(
                f"no target was distributed: {detail}", reasons.DISTRIBUTION_FAILED
            )
        return Outcome.done(f"{total - len(failed)} of {total} target(s) distributed")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Outputs are the point of the run; they stay."""


def _target_error(target: PlannedTarget, error: ProviderError, waits: list[Waiting]) -> None:
    """A fatal error ends the target; a retryable one is counted against the target's
    budget; an operation still running is plain waiting."""
    if error.fatal:
        distribution.record_failure(target, str(error), error.code)
    elif error.retry_kind is None:
        waits.append((target, error))
    elif distribution.record_retry(target, str(error), error.code):
        metrics.reconcile_error(error.retry_kind)
        waits.append((target, error))


def _waiting(waits: list[Waiting]) -> Outcome | None:
    """Come back for the targets still under way; a retry names its code in the reason."""
    if not waits:
        return None
    delay = min(error.retry_after for _, error in waits)
    for target, error in waits:
        if error.retry_kind is not None and error.code:
            return Outcome.wait(
                f"{target.path} ({target.run_output_name}): retry {target.retries} of "
                f"{distribution.MAX_TARGET_RETRIES} in {error.retry_after:.0f}s: {error}",
                delay=delay,
                reason=reasons.retry_reason(error.code),
            )
    return Outcome.wait(str(waits[0][1]), delay=delay)
