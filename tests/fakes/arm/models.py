"""Pydantic models of the emulator's settings, state and the records tests read."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None) -> str | None:
    """ARM's timestamp format (ISO 8601 with a Z-less offset is fine for the SDK)."""
    return ts.isoformat() if ts else None


DEFAULT_LOCATIONS = (
    "eastus",
    "eastus2",
    "westus2",
    "westus3",
    "centralus",
    "northeurope",
    "westeurope",
    "uksouth",
)

DEFAULT_VM_SIZES = (
    "Standard_B2s",
    "Standard_B2ms",
    "Standard_D1_v2",
    "Standard_DS1_v2",
    "Standard_DS2_v2",
    "Standard_D2s_v3",
    "Standard_D2ds_v4",
    "Standard_D2s_v5",
    "Standard_D4s_v5",
    "Standard_D2ds_v5",
    "Standard_F2s_v2",
)


class Plan(BaseModel):
    """A marketplace purchase plan (third-party images need it on the VM)."""

    name: str
    product: str
    publisher: str


class MarketplaceImage(BaseModel):
    """One publisher/offer/sku of the marketplace catalogue, with its versions."""

    publisher: str
    offer: str
    sku: str
    versions: list[str]
    os_type: Literal["Linux", "Windows"] = "Linux"
    hyper_v_generation: Literal["V1", "V2"] = "V2"
    architecture: Literal["x64", "Arm64"] = "x64"
    disk_size_gb: int = 30
    plan: Plan | None = None
    locations: list[str] | None = None  # None: every location

    def offered_in(self, location: str) -> bool:
        return self.locations is None or location in self.locations


DEFAULT_MARKETPLACE: tuple[MarketplaceImage, ...] = (
    MarketplaceImage(
        publisher="Canonical",
        offer="ubuntu-24_04-lts",
        sku="server",
        versions=["24.04.202409120", "24.04.202410010", "24.04.202411030"],
    ),
    MarketplaceImage(
        publisher="Canonical",
        offer="0001-com-ubuntu-server-jammy",
        sku="22_04-lts-gen2",
        versions=["22.04.202408010", "22.04.202410020"],
    ),
    MarketplaceImage(
        publisher="Debian",
        offer="debian-12",
        sku="12-gen2",
        versions=["0.20240717.1811", "0.20241004.1881", "0.20241111.1927"],
    ),
    MarketplaceImage(
        publisher="MicrosoftWindowsServer",
        offer="WindowsServer",
        sku="2022-datacenter-azure-edition",
        versions=["20348.2700.240905", "20348.2762.241006"],
        os_type="Windows",
        disk_size_gb=127,
    ),
    MarketplaceImage(
        publisher="RedHat",
        offer="RHEL",
        sku="9-lvm-gen2",
        versions=["9.4.2024081415", "9.5.2024112913"],
        disk_size_gb=64,
    ),
    MarketplaceImage(
        publisher="center-for-internet-security-inc",
        offer="cis-ubuntu-linux-2204-l1",
        sku="cis-ubuntu2204-l1-gen2",
        versions=["2.0.1", "2.1.0"],
        plan=Plan(
            name="cis-ubuntu2204-l1-gen2",
            product="cis-ubuntu-linux-2204-l1",
            publisher="center-for-internet-security-inc",
        ),
    ),
)


class StoredResource(BaseModel):
    """One ARM resource as the emulator keeps it.

    `body` is the JSON document minus the envelope (id, name, type, location, tags) and
    minus `properties.provisioningState`; `meta` is private to the emulator.
    """

    id: str
    type: str
    name: str
    subscription: str
    resource_group: str | None = None
    location: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] = Field(default_factory=dict)
    provisioning_state: str = "Succeeded"
    api_version: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    changed_at: datetime = Field(default_factory=utcnow)
    operation_id: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


OperationKind = Literal["create", "update", "delete", "action"]
OperationStatus = Literal["InProgress", "Succeeded", "Failed", "Canceled"]


