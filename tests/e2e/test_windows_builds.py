"""Windows templates built by the operator against the ARM emulator, end to end.

No Windows runs here: the emulator's Windows VMs are WinRM guests (fakes/arm/winrm_guest.py)
over a model of the parts of Windows the steps touch (fakes/arm/windows_os.py): a file
system, scheduled tasks, restarts that drop the endpoint and come back with a new boot
time, and a Windows Update agent with a catalogue. The operator talks to them through
its real WinRM client (pypsrp, NTLM over HTTPS pinned to the run's certificate) and to
ARM through the real Azure SDKs; logs go to Azurite.
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient
from kubernetes import config

from azurehelpers import (
    BUILD_RESOURCE_TYPES,
    WINDOWS_SERVER_2022,
    create_gallery,
    emulator_operator,
    managed_image_target,
)
from conftest import OPERATOR_NAMESPACE, OperatorProcess
from fakes.arm import ArmEmulator, NoopVmBackend
from fakes.arm.windows_os import FakeWindowsGuest
from fakes.arm.winrm_guest import WindowsGuestBackend
from fakes.azurite import Azurite
from kubehelpers import Kiln, run, template, wait_ended, wait_until
from secretscan import RunRecorder

pytestmark = [pytest.mark.e2e, pytest.mark.azure, pytest.mark.windows]

NAMESPACE = "windows-builds"
LOCATION = "westeurope"
BIG_LINES = 50_000
BIG_LINE = "line {} of the big step: " + "0123456789" * 8  # ~100 bytes: 5 MB in all


@pytest.fixture(scope="module")
def arm(azurite: Azurite) -> Iterator[ArmEmulator]:
    """Windows VMs are WinRM guests; a restart takes a few seconds, not minutes."""
    backend = WindowsGuestBackend(NoopVmBackend(), down_seconds=0.5, boot_seconds=2.0)
    emulator = ArmEmulator(
        backend=backend,
        blob_endpoint=azurite.blob_endpoint,
        storage_account_key=azurite.account_key,
        lro_duration=0.1,
        retry_after=0.2,
    )
    with emulator:
        yield emulator


@pytest.fixture(scope="module")
def operator(
    control_plane: Any, arm: ArmEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    data = tmp_path_factory.mktemp("windows-operator")
    with emulator_operator(control_plane, arm, NAMESPACE, LOCATION, data) as process:
        yield process


@pytest.fixture(scope="module")
def kiln(control_plane: Any, operator: OperatorProcess) -> Iterator[Kiln]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        yield Kiln(api, NAMESPACE)


@pytest.fixture(scope="module", autouse=True)
def recorder(kiln: Kiln) -> Iterator[RunRecorder]:
    with RunRecorder(kiln.api.api_client, NAMESPACE, OPERATOR_NAMESPACE) as recording:
        yield recording


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A directory served over http:// (the azure provider fetches http(s), as AIB does)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def windows_template(arm: ArmEmulator, name: str, **spec: Any) -> dict[str, Any]:
    ids = create_gallery(arm, f"{name}-out", f"{name}gal", name, LOCATION, os_type="Windows")
    manifest = template(
        name,
        source=WINDOWS_SERVER_2022,
        distribute=[managed_image_target(ids["image"], LOCATION)],
        **spec,
    )
    manifest["spec"]["provider"] = "azure"
    return manifest


def guest_of(arm: ArmEmulator, body: dict[str, Any]) -> FakeWindowsGuest:
    return arm.backend.guest(body["status"]["checkpoint"]["azure"]["vmId"])


def vm_id_of(kiln: Kiln, name: str) -> str | None:
    body = kiln.get("imagebuildruns", name) or {}
    return (((body.get("status") or {}).get("checkpoint") or {}).get("azure") or {}).get("vmId")


def run_log(azurite: Azurite, name: str) -> str:
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    blob = blobs.get_blob_client("packerlogs", f"{name}/customization.log")
    return blob.download_blob().readall().decode()


def leftovers(arm: ArmEmulator) -> list[str]:
    return [item.id for item in arm.inventory() if item.type in BUILD_RESOURCE_TYPES]


def steps_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["name"]: step for step in body["status"]["steps"]}


def test_a_template_with_every_windows_step_builds_a_managed_and_a_gallery_image(
    kiln: Kiln, arm: ArmEmulator, azurite: Azurite, served: tuple[Path, str]
) -> None:
    root, base = served
    payload = b"payload for C:\\kiln-test\r\n"
    (root / "payload.txt").write_bytes(payload)
    script = b"Write-Output 'from scriptUri'\r\n"
    script += b"Get-Content -LiteralPath 'C:\\kiln-test\\payload.txt'\r\n"
    (root / "check.ps1").write_bytes(script)
    ids = create_gallery(arm, "full-out", "fullgal", "full", LOCATION, os_type="Windows")
    manifest = windows_template(
        arm,
        "full",
        customize=[
            {
                "type": "PowerShell",
                "name": "prepare",
                "inline": [
                    "New-Item -ItemType Directory -Path 'C:\\kiln-test' -Force | Out-Null",
                    "Write-Output 'hello from PowerShell'",
                ],
            },
            {
                "type": "File",
                "sourceUri": f"{base}/payload.txt",
                "sha256Checksum": hashlib.sha256(payload).hexdigest(),
                "destination": "C:\\kiln-test\\payload.txt",
            },
            {
                "type": "PowerShell",
                "name": "as system",
                "runElevated": True,
                "runAsSystem": True,
                "inline": ["whoami", "exit 3010"],
                "validExitCodes": [0, 3010],
            },
            {
                "type": "WindowsRestart",
                "restartCheckCommand": "Write-Output 'restarted.'",
                "restartTimeout": "2m",
            },
            {"type": "WindowsUpdate"},
            {
                "type": "PowerShell",
                "scriptUri": f"{base}/check.ps1",
                "sha256Checksum": hashlib.sha256(script).hexdigest(),
            },
        ],
        validate={
            "inVMValidations": [
                {
                    "type": "PowerShell",
                    "name": "payload arrived",
                    "inline": [
                        "Test-Path -LiteralPath 'C:\\kiln-test\\payload.txt' -PathType Leaf",
                    ],
                }
            ]
        },
    )
    manifest["spec"]["distribute"] = [
        managed_image_target(ids["image"], LOCATION),
        {
            "type": "SharedImage",
            "runOutputName": "gallery",
            "galleryImageId": ids["gallery"],
            "versioning": {"scheme": "Latest", "major": 3},
        },
    ]
    kiln.create("imagetemplates", manifest)
    kiln.create("imagebuildruns", run("full-1", "full"))
    body = wait_ended(kiln, "full-1", timeout=600)
    status = body["status"]
    assert status["runState"] == "Succeeded", status["message"]
    outputs = {o["runOutputName"]: o for o in status["runOutputs"]}
    assert outputs["image"]["artifactId"] == ids["image"]
    assert outputs["gallery"]["artifactId"] == f"{ids['gallery']}/versions/3.0.0"
    assert all(s["state"] in ("Succeeded", "Skipped") for s in status["steps"]), status["steps"]
    assert status["checkpoint"]["scriptIndex"] == {"customize": 6, "validate": 1}
    assert status["checkpoint"].get("windows") is None

    guest = guest_of(arm, body)
    assert guest.fs.read("C:\\kiln-test\\payload.txt") == payload
    assert guest.boots == 4, "WindowsRestart once, WindowsUpdate twice"
    cycles = [f"kiln-customize-04-u0{n}" for n in range(1, 5)]
    assert [t for t in guest.task_starts if "-u0" in t] == cycles, "no cycle skipped or repeated"
    agent = {u.kb: u for u in guest.updates.updates}
    assert all(agent[kb].installed for kb in ("KB5044414", "KB5044281", "KB5044035", "KB890830"))
    assert not agent["KB5044288"].installs, "the Preview filter excluded it"
    assert agent["KB4052623"].installs == 1, "a failed update is not retried every cycle"
    assert guest.tasks == {}, "Kiln's tasks were removed before sysprep"
    assert not guest.fs.is_dir("C:\\Windows\\Temp\\kiln")
    assert guest.image_state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"

    log = run_log(azurite, "full-1")
    for text in (
        "==> customize[0] PowerShell 'prepare'",
        "hello from PowerShell",
        "uploaded http://127.0.0.1:",
        "nt authority\\system",
        "the VM restarted (running since",
        "restarted.",
        "KILN-WU failed 5f1a8e2c-0006-4c1e-9a51-000000000006 0x80070643",
        "cycle 2: 3 found, 1 selected, 1 installed, 0 failed, restart needed: True",
        "4 update(s) installed in 4 cycle(s); 1 failed",
        "from scriptUri",
        "payload for C:\\kiln-test",
        "==> validate[0] PowerShell 'payload arrived'",
        ">>> Sysprep complete",
    ):
        assert text in log, text
    assert leftovers(arm) == []


def test_an_operator_killed_during_a_long_powershell_step_resumes_without_rerunning_it(
    kiln: Kiln, arm: ArmEmulator, azurite: Azurite, operator: OperatorProcess
) -> None:
    kiln.create(
        "imagetemplates",
        windows_template(
            arm,
            "long",
            customize=[
                {
                    "type": "PowerShell",
                    "inline": [
                        "Write-Output 'before'",
                        "Start-Sleep -Seconds 15",
                        "Write-Output 'after'",
                    ],
                }
            ],
        ),
    )
    kiln.create("imagebuildruns", run("long-1", "long"))

    def running() -> bool:
        vm_id = vm_id_of(kiln, "long-1")
        if vm_id is None:
            return False
        try:
            task = arm.backend.guest(vm_id).tasks.get("kiln-customize-00")
        except KeyError:
            return False
        return task is not None and task.state == "Running"

    wait_until(running, 300, "the PowerShell step to run on the VM")
    operator.kill()
    operator.start()
    body = wait_ended(kiln, "long-1", timeout=600)
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    assert guest_of(arm, body).task_starts == ["kiln-customize-00"], "the script ran once"
    log = run_log(azurite, "long-1")
    assert log.count("before\r\n") == 1 and log.count("after\r\n") == 1, log


def test_an_operator_killed_during_a_windows_update_restart_resumes_it(
    kiln: Kiln, arm: ArmEmulator, azurite: Azurite, operator: OperatorProcess
) -> None:
    kiln.create(
        "imagetemplates", windows_template(arm, "wu", customize=[{"type": "WindowsUpdate"}])
    )
    kiln.create("imagebuildruns", run("wu-1", "wu"))

    def restarting() -> bool:
        body = kiln.get("imagebuildruns", "wu-1") or {}
        windows = ((body.get("status") or {}).get("checkpoint") or {}).get("windows") or {}
        restart = (windows.get("update") or {}).get("restart") or {}
        return bool(restart.get("issued"))

    wait_until(restarting, 300, "a Windows Update restart")
    operator.kill()
    operator.start()
    body = wait_ended(kiln, "wu-1", timeout=600)
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    guest = guest_of(arm, body)
    assert guest.boots == 3, "two restarts, none repeated"
    assert sorted(guest.task_starts) == [f"kiln-customize-00-u0{n}" for n in range(1, 5)]
    assert "4 update(s) installed in 4 cycle(s); 1 failed" in run_log(azurite, "wu-1")


def test_a_failing_step_fails_the_run_with_its_exit_code_and_abort_keeps_the_vm(
    kiln: Kiln, arm: ArmEmulator
) -> None:
    manifest = windows_template(
        arm,
        "fails",
        customize=[{"type": "PowerShell", "inline": ["Write-Output 'about to fail'", "exit 7"]}],
        errorHandling={"onCustomizerError": "abort"},
    )
    kiln.create("imagetemplates", manifest)
    kiln.create("imagebuildruns", run("fails-1", "fails"))
    body = wait_ended(kiln, "fails-1", timeout=600)
    status = body["status"]
    assert status["runState"] == "Failed"
    record = steps_of(body)["customize"]
    assert record["exitCode"] == 7 and record["logTail"] == ["about to fail"]
    assert "failed with exit code 7" in status["message"]
    assert "WinRM over HTTPS to" in status["message"] and "delete the run" in status["message"]
    vm_id = status["checkpoint"]["azure"]["vmId"]
    assert arm.resource(vm_id) is not None, "errorHandling abort keeps the VM"
    kiln.delete("imagebuildruns", "fails-1")
    wait_until(lambda: arm.resource(vm_id) is None, 120, "the kept VM to go with its run")


@pytest.mark.slow  # tests/integration/test_windows_guest.py has the quick version
def test_a_reboot_loop_is_reported_instead_of_cycling(kiln: Kiln, arm: ArmEmulator) -> None:
    manifest = windows_template(
        arm,
        "loop",
        customize=[
            {
                "type": "WindowsUpdate",
                "searchCriteria": "IsInstalled=0",
                "filters": ["include:$true"],
            }
        ],
    )
    kiln.create("imagetemplates", manifest)
    kiln.create("imagebuildruns", run("loop-1", "loop"))
    body = wait_ended(kiln, "loop-1", timeout=600)
    status = body["status"]
    assert status["runState"] == "Failed"
    assert "reboot loop: Intel - System - 10.1.1.44 (optional driver)" in status["message"]
    assert guest_of(arm, body).boots == 3


def test_a_step_printing_5_mb_loses_nothing(kiln: Kiln, arm: ArmEmulator, azurite: Azurite) -> None:
    line = BIG_LINE.format("$_")
    manifest = windows_template(
        arm,
        "big",
        customize=[
            {
                "type": "PowerShell",
                "inline": [f'1..{BIG_LINES} | ForEach-Object {{ Write-Output "{line}" }}'],
            }
        ],
    )
    kiln.create("imagetemplates", manifest)
    kiln.create("imagebuildruns", run("big-1", "big"))
    body = wait_ended(kiln, "big-1", timeout=600)
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    log = run_log(azurite, "big-1")
    printed = re.findall(r"^line \d+ of the big step: .*$", log.replace("\r\n", "\n"), re.M)
    assert printed == [BIG_LINE.format(n) for n in range(1, BIG_LINES + 1)]


def test_no_secret_in_status_events_or_the_operator_log(
    recorder: RunRecorder, arm: ArmEmulator, operator: OperatorProcess
) -> None:
    """The admin passwords, the WinRM certificates' keys and every token of these runs."""
    recorder.assert_nothing_leaked(
        operator.log(),
        *arm.identity.issued_tokens,
        arm.client_secret,
        arm.storage_account_key or "",
    )
