"""The build steps, in order; cleanup runs the others' delete() in reverse."""

from __future__ import annotations

from kiln.api.run import RunSubState
from kiln.pipeline.base import DEFAULT_PASS_SECONDS, Outcome, Step, StepEnv
from kiln.pipeline.image import CaptureStep, DeprovisionStep, DistributeStep
from kiln.pipeline.machine import ConnectStep, SourceStep, StagingStep, VmStep
from kiln.pipeline.scripts import CustomizeStep, ValidateStep
from kiln.providers.base import RunContext


class CleanupStep:
    name = "cleanup"
    sub_state = RunSubState.Distributing

    def applies(self, ctx: RunContext) -> bool:
        return True

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        await delete_all(ctx, env, keep_vm=False)
        return Outcome.done("build resources removed")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Cleanup makes nothing to remove."""


STEPS: list[Step] = [
    StagingStep(),
    SourceStep(),
    VmStep(),
    ConnectStep(),
    CustomizeStep(),
    ValidateStep(),
    DeprovisionStep(),
    CaptureStep(),
    DistributeStep(),
    CleanupStep(),
]
STEPS_BY_NAME: dict[str, Step] = {step.name: step for step in STEPS}


async def delete_all(ctx: RunContext, env: StepEnv, *, keep_vm: bool) -> None:
    """Every step's delete(), last step first; keep_vm leaves the VM for debugging."""
    for step in reversed(STEPS):
        if keep_vm and step.name == VmStep.name:
            await env.disconnect(ctx)
            continue
        await step.delete(ctx, env)


def pass_deadline(step: Step) -> float:
    """How long one reconcile() of the step may take before it is stopped."""
    return float(getattr(step, "pass_seconds", DEFAULT_PASS_SECONDS))
