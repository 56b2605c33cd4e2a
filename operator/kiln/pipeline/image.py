"""Steps that turn the build VM into images: deprovision, capture, distribute."""

from __future__ import annotations

from kiln import reasons
from kiln.api.run import RunSubState
from kiln.api.status import RunOutput
from kiln.communicators import winrm_jobs
from kiln.customizers import windows
from kiln.customizers.linux import DEPROVISION_SCRIPT, final_shutdown_command
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.logs import RunLogs
from kiln.providers.base import ProviderError, RunContext

DEPROVISION_JOB = "deprovision"


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
    """Every target is tried; one that fails does not stop the others."""

    name = "distribute"
    sub_state = RunSubState.Distributing

    def applies(self, ctx: RunContext) -> bool:
        return builds_image(ctx)

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        outputs = ctx.checkpoint.outputs
        for index, target in enumerate(ctx.spec.distribute):
            if str(index) in outputs:
                continue
            try:
                output = await env.provider.distribute(ctx, index)
            except ProviderError as error:
                if not error.fatal:
                    raise  # waiting and retries are the driver's (budget, conditions)
                output = RunOutput(
                    run_output_name=target.run_output_name,
                    provisioning_state="Failed",
                    message=str(error),
                )
            outputs[str(index)] = output
        failed = [o for o in outputs.values() if o.provisioning_state == "Failed"]
        if len(failed) == len(outputs):
            detail = "; ".join(f"{o.run_output_name}: {o.message}" for o in failed)
            return Outcome.failed(
                f"no target was distributed: {detail}", reasons.DISTRIBUTION_FAILED
            )
        return Outcome.done(f"{len(outputs) - len(failed)} of {len(outputs)} target(s) distributed")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Outputs are the point of the run; they stay."""
