"""SSH communicator (asyncssh): verified host key, commands, uploads, detached jobs.

Customization scripts run as detached jobs on the VM: they keep running when the
operator restarts, and write their log and exit code to files that any later
connection can read. That is what lets a level-based reconciler poll them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import asyncssh
from pydantic import BaseModel, SecretStr

log = logging.getLogger(__name__)
T = TypeVar("T")

JOBS_DIR = "/var/lib/kiln/jobs"
MAX_LOG_CHUNK = 1024 * 1024
# A VM that stops answering is noticed within KEEPALIVE_SECONDS * KEEPALIVE_COUNT.
KEEPALIVE_SECONDS = 10.0
KEEPALIVE_COUNT = 3
COMMAND_TIMEOUT = 120.0  # one remote command (jobs run detached, so commands are short)
TRANSFER_TIMEOUT = 600.0  # one upload or download
_CLOSE_TIMEOUT = 5.0
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RETRY_PAUSE = 2.0
_ATTEMPT_TIMEOUT = 30.0


class KeyPair(BaseModel):
    """An ed25519 key pair: OpenSSH private key text and an authorized_keys line."""

    private_key: SecretStr
    public_key: str


class CommandResult(BaseModel):
    exit_status: int
    stdout: str
    stderr: str


class JobStatus(BaseModel):
    """running False with exit_code None means the job died without recording one."""

    running: bool
    exit_code: int | None
    new_log: bytes
    next_offset: int
    more: bool = False  # a full chunk was read: poll again at once


class CommunicatorError(RuntimeError):
    """The VM could not be reached, or a remote step of the communicator failed."""


class HostKeyMismatch(CommunicatorError):
    """The VM presented a host key other than the one Kiln injected: never trusted."""


class JobNotFound(CommunicatorError):
    """poll_job for a job id that was never started on this VM."""


def generate_keypair(comment: str = "kiln") -> KeyPair:
    """A fresh ed25519 key pair, usable as a client key or as a VM's host key."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    return KeyPair(
        private_key=SecretStr(key.export_private_key("openssh").decode()),
        public_key=key.export_public_key("openssh").decode().strip(),
    )


def _job_dir(jobs_dir: str, job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} must match {_JOB_ID.pattern}")
    return f"{jobs_dir}/{job_id}"


def _runner(script_argv: str) -> str:
    """Claims the job once (mkdir is atomic), runs it, records the exit code atomically."""
    return f"""#!/bin/sh
d=$(dirname "$0")
mkdir "$d/started" 2>/dev/null || exit 0
echo $$ >"$d/started/pid.tmp" && mv -f "$d/started/pid.tmp" "$d/started/pid"
{script_argv} >>"$d/log" 2>&1 </dev/null
echo $? >"$d/exit_code.tmp" && mv -f "$d/exit_code.tmp" "$d/exit_code"
"""


def _start_command(jobs_dir: str, job_id: str, script: str, elevated: bool) -> str:
    """Stage the job (script on stdin), publish it by rename, then launch it detached.
    Prints `KILN new` when this call published the job (not when it existed already)."""
    job_dir = _job_dir(jobs_dir, job_id)
    path = shlex.quote(f"{job_dir}/script")
    argv = path if script.startswith("#!") else f"/bin/bash {path}"
    runner = _runner(f"sudo -n {argv}" if elevated else argv)
    d = shlex.quote(job_dir)
    return f"""set -e
jobs={shlex.quote(jobs_dir)}
if [ ! -w "$jobs" ] && ! mkdir -p -m 0700 "$jobs" 2>/dev/null; then
  sudo -n install -d -m 0755 "$(dirname "$jobs")"
  sudo -n install -d -m 0700 -o "$(id -u)" -g "$(id -g)" "$jobs"
fi
if [ -e {d} ]; then
  cat >/dev/null
else
  s=$(mktemp -d "$jobs/.stage.XXXXXX")
  cat >"$s/script"
  chmod 0700 "$s/script"
  printf '%s' {shlex.quote(runner)} >"$s/run"
  if mv -T "$s" {d} 2>/dev/null; then echo "KILN new"; else rm -rf "$s"; fi
fi
setsid -f /bin/sh {d}/run </dev/null >/dev/null 2>&1
"""


