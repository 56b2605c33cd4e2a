"""Session fixtures for the Azure provider's end-to-end tests: Azurite and an ARM emulator
whose VMs are real QEMU machines. Pull them in from a conftest with

    pytest_plugins = ["fakes.fixtures"]

- `azurite` -> fakes.azurite.Azurite, running: `.blob_endpoint`, `.account_key`,
  `.connection_string`, `.client_kwargs()`.
- `arm_qemu` -> fakes.arm.ArmEmulator in a background thread (use the sync SDK clients:
  `arm_qemu.client(ComputeManagementClient)`), its `.backend` a QemuWindowsVmBackend (a
  QemuVmBackend for Linux VMs whose Windows VMs are WinRM guests: `.backend.guest(vm_id)`,
  `.backend.windows`); storage accounts hand out Azurite's endpoint and key; the marketplace
  holds the locally cached Debian:debian-12:{12,12-gen2} versions, then Windows Server 2022
  (MicrosoftWindowsServer:WindowsServer:2022-datacenter-azure-edition); sizes
  ARM_QEMU_VM_SIZES.
- `resources`, `network`, `compute`, `storage`, `keyvault` -> the SDK clients of the
  requesting module's own `arm` emulator fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.keyvault import KeyVaultManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.storage import StorageManagementClient

from fakes.arm import DEFAULT_LOCATIONS, ArmEmulator
from fakes.arm.qemu_backend import (
    QemuWindowsVmBackend,
    debian12_marketplace,
    windows_marketplace,
)
from fakes.azurite import Azurite, find_azurite_blob
from kiln.providers.local import baseimage

ARM_QEMU_VM_SIZES: dict[str, list[str]] = {
    "westeurope": ["Standard_D2ds_v4", "Standard_D1_v2", "Standard_B2s", "Standard_D2s_v5"],
    "northeurope": ["Standard_D2ds_v4", "Standard_D2s_v5"],
    "eastus": ["Standard_D2ds_v4", "Standard_D2s_v5", "Standard_B2s"],
    "westus2": ["Standard_D2s_v5", "Standard_B2s"],
}


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service on a free loopback port (scripts/setup-azurite.sh installs it)."""
    if find_azurite_blob() is None:
        pytest.fail("azurite-blob is not installed: run scripts/setup-azurite.sh")
    with Azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture(scope="session")
def arm_qemu(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[ArmEmulator]:
    """The ARM emulator with real QEMU VMs, WinRM Windows guests, Azurite blobs and the local
    Debian 12 image."""
    cache_root = baseimage.default_cache_root()
    # builds the base image if none is cached; Debian stays first (tests read marketplace[0])
    marketplace = [*debian12_marketplace(cache_root), *windows_marketplace()]
    backend = QemuWindowsVmBackend(tmp_path_factory.mktemp("armvm"), cache_root)
    emulator = ArmEmulator(
        backend=backend,
        blob_endpoint=azurite.blob_endpoint,
        storage_account_key=azurite.account_key,
        marketplace=marketplace,
        locations=DEFAULT_LOCATIONS,
        vm_sizes=ARM_QEMU_VM_SIZES,
        lro_duration=0.1,
        retry_after=0.5,
    )
    try:
        with emulator:
            yield emulator
    finally:
        backend.shutdown()


# The SDK clients of the requesting module's own `arm` emulator fixture.


@pytest.fixture(scope="module")
def resources(arm: ArmEmulator) -> ResourceManagementClient:
    return arm.client(ResourceManagementClient)


@pytest.fixture(scope="module")
def network(arm: ArmEmulator) -> NetworkManagementClient:
    return arm.client(NetworkManagementClient)


@pytest.fixture(scope="module")
def compute(arm: ArmEmulator) -> ComputeManagementClient:
    return arm.client(ComputeManagementClient)


@pytest.fixture(scope="module")
def storage(arm: ArmEmulator) -> StorageManagementClient:
    return arm.client(StorageManagementClient)


@pytest.fixture(scope="module")
def keyvault(arm: ArmEmulator) -> KeyVaultManagementClient:
    return arm.client(KeyVaultManagementClient)
