"""What Kiln runs on a Windows build VM: sysprep, and the template's Windows steps
(PowerShell scripts, restarts, Windows Update cycles) with the pure decisions about them."""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel

from kiln.api.run import WindowsUpdateProgress
from kiln.api.template import PowerShellStep, WindowsRestartStep, WindowsUpdateStep
from kiln.api.tenancy import TenancyPolicy
from kiln.customizers.sources import TokenSource, fetch

OVERRIDE_PATH = r"C:\DeprovisioningScript.ps1"
GENERALIZED_STATE = "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
_SETUP_STATE = r"HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State"

IMAGE_STATE = f"(Get-ItemProperty '{_SETUP_STATE}').ImageState"

# A file at C:\DeprovisioningScript.ps1 (put there by a customizer) replaces the default,
# as AIB documents.
HAS_OVERRIDE = f"Test-Path '{OVERRIDE_PATH}'"
OVERRIDE_SCRIPT = f"& '{OVERRIDE_PATH}'\nexit $LASTEXITCODE\n"

SYSPREP_MINUTES = 15  # the script gives up after this; it runs under a longer timeout
SYSPREP_TIMEOUT_SECONDS = SYSPREP_MINUTES * 60 + 120
_SYSPREP_ERRORS = r"$env:SystemRoot\System32\Sysprep\Panther\setuperr.log"


def _give_up(what: str) -> str:
    """One line (the loop body's exit), so the script's last words are sysprep's errors."""
    return (
        f"if ((Get-Date) -gt $deadline) {{ Write-Error '{what} within {SYSPREP_MINUTES} "
        f"minutes'; Get-Content {_SYSPREP_ERRORS} -Tail 20 -ErrorAction SilentlyContinue; "
        "exit 1 }"
    )


# AIB's default: wait for the Azure guest agent, sysprep for a VM, wait until Windows
# reports the generalized state. Sysprep quits instead of shutting down: capture
# deallocates the VM, which Azure needs before generalize. Every loop has an end: a
# sysprep that fails leaves the image state as it was, and the script exits 1 with the
# tail of sysprep's error log.
DEPROVISION_SCRIPT = rf"""$deadline = (Get-Date).AddMinutes({SYSPREP_MINUTES})
Write-Output '>>> Waiting for GA Service (RdAgent) to start ...'
while ((Get-Service RdAgent).Status -ne 'Running') {{
  {_give_up("RdAgent did not start")}
  Start-Sleep -Seconds 5
}}
Write-Output '>>> Waiting for GA Service (WindowsAzureGuestAgent) to start ...'
while ((Get-Service WindowsAzureGuestAgent).Status -ne 'Running') {{
  {_give_up("WindowsAzureGuestAgent did not start")}
  Start-Sleep -Seconds 5
}}
Write-Output '>>> Sysprepping VM ...'
if (Test-Path $env:SystemRoot\System32\Sysprep\unattend.xml) {{
  Remove-Item $env:SystemRoot\System32\Sysprep\unattend.xml -Force
}}
& $env:SystemRoot\System32\Sysprep\Sysprep.exe /oobe /generalize /quiet /quit /mode:vm
while ($true) {{
  $imageState = {IMAGE_STATE}
  Write-Output $imageState
  if ($imageState -eq '{GENERALIZED_STATE}') {{ break }}
  {_give_up("sysprep did not generalize the VM")}
  Start-Sleep -Seconds 5
}}
Write-Output '>>> Sysprep complete ...'
"""


# --- the template's Windows steps ----------------------------------------------------------


async def powershell_script(
    step: PowerShellStep, policy: TenancyPolicy, token: TokenSource | None = None
) -> str:
    """Inline commands as one script file (a terminating error ends it, exit code 1, as
    with AIB), or the script at scriptUri, checked against sha256Checksum."""
    if step.inline:
        return "\n".join(step.inline) + "\n"
    assert step.script_uri is not None
    data = await fetch(step.script_uri, policy, step.sha256_checksum, token=token)
    return data.decode("utf-8-sig", "replace")


def valid_exit_codes(step: PowerShellStep) -> list[int]:
    return step.valid_exit_codes or [0]


