"""The provider interface: where build VMs run and where images go.

The pipeline is provider-neutral; a provider only creates, finds and deletes things in
its world (QEMU on this machine, or an Azure subscription) and reports where they are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from kiln.api.distribution import PlannedTarget
from kiln.api.run import Checkpoint, Endpoint, TemplateIdentity
from kiln.api.status import RunOutput
from kiln.api.template import ImageTemplateSpec
from kiln.communicators.ssh import SshCommunicator as Communicator
from kiln.communicators.winrm import WinRmCredentials
from kiln.naming import run_secret_name

# The UIDs of the runs whose build resources must stay, read when it is called.
Owners = Callable[[], Awaitable[set[str]]]


class ProviderError(Exception):
    """A failure in the provider's world; fatal ones stop the run, others are retried.

    code is the cloud's error code (for the reason a retry shows); retry_kind is set for
    an error that is retried (counted against the run's retry budget, shown in its
    conditions and counted by the metrics), unset for ordinary waiting (an operation
    still running)."""

    def __init__(
        self,
        message: str,
        *,
        fatal: bool = True,
        retry_after: float = 10.0,
        code: str | None = None,
        retry_kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.retry_after = retry_after
        self.code = code
        self.retry_kind = retry_kind


class RunContext(BaseModel):
    """Everything a step needs about one run; checkpoint is persisted after every step."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    namespace: str
    run_name: str
    run_uid: str
    template: TemplateIdentity
    spec: ImageTemplateSpec
    checkpoint: Checkpoint
    run_dir: Path
    key_namespace: str = Field(description="The operator's namespace, home of the key Secret.")
    client_private_key: str = ""
    client_public_key: str = ""
    host_private_key: str = ""
    host_public_key: str = ""
    winrm: WinRmCredentials | None = None

    @property
    def key_secret(self) -> str:
        """namespace/name of the run's key Secret (the operator's, never the tenant's)."""
        return f"{self.key_namespace}/{run_secret_name(self.run_uid)}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "customization.log"

    @property
    def windows(self) -> bool:
        """The source image runs Windows (the provider records it when resolving)."""
        return self.checkpoint.os_type == "Windows"


class BuildProvider(Protocol):
    name: str

    def staging_id(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        """The staging group (or directory) of a template, the same on every pass."""

    def run_dir(self, template: TemplateIdentity, spec: ImageTemplateSpec, run: str) -> Path:
        """Where a run keeps its logs and build files on this machine."""

    async def ensure_staging(self, ctx: RunContext) -> str: ...

    async def delete_staging(
        self,
        template: TemplateIdentity,
        staging: str,
        *,
        keep_group: bool,
        service_account: str | None = None,
    ) -> None:
        """Remove what Kiln made for the template; keep_group empties a custom group only.
        service_account: the template's spec.serviceAccountName (whose identity it used)."""

    async def resolve_source(self, ctx: RunContext) -> str:
        """The exact source image version; 'latest' resolves here."""

    async def latest_source_version(self, spec: ImageTemplateSpec, namespace: str) -> str | None:
        """What 'latest' resolves to now, for the SourceImage trigger; None if unknown."""

    async def create_vm(self, ctx: RunContext) -> Endpoint:
        """Create the build VM, or find the one created before; never a second one."""

    async def collect_from_vm(self, ctx: RunContext, communicator: Communicator) -> None:
        """Fetch what capture needs from the running VM (e.g. its kernel) before shutdown."""

    async def vm_lost(self, ctx: RunContext) -> str | None:
        """Why the build VM can never answer again (it is gone), or None if it may still:
        a lost connection is retried only while the VM may come back."""

    async def stop_vm(self, ctx: RunContext) -> bool:
        """True once the build VM is stopped and ready for capture; False: ask again."""

    async def capture(self, ctx: RunContext) -> None:
        """Turn the stopped VM's disk into the image the distributors publish."""

    async def gallery_versions(self, ctx: RunContext, target: PlannedTarget) -> list[str]:
        """The versions of a SharedImage target's image definition that exist now."""

    async def distribute(self, ctx: RunContext, target: PlannedTarget) -> RunOutput:
        """Publish what the plan says for one target (spec.distribute[target.index] for
        what the plan does not hold, e.g. a SAS); idempotent, never a second artifact."""

    async def delete_vm(self, ctx: RunContext) -> None:
        """Remove the build VM and everything made for it, keeping logs and outputs."""

    async def sweep(self, owners: Owners) -> list[str]:
        """Remove build resources of runs that owners() does not name; what was removed.
        The candidates are listed first and owners() is called after: a run's resources are
        made after the run, so anything listed belongs to a run that owners() sees, and a
        resource made meanwhile is not a candidate (no race with a run being created)."""

    async def leftovers(self, ctx: RunContext) -> list[str]:
        """What of the run's build resources still exists (IDs, paths), for a report."""

    def describe_vm(self, ctx: RunContext) -> str:
        """How a person reaches a kept build VM (errorHandling abort)."""

    async def storage_token(self, ctx: RunContext) -> str | None:
        """A bearer token for Azure Storage of the template's identity, to read private
        scripts and files; None where the provider has no Azure identity."""

    async def publish_logs(self, ctx: RunContext) -> None:
        """Put the run's customization log where the provider keeps logs."""

    async def close(self) -> None:
        """Release clients and connections at operator shutdown."""
