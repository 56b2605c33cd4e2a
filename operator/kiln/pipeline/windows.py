"""The template's steps on a Windows build VM: PowerShell, File, WindowsRestart and
WindowsUpdate, over WinRM, a pass at a time.

Scripts run as detached jobs (scheduled tasks, communicators/winrm_jobs.py). A restart
is a small state machine in the checkpoint (api.run.WindowsRestart): the boot time
before it is persisted first, then the command is sent, then the VM must answer WinRM
with another boot time (and the check command pass) before the timeout. So an operator
that dies anywhere in it neither loses the restart nor restarts the VM a second time
once the new boot is seen. WindowsUpdate runs search/install cycles, each one job,
with a restart between cycles when Windows asks for one.
"""

from __future__ import annotations

import time

from kiln.api.run import WindowsProgress, WindowsRestart, WindowsUpdateProgress
from kiln.api.template import FileStep, PowerShellStep, WindowsRestartStep, WindowsUpdateStep
from kiln.communicators.ssh import CommunicatorError
from kiln.communicators.winrm import UploadRefused
from kiln.customizers import windows
from kiln.customizers.sources import fetch, redact
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.jobs import run_job
from kiln.pipeline.logs import RunLogs
from kiln.providers.base import RunContext

WindowsStep = PowerShellStep | FileStep | WindowsRestartStep | WindowsUpdateStep
RESTART_POLL_SECONDS = 3.0
CONNECT_TIMEOUT = 10.0


def progress_of(ctx: RunContext, job_id: str) -> WindowsProgress:
    """The checkpointed progress of this step (a stale one of another step is replaced)."""
    current = ctx.checkpoint.windows
    if current is None or current.step != job_id:
        current = ctx.checkpoint.windows = WindowsProgress(step=job_id)
    return current


async def _log(logs: RunLogs, job_id: str, text: str) -> None:
    await logs.aappend(job_id, f"{text}\n".encode())


async def run_windows_step(
    ctx: RunContext, env: StepEnv, logs: RunLogs, job_id: str, step: WindowsStep, reason: str
) -> Outcome | None:
    """None when the step finished well; otherwise what to tell the driver."""
    if isinstance(step, FileStep):
        return await _file(ctx, env, logs, job_id, step, reason)
    if isinstance(step, PowerShellStep):
        script = await windows.powershell_script(step, env.policy, env.storage_token(ctx))
        return await run_job(
            await env.winrm(ctx),
            logs,
            job_id,
            script,
            reason,
            windows.valid_exit_codes(step),
            elevated=bool(step.run_elevated),
            system=bool(step.run_as_system),
        )
    progress = progress_of(ctx, job_id)
    if isinstance(step, WindowsRestartStep):
        command, check, timeout = windows.restart_plan(step)
        return await restart(ctx, env, logs, job_id, progress, command, check, timeout, reason)
    return await _update(ctx, env, logs, job_id, step, progress, reason)


async def _file(
    ctx: RunContext, env: StepEnv, logs: RunLogs, job_id: str, step: FileStep, reason: str
) -> Outcome | None:
    data = await fetch(
        step.source_uri, env.policy, step.sha256_checksum, token=env.storage_token(ctx)
    )
    try:
        await (await env.winrm(ctx)).upload(data, step.destination)
    except UploadRefused as error:
        return Outcome.failed(str(error), reason)
    await _log(
        logs,
        job_id,
        f"uploaded {redact(step.source_uri)} to {step.destination} "
        f"({len(data)} bytes, SHA-256 checked on the VM)",
    )
    return None


async def restart(
    ctx: RunContext,
    env: StepEnv,
    logs: RunLogs,
    job_id: str,
    owner: WindowsProgress | WindowsUpdateProgress,
    command: str,
    check: str | None,
    timeout: float,
    reason: str,
) -> Outcome | None:
    """One pass of a restart kept in owner.restart; None once the VM is back from it."""
    state = owner.restart
    if state is None:
        boot = await (await env.winrm(ctx)).boot_time()
        owner.restart = WindowsRestart(boot_time=boot, deadline=time.time() + timeout)
        await _log(logs, job_id, f"restarting the VM (running since {boot})")
        return Outcome.wait("restarting the build VM", delay=0)  # persisted before it is sent
    if not state.issued:
        return await _issue(ctx, env, logs, job_id, state, command, reason)
    try:
        communicator = await env.winrm(ctx, timeout=CONNECT_TIMEOUT)
        boot = await communicator.boot_time()
    except CommunicatorError as error:
        await env.disconnect(ctx)
        state.seen = f"WinRM did not answer ({str(error)[:160]})"
        return _waiting(state, timeout, reason)
    if boot == state.boot_time:
        state.seen = "the VM still ran the boot from before the restart"
        return _waiting(state, timeout, reason)
    if check:
        result = await communicator.run_powershell(check, timeout=max(60.0, timeout / 5))
        await logs.aappend(job_id, (result.stdout + result.stderr).encode())
        if result.exit_status != 0:
            state.seen = f"restartCheckCommand exited with {result.exit_status}"
            return _waiting(state, timeout, reason)
    await _log(logs, job_id, f"the VM restarted (running since {boot})")
    owner.restart = None
    return None


