"""One detached job on the build VM, driven a pass at a time (SSH or WinRM alike)."""

from __future__ import annotations

from typing import Any, Protocol

from kiln.communicators.ssh import JobStatus
from kiln.pipeline.base import Outcome
from kiln.pipeline.logs import RunLogs

POLL_SECONDS = 3.0


class JobRunner(Protocol):
    async def start_job(self, job_id: str, script: str, *args: Any, **kwargs: Any) -> None: ...

    async def poll_job(self, job_id: str, log_offset: int = 0) -> JobStatus: ...


async def run_job(
    communicator: JobRunner,
    logs: RunLogs,
    job_id: str,
    script: str,
    failure_reason: str,
    valid_exit_codes: tuple[int, ...] | list[int] = (0,),
    **start: bool,
) -> Outcome | None:
    """Start the job (a no-op once started), read the log it wrote since the last pass
    (all of it that is there), and say: None when it ended well, else wait or failed."""
    await communicator.start_job(job_id, script, **start)
    while True:
        status = await communicator.poll_job(job_id, await logs.aoffset(job_id))
        await logs.aappend(job_id, status.new_log)
        if not status.more:
            break
    if status.running:
        return Outcome.wait(f"running {job_id}", delay=POLL_SECONDS)
    if status.exit_code in valid_exit_codes:
        return None
    code = (
        "no exit code (the script was killed, or the VM restarted under it)"
        if status.exit_code is None
        else f"exit code {status.exit_code}"
    )
    valid = "" if list(valid_exit_codes) == [0] else f" (validExitCodes {list(valid_exit_codes)})"
    return Outcome.failed(
        f"failed with {code}{valid}",
        failure_reason,
        exit_code=status.exit_code,
        log_tail=await logs.atail(job_id),
    )
