"""Operator-wide settings, from KILN_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kiln.api.template import Provider


def _home() -> Path:
    return Path(os.environ.get("HOME", "/root"))


class OperatorSettings(BaseModel):
    default_provider: Provider = Field(default=Provider.local)
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty: all of them."
    )
    cache_root: Path = Field(default_factory=lambda: _home() / ".cache" / "kiln")
    data_root: Path = Field(
        default_factory=lambda: _home() / ".local" / "share" / "kiln",
        description="Local provider: staging directories and, by default, the gallery.",
    )
    gallery_root: Path | None = Field(
        default=None, description="Local provider: where distributed images go."
    )
    location: str | None = None
    resource_group: str | None = None
    subscription_id: str | None = None
    azure_arm_endpoint: str = Field(
        default="https://management.azure.com",
        description="Azure Resource Manager endpoint (a sovereign cloud's, or an emulator's).",
    )
    azure_authority: str | None = Field(
        default=None, description="Entra ID authority host; unset: azure-identity's default."
    )
    azure_ca_bundle: Path | None = Field(
        default=None, description="CA bundle for ARM and the authority (private endpoints)."
    )
    azure_credentials_secret: str | None = Field(
        default=None,
        description="namespace/name of a Secret with clientId, clientSecret and tenantId; "
        "unset: DefaultAzureCredential (workload identity, managed identity, environment).",
    )
    azure_communicator_source: str = Field(
        default="*",
        description="Source address range the build VM's NSG admits to the communicator "
        "port, SSH 22 or WinRM 5986 (set it to the operator's egress address).",
    )
    max_active_runs: int = Field(default=2, ge=1, description="Builds at once, operator-wide.")
    vm_memory_mb: int = Field(default=1024, ge=256)
    liveness_port: int = 8080
    metrics_port: int = Field(
        default=8081, description="/metrics, and run logs for `kiln logs` through the API server."
    )
    log_format: Literal["text", "json"] = Field(default="text", description="text or json.")
    leader_election: bool = Field(
        default=False,
        description="Run as one of several replicas: only the holder of a Lease works, the "
        "others stand by and take over when it stops renewing.",
    )
    leader_election_namespace: str = Field(
        default="default", description="Namespace of the Lease (the operator's own)."
    )
    leader_election_name: str = Field(default="kiln", description="Name of the Lease.")
    identity: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="This replica's name in the Lease (the pod name).",
    )
    http_address: str | None = Field(
        default=None,
        description="host:port where the other replicas reach this one's HTTP port (the "
        "pod IP); a standby forwards log requests to the active replica there.",
    )

    @property
    def staging_root(self) -> Path:
        return self.data_root / "staging"

    @property
    def gallery(self) -> Path:
        return self.gallery_root or self.data_root / "gallery"


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """KILN_DEFAULT_PROVIDER, KILN_NAMESPACES (comma separated), KILN_CACHE, ..."""
    env = os.environ if environ is None else environ
    names = {
        "default_provider": "KILN_DEFAULT_PROVIDER",
        "cache_root": "KILN_CACHE",
        "data_root": "KILN_DATA",
        "gallery_root": "KILN_GALLERY",
        "location": "KILN_LOCATION",
        "resource_group": "KILN_RESOURCE_GROUP",
        "subscription_id": "KILN_SUBSCRIPTION_ID",
        "max_active_runs": "KILN_MAX_ACTIVE_RUNS",
        "vm_memory_mb": "KILN_VM_MEMORY_MB",
        "liveness_port": "KILN_LIVENESS_PORT",
        "azure_arm_endpoint": "KILN_AZURE_ARM_ENDPOINT",
        "azure_authority": "KILN_AZURE_AUTHORITY",
        "azure_ca_bundle": "KILN_AZURE_CA_BUNDLE",
        "azure_credentials_secret": "KILN_AZURE_CREDENTIALS_SECRET",
        "azure_communicator_source": "KILN_AZURE_COMMUNICATOR_SOURCE",
        "metrics_port": "KILN_METRICS_PORT",
        "log_format": "KILN_LOG_FORMAT",
        "leader_election": "KILN_LEADER_ELECTION",
        "leader_election_namespace": "KILN_LEADER_ELECTION_NAMESPACE",
        "leader_election_name": "KILN_LEADER_ELECTION_NAME",
        "identity": "KILN_POD_NAME",
        "http_address": "KILN_HTTP_ADDRESS",
    }
    values: dict[str, object] = {field: env[var] for field, var in names.items() if env.get(var)}
    if env.get("KILN_NAMESPACES"):
        values["namespaces"] = [n.strip() for n in env["KILN_NAMESPACES"].split(",") if n.strip()]
    return OperatorSettings.model_validate(values)