async def _issue(
    ctx: RunContext,
    env: StepEnv,
    logs: RunLogs,
    job_id: str,
    state: WindowsRestart,
    command: str,
    reason: str,
) -> Outcome:
    communicator = await env.winrm(ctx)
    if await communicator.boot_time() == state.boot_time:  # else an earlier pass sent it
        try:
            result = await communicator.run_powershell(command, timeout=120)
        except CommunicatorError as error:  # the VM went down under the command
            await _log(logs, job_id, f"the connection dropped as the VM went down: {error}")
        else:
            await logs.aappend(job_id, (result.stdout + result.stderr).encode())
            if result.exit_status not in (0, windows.ALREADY_SHUTTING_DOWN):
                return Outcome.failed(
                    f"the restart command exited with {result.exit_status}",
                    reason,
                    exit_code=result.exit_status,
                    log_tail=await logs.atail(job_id),
                )
    state.issued = True
    await env.disconnect(ctx)  # the connection goes with the boot
    return Outcome.wait("waiting for the build VM to restart", delay=RESTART_POLL_SECONDS)


def _waiting(state: WindowsRestart, timeout: float, reason: str) -> Outcome:
    if time.time() > state.deadline:
        return Outcome.failed(
            f"the VM did not come back from its restart within {timeout:.0f}s: {state.seen}",
            reason,
        )
    return Outcome.wait(
        f"waiting for the build VM to restart: {state.seen}", delay=RESTART_POLL_SECONDS
    )


async def _update(
    ctx: RunContext,
    env: StepEnv,
    logs: RunLogs,
    job_id: str,
    step: WindowsUpdateStep,
    progress: WindowsProgress,
    reason: str,
) -> Outcome | None:
    """Cycles until nothing applies: each a job; a restart between them when needed."""
    update = progress.update = progress.update or WindowsUpdateProgress()
    limit = windows.update_limit(step)
    while True:
        if update.restart is not None:
            outcome = await _update_restart(ctx, env, logs, job_id, update, reason)
            if outcome is not None:
                return outcome
            update.cycle += 1
        cycle_job = f"{job_id}-u{update.cycle:02d}"
        await logs.astart(cycle_job, f"{job_id} WindowsUpdate cycle {update.cycle}")
        script = windows.update_script(step, limit - update.installed, list(update.failed))
        outcome = await run_job(await env.winrm(ctx), logs, cycle_job, script, reason, system=True)
        if outcome is not None:
            return outcome
        report = windows.parse_cycle(await logs.aread(cycle_job))
        # local lines go to the step's own log: a job's log holds only what the VM wrote
        await _log(
            logs,
            job_id,
            f"cycle {update.cycle}: {report.found} found, {len(report.selected)} selected, "
            f"{len(report.installed)} installed, {len(report.failed)} failed, "
            f"restart needed: {report.reboot}",
        )
        decision = windows.decide_after_cycle(update, report, limit)
        if decision.action == "failed":
            return Outcome.failed(decision.message, reason, log_tail=await logs.atail(cycle_job))
        if decision.action == "done":
            await _log(logs, job_id, decision.message)
            return None
        if decision.action == "restart":
            # its first pass records the boot time and waits: the cycle's counts and the
            # restart are persisted together
            return await _update_restart(ctx, env, logs, job_id, update, reason)
        update.cycle += 1


async def _update_restart(
    ctx: RunContext,
    env: StepEnv,
    logs: RunLogs,
    job_id: str,
    update: WindowsUpdateProgress,
    reason: str,
) -> Outcome | None:
    command, seconds = windows.UPDATE_RESTART_COMMAND, windows.UPDATE_RESTART_SECONDS
    return await restart(ctx, env, logs, job_id, update, command, None, seconds, reason)
