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

# AIB's default: wait for the Azure guest agent, sysprep for a VM, wait until Windows
# reports the generalized state. Sysprep quits instead of shutting down: capture
# deallocates the VM, which Azure needs before generalize.
DEPROVISION_SCRIPT = rf"""Write-Output '>>> Waiting for GA Service (RdAgent) to start ...'
while ((Get-Service RdAgent).Status -ne 'Running') {{ Start-Sleep -Seconds 5 }}
Write-Output '>>> Waiting for GA Service (WindowsAzureGuestAgent) to start ...'
while ((Get-Service WindowsAzureGuestAgent).Status -ne 'Running') {{ Start-Sleep -Seconds 5 }}
Write-Output '>>> Sysprepping VM ...'
if (Test-Path $env:SystemRoot\System32\Sysprep\unattend.xml) {{
  Remove-Item $env:SystemRoot\System32\Sysprep\unattend.xml -Force
}}
& $env:SystemRoot\System32\Sysprep\Sysprep.exe /oobe /generalize /quiet /quit /mode:vm
while ($true) {{
  $imageState = {IMAGE_STATE}
  Write-Output $imageState
  if ($imageState -eq '{GENERALIZED_STATE}') {{ break }}
  Start-Sleep -Seconds 5
}}
Write-Output '>>> Sysprep complete ...'
"""
