"""What a pipeline step is, and what it returns.

A step's reconcile() is called again and again until it says done or failed: it reads
the checkpoint and the world, does the next thing, and returns. It never waits long
itself; "wait" hands the time back to the driver, which persists the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from pydantic import BaseModel

from kiln.api.run import RunSubState
from kiln.api.tenancy import TenancyPolicy
from kiln.communicators.ssh import SshCommunicator
from kiln.communicators.winrm import WinRmCommunicator
from kiln.customizers.sources import FetchError, TokenSource
from kiln.kube import Kube
from kiln.providers.base import BuildProvider, ProviderError, RunContext


class Outcome(BaseModel):
    kind: Literal["done", "wait", "failed"]
    message: str = ""
    delay: float = 2.0
    exit_code: int | None = None
    log_tail: list[str] | None = None
    reason: str | None = None

    @classmethod
    def done(cls, message: str = "") -> Outcome:
        return cls(kind="done", message=message)

    @classmethod
    def wait(cls, message: str, delay: float = 2.0, reason: str | None = None) -> Outcome:
        """Come back after delay; a reason marks a retry that the run's conditions show."""
        return cls(kind="wait", message=message, delay=delay, reason=reason)

    @classmethod
    def failed(cls, message: str, reason: str, **details: object) -> Outcome:
        return cls(kind="failed", message=message, reason=reason, **details)


@dataclass
class StepEnv:
    """What steps share for one run: its provider, API client, what the operator lets
    templates reach, and the open connection."""

    provider: BuildProvider
    kube: Kube
    policy: TenancyPolicy
    connections: dict[str, SshCommunicator] = field(default_factory=dict)
    winrm_connections: dict[str, WinRmCommunicator] = field(default_factory=dict)

    async def communicator(self, ctx: RunContext, timeout: float = 20.0) -> SshCommunicator:
        """The run's open SSH connection, or a new one (after a restart) to the same VM."""
        existing = self.connections.get(ctx.run_uid)
        if existing is not None:
            return existing
        endpoint = ctx.checkpoint.endpoint
        if endpoint is None:
            raise RuntimeError("no build VM endpoint recorded")
        communicator = SshCommunicator()
        await communicator.connect(
            endpoint.host,
            endpoint.port,
            endpoint.user,
            ctx.client_private_key,
            ctx.host_public_key,
            timeout=timeout,
        )
        self.connections[ctx.run_uid] = communicator
        return communicator

    async def winrm(self, ctx: RunContext, timeout: float = 20.0) -> WinRmCommunicator:
        """The run's WinRM communicator (a Windows build VM), connected and pinned."""
        existing = self.winrm_connections.get(ctx.run_uid)
        if existing is not None:
            return existing
        if ctx.winrm is None:
            raise RuntimeError("a Windows run without WinRM credentials")
        endpoint = ctx.checkpoint.endpoint
        if endpoint is None:
            raise RuntimeError("no build VM endpoint recorded")
        communicator = WinRmCommunicator()
        await communicator.connect(
            endpoint.host, endpoint.port, endpoint.user, ctx.winrm, timeout=timeout
        )
        self.winrm_connections[ctx.run_uid] = communicator
        return communicator

    def storage_token(self, ctx: RunContext) -> TokenSource:
        """The template's token for private blobs (Linux and Windows steps alike), asked
        for only when a blob needs it."""

        async def token() -> str | None:
            try:
                return await self.provider.storage_token(ctx)
            except ProviderError as error:
                raise FetchError(
                    f"no Azure Storage token of the template's identity: {error}"
                ) from None

        return token

    async def disconnect(self, ctx: RunContext) -> None:
        for connections in (self.connections, self.winrm_connections):
            communicator = connections.pop(ctx.run_uid, None)
            if communicator is not None:
                await communicator.close()


DEFAULT_PASS_SECONDS = 600.0


class Step(Protocol):
    """pass_seconds (optional, default DEFAULT_PASS_SECONDS) bounds one reconcile()."""

    name: str
    sub_state: RunSubState

    def applies(self, ctx: RunContext) -> bool: ...

    async def reconcile(self, ctx: RunContext, env: StepEnv) -> Outcome: ...

    async def delete(self, ctx: RunContext, env: StepEnv) -> None: ...