def _poll_command(jobs_dir: str, job_id: str, offset: int) -> str:
    """Print `KILN <state>` then the log from offset; exit code is read before the log."""
    d = shlex.quote(_job_dir(jobs_dir, job_id))
    return f"""d={d}
[ -d "$d" ] || {{ echo "KILN missing"; exit 0; }}
alive() {{
  [ ! -f "$d/started/pid" ] && return 0
  tr '\\0' ' ' <"/proc/$(cat "$d/started/pid")/cmdline" 2>/dev/null | grep -qF "$d/run"
}}
if [ -f "$d/exit_code" ]; then s="exit $(cat "$d/exit_code")"
elif alive; then s=running
elif [ -f "$d/exit_code" ]; then s="exit $(cat "$d/exit_code")"
else s=lost
fi
echo "KILN $s"
tail -c +{offset + 1} "$d/log" 2>/dev/null | head -c {MAX_LOG_CHUNK}
"""


def _parse_poll(output: bytes, offset: int) -> JobStatus:
    header, _, new_log = output.partition(b"\n")
    state = header.decode().split()
    if state[:2] == ["KILN", "missing"]:
        raise JobNotFound("no such job on the VM")
    if state[:2] == ["KILN", "exit"]:
        running, exit_code = False, int(state[2])
    elif state[:2] == ["KILN", "running"]:
        running, exit_code = True, None
    elif state[:2] == ["KILN", "lost"]:
        running, exit_code = False, None
    else:
        raise CommunicatorError(f"unexpected job status line {header[:200]!r}")
    more = len(new_log) >= MAX_LOG_CHUNK
    if more:
        running = True  # more log to read: the job's end is reported with its last chunk
        exit_code = None
    return JobStatus(
        running=running,
        exit_code=exit_code,
        new_log=new_log,
        next_offset=offset + len(new_log),
        more=more,
    )


