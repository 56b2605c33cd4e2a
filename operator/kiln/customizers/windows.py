"""What Kiln runs on a Windows build VM itself (not a template's steps)."""

from __future__ import annotations

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