DEFAULT_RESTART_COMMAND = 'shutdown /r /f /t 0 /c "packer restart"'  # AIB's, from Packer
DEFAULT_RESTART_TIMEOUT = "5m"
UPDATE_RESTART_COMMAND = 'shutdown /r /f /t 0 /c "kiln: Windows Update"'
UPDATE_RESTART_SECONDS = 1800.0  # installing a cumulative update at shutdown takes long
ALREADY_SHUTTING_DOWN = 1115  # ERROR_SHUTDOWN_IN_PROGRESS: an earlier request is under way
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> float:
    """AIB's (Packer's) durations: 90s, 5m, 2h, 1h30m -> seconds."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"{text!r} is not a duration like 5m, 2h or 1h30m")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def restart_plan(step: WindowsRestartStep) -> tuple[str, str | None, float]:
    """The restart command, the check command (None: none) and the timeout in seconds."""
    command = step.restart_command or DEFAULT_RESTART_COMMAND
    timeout = parse_duration(step.restart_timeout or DEFAULT_RESTART_TIMEOUT)
    return command, step.restart_check_command or None, timeout


DEFAULT_SEARCH_CRITERIA = "BrowseOnly=0 and IsInstalled=0"
DEFAULT_FILTERS = ("exclude:$_.Title -like '*Preview*'", "include:$true")
DEFAULT_UPDATE_LIMIT = 1000
REBOOT_LOOP_CYCLES = 3  # the same update installed this many cycles in a row: a loop


def parse_filters(filters: list[str] | None) -> list[tuple[str, str]]:
    """(include|exclude, PowerShell expression) pairs; the first match decides."""
    parsed = []
    for rule in filters or DEFAULT_FILTERS:
        kind, sep, expression = rule.partition(":")
        if not sep or kind not in ("include", "exclude") or not expression.strip():
            raise ValueError(
                f"filter {rule!r} must be include:<expression> or exclude:<expression>"
            )
        parsed.append((kind, expression.strip()))
    return parsed


def update_limit(step: WindowsUpdateStep) -> int:
    return step.update_limit or DEFAULT_UPDATE_LIMIT


# One cycle: search, filter, download, install. It prints a `KILN-WU` line per fact, which
# parse_cycle reads; a restart is the operator's (it must see the VM go and come back).
_UPDATE_SCRIPT = r"""$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$parameters = '__PARAMETERS__' | ConvertFrom-Json
if ((New-Object -ComObject Microsoft.Update.SystemInfo).RebootRequired) {
  Write-Output 'a restart is pending from an earlier install; restarting first'
  Write-Output 'KILN-WU reboot True'
  exit 0
}
$filters = @($parameters.filters | ForEach-Object {
  $kind, $expression = $_ -split ':', 2
  [pscustomobject]@{ Kind = $kind; Block = [scriptblock]::Create($expression) }
})
$session = New-Object -ComObject Microsoft.Update.Session
$session.ClientApplicationID = 'kiln'
$searcher = $session.CreateUpdateSearcher()
Write-Output "Searching for updates: $($parameters.criteria)"
$result = $searcher.Search($parameters.criteria)
Write-Output "KILN-WU found $($result.Updates.Count)"
$selected = New-Object -ComObject Microsoft.Update.UpdateColl
foreach ($update in $result.Updates) {
  $id = $update.Identity.UpdateID
  $include = $false
  foreach ($filter in $filters) {
    if (Where-Object -InputObject $update -FilterScript $filter.Block) {
      $include = $filter.Kind -eq 'include'
      break
    }
  }
  if ($parameters.skip -contains $id) { $include = $false }
  if ($include -and $selected.Count -lt $parameters.limit) {
    if (-not $update.EulaAccepted) { $update.AcceptEula() }
    [void]$selected.Add($update)
    Write-Output "KILN-WU selected $id $($update.Title)"
  } else {
    Write-Output "KILN-WU skipped $id $($update.Title)"
  }
}
$reboot = $false
if ($selected.Count -gt 0) {
  $downloader = $session.CreateUpdateDownloader()
  $downloader.Updates = $selected
  [void]$downloader.Download()
  $installer = $session.CreateUpdateInstaller()
  $installer.Updates = $selected
  $installation = $installer.Install()
  for ($i = 0; $i -lt $selected.Count; $i++) {
    $update = $selected.Item($i)
    $outcome = $installation.GetUpdateResult($i)
    if ($outcome.ResultCode -eq 2 -or $outcome.ResultCode -eq 3) {
      Write-Output "KILN-WU installed $($update.Identity.UpdateID) $($update.Title)"
    } else {
      $hresult = '0x{0:X8}' -f $outcome.HResult
      Write-Output "KILN-WU failed $($update.Identity.UpdateID) $hresult $($update.Title)"
    }
  }
  $reboot = $installation.RebootRequired
}
Write-Output "KILN-WU reboot $reboot"
"""


def update_script(step: WindowsUpdateStep, limit: int, skip: list[str]) -> str:
    """One cycle's script: at most `limit` updates, none of those in `skip`."""
    parameters = {
        "criteria": step.search_criteria or DEFAULT_SEARCH_CRITERIA,
        "filters": [f"{kind}:{expression}" for kind, expression in parse_filters(step.filters)],
        "limit": max(0, limit),
        "skip": sorted(skip),
    }
    return _UPDATE_SCRIPT.replace("__PARAMETERS__", json.dumps(parameters).replace("'", "''"))


