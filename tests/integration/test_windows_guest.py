"""Kiln's WinRM communicator against the emulator's Windows guest: detached jobs as
scheduled tasks, uploads, reboots. No Windows runs here (fakes/arm/windows_os.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from azurehelpers import WINDOWS_SERVER_2022
from fakes.arm import ArmEmulator, NoopVmBackend
from fakes.arm.models import VmInfo, WinRmListener
from fakes.arm.windows_os import FakeWindowsGuest
from fakes.arm.winrm_guest import WindowsGuestBackend
from fakes.azurite import Azurite
from kiln.api.run import Checkpoint, Endpoint, TemplateIdentity
from kiln.api.template import ImageTemplateSpec
from kiln.api.tenancy import TenancyPolicy
from kiln.communicators import winrm_jobs
from kiln.communicators.ssh import JobNotFound, JobStatus
from kiln.communicators.winrm import (
    UploadRefused,
    WinRmCommunicator,
    WinRmCredentials,
    generate_winrm_credentials,
)
from kiln.customizers.sources import FetchError, fetch
from kiln.pipeline.base import Outcome, StepEnv
from kiln.pipeline.logs import COMBINED
from kiln.pipeline.scripts import CustomizeStep
from kiln.providers.azure.provider import AzureProvider
from kiln.providers.base import RunContext
from kiln.reconcile.runs import merge_patch
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.azure,
    pytest.mark.windows,
    pytest.mark.timeout(120),
    pytest.mark.asyncio(loop_scope="session"),
]
USER = "packer"


class Vm:
    def __init__(self, backend: WindowsGuestBackend, vm: VmInfo, creds: WinRmCredentials):
        self.backend, self.vm, self.creds = backend, vm, creds

    @property
    def guest(self) -> FakeWindowsGuest:
        return self.backend.guest(self.vm.id)

    async def connect(self) -> WinRmCommunicator:
        communicator = WinRmCommunicator()
        assert self.vm.address
        await communicator.connect(self.vm.address, 5986, USER, self.creds, timeout=5)
        return communicator


@pytest.fixture
async def windows(tmp_path: Path) -> AsyncIterator[Vm]:
    creds = generate_winrm_credentials("kiln-build")
    pfx = base64.b64decode(creds.pfx.get_secret_value())
    key, _, _ = pkcs12.load_key_and_certificates(
        pfx, creds.pfx_password.get_secret_value().encode()
    )
    assert key is not None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    vm = VmInfo(
        id=f"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{address}",
        name="vm",
        resource_group="rg",
        location="westeurope",
        vm_size="Standard_D2s_v5",
        os_type="Windows",
        computer_name="kiln-build",
        admin_username=USER,
        public_ip=address,
        admin_password=creds.password.get_secret_value(),
        winrm_listeners=[
            WinRmListener(
                protocol="Https", certificate_pem=creds.certificate_pem, private_key_pem=key_pem
            )
        ],
    )
    backend = WindowsGuestBackend(NoopVmBackend(), tmp_path, down_seconds=0.2, boot_seconds=1.0)
    await backend.create(vm)
    yield Vm(backend, vm, creds)
    await backend.shutdown_all()


async def until_ended(communicator: WinRmCommunicator, job: str) -> tuple[JobStatus, bytes]:
    log = b""
    for _ in range(200):
        status = await communicator.poll_job(job, len(log))
        log += status.new_log
        if not status.running:
            return status, log
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job} never ended")


async def test_a_job_runs_detached_once_and_its_exit_code_and_output_are_read(
    windows: Vm,
) -> None:
    communicator = await windows.connect()
    script = "Write-Output 'first'\nStart-Sleep -Seconds 1\nWrite-Error 'oops'\nexit 3\n"
    await communicator.start_job("customize-00", script)
    await communicator.start_job("customize-00", script)  # again (a restarted operator)
    status = await communicator.poll_job("customize-00", 0)
    assert status.running and status.new_log == b"first\r\n"
    await communicator.close()  # the task goes on without the connection
    communicator = await windows.connect()
    status, log = await until_ended(communicator, "customize-00")
    assert status.exit_code == 3
    assert log == b"first\r\noops\r\n"
    task = windows.guest.tasks["kiln-customize-00"]
    assert (task.runs, task.user, task.run_level, task.logon_type) == (1, USER, "Limited", "s4u")
    await communicator.start_job("customize-00", script)
    assert task.runs == 1, "an ended job is never started again"
    with pytest.raises(JobNotFound):
        await communicator.poll_job("customize-01", 0)
    await communicator.close()


async def test_elevated_and_system_jobs_run_as_their_principal(windows: Vm) -> None:
    communicator = await windows.connect()
    await communicator.start_job("a", "whoami", elevated=True)
    await communicator.start_job("b", "whoami\nthrow 'stop here'\nWrite-Output 'never'", True, True)
    _, log = await until_ended(communicator, "a")
    assert log == b"kiln-build\\packer\r\n"
    assert windows.guest.tasks["kiln-a"].run_level == "Highest"
    status, log = await until_ended(communicator, "b")
    assert (status.exit_code, log) == (1, b"nt authority\\system\r\nstop here\r\n")
    assert windows.guest.tasks["kiln-b"].user == "SYSTEM"
    await communicator.close()


async def test_a_large_log_is_read_in_chunks_and_nothing_is_lost(windows: Vm) -> None:
    communicator = await windows.connect()
    line = "0123456789" * 10
    await communicator.start_job("big", f'1..12000 | ForEach-Object {{ Write-Output "$_ {line}" }}')
    status, log = await until_ended(communicator, "big")
    expected = "".join(f"{n} {line}\r\n" for n in range(1, 12001)).encode()
    assert status.exit_code == 0 and log == expected
    await communicator.close()


async def test_uploads_are_checked_and_need_an_existing_directory(windows: Vm) -> None:
    communicator = await windows.connect()
    data = bytes(random.getrandbits(8) for _ in range(winrm_jobs.UPLOAD_CHUNK * 2 + 17))
    await communicator.upload(data, r"C:\Windows\Temp\payload.bin")
    assert windows.guest.fs.read(r"c:\windows\temp\PAYLOAD.bin") == data
    assert not windows.guest.fs.is_file(r"C:\Windows\Temp\payload.bin.kiln-tmp")
    await communicator.upload(b"", r"C:\Windows\Temp\empty.txt")
    assert windows.guest.fs.read(r"C:\Windows\Temp\empty.txt") == b""
    with pytest.raises(UploadRefused, match=r"C:\\nowhere does not exist"):
        await communicator.upload(b"x", r"C:\nowhere\file.txt")
    assert hashlib.sha256(data).hexdigest()
    await communicator.close()


async def test_a_restart_drops_the_endpoint_kills_jobs_and_comes_back_with_a_new_boot(
    windows: Vm,
) -> None:
    communicator = await windows.connect()
    before = await communicator.boot_time()
    await communicator.start_job("long", "Start-Sleep -Seconds 30\nWrite-Output 'done'")
    await communicator.run_powershell('shutdown /r /f /t 0 /c "packer restart"')
    await asyncio.sleep(0.5)
    assert windows.backend.server(windows.vm.id) is None, "the endpoint is down"
    await communicator.close()
    for _ in range(50):
        await asyncio.sleep(0.2)
        if windows.backend.server(windows.vm.id) is not None:
            break
    communicator = await windows.connect()
    assert await communicator.boot_time() != before
    status, _ = await until_ended(communicator, "long")
    assert (status.running, status.exit_code) == (False, None), "the job died with the boot"
    await communicator.close()


# --- the customize step on that VM, as the driver runs it, with "crashes" -------------------


def run_context(vm: Vm, tmp_path: Path, steps: list[dict]) -> RunContext:
    body = {**valid_spec(), "provider": "azure", "source": WINDOWS_SERVER_2022, "customize": steps}
    template = TemplateIdentity(namespace="default", name="win", uid=str(uuid.uuid4()))
    checkpoint = Checkpoint(template=template, os_type="Windows")
    assert vm.vm.address
    checkpoint.endpoint = Endpoint(host=vm.vm.address, port=5986, user=USER)
    ctx = RunContext(
        namespace="default",
        run_name="win-1",
        run_uid=str(uuid.uuid4()),
        template=template,
        spec=ImageTemplateSpec.model_validate(body),
        checkpoint=checkpoint,
        run_dir=tmp_path / "run",
        key_namespace="kiln-system",
        winrm=vm.creds,
    )
    ctx.run_dir.mkdir()
    return ctx


def applied(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a status patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = applied(result.get(key), value)
    return result


async def drive(
    ctx: RunContext,
    passes: int = 400,
    policy: TenancyPolicy | None = None,
    provider: AzureProvider | None = None,
) -> Outcome:
    """Passes of the customize step until it ends (or its checkpoint shows `until`); each
    pass starts from the persisted checkpoint with fresh connections, as after a crash."""
    step = CustomizeStep()
    stored: dict = {}
    for _ in range(passes):
        env = StepEnv(provider=provider, kube=None, policy=policy or TenancyPolicy())  # type: ignore[arg-type]
        stored = applied(stored, merge_patch(stored, ctx.checkpoint.wire()))  # a status patch
        ctx.checkpoint = Checkpoint.model_validate(stored)
        try:
            outcome = await step.reconcile(ctx, env)
        finally:
            await env.disconnect(ctx)
        if outcome.kind != "wait":
            return outcome
        await asyncio.sleep(min(outcome.delay, 0.3))
    raise AssertionError("the step never ended")


async def test_restarts_and_update_cycles_survive_a_crash_at_every_pass(
    windows: Vm, tmp_path: Path
) -> None:
    ctx = run_context(
        windows,
        tmp_path,
        [
            {"type": "WindowsRestart", "restartCheckCommand": "Write-Output 'restarted.'"},
            {"type": "WindowsUpdate", "updateLimit": 3},
        ],
    )
    outcome = await drive(ctx)
    assert outcome.kind == "done", outcome.message
    assert windows.guest.boots == 3, "one WindowsRestart, one Windows Update restart"
    assert windows.guest.task_starts == [f"kiln-customize-01-u0{n}" for n in (1, 2, 3)]
    log = (ctx.run_dir / COMBINED).read_text()
    assert "3 update(s) installed in 3 cycle(s); 1 failed; updateLimit 3 reached" in log
    assert ctx.checkpoint.windows is None


async def test_a_restart_that_never_comes_back_fails_with_what_was_seen(
    windows: Vm, tmp_path: Path
) -> None:
    ctx = run_context(
        windows,
        tmp_path,
        [
            {
                "type": "WindowsRestart",
                "restartCommand": "Write-Output 'not restarting'",
                "restartTimeout": "3s",
            }
        ],
    )
    outcome = await drive(ctx)
    assert outcome.kind == "failed"
    assert outcome.message.endswith(
        "the VM did not come back from its restart within 3s: "
        "the VM still ran the boot from before the restart"
    )
    assert windows.guest.boots == 1


async def test_a_file_needs_its_directory_on_the_vm(windows: Vm, tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("x")
    policy = TenancyPolicy.model_validate(
        {"file_source_roots": [{"path": str(tmp_path), "directory": str(tmp_path)}]}
    )
    steps = [
        {"type": "File", "sourceUri": f"file://{tmp_path}/x.txt", "destination": "C:\\nope\\x"}
    ]
    outcome = await drive(run_context(windows, tmp_path, steps), policy=policy)
    assert outcome.kind == "failed"
    assert outcome.message == (
        "customize[0] File: the directory C:\\nope does not exist on the build VM; create it "
        "in an earlier PowerShell step"
    )


async def test_an_update_pending_after_every_restart_is_a_reboot_loop(
    windows: Vm, tmp_path: Path
) -> None:
    step = {
        "type": "WindowsUpdate",
        "searchCriteria": "IsInstalled=0",
        "filters": ["include:$true"],
    }
    outcome = await drive(run_context(windows, tmp_path, [step]))
    assert outcome.kind == "failed"
    assert "reboot loop: Intel - System - 10.1.1.44 (optional driver) was installed" in (
        outcome.message
    )
    assert windows.guest.boots == 3, "it stopped after the third cycle, not at the timeout"


# --- private blobs: fetched by the operator with the template's identity, as on Linux ------

PRIVATE_SCRIPT = b"Write-Output 'from a private container'\r\n"
PRIVATE_FILE = b"private payload\n"


async def test_private_powershell_scripts_and_files_are_read_with_the_templates_identity(
    windows: Vm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azurite refuses anonymous reads of the container; the operator reads the script and
    the file again with a storage token of the template's identity (here the operator's
    own, from the emulator's Entra endpoint) and runs/uploads them on the Windows VM."""
    with Azurite(tmp_path / "azurite", oauth=True) as azurite:
        assert azurite.ca_path is not None
        container = BlobServiceClient.from_connection_string(
            azurite.connection_string, **azurite.client_kwargs()
        ).create_container("scripts")
        container.upload_blob("setup.ps1", PRIVATE_SCRIPT)
        container.upload_blob("payload.txt", PRIVATE_FILE)
        script_url = f"{azurite.blob_endpoint}scripts/setup.ps1"
        file_url = f"{azurite.blob_endpoint}scripts/payload.txt"
        async with ArmEmulator(lro_duration=0.05, retry_after=0.05) as arm:
            for name in ("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"):
                monkeypatch.setenv(name, arm.environment()[name])
            bundle = tmp_path / "ca.pem"  # the ARM emulator's (Entra's) and Azurite's CAs
            bundle.write_text(arm.ca_path.read_text() + azurite.ca_path.read_text())
            settings = OperatorSettings.model_validate(
                {
                    "azure_arm_endpoint": arm.url,
                    "azure_authority": arm.url,
                    "azure_ca_bundle": bundle,
                    "subscription_id": arm.subscription_id,
                    "azure_storage_hosts": ["127.0.0.1"],
                    "download_blocked_ranges": [],  # Azurite listens on loopback
                    "data_root": tmp_path,
                }
            )
            policy = settings.tenancy_policy
            with pytest.raises(FetchError, match=r"HTTP 403 \(AuthorizationFailure\)"):
                await fetch(script_url, policy)  # anonymously: refused
            steps = [
                {"type": "PowerShell", "scriptUri": script_url},
                {
                    "type": "File",
                    "sourceUri": file_url,
                    "destination": r"C:\Windows\Temp\payload.txt",
                },
            ]
            ctx = run_context(windows, tmp_path, steps)
            provider = AzureProvider(settings, None)  # type: ignore[arg-type]
            issued = len(arm.identity.issued_tokens)
            try:
                outcome = await drive(ctx, policy=policy, provider=provider)
            finally:
                await provider.close()
            audiences = {
                jwt.decode(t, options={"verify_signature": False})["aud"]
                for t in arm.identity.issued_tokens[issued:]
            }
    assert outcome.kind == "done", outcome.message
    assert "from a private container" in (ctx.run_dir / COMBINED).read_text()
    assert windows.guest.fs.read(r"C:\Windows\Temp\payload.txt") == PRIVATE_FILE
    assert audiences == {"https://storage.azure.com"}
