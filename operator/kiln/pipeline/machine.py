"""Steps that set up the build: staging, source, build VM, connection."""

from __future__ import annotations

import base64
import time

from kiln import GROUP, reasons
from kiln.api.run import RunSubState
from kiln.communicators.ssh import CommunicatorError, HostKeyMismatch, generate_keypair
from kiln.communicators.winrm import WinRmCredentials, generate_winrm_credentials
from kiln.naming import BUILD_COMPUTER_NAME, run_secret_name
from kiln.pipeline.base import Outcome, StepEnv
from kiln.providers.base import RunContext
from kiln.reconcile.runs import label_value

BOOT_TIMEOUT_SECONDS = 900
# The run Secret's keys for a Windows build VM, and the WinRmCredentials field of each.
WINRM_KEYS = {
    "winrm-password": "password",
    "winrm-certificate": "certificate_pem",
    "winrm-pfx": "pfx",
    "winrm-pfx-password": "pfx_password",
}


class StagingStep:
    name = "staging"
    sub_state = RunSubState.Building

    def applies(self, ctx: RunContext) -> bool:
        return True

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        ctx.checkpoint.staging = await env.provider.ensure_staging(ctx)
        ctx.run_dir.mkdir(parents=True, exist_ok=True)  # the log's home, from here on
        return Outcome.done(ctx.checkpoint.staging)

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """The staging group belongs to the template; it goes when the template goes."""


class SourceStep:
    name = "source"
    sub_state = RunSubState.Building

    def applies(self, ctx: RunContext) -> bool:
        return True

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        ctx.checkpoint.exact_source = await env.provider.resolve_source(ctx)
        return Outcome.done(ctx.checkpoint.exact_source)

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        """Resolving a source creates nothing."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decode_keys(data: dict[str, str], ctx: RunContext) -> None:
    """Fill the context's key fields from the run's Secret data."""
    text = {key: base64.b64decode(value).decode() for key, value in data.items()}
    ctx.client_private_key = text["ssh-privatekey"]
    ctx.client_public_key = text["ssh-publickey"]
    ctx.host_private_key = text["host-privatekey"]
    ctx.host_public_key = text["host-publickey"]
    if all(key in text for key in WINRM_KEYS):
        ctx.winrm = WinRmCredentials.model_validate(
            {field: text[key] for key, field in WINRM_KEYS.items()}
        )


def _secret_data(ctx: RunContext) -> dict[str, str]:
    """Fresh per-run credentials: SSH keys always, a WinRM login for Windows VMs."""
    client, host = generate_keypair(f"kiln-{ctx.run_name}"), generate_keypair("host")
    data = {
        "ssh-privatekey": _b64(client.private_key.get_secret_value()),
        "ssh-publickey": _b64(client.public_key),
        "host-privatekey": _b64(host.private_key.get_secret_value()),
        "host-publickey": _b64(host.public_key),
    }
    if ctx.windows:
        winrm = generate_winrm_credentials(BUILD_COMPUTER_NAME)
        for key, field in WINRM_KEYS.items():
            value = getattr(winrm, field)
            data[key] = _b64(value if isinstance(value, str) else value.get_secret_value())
    return data


# Labels and annotations of a run's key Secret: it lives in the operator's namespace, where
# an owner reference to the run cannot reach, so these say whose it is (for the sweeper).
KEY_SECRET_RUN_UID = f"{GROUP}/run-uid"
KEY_SECRET_RUN_NAMESPACE = f"{GROUP}/run-namespace"
KEY_SECRET_RUN_NAME = f"{GROUP}/run-name"


def key_secret_metadata(namespace: str, run_name: str, run_uid: str) -> dict[str, object]:
    """Metadata of the key Secret of the run namespace/run_name with uid run_uid."""
    return {
        "name": run_secret_name(run_uid),
        "labels": {KEY_SECRET_RUN_UID: run_uid, f"{GROUP}/run": label_value(run_name)},
        "annotations": {KEY_SECRET_RUN_NAMESPACE: namespace, KEY_SECRET_RUN_NAME: run_name},
    }


class VmStep:
    """Creates the per-run key pairs and the VM. The keys are kept in a Secret in the
    operator's namespace (tenants cannot read it); the run's cleanup deletes it, and the
    key Secret sweeper (kiln.reconcile.keysweeper) deletes any whose run is gone."""

    name = "vm"
    sub_state = RunSubState.Building

    def applies(self, ctx: RunContext) -> bool:
        return True

    async def _ensure_keys(self, ctx: RunContext, env: StepEnv) -> None:
        secret = run_secret_name(ctx.run_uid)
        data = await env.kube.read_secret(ctx.key_namespace, secret)
        if data is None:
            await env.kube.create_secret(
                ctx.key_namespace,
                {
                    "metadata": key_secret_metadata(ctx.namespace, ctx.run_name, ctx.run_uid),
                    "type": "kubernetes.io/ssh-auth",
                    "data": _secret_data(ctx),
                },
            )
            data = await env.kube.read_secret(ctx.key_namespace, secret)
        assert data is not None
        decode_keys(data, ctx)

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        await self._ensure_keys(ctx, env)
        endpoint = await env.provider.create_vm(ctx)
        ctx.checkpoint.endpoint = endpoint
        note = f" ({ctx.checkpoint.vm_note})" if ctx.checkpoint.vm_note else ""
        return Outcome.done(f"build VM at {endpoint.host}:{endpoint.port}{note}")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        await env.disconnect(ctx)
        await env.provider.delete_vm(ctx)
        await env.kube.delete_secret(ctx.key_namespace, run_secret_name(ctx.run_uid))


class ConnectStep:
    """Waits for a login that proves the VM's identity: SSH with the injected host key
    (then cloud-init must finish), or WinRM pinned to the per-run certificate."""

    name = "connect"
    sub_state = RunSubState.Building

    def applies(self, ctx: RunContext) -> bool:
        return True

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome:
        if ctx.checkpoint.boot_deadline is None:
            ctx.checkpoint.boot_deadline = time.time() + BOOT_TIMEOUT_SECONDS
        deadline = ctx.checkpoint.boot_deadline
        login = "a WinRM login" if ctx.windows else "an SSH login"
        try:
            if ctx.windows:
                await env.winrm(ctx)
                return Outcome.done("connected over WinRM")
            communicator = await env.communicator(ctx)
        except HostKeyMismatch as error:
            return Outcome.failed(str(error), reasons.PROVIDER_ERROR)
        except CommunicatorError as error:
            if lost := await env.provider.vm_lost(ctx):
                return Outcome.failed(lost, reasons.PROVIDER_ERROR)
            if time.time() > deadline:
                return Outcome.failed(
                    f"the build VM did not accept {login} in {BOOT_TIMEOUT_SECONDS}s: {error}",
                    reasons.PROVIDER_ERROR,
                )
            return Outcome.wait("waiting for the build VM to boot", delay=5)
        result = await communicator.run("cloud-init status 2>/dev/null || true")
        if "running" in result.stdout or "not started" in result.stdout:
            return Outcome.wait("waiting for cloud-init on the build VM", delay=3)
        return Outcome.done("connected")

    async def delete(self, ctx: RunContext, env: StepEnv) -> None:
        await env.disconnect(ctx)
