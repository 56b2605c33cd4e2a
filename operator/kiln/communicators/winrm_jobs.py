"""Detached jobs and file uploads on a Windows build VM: the PowerShell Kiln sends.

As on Linux (communicators/ssh.py), a script runs detached from the connection that
started it, writes its output and exit code to files on the VM, and is polled: a
WinRM shell dies with the operator, a scheduled task does not. Each job has a
directory under JOBS_DIR:

- script.ps1 runs the template's script (user.ps1) as Packer does: `& 'user.ps1'` then
  `exit $LASTEXITCODE`, so `exit N`, a failing last program and a terminating error
  (exit 1) all become the job's exit code;
- run.ps1 is the scheduled task's action: it claims the job (creating `started` fails
  when it exists, so a job never runs twice), runs script.ps1 through cmd.exe with both
  streams appended to `log` as they are written, then records `exit_code` by rename;
- `launched` is written once the task was started.

Every command here is straight-line PowerShell (no branches): the decisions are made in
Python from the facts a poll prints, so they can be tested without Windows.
"""

from __future__ import annotations

import base64
import re

from pydantic import BaseModel

JOBS_DIR = r"C:\Windows\Temp\kiln\jobs"
KILN_DIR = r"C:\Windows\Temp\kiln"
TASK_PREFIX = "kiln-"
MAX_LOG_CHUNK = 512 * 1024  # bytes of log one poll reads
UPLOAD_CHUNK = 7680  # bytes per command: its base64 fits powershell.exe's command line
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PATH = re.compile(r"^[A-Za-z]:\\[^'\"\r\n<>|?*]*$")
POWERSHELL = "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass"
UTF8_BOM = b"\xef\xbb\xbf"  # Windows PowerShell 5.1 reads a script without one as ANSI


def quote(text: str) -> str:
    """A PowerShell single-quoted string."""
    return "'" + text.replace("'", "''") + "'"


def windows_path(path: str) -> str:
    """An absolute path with backslashes; refuses quotes and wildcards."""
    path = path.replace("/", "\\")
    if not _PATH.match(path):
        raise ValueError(f"{path!r} is not an absolute Windows path Kiln can write")
    return path


def parent_of(path: str) -> str:
    head = windows_path(path).rsplit("\\", 1)[0]
    return head + "\\" if len(head) == 2 else head


def job_dir(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} must match {_JOB_ID.pattern}")
    return f"{JOBS_DIR}\\{job_id}"


def task_name(job_id: str) -> str:
    return f"{TASK_PREFIX}{job_id}"


def wrapper(directory: str) -> str:
    return (
        "$ProgressPreference = 'SilentlyContinue'\n"
        f"& {quote(directory + chr(92) + 'user.ps1')}\n"
        "exit $LASTEXITCODE\n"
    )


def runner(directory: str) -> str:
    """run.ps1: claim, run with output to the log, record the exit code atomically."""
    d = directory
    return (
        f"New-Item -ItemType Directory -Path {quote(d + chr(92) + 'started')} "
        "-ErrorAction Stop | Out-Null\n"
        f'cmd.exe /c "{POWERSHELL} -File {d}\\script.ps1 >> {d}\\log 2>&1"\n'
        f"Set-Content -LiteralPath {quote(d + chr(92) + 'exit_code.tmp')} -Value $LASTEXITCODE\n"
        f"Move-Item -LiteralPath {quote(d + chr(92) + 'exit_code.tmp')} "
        f"-Destination {quote(d + chr(92) + 'exit_code')} -Force\n"
    )


def launch_command(job_id: str, user: str, elevated: bool, system: bool) -> str:
    """Register the job's task (SYSTEM, or the build user via S4U: no password is
    stored or sent) and start it. A task already running is left alone by Windows."""
    d = job_dir(job_id)
    if system:
        principal = "-UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest"
    else:
        level = "Highest" if elevated else "Limited"
        principal = f"-UserId {quote(user)} -LogonType S4U -RunLevel {level}"
    argument = quote(f'{POWERSHELL.removeprefix("powershell.exe ")} -File "{d}\\run.ps1"')
    return (
        # a limited token lacks the Administrators group: the user itself may write here
        f"icacls {quote(d)} /grant {quote(user + ':(OI)(CI)M')} /Q | Out-Null\n"
        f"$action = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument {argument}\n"
        f"$principal = New-ScheduledTaskPrincipal {principal}\n"
        "$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit ([TimeSpan]::Zero) "
        "-AllowStartIfOnBatteries -DontStopIfGoingOnBatteries -MultipleInstances IgnoreNew\n"
        f"Register-ScheduledTask -TaskName {quote(task_name(job_id))} -Action $action "
        "-Principal $principal -Settings $settings -Force | Out-Null\n"
        f"Start-ScheduledTask -TaskName {quote(task_name(job_id))}\n"
        f"Set-Content -LiteralPath {quote(d + chr(92) + 'launched')} -Value 'launched'\n"
    )


def stage_dir(job_id: str) -> str:
    return f"{JOBS_DIR}\\.stage-{job_id}"


def stage_command(job_id: str) -> str:
    """A fresh staging directory (a crash may have left one) with an empty log."""
    s = stage_dir(job_id)
    return (
        f"Remove-Item -LiteralPath {quote(s)} -Recurse -Force -ErrorAction SilentlyContinue\n"
        f"New-Item -ItemType Directory -Path {quote(s)} -Force -ErrorAction Stop | Out-Null\n"
        f"New-Item -ItemType File -Path {quote(s + chr(92) + 'log')} -Force "
        "-ErrorAction Stop | Out-Null\n"
    )


