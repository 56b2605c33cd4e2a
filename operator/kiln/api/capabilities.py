"""What each provider can build, in one table.

The CRD's CEL rules (api/template.py), the operator's own checks (api/validation.py) and
the pipeline (a provider refusing steps it cannot run) all read this table, so adding a
provider or a capability is one entry here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel


class Provider(StrEnum):
    azure = "azure"
    local = "local"


class ProviderCapabilities(BaseModel):
    windows_build_vms: bool  # boots Windows build VMs
    windows_customizers: bool  # runs PowerShell, WindowsRestart, WindowsUpdate, File there
    file_uris: bool  # scriptUri and sourceUri may be file:// (the operator's machine)
    vhd_destination: Literal["file", "blob"]  # what a VHD target's uri names
    account_fields: tuple[str, ...] = ()  # spec fields it needs (or the operator's defaults)


CAPABILITIES: dict[Provider, ProviderCapabilities] = {
    Provider.local: ProviderCapabilities(
        windows_build_vms=False, windows_customizers=False, file_uris=True, vhd_destination="file"
    ),
    Provider.azure: ProviderCapabilities(
        windows_build_vms=True,
        windows_customizers=True,
        file_uris=False,
        vhd_destination="blob",
        account_fields=("location", "resourceGroup", "subscriptionId"),
    ),
}


def capabilities(provider: Provider | str) -> ProviderCapabilities:
    return CAPABILITIES[Provider(provider)]


def windows_provider() -> Provider:
    """A provider that builds on Windows VMs, for messages that say what to use."""
    return next(p for p, c in CAPABILITIES.items() if c.windows_build_vms)


def file_uri_provider() -> Provider:
    return next(p for p, c in CAPABILITIES.items() if c.file_uris)
