"""Operator-wide settings, from KILN_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from kiln.api.template import Provider
from kiln.api.tenancy import DEFAULT_BLOCKED_RANGES, FileRoot, IPNetwork, TenancyPolicy

# The local gallery's artifact trees (managed images, gallery versions): no VHD goes there.
GALLERY_TREES = ("images", "galleries")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_OPERATOR_NAMESPACE = "kiln-system"
# Sources that would open the build VM's communicator port to the whole internet.
_EVERYWHERE = {"*", "any", "internet", "0.0.0.0/0", "::/0"}


def _home() -> Path:
    return Path(os.environ.get("HOME", "/root"))


class SettingsError(ValueError):
    """A KILN_* environment variable that cannot be used; the message names it and says why."""


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
        description="Secret (name in the operator's namespace, or namespace/name) with "
        "clientId, clientSecret and tenantId for the operator's own identity; "
        "unset: DefaultAzureCredential (workload identity, managed identity, environment).",
    )
    azure_communicator_source: str | None = Field(
        default=None,
        description="Source address range the build VM's NSG admits to the communicator "
        "port, SSH 22 or WinRM 5986: the operator's egress address. Unset: only builds in "
        "an existing subnet (vmProfile.vnetConfig.subnetId) are accepted.",
    )
    azure_operator_identity: bool = Field(
        default=True,
        description="Templates without spec.serviceAccountName build with the operator's own "
        "Azure identity; false: every template must name a ServiceAccount of its namespace.",
    )
    azure_tenant_id: str | None = Field(
        default=None,
        description="Entra tenant of templates' federated identities, unless their "
        "ServiceAccount's azure.workload.identity/tenant-id annotation names another.",
    )
    operator_namespace: str | None = Field(
        default=None,
        description="Where per-run key Secrets live; unset: the operator Pod's namespace, "
        f"else {DEFAULT_OPERATOR_NAMESPACE}.",
    )
    file_source_roots: list[FileRoot] = Field(
        default_factory=list,
        description="Directories file:// sources may name; none: file:// is refused.",
    )
    output_roots: list[Path] = Field(
        default_factory=list,
        description="Directories a local VHD target's uri may name, besides the gallery.",
    )
    download_blocked_ranges: list[IPNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(r) for r in DEFAULT_BLOCKED_RANGES],
        description="Addresses the operator never downloads scriptUri/sourceUri from.",
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
    leader_election_namespace: str | None = Field(
        default=None, description="Namespace of the Lease; unset: the operator's own."
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

    @field_validator("file_source_roots", mode="before")
    @classmethod
    def _parse_roots(cls, value: object) -> object:
        if isinstance(value, list):
            return [FileRoot.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("azure_communicator_source")
    @classmethod
    def _not_everywhere(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() in _EVERYWHERE:
            raise ValueError(
                f"KILN_AZURE_COMMUNICATOR_SOURCE {value!r} would admit the whole internet to "
                "the build VM; set it to the operator's egress address range"
            )
        return value

    @property
    def secrets_namespace(self) -> str:
        """The operator's own namespace: the only one where Kiln keeps Secrets."""
        if self.operator_namespace:
            return self.operator_namespace
        try:
            return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or DEFAULT_OPERATOR_NAMESPACE
        except OSError:
            return DEFAULT_OPERATOR_NAMESPACE

    @property
    def tenancy_policy(self) -> TenancyPolicy:
        return TenancyPolicy(
            file_source_roots=self.file_source_roots,
            output_roots=[*self.output_roots, self.gallery],
            protected_roots=[self.gallery / tree for tree in GALLERY_TREES],
            blocked_ranges=self.download_blocked_ranges,
            communicator_source=self.azure_communicator_source,
            operator_identity=self.azure_operator_identity,
        )

    @property
    def staging_root(self) -> Path:
        return self.data_root / "staging"

    @property
    def gallery(self) -> Path:
        return self.gallery_root or self.data_root / "gallery"


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """KILN_DEFAULT_PROVIDER, KILN_NAMESPACES (comma separated), KILN_CACHE, ...

    List settings are comma separated; `none` gives an empty list (no blocked ranges)."""
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
        "azure_operator_identity": "KILN_AZURE_OPERATOR_IDENTITY",
        "azure_tenant_id": "KILN_AZURE_TENANT_ID",
        "operator_namespace": "KILN_OPERATOR_NAMESPACE",
    }
    lists = {
        "file_source_roots": "KILN_FILE_SOURCE_ROOTS",
        "output_roots": "KILN_OUTPUT_ROOTS",
        "download_blocked_ranges": "KILN_DOWNLOAD_BLOCKED_RANGES",
    }
    values: dict[str, object] = {field: env[var] for field, var in names.items() if env.get(var)}
    for field, var in lists.items():
        if env.get(var):
            items = [n.strip() for n in env[var].split(",") if n.strip()]
            values[field] = [] if items == ["none"] else items
    if env.get("KILN_NAMESPACES"):
        values["namespaces"] = [n.strip() for n in env["KILN_NAMESPACES"].split(",") if n.strip()]
    try:
        return OperatorSettings.model_validate(values)
    except ValidationError as error:
        variables = {**names, **lists, "namespaces": "KILN_NAMESPACES"}
        problems = [
            f"{variables.get(str(e['loc'][0]), 'settings')}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False)
        ]
        raise SettingsError("; ".join(problems)) from None