def publish_command(job_id: str) -> str:
    """The staged job becomes the job by one rename."""
    return (
        f"Move-Item -LiteralPath {quote(stage_dir(job_id))} "
        f"-Destination {quote(job_dir(job_id))} -ErrorAction Stop\n"
    )


_FACTS = ("dir", "launched", "started", "exit", "task", "exit-again", "log")


def poll_command(job_id: str, offset: int, chunk: int = MAX_LOG_CHUNK) -> str:
    """Facts, each after a `KILN <name>` line; the exit code is read before and after the
    task's state (a job ending in between is not taken for lost), and before the log."""
    d, task = job_dir(job_id), quote(task_name(job_id))
    exit_code = f"Get-Content -LiteralPath {quote(d + chr(92) + 'exit_code')} "
    exit_code += "-ErrorAction SilentlyContinue"
    facts = {
        "dir": f"Test-Path -LiteralPath {quote(d)} -PathType Container",
        "launched": f"Test-Path -LiteralPath {quote(d + chr(92) + 'launched')} -PathType Leaf",
        "started": f"Test-Path -LiteralPath {quote(d + chr(92) + 'started')} -PathType Container",
        "exit": exit_code,
        "task": f"(Get-ScheduledTask -TaskName {task} -ErrorAction SilentlyContinue).State",
        "exit-again": exit_code,
        "log": (
            f"$f = [IO.File]::Open({quote(d + chr(92) + 'log')}, 'Open', 'Read', 'ReadWrite')\n"
            f"$null = $f.Seek({int(offset)}, 'Begin')\n"
            f"$b = New-Object byte[] {chunk}\n"
            f"$n = $f.Read($b, 0, {chunk})\n"
            "$f.Close()\n"
            "[Convert]::ToBase64String($b, 0, $n)"
        ),
    }
    return "".join(f"Write-Output 'KILN {name}'\n{facts[name]}\n" for name in _FACTS)


class JobFacts(BaseModel):
    """What a poll saw of one job."""

    exists: bool
    launched: bool = False
    started: bool = False
    exit_code: int | None = None
    task_state: str | None = None
    log: bytes = b""

    @property
    def needs_launch(self) -> bool:
        """Staged but its task never started (the operator stopped in between)."""
        return (
            self.exists
            and not self.launched
            and not self.started
            and self.exit_code is None
            and self.task_state not in ("Running", "Queued")
        )

    @property
    def running(self) -> bool:
        return self.exit_code is None and (
            self.task_state in ("Running", "Queued") or self.needs_launch
        )


def parse_facts(stdout: str) -> JobFacts:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith("KILN ") and line[5:].strip() in _FACTS:
            current = sections.setdefault(line[5:].strip(), [])
        elif current is not None and line.strip():
            current.append(line.strip())

    def one(name: str) -> str | None:
        values = sections.get(name) or []
        return values[0] if values else None

    if "log" not in sections:
        raise ValueError(f"unexpected job poll output {stdout[:200]!r}")
    if one("dir") != "True":
        return JobFacts(exists=False)
    code = one("exit") or one("exit-again")
    log = base64.b64decode("".join(sections["log"])) if sections["log"] else b""
    return JobFacts(
        exists=True,
        launched=one("launched") == "True",
        started=one("started") == "True",
        exit_code=int(code) if code is not None and re.fullmatch(r"-?\d+", code) else None,
        task_state=one("task"),
        log=log,
    )


def upload_commands(data: bytes, path: str) -> list[str]:
    """Write data to path's temporary twin, chunk by chunk (each a command)."""
    tmp = quote(f"{windows_path(path)}.kiln-tmp")
    commands = [f"New-Item -ItemType File -Path {tmp} -Force -ErrorAction Stop | Out-Null"]
    for start in range(0, len(data), UPLOAD_CHUNK):
        chunk = base64.b64encode(data[start : start + UPLOAD_CHUNK]).decode()
        commands.append(
            f"Add-Content -LiteralPath {tmp} -Encoding Byte "
            f"-Value ([Convert]::FromBase64String('{chunk}')) -ErrorAction Stop"
        )
    return commands


def hash_command(path: str) -> str:
    tmp = quote(f"{windows_path(path)}.kiln-tmp")
    return f"(Get-FileHash -LiteralPath {tmp} -Algorithm SHA256).Hash"


def rename_command(path: str) -> str:
    tmp = quote(f"{windows_path(path)}.kiln-tmp")
    return f"Move-Item -LiteralPath {tmp} -Destination {quote(windows_path(path))} -Force"


def directory_exists_command(path: str) -> str:
    return f"Test-Path -LiteralPath {quote(path)} -PathType Container"


BOOT_TIME = (
    "(Get-CimInstance -ClassName Win32_OperatingSystem).LastBootUpTime"
    ".ToUniversalTime().ToString('o')"
)

# Before sysprep: Kiln's tasks and files must not go into the image.
CLEANUP = (
    f"Get-ScheduledTask -TaskName '{TASK_PREFIX}*' -ErrorAction SilentlyContinue | "
    "Unregister-ScheduledTask -Confirm:$false\n"
    f"Remove-Item -LiteralPath {quote(KILN_DIR)} -Recurse -Force -ErrorAction SilentlyContinue\n"
)