class CycleReport(BaseModel):
    """What one cycle's log says."""

    found: int = 0
    selected: dict[str, str] = {}  # update ID -> title
    installed: list[str] = []
    failed: dict[str, str] = {}  # update ID -> HResult
    reboot: bool = False
    complete: bool = False  # its last line (reboot True/False) was printed


def parse_cycle(log: str) -> CycleReport:
    report = CycleReport()
    for line in log.splitlines():
        words = line.strip().split(" ", 3)
        if len(words) < 3 or words[0] != "KILN-WU":
            continue
        what, rest = words[1], words[2:]
        if what == "found" and rest[0].isdigit():
            report.found = int(rest[0])
        elif what == "selected":
            report.selected[rest[0]] = rest[1] if len(rest) > 1 else rest[0]
        elif what == "installed":
            report.installed.append(rest[0])
        elif what == "failed":
            report.failed[rest[0]] = rest[1].split(" ", 1)[0] if len(rest) > 1 else "?"
        elif what == "reboot":
            report.reboot, report.complete = rest[0].lower() == "true", True
    return report


class UpdateDecision(BaseModel):
    """What follows a cycle: restart, another cycle, or the step's end."""

    action: Literal["restart", "next", "done", "failed"]
    message: str = ""


def decide_after_cycle(
    progress: WindowsUpdateProgress, report: CycleReport, limit: int
) -> UpdateDecision:
    """Counts the cycle into progress (once: the caller persists it with the decision)."""
    cycle = progress.cycle
    if not report.complete:
        return UpdateDecision(
            action="failed", message=f"cycle {cycle} ended without its summary line"
        )
    progress.installed += len(report.installed)
    progress.failed.update(report.failed)
    progress.pending = {
        update_id: progress.pending.get(update_id, 0) + 1 for update_id in report.installed
    }
    looping = [u for u, count in progress.pending.items() if count >= REBOOT_LOOP_CYCLES]
    if looping:
        titles = ", ".join(report.selected.get(u, u) for u in looping)
        return UpdateDecision(
            action="failed",
            message=f"reboot loop: {titles} was installed and the VM restarted "
            f"{REBOOT_LOOP_CYCLES} times, and it still applies; exclude it with a filter "
            "(exclude:$_.Title -like '...') or fix it in the image",
        )
    if report.reboot:
        return UpdateDecision(action="restart")
    if not report.selected or progress.installed >= limit:
        limit_reached = progress.installed >= limit
        failed = f"; {len(progress.failed)} failed" if progress.failed else ""
        return UpdateDecision(
            action="done",
            message=f"{progress.installed} update(s) installed in {cycle} cycle(s){failed}"
            + (f"; updateLimit {limit} reached" if limit_reached else ""),
        )
    return UpdateDecision(action="next")