class SshCommunicator:
    """One SSH connection to a build VM; every method is safe to call again after a restart."""

    def __init__(self, jobs_dir: str = JOBS_DIR) -> None:
        self._conn: asyncssh.SSHClientConnection | None = None
        self._jobs_dir = jobs_dir

    async def connect(
        self,
        host: str,
        port: int,
        user: str,
        client_private_key: str,
        host_public_key: str,
        timeout: float = 300.0,
    ) -> None:
        """Retry until sshd answers with exactly host_public_key; any other key fails at once."""
        client_key = asyncssh.import_private_key(client_private_key)
        trusted = ([asyncssh.import_public_key(host_public_key)], [], [])
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self._conn = await asyncssh.connect(
                    host,
                    port,
                    username=user,
                    client_keys=[client_key],
                    known_hosts=trusted,
                    config=None,
                    agent_path=None,
                    preferred_auth="publickey",
                    connect_timeout=min(_ATTEMPT_TIMEOUT, remaining),
                    login_timeout=min(_ATTEMPT_TIMEOUT, remaining),
                    keepalive_interval=KEEPALIVE_SECONDS,
                    keepalive_count_max=KEEPALIVE_COUNT,
                )
                log.info("ssh connected to %s@%s:%s", user, host, port)
                return
            except asyncssh.HostKeyNotVerifiable as exc:
                raise HostKeyMismatch(
                    f"{host}:{port} presented a host key other than the expected one: {exc}"
                ) from exc
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                last = exc
                log.debug("ssh %s:%s not ready yet: %s", host, port, exc)
            await asyncio.sleep(min(_RETRY_PAUSE, max(0.0, deadline - time.monotonic())))
        raise CommunicatorError(f"no SSH login to {user}@{host}:{port} in {timeout:.0f}s: {last}")

    @property
    def connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise CommunicatorError("not connected")
        return self._conn

    async def _bounded(self, what: str, action: Awaitable[T], timeout: float) -> T:
        """Every remote call ends: a VM that does not answer in time is an error."""
        try:
            return await asyncio.wait_for(action, timeout)
        except TimeoutError:
            raise CommunicatorError(f"{what} got no answer in {timeout:.0f}s") from None

    async def _exec(
        self, command: str, stdin: bytes | None, timeout: float
    ) -> asyncssh.SSHCompletedProcess:
        return await self._bounded(
            "a remote command",
            self.connection.run(command, input=stdin, encoding=None, check=False),
            timeout,
        )

    async def run(
        self, command: str, stdin: bytes | None = None, timeout: float = COMMAND_TIMEOUT
    ) -> CommandResult:
        """Run a command; exit_status is -signal when it was killed by a signal."""
        result = await self._exec(command, stdin, timeout)
        return CommandResult(
            exit_status=result.returncode if result.returncode is not None else -1,
            stdout=(result.stdout or b"").decode(errors="replace"),
            stderr=(result.stderr or b"").decode(errors="replace"),
        )

    async def upload(self, data: bytes | Path, remote_path: str, mode: int = 0o644) -> None:
        """Copy bytes or a local file to remote_path under a temp name, then rename."""
        await self._bounded(
            f"upload to {remote_path}", self._upload(data, remote_path, mode), TRANSFER_TIMEOUT
        )

    async def _upload(self, data: bytes | Path, remote_path: str, mode: int) -> None:
        tmp = f"{remote_path}.kiln-tmp"
        async with self.connection.start_sftp_client() as sftp:
            if isinstance(data, Path):
                await sftp.put(str(data), tmp)
            else:
                async with sftp.open(tmp, "wb") as fh:
                    await fh.write(data)
            await sftp.chmod(tmp, mode)
            await sftp.posix_rename(tmp, remote_path)

    async def download(self, remote_path: str, local_path: Path, elevated: bool = False) -> None:
        """Copy a remote file here (under a temp name, then renamed); elevated reads as root."""
        tmp = local_path.with_name(f".{local_path.name}.tmp")
        if elevated:
            command = f"sudo -n cat {shlex.quote(remote_path)}"
            result = await self._exec(command, None, TRANSFER_TIMEOUT)
            if result.exit_status != 0:
                stderr = (result.stderr or b"").decode(errors="replace").strip()
                raise CommunicatorError(f"could not read {remote_path}: {stderr}")
            await asyncio.to_thread(tmp.write_bytes, result.stdout or b"")
        else:
            await self._bounded(
                f"download of {remote_path}", self._sftp_get(remote_path, tmp), TRANSFER_TIMEOUT
            )
        await asyncio.to_thread(tmp.replace, local_path)

    async def _sftp_get(self, remote_path: str, local_path: Path) -> None:
        async with self.connection.start_sftp_client() as sftp:
            await sftp.get(remote_path, str(local_path))

    async def start_job(self, job_id: str, script: str, elevated: bool = False) -> bool:
        """Start script detached under JOBS_DIR/job_id; a job id that exists is left alone
        (steps call this on every pass). True when this call started it."""
        command = _start_command(self._jobs_dir, job_id, script, elevated)
        result = await self.run(command, stdin=script.encode())
        if result.exit_status != 0:
            raise CommunicatorError(f"could not start job {job_id}: {result.stderr.strip()}")
        started = "KILN new" in result.stdout.splitlines()
        if started:
            log.info("job %s started (elevated=%s)", job_id, elevated)
        return started

    async def poll_job(self, job_id: str, log_offset: int = 0) -> JobStatus:
        """State of a job and the log written since log_offset (at most 1 MiB at a time:
        a job reported ended with a full chunk has more log, so it reads as running until
        the rest is read)."""
        command = _poll_command(self._jobs_dir, job_id, log_offset)
        result = await self._exec(command, None, COMMAND_TIMEOUT)
        if result.exit_status != 0:
            stderr = (result.stderr or b"").decode(errors="replace").strip()
            raise CommunicatorError(f"could not poll job {job_id}: {stderr}")
        try:
            return _parse_poll(result.stdout or b"", log_offset)
        except JobNotFound:
            raise JobNotFound(f"job {job_id} was never started on this VM") from None

    async def close(self) -> None:
        """Closes without waiting long for a VM that no longer answers."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), _CLOSE_TIMEOUT)