class Operation(BaseModel):
    """A long-running operation, pollable through Azure-AsyncOperation and Location URLs."""

    id: str
    kind: OperationKind
    action: str | None = None
    resource_id: str
    resource_type: str
    namespace: str
    location: str
    api_version: str
    status: OperationStatus = "InProgress"
    start_time: datetime = Field(default_factory=utcnow)
    end_time: datetime | None = None
    duration: float = 0.0
    params: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    inject_error: dict[str, Any] | None = None
    result_status: int = 200  # what the Location URL answers once done

    def status_body(self) -> dict[str, Any]:
        """The Azure-AsyncOperation document."""
        body: dict[str, Any] = {
            "name": self.id,
            "status": self.status,
            "startTime": iso(self.start_time),
        }
        if self.end_time:
            body["endTime"] = iso(self.end_time)
        if self.error:
            body["error"] = self.error
        if self.output is not None and self.status == "Succeeded":
            body["properties"] = {"output": self.output}
        return body


class CreationRecord(BaseModel):
    id: str
    type: str
    count: int = 0


class ArmState(BaseModel):
    """Everything the emulator persists in `state-dir/state.json`."""

    resources: dict[str, StoredResource] = Field(default_factory=dict)
    operations: dict[str, Operation] = Field(default_factory=dict)
    creations: dict[str, CreationRecord] = Field(default_factory=dict)
    next_public_ip: int = 1
    next_private_ip: int = 1
    # soft-deleted key vaults by lower-case name (names stay taken until purged)
    deleted_vaults: dict[str, StoredResource] = Field(default_factory=dict)


class RequestRecord(BaseModel):
    """One request as the server saw it (the `arm.requests` log)."""

    method: str
    path: str
    api_version: str | None
    status: int
    query: dict[str, str] = Field(default_factory=dict)
    error_code: str | None = None
    injected: bool = False
    time: datetime = Field(default_factory=utcnow)


class InventoryItem(BaseModel):
    """One resource in `arm.inventory()`."""

    id: str
    type: str
    name: str
    resource_group: str | None
    location: str | None
    tags: dict[str, str]
    provisioning_state: str


class WinRmListener(BaseModel):
    """A WinRM listener of a Windows VM; Https ones carry the Key Vault certificate as PEM."""

    model_config = ConfigDict(frozen=True)

    protocol: Literal["Http", "Https"]
    certificate_url: str | None = None
    certificate_pem: str | None = None
    private_key_pem: str | None = Field(default=None, repr=False)


class DataDiskInfo(BaseModel):
    """A VM's data disk: its LUN, size and managed disk."""

    model_config = ConfigDict(frozen=True)

    lun: int
    size_gb: int
    id: str | None = None


class VmInfo(BaseModel):
    """What a VmBackend learns about a VM: where it lives, who logs in, what runs at boot."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    resource_group: str
    location: str
    vm_size: str
    os_type: Literal["Linux", "Windows"]
    computer_name: str
    admin_username: str
    ssh_public_keys: list[str] = Field(default_factory=list)
    disable_password_authentication: bool = True
    custom_data: str | None = None  # base64, as sent
    public_ip: str | None = None
    private_ip: str | None = None
    image_reference: dict[str, Any] = Field(default_factory=dict)
    plan: dict[str, Any] | None = None
    os_disk_id: str | None = None
    os_disk_size_gb: int | None = None
    data_disks: list[DataDiskInfo] = Field(default_factory=list)
    identities: list[str] = Field(default_factory=list)  # user-assigned identity IDs
    # the managed image or gallery image version the OS disk is made from (None: marketplace)
    source_image_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    # Windows: the password WinRM authenticates (never in repr) and the WinRM listeners
    admin_password: str | None = Field(default=None, repr=False)
    winrm_listeners: list[WinRmListener] = Field(default_factory=list)

    @property
    def address(self) -> str | None:
        """Where a communicator connects: the public IP, else the private one."""
        return self.public_ip or self.private_ip

    @property
    def custom_data_bytes(self) -> bytes | None:
        if self.custom_data is None:
            return None
        try:
            return base64.b64decode(self.custom_data)
        except (binascii.Error, ValueError):
            return None
