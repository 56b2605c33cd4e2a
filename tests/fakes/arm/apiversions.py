"""api-versions accepted per resource type.

Each set holds the version the installed azure-mgmt SDKs send by default (read from the
SDK sources: resource 26 -> 2025-04-01, storage 25.3 -> 2026-09-01, network 33.1 ->
2026-03-01, compute 39: VMs/images/marketplace 2026-04-01, disks 2026-03-02, galleries
2026-03-03, resource SKUs 2021-07-01, keyvault 14.1 -> 2026-05-15 and 2015-11-01 for its
vaults.list over /resources; managed identities, which Kiln reaches only through a VM's identity
block, at their GA versions) plus older GA versions a pinned client may send.
tests/unit/test_arm_emulator.py re-reads the SDK sources to keep this table honest.
"""

from __future__ import annotations

import re

from .errors import ArmError

RESOURCES = frozenset(
    {
        "2015-11-01",
        "2021-04-01",
        "2022-09-01",
        "2023-07-01",
        "2024-03-01",
        "2024-07-01",
        "2024-11-01",
        "2025-03-01",
        "2025-04-01",
    }
)
STORAGE = frozenset(
    {
        "2023-01-01",
        "2023-04-01",
        "2023-05-01",
        "2024-01-01",
        "2025-01-01",
        "2025-06-01",
        "2026-09-01",
    }
)
NETWORK = frozenset(
    {
        "2023-09-01",
        "2023-11-01",
        "2024-01-01",
        "2024-03-01",
        "2024-05-01",
        "2024-07-01",
        "2024-10-01",
        "2025-01-01",
        "2025-03-01",
        "2025-05-01",
        "2026-03-01",
    }
)
COMPUTE = frozenset(
    {
        "2023-03-01",
        "2023-07-01",
        "2023-09-01",
        "2024-03-01",
        "2024-07-01",
        "2024-11-01",
        "2025-04-01",
        "2026-04-01",
    }
)
DISKS = frozenset({"2023-04-02", "2023-10-02", "2024-03-02", "2025-01-02", "2026-03-02"})
GALLERIES = frozenset(
    {"2022-03-03", "2022-08-03", "2023-07-03", "2024-03-03", "2025-03-03", "2026-03-03"}
)
SKUS = frozenset({"2019-04-01", "2021-07-01"})
MANAGED_IDENTITY = frozenset({"2018-11-30", "2023-01-31", "2024-11-30"})
KEYVAULT = frozenset({"2022-07-01", "2023-02-01", "2023-07-01", "2024-11-01", "2026-05-15"})

BY_TYPE: dict[str, frozenset[str]] = {
    "microsoft.resources/resourcegroups": RESOURCES,
    "microsoft.resources/resources": RESOURCES,
    "microsoft.resources/operationresults": RESOURCES,
    "microsoft.storage/storageaccounts": STORAGE,
    "microsoft.storage/locations": STORAGE,
    "microsoft.storage/checknameavailability": STORAGE,
    "microsoft.network/virtualnetworks": NETWORK,
    "microsoft.network/virtualnetworks/subnets": NETWORK,
    "microsoft.network/networksecuritygroups": NETWORK,
    "microsoft.network/networksecuritygroups/securityrules": NETWORK,
    "microsoft.network/publicipaddresses": NETWORK,
    "microsoft.network/networkinterfaces": NETWORK,
    "microsoft.network/locations": NETWORK,
    "microsoft.compute/virtualmachines": COMPUTE,
    "microsoft.compute/images": COMPUTE,
    "microsoft.compute/locations": COMPUTE | DISKS | GALLERIES,
    "microsoft.compute/locations/publishers": COMPUTE,
    "microsoft.compute/skus": SKUS,
    "microsoft.compute/disks": DISKS,
    "microsoft.compute/galleries": GALLERIES,
    "microsoft.compute/galleries/images": GALLERIES,
    "microsoft.compute/galleries/images/versions": GALLERIES,
    "microsoft.keyvault/vaults": KEYVAULT,
    "microsoft.keyvault/vaults/secrets": KEYVAULT,
    "microsoft.keyvault/locations": KEYVAULT,
    "microsoft.keyvault/deletedvaults": KEYVAULT,
    "microsoft.managedidentity/userassignedidentities": MANAGED_IDENTITY,
}

_FORMAT = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")


def check(api_version: str | None, type_key: str, type_name: str, location: str = "") -> str:
    """The api-version, or ARM's 400 for a missing, malformed or unsupported one."""
    if not api_version:
        raise ArmError(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )
    supported = BY_TYPE.get(type_key)
    if not _FORMAT.match(api_version):
        raise ArmError(
            400,
            "InvalidApiVersionParameter",
            f"The api-version '{api_version}' is invalid. The supported versions are "
            f"'{','.join(sorted(supported or RESOURCES, reverse=True))}'.",
        )
    if supported is not None and api_version not in supported:
        short = type_name.split("/", 1)[-1]
        raise ArmError(
            400,
            "NoRegisteredProviderFound",
            f"No registered resource provider found for location '{location}' and API version "
            f"'{api_version}' for type '{short}'. The supported api-versions are "
            f"'{', '.join(sorted(supported, reverse=True))}'.",
        )
    return api_version
