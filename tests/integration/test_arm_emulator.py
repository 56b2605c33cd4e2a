"""The ARM emulator driven only through the real azure-mgmt clients and azure-identity.

What passes here is what the Kiln Azure provider can rely on: the token flow, LRO pollers
(and continuation tokens), retries under throttling, and Azure's own error codes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.core import PipelineClient
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
)
from azure.core.rest import HttpRequest
from azure.identity import ClientSecretCredential
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.storage import StorageManagementClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from azurehelpers import create_identity, vnet_and_nsg
from fakes.arm import ArmEmulator, RecordingVmBackend

pytestmark = [pytest.mark.azure, pytest.mark.integration, pytest.mark.timeout(120)]

LOCATION = "westus2"
VM_TYPE = "Microsoft.Compute/virtualMachines"
AZURITE = "http://127.0.0.1:10000/{account}"
AZURITE_KEY = base64.b64encode(b"azurite-key-" * 5).decode()


def ssh_public_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


PUBLIC_KEY = ssh_public_key()
CUSTOM_DATA = base64.b64encode(b"#cloud-config\nruncmd: [echo kiln]\n").decode()


@pytest.fixture(scope="module")
def backend() -> RecordingVmBackend:
    return RecordingVmBackend()


@pytest.fixture(scope="module")
def arm(backend: RecordingVmBackend) -> Iterator[ArmEmulator]:
    emulator = ArmEmulator(
        lro_duration=0.1,
        retry_after=0.05,
        backend=backend,
        blob_endpoint=AZURITE,
        storage_account_key=AZURITE_KEY,
        vm_sizes={
            "westus2": ["Standard_D2s_v5", "Standard_B2s"],
            "eastus": ["Standard_D2s_v5"],
            "westeurope": ["Standard_B2s"],
        },
        locations=["westus2", "eastus", "westeurope"],
        seed=7,
    )
    with emulator:
        yield emulator


@pytest.fixture(autouse=True)
def clean_faults(arm: ArmEmulator) -> Iterator[None]:
    yield
    arm.clear_faults()
    arm.lro_durations.clear()


def group(resources: ResourceManagementClient, name: str, location: str = LOCATION) -> str:
    rg = resources.resource_groups.create_or_update(
        name, {"location": location, "tags": {"kiln-run": name}}
    )
    return rg.name


def build_network(
    network: NetworkManagementClient, rg: str, *, public_ip: bool = True
) -> dict[str, Any]:
    """vnet + subnet, NSG allowing SSH, Standard static public IP, NIC: what Kiln creates."""
    vnet, nsg = vnet_and_nsg(network, rg, LOCATION)
    nic_cfg: dict[str, Any] = {"subnet": {"id": vnet.subnets[0].id}}
    pip = None
    if public_ip:
        pip = network.public_ip_addresses.begin_create_or_update(
            rg,
            "pip",
            {
                "location": LOCATION,
                "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Static"},
            },
        ).result()
        nic_cfg["publicIPAddress"] = {"id": pip.id}
    nic = network.network_interfaces.begin_create_or_update(
        rg,
        "nic",
        {
            "location": LOCATION,
            "properties": {
                "networkSecurityGroup": {"id": nsg.id},
                "ipConfigurations": [{"name": "ipconfig1", "properties": nic_cfg}],
            },
        },
    ).result()
    return {"vnet": vnet, "nsg": nsg, "pip": pip, "nic": nic}


def vm_model(
    nic_id: str, *, size: str = "Standard_D2s_v5", image: Any = None, user: str = "kiln"
) -> cm.VirtualMachine:
    """The VM the way a provider builds it with the SDK's models."""
    return cm.VirtualMachine(
        location=LOCATION,
        tags={"kiln-template": "t1"},
        hardware_profile=cm.HardwareProfile(vm_size=size),
        storage_profile=cm.StorageProfile(
            image_reference=image
            or cm.ImageReference(
                publisher="Canonical", offer="ubuntu-24_04-lts", sku="server", version="latest"
            ),
            os_disk=cm.OSDisk(
                create_option="FromImage",
                delete_option="Delete",
                managed_disk=cm.ManagedDiskParameters(storage_account_type="StandardSSD_LRS"),
            ),
        ),
        os_profile=cm.OSProfile(
            computer_name="kiln-build",
            admin_username=user,
            custom_data=CUSTOM_DATA,
            linux_configuration=cm.LinuxConfiguration(
                disable_password_authentication=True,
                ssh=cm.SshConfiguration(
                    public_keys=[
                        cm.SshPublicKey(
                            path=f"/home/{user}/.ssh/authorized_keys", key_data=PUBLIC_KEY
                        )
                    ]
                ),
            ),
        ),
        network_profile=cm.NetworkProfile(
            network_interfaces=[cm.NetworkInterfaceReference(id=nic_id, primary=True)]
        ),
    )


def refused(compute: ComputeManagementClient, rg: str, model: cm.VirtualMachine) -> Any:
    """The error Azure answers a VM PUT with (the PUT must fail)."""
    with pytest.raises(HttpResponseError) as err:
        compute.virtual_machines.begin_create_or_update(rg, "vm-bad", model)
    return err.value


def power_state(compute: ComputeManagementClient, rg: str, name: str) -> list[str]:
    view = compute.virtual_machines.instance_view(rg, name)
    return [s.code for s in view.statuses]


# --- identity -------------------------------------------------------------------------


def test_token_flow_and_401_without_token(
    arm: ArmEmulator, resources: ResourceManagementClient
) -> None:
    credential = arm.credential()
    token = credential.get_token(f"{arm.url}/.default")
    assert token.token.count(".") == 2 and token.expires_on > time.time() + 3000
    group(resources, "rg-auth")  # the SDK's bearer policy got and sent a token

    wrong = type(credential)(
        arm.tenant_id,
        arm.client_id,
        "not-the-secret",
        authority=arm.url,
        disable_instance_discovery=True,
        connection_verify=str(arm.ca_path),
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        wrong.get_token(f"{arm.url}/.default")

    class Forged:
        def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
            return AccessToken("eyJhbGciOiJub25lIn0.e30.c2ln", int(time.time()) + 3600)

    forged = arm.client(ResourceManagementClient, credential=Forged())
    with pytest.raises(ClientAuthenticationError) as info:
        forged.resource_groups.get("rg-auth")
    assert info.value.status_code == 401
    assert info.value.error.code == "InvalidAuthenticationToken"

    # no Authorization header at all: azure-core without a bearer policy
    plain = PipelineClient(base_url=arm.url, connection_verify=str(arm.ca_path))
    path = f"/subscriptions/{arm.subscription_id}/resourcegroups/rg-auth?api-version=2025-04-01"
    response = plain.send_request(HttpRequest("GET", arm.url + path))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AuthenticationFailed"
    assert "Bearer" in response.headers["WWW-Authenticate"]


async def test_aio_clients_in_the_test_loop() -> None:
    from azure.mgmt.resource.resources.aio import ResourceManagementClient as AioResources

    async with ArmEmulator(lro_duration=0.05, retry_after=0.05) as arm:
        credential = arm.async_credential()
        async with credential, arm.client(AioResources, credential=credential) as client:
            await client.resource_groups.create_or_update("rg-aio", {"location": "eastus"})
            poller = await client.resource_groups.begin_delete("rg-aio")
            await poller.result()
            assert not await client.resource_groups.check_existence("rg-aio")


# --- protocol -------------------------------------------------------------------------


def test_api_version_is_required_and_checked(arm: ArmEmulator) -> None:
    old = arm.client(ResourceManagementClient, api_version="2015-01-01")
    with pytest.raises(HttpResponseError) as info:
        old.resource_groups.get("anything")
    assert info.value.status_code == 400
    assert info.value.error.code == "NoRegisteredProviderFound"
    assert all(r.api_version for r in arm.requests)
    arm.request_latency = 0.3
    try:
        started = time.monotonic()
        arm.client(ResourceManagementClient).resource_groups.check_existence("anything")
        assert time.monotonic() - started >= 0.3
    finally:
        arm.request_latency = 0.0


def test_resource_group_create_get_exists_delete_cascades(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    storage: StorageManagementClient,
) -> None:
    rg = resources.resource_groups.create_or_update(
        "rg-cascade", {"location": "West US 2", "tags": {"owner": "kiln"}}
    )
    assert rg.location == "westus2" and rg.tags == {"owner": "kiln"}
    assert rg.properties.provisioning_state == "Succeeded"
    assert resources.resource_groups.check_existence("rg-cascade") is True
    assert resources.resource_groups.check_existence("rg-missing") is False
    with pytest.raises(HttpResponseError) as info:
        resources.resource_groups.create_or_update("rg-cascade", {"location": "eastus"})
    assert info.value.error.code == "InvalidResourceGroupLocation"
    with pytest.raises(HttpResponseError) as info:  # Azure refuses '/' in tag names
        resources.resource_groups.create_or_update(
            "rg-tags", {"location": "eastus", "tags": {"kiln.dev/run": "x"}}
        )
    assert info.value.error.code == "InvalidTagNameCharacters"
    with pytest.raises(HttpResponseError) as info:
        resources.resource_groups.create_or_update("trailing.", {"location": "eastus"})
    assert info.value.error.code == "InvalidResourceGroup"

    build_network(network, "rg-cascade")
    storage.storage_accounts.begin_create(
        "rg-cascade",
        "kilncascade01",
        {"location": LOCATION, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"},
    ).result()
    listed = {r.type for r in resources.resources.list_by_resource_group("rg-cascade")}
    assert listed == {
        "Microsoft.Network/virtualNetworks",
        "Microsoft.Network/networkSecurityGroups",
        "Microsoft.Network/publicIPAddresses",
        "Microsoft.Network/networkInterfaces",
        "Microsoft.Storage/storageAccounts",
    }
    tagged = list(
        resources.resource_groups.list(filter="tagName eq 'owner' and tagValue eq 'kiln'")
    )
    assert [g.name for g in tagged] == ["rg-cascade"]

    poller = resources.resource_groups.begin_delete("rg-cascade")
    assert resources.resource_groups.get("rg-cascade").properties.provisioning_state == "Deleting"
    poller.result()
    assert resources.resource_groups.check_existence("rg-cascade") is False
    assert arm.inventory("rg-cascade") == []
    with pytest.raises(ResourceNotFoundError) as info:
        resources.resource_groups.get("rg-cascade")
    assert info.value.error.code == "ResourceGroupNotFound"
    with pytest.raises(ResourceNotFoundError) as info:
        network.virtual_networks.get("rg-cascade", "vnet")
    assert info.value.error.code == "ResourceGroupNotFound"
    delete_rg = [r for r in arm.requests if r.method == "DELETE" and r.path.endswith("/rg-cascade")]
    assert delete_rg[-1].status == 202


def test_storage_account_create_and_list_keys(
    arm: ArmEmulator, resources: ResourceManagementClient, storage: StorageManagementClient
) -> None:
    rg = group(resources, "rg-storage")
    availability = storage.storage_accounts.check_name_availability(
        {"name": "kilnstore01", "type": "Microsoft.Storage/storageAccounts"}
    )
    assert availability.name_available
    poller = storage.storage_accounts.begin_create(
        rg,
        "kilnstore01",
        {
            "location": LOCATION,
            "sku": {"name": "Standard_LRS"},
            "kind": "StorageV2",
            "tags": {"kiln-run": "r1"},
        },
    )
    account = poller.result()
    assert account.provisioning_state == "Succeeded"
    assert account.primary_endpoints.blob == "http://127.0.0.1:10000/kilnstore01/"
    keys = storage.storage_accounts.list_keys(
        rg, "kilnstore01"
    ).keys_property  # `.keys` is the Mapping method
    assert keys[0].key_name == "key1" and keys[0].value == AZURITE_KEY
    initial = next(r for r in arm.requests if r.method == "PUT" and r.path.endswith("/kilnstore01"))
    assert initial.status == 202  # storage answers 202 + Location, as in Azure
    with pytest.raises(HttpResponseError) as info:
        storage.storage_accounts.begin_create(
            rg,
            "Bad_Name",
            {"location": LOCATION, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"},
        )
    assert info.value.error.code == "AccountNameInvalid"
    other = group(resources, "rg-storage-2")
    with pytest.raises(HttpResponseError) as info:
        storage.storage_accounts.begin_create(
            other,
            "kilnstore01",
            {"location": LOCATION, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"},
        )
    assert info.value.status_code == 409 and info.value.error.code == "StorageAccountAlreadyExists"


def test_network_resources_and_reference_errors(
    arm: ArmEmulator, resources: ResourceManagementClient, network: NetworkManagementClient
) -> None:
    rg = group(resources, "rg-net")
    made = build_network(network, rg)
    assert made["pip"].ip_address.startswith("127.0.2.")
    nic = made["nic"]
    assert nic.ip_configurations[0].private_ip_address.startswith("127.0.3.")
    assert nic.network_security_group.id == made["nsg"].id
    subnet = network.subnets.get(rg, "vnet", "default")
    assert subnet.address_prefix == "10.0.0.0/24" and subnet.ip_configurations[0].id.endswith(
        "/ipconfig1"
    )
    assert network.public_ip_addresses.get(rg, "pip").ip_configuration.id.endswith("/ipconfig1")

    missing = made["vnet"].id + "/subnets/nope"
    with pytest.raises(HttpResponseError) as info:
        network.network_interfaces.begin_create_or_update(
            rg,
            "nic-bad",
            {
                "location": LOCATION,
                "properties": {
                    "ipConfigurations": [{"name": "c", "properties": {"subnet": {"id": missing}}}]
                },
            },
        )
    assert info.value.status_code == 400
    assert info.value.error.code == "InvalidResourceReference"
    assert info.value.error.message == (
        f"Resource {missing} referenced by resource {nic.id.rsplit('/', 1)[0]}/nic-bad was not "
        "found. Please make sure that the referenced resource exists, and that both resources "
        "are in the same region."
    )
    with pytest.raises(HttpResponseError) as info:
        network.public_ip_addresses.begin_create_or_update(
            rg,
            "pip-dyn",
            {
                "location": LOCATION,
                "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Dynamic"},
            },
        )
    assert info.value.error.code == "StandardSkuPublicIPAddressesMustBeStatic"
    with pytest.raises(HttpResponseError) as info:
        network.security_rules.begin_create_or_update(
            rg,
            "nsg",
            "TooLow",
            {
                "properties": {
                    "protocol": "Tcp",
                    "access": "Allow",
                    "direction": "Inbound",
                    "priority": 50,
                    "sourceAddressPrefix": "*",
                    "sourcePortRange": "*",
                    "destinationAddressPrefix": "*",
                    "destinationPortRange": "22",
                }
            },
        )
    assert info.value.error.code == "SecurityRuleInvalidPriority"
    with pytest.raises(HttpResponseError) as info:
        network.subnets.begin_delete(rg, "vnet", "default")
    assert info.value.error.code == "InUseSubnetCannotBeDeleted"
    with pytest.raises(HttpResponseError) as info:
        network.virtual_networks.begin_create_or_update(
            rg,
            "vnet2",
            {
                "location": LOCATION,
                "properties": {
                    "addressSpace": {"addressPrefixes": ["10.1.0.0/16"]},
                    "subnets": [{"name": "s", "properties": {"addressPrefix": "10.2.0.0/24"}}],
                },
            },
        )
    assert info.value.error.code == "NetcfgSubnetRangeOutsideVnet"
    # deleting in dependency order works and releases the addresses
    network.network_interfaces.begin_delete(rg, "nic").result()
    network.public_ip_addresses.begin_delete(rg, "pip").result()
    network.subnets.begin_delete(rg, "vnet", "default").result()
    assert network.virtual_networks.get(rg, "vnet").subnets == []


# --- virtual machines -----------------------------------------------------------------


def test_vm_lifecycle_image_and_gallery_version(
    arm: ArmEmulator,
    backend: RecordingVmBackend,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
) -> None:
    rg = group(resources, "rg-vm")
    made = build_network(network, rg)
    arm.set_lro_duration(0.4, VM_TYPE, "create")

    poller = compute.virtual_machines.begin_create_or_update(rg, "vm1", vm_model(made["nic"].id))
    during = compute.virtual_machines.get(rg, "vm1")
    assert during.provisioning_state == "Creating"
    vm = poller.result()
    assert vm.provisioning_state == "Succeeded"
    assert vm.storage_profile.image_reference.exact_version == "24.04.202411030"
    assert vm.os_profile.admin_username == "kiln" and vm.os_profile.custom_data is None
    first = next(
        r for r in arm.requests if r.method == "PUT" and r.path.endswith("/virtualMachines/vm1")
    )
    assert first.status == 201

    view = compute.virtual_machines.get(rg, "vm1", expand="instanceView").instance_view
    assert [s.code for s in view.statuses] == ["ProvisioningState/succeeded", "PowerState/running"]
    info = arm.vm_info(vm.id)
    assert info.public_ip == made["pip"].ip_address and info.private_ip.startswith("127.0.3.")
    assert info.admin_username == "kiln" and info.ssh_public_keys == [PUBLIC_KEY]
    assert info.custom_data_bytes.startswith(b"#cloud-config")
    assert [c for c, v in backend.calls if v.id == vm.id] == ["create"]

    disk = compute.disks.get(rg, vm.storage_profile.os_disk.name)
    assert disk.managed_by == vm.id and disk.disk_size_gb == 30

    compute.virtual_machines.begin_deallocate(rg, "vm1").result()
    assert power_state(compute, rg, "vm1")[-1] == "PowerState/deallocated"
    grant = compute.disks.begin_grant_access(
        rg, disk.name, {"access": "Read", "durationInSeconds": 3600}
    ).result()
    assert grant.access_sas.startswith("https://md-")
    compute.disks.begin_revoke_access(rg, disk.name).result()
    compute.virtual_machines.generalize(rg, "vm1")
    assert "OSState/generalized" in power_state(compute, rg, "vm1")
    with pytest.raises(HttpResponseError) as info_err:
        compute.virtual_machines.begin_start(rg, "vm1")
    assert info_err.value.error.code == "OperationNotAllowed"

    image = compute.images.begin_create_or_update(
        rg,
        "img1",
        {
            "location": LOCATION,
            "properties": {"sourceVirtualMachine": {"id": vm.id}, "hyperVGeneration": "V2"},
        },
    ).result()
    assert image.provisioning_state == "Succeeded"
    assert image.storage_profile.os_disk.os_state == "Generalized"

    compute.galleries.begin_create_or_update(rg, "kilngallery", {"location": LOCATION}).result()
    definition = compute.gallery_images.begin_create_or_update(
        rg,
        "kilngallery",
        "ubuntu",
        {
            "location": LOCATION,
            "properties": {
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "identifier": {"publisher": "kiln", "offer": "ubuntu", "sku": "24_04"},
            },
        },
    ).result()
    assert definition.provisioning_state == "Succeeded"
    version = compute.gallery_image_versions.begin_create_or_update(
        rg,
        "kilngallery",
        "ubuntu",
        "1.0.0",
        {
            "location": LOCATION,
            "properties": {
                "publishingProfile": {
                    "targetRegions": [
                        {
                            "name": "westus2",
                            "regionalReplicaCount": 1,
                            "storageAccountType": "Standard_LRS",
                        },
                        {
                            "name": "East US",
                            "regionalReplicaCount": 2,
                            "storageAccountType": "Standard_ZRS",
                        },
                    ],
                    "excludeFromLatest": False,
                },
                "storageProfile": {"source": {"id": vm.id}},
            },
        },
    ).result()
    assert version.provisioning_state == "Succeeded"
    regions = {
        r.name: (r.regional_replica_count, r.storage_account_type)
        for r in version.publishing_profile.target_regions
    }
    assert regions == {"westus2": (1, "Standard_LRS"), "eastus": (2, "Standard_ZRS")}
    status = compute.gallery_image_versions.get(
        rg, "kilngallery", "ubuntu", "1.0.0", expand="ReplicationStatus"
    )
    assert status.replication_status.aggregated_state == "Completed"
    assert [
        v.name
        for v in compute.gallery_image_versions.list_by_gallery_image(rg, "kilngallery", "ubuntu")
    ] == ["1.0.0"]
    with pytest.raises(HttpResponseError) as info_err:
        compute.gallery_image_versions.begin_create_or_update(
            rg,
            "kilngallery",
            "ubuntu",
            "1.0.1",
            {
                "location": LOCATION,
                "properties": {
                    "publishingProfile": {"targetRegions": [{"name": "eastus"}]},
                    "storageProfile": {"source": {"id": image.id}},
                },
            },
        )
    assert info_err.value.error.code == "InvalidParameter"

    compute.virtual_machines.begin_delete(rg, "vm1").result()
    assert [c for c, v in backend.calls if v.id == vm.id] == [
        "create",
        "deallocate",
        "generalize",
        "delete",
    ]
    with pytest.raises(ResourceNotFoundError):
        compute.disks.get(rg, disk.name)  # deleteOption Delete took the OS disk along
    assert arm.creation_count(vm.id) == 1

    # a VM from the gallery definition picks the latest version in its region
    nic2 = network.network_interfaces.begin_create_or_update(
        rg,
        "nic2",
        {
            "location": LOCATION,
            "properties": {
                "ipConfigurations": [
                    {"name": "c", "properties": {"subnet": {"id": made["vnet"].subnets[0].id}}}
                ]
            },
        },
    ).result()
    from_gallery = compute.virtual_machines.begin_create_or_update(
        rg, "vm2", vm_model(nic2.id, image=cm.ImageReference(id=definition.id))
    ).result()
    assert from_gallery.provisioning_state == "Succeeded"
    assert arm.vm_info(from_gallery.id).public_ip is None


def test_marketplace_versions(compute: ComputeManagementClient) -> None:
    versions = compute.virtual_machine_images.list(
        LOCATION, "Canonical", "ubuntu-24_04-lts", "server"
    )
    names = [v.name for v in versions]
    assert names == ["24.04.202409120", "24.04.202410010", "24.04.202411030"]
    newest = compute.virtual_machine_images.list(
        LOCATION, "Canonical", "ubuntu-24_04-lts", "server", top=1, orderby="name desc"
    )
    assert [v.name for v in newest] == ["24.04.202411030"]
    one = compute.virtual_machine_images.get(
        LOCATION, "Canonical", "ubuntu-24_04-lts", "server", "24.04.202410010"
    )
    assert one.os_disk_image.operating_system == "Linux" and one.hyper_v_generation == "V2"
    skus = compute.virtual_machine_images.list_skus(LOCATION, "Debian", "debian-12")
    assert [s.name for s in skus] == ["12-gen2"]
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machine_images.get(
            LOCATION, "Canonical", "ubuntu-24_04-lts", "server", "1.0.0"
        )


def test_sku_not_available_and_vm_validation(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
) -> None:
    rg = group(resources, "rg-sku")
    nic = build_network(network, rg, public_ip=False)["nic"]
    with pytest.raises(HttpResponseError) as info:
        compute.virtual_machines.begin_create_or_update(
            rg, "vm-big", vm_model(nic.id, size="Standard_D4s_v5")
        )
    assert info.value.status_code == 409 and info.value.error.code == "SkuNotAvailable"
    skus = {
        s.name: s.restrictions
        for s in compute.resource_skus.list(filter=f"location eq '{LOCATION}'")
    }
    assert (
        skus["Standard_D2s_v5"] == []
        and skus["Standard_D4s_v5"][0].reason_code == "NotAvailableForSubscription"
    )

    bad = vm_model(nic.id)
    bad.os_profile.linux_configuration.ssh.public_keys[0].path = "/root/.ssh/authorized_keys"
    err = refused(compute, rg, bad)
    assert (
        err.error.code == "InvalidParameter"
        and err.error.target == "linuxConfiguration.ssh.publicKeys.path"
    )
    bad = vm_model(nic.id, user="root")
    assert refused(compute, rg, bad).error.message == "The Admin Username specified is not allowed."
    bad = vm_model(nic.id)
    bad.os_profile.linux_configuration.ssh.public_keys = []
    assert "SSH or by user name and password" in refused(compute, rg, bad).error.message
    bad = vm_model(
        nic.id,
        image=cm.ImageReference(publisher="Canonical", offer="nope", sku="x", version="latest"),
    )
    err = refused(compute, rg, bad)
    assert err.status_code == 404 and err.error.code == "PlatformImageNotFound"
    plan_image = cm.ImageReference(
        publisher="center-for-internet-security-inc",
        offer="cis-ubuntu-linux-2204-l1",
        sku="cis-ubuntu2204-l1-gen2",
        version="latest",
    )
    assert (
        refused(compute, rg, vm_model(nic.id, image=plan_image)).error.code
        == "VMMarketplaceInvalidInput"
    )
    bad = vm_model(nic.id)
    bad.network_profile.network_interfaces[0].id = nic.id + "-missing"
    assert refused(compute, rg, bad).error.code == "NotFound"
    assert (
        arm.creation_count(
            nic.id.rsplit("/", 3)[0] + "/providers/Microsoft.Compute/virtualMachines/vm-bad"
        )
        == 0
    )


def test_data_disks_and_user_assigned_identities_of_a_vm(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
) -> None:
    rg = group(resources, "rg-disks")
    nic = build_network(network, rg, public_ip=False)["nic"]
    identity = create_identity(arm, rg, "builder", LOCATION)
    assert identity.properties["principalId"] and identity.properties["clientId"]

    def with_disks(*disks: cm.DataDisk, identities: tuple[str, ...] = ()) -> cm.VirtualMachine:
        model = vm_model(nic.id)
        model.storage_profile.data_disks = list(disks)
        if identities:
            model.identity = cm.VirtualMachineIdentity(
                type="UserAssigned", user_assigned_identities={i: {} for i in identities}
            )
        return model

    empty = {"create_option": "Empty", "disk_size_gb": 2}
    err = refused(compute, rg, with_disks(cm.DataDisk(lun=0, **empty), cm.DataDisk(lun=0, **empty)))
    assert (err.status_code, err.error.code) == (400, "InvalidParameter")
    err = refused(compute, rg, with_disks(cm.DataDisk(lun=0, create_option="Empty")))
    assert err.error.target == "dataDisk.diskSizeGB"
    err = refused(compute, rg, with_disks(cm.DataDisk(lun=0, create_option="FromImage")))
    assert "has no data disk at that LUN" in err.error.message
    err = refused(compute, rg, with_disks(*(cm.DataDisk(lun=lun, **empty) for lun in range(5))))
    assert (err.status_code, err.error.code) == (409, "OperationNotAllowed")
    missing = identity.id.replace("/builder", "/nobody")
    err = refused(compute, rg, with_disks(identities=(missing,)))
    assert (err.status_code, err.error.code) == (400, "FailedIdentityOperation")
    assert f"Resource '{missing}' was not found" in err.error.message

    vm = compute.virtual_machines.begin_create_or_update(
        rg,
        "vm-disks",
        with_disks(
            cm.DataDisk(lun=0, delete_option="Delete", **empty),
            cm.DataDisk(lun=1, create_option="Empty", disk_size_gb=3, caching="ReadWrite"),
            identities=(identity.id,),
        ),
    ).result()
    disks = vm.storage_profile.data_disks
    assert [(d.lun, d.disk_size_gb, d.caching) for d in disks] == [
        (0, 2, "None"),
        (1, 3, "ReadWrite"),
    ]
    made = [compute.disks.get(rg, d.name) for d in disks]
    assert [(d.disk_size_gb, d.creation_data.create_option) for d in made] == [
        (2, "Empty"),
        (3, "Empty"),
    ]
    assert all(d.managed_by.lower() == vm.id.lower() for d in made)
    assigned = vm.identity.user_assigned_identities[identity.id]
    assert assigned.principal_id == identity.properties["principalId"]
    assert arm.vm_info(vm.id).identities == [identity.id]
    assert [d.lun for d in arm.vm_info(vm.id).data_disks] == [0, 1]

    compute.virtual_machines.begin_delete(rg, "vm-disks").result()
    with pytest.raises(ResourceNotFoundError):  # deleteOption Delete
        compute.disks.get(rg, disks[0].name)
    kept = compute.disks.get(rg, disks[1].name)  # Detach, Azure's default
    assert kept.managed_by is None and kept.disk_state == "Unattached"
    compute.disks.begin_delete(rg, disks[1].name).result()


def test_poller_resumed_from_continuation_token_in_new_client(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
) -> None:
    rg = group(resources, "rg-token")
    nic = build_network(network, rg)["nic"]
    arm.set_lro_duration(0.5, VM_TYPE)
    poller = compute.virtual_machines.begin_create_or_update(rg, "vm-resume", vm_model(nic.id))
    token = poller.continuation_token()
    del poller  # the operator restarts: only the token survives (in the run's status)

    fresh = ComputeManagementClient(arm.credential(), arm.subscription_id, **arm.client_kwargs())
    resumed = fresh.virtual_machines.begin_create_or_update(
        rg, "vm-resume", None, continuation_token=token
    )
    vm = resumed.result()
    assert vm.provisioning_state == "Succeeded" and vm.name == "vm-resume"
    assert arm.creation_count(vm.id) == 1
    delete = fresh.virtual_machines.begin_delete(rg, "vm-resume")
    again = ComputeManagementClient(arm.credential(), arm.subscription_id, **arm.client_kwargs())
    again.virtual_machines.begin_delete(
        rg, "vm-resume", continuation_token=delete.continuation_token()
    ).result()
    with pytest.raises(ResourceNotFoundError):
        compute.virtual_machines.get(rg, "vm-resume")


def test_sdk_retries_complete_a_vm_under_30_percent_faults(
    arm: ArmEmulator, resources: ResourceManagementClient
) -> None:
    fast = {"retry_backoff_factor": 0.02, "retry_backoff_max": 0.2, "retry_total": 12}
    net = arm.client(NetworkManagementClient, **fast)
    comp = arm.client(ComputeManagementClient, **fast)
    rg = group(resources, "rg-faults")
    arm.requests  # noqa: B018
    before = len(arm.requests)
    arm.set_failure_rate(0.3, statuses=(429, 500, 503), retry_after=0.05, seed=11)
    nic = build_network(net, rg)["nic"]
    vm = comp.virtual_machines.begin_create_or_update(rg, "vm-flaky", vm_model(nic.id)).result()
    arm.clear_faults()
    assert vm.provisioning_state == "Succeeded"
    log = arm.requests[before:]
    injected = [r for r in log if r.injected]
    assert len(injected) >= 3, "the fault rate should have bitten"
    assert {r.status for r in injected} <= {429, 500, 503}
    assert arm.creations(VM_TYPE)[vm.id] == 1  # exactly one VM was ever created


def test_fail_next_gives_the_sdk_the_exact_error(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
) -> None:
    rg = group(resources, "rg-failnext")
    nic = build_network(network, rg)["nic"]
    message = (
        "Operation could not be completed as it results in exceeding approved "
        "standardDSv5Family Cores quota."
    )
    arm.fail_next("PUT", r"/virtualMachines/vm-quota$", 409, "OperationNotAllowed", message)
    with pytest.raises(HttpResponseError) as info:
        compute.virtual_machines.begin_create_or_update(rg, "vm-quota", vm_model(nic.id))
    assert info.value.status_code == 409
    assert info.value.error.code == "OperationNotAllowed" and info.value.error.message == message

    # the request is accepted, the long-running operation fails (allocation failure)
    arm.fail_next(
        "PUT",
        r"/virtualMachines/vm-alloc$",
        409,
        "AllocationFailed",
        "Allocation failed. We do not have sufficient capacity for the requested VM size in "
        "this region.",
        stage="operation",
    )
    poller = compute.virtual_machines.begin_create_or_update(rg, "vm-alloc", vm_model(nic.id))
    with pytest.raises(HttpResponseError) as info:
        poller.result()
    assert info.value.error.code == "AllocationFailed"
    assert compute.virtual_machines.get(rg, "vm-alloc").provisioning_state == "Failed"

    # the response is lost after the VM was accepted: the SDK's retry is idempotent
    arm.fail_next("PUT", r"/virtualMachines/vm-lost$", 500, stage="response")
    compute.virtual_machines.begin_delete(rg, "vm-alloc").result()
    vm = compute.virtual_machines.begin_create_or_update(rg, "vm-lost", vm_model(nic.id)).result()
    assert vm.provisioning_state == "Succeeded"
    assert arm.creation_count(vm.id) == 1
    # a second operation while one runs: 409 AnotherOperationInProgress (retryable)
    arm.set_lro_duration(0.5, VM_TYPE, "deallocate")
    no_retry = arm.client(ComputeManagementClient, retry_total=0)
    running = compute.virtual_machines.begin_deallocate(rg, "vm-lost")
    with pytest.raises(HttpResponseError) as info:
        no_retry.virtual_machines.begin_power_off(rg, "vm-lost")
    assert info.value.status_code == 409 and info.value.error.code == "AnotherOperationInProgress"
    assert "Retry-After" in info.value.response.headers
    running.result()
    inv = {i.id: i for i in arm.inventory(rg)}
    assert inv[vm.id].provisioning_state == "Succeeded" and inv[vm.id].tags == {
        "kiln-template": "t1"
    }


def test_default_azure_credential_from_environment(
    arm: ArmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.identity import DefaultAzureCredential

    for name in (
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_AUTHORITY_HOST",
    ):
        monkeypatch.setenv(name, arm.environment()[name])
    credential = DefaultAzureCredential(
        disable_instance_discovery=True, connection_verify=str(arm.ca_path)
    )
    client = arm.client(ResourceManagementClient, credential=credential)
    assert (
        client.resource_groups.create_or_update("rg-dac", {"location": "eastus"}).name == "rg-dac"
    )


# --- by hand: python -m fakes.arm --------------------------------------------------------


def _serve(state_dir: Path, port: int = 0) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    tests_dir = Path(__file__).resolve().parents[1]
    conn = state_dir / "connection.json"
    conn.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fakes.arm",
            *("--port", str(port), "--state-dir", str(state_dir)),
            *("--lro-duration", "1", "--retry-after", "1"),
        ],
        env={**os.environ, "PYTHONPATH": str(tests_dir)},
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not conn.exists():
        assert proc.poll() is None, "the emulator exited"
        assert time.monotonic() < deadline, "the emulator did not start"
        time.sleep(0.05)
    return proc, json.loads(conn.read_text())


def test_cli_state_and_pollers_survive_a_restart(tmp_path: Path) -> None:
    proc, info = _serve(tmp_path)
    try:
        credential = ClientSecretCredential(
            info["tenant_id"],
            info["client_id"],
            info["client_secret"],
            authority=info["url"],
            disable_instance_discovery=True,
            connection_verify=info["ca_path"],
        )
        options = {
            "base_url": info["url"],
            "credential_scopes": [info["credential_scope"]],
            "connection_verify": info["ca_path"],
        }
        rc = ResourceManagementClient(credential, info["subscription_id"], **options)
        net = NetworkManagementClient(credential, info["subscription_id"], **options)
        rc.resource_groups.create_or_update("rg-cli", {"location": "eastus"})
        poller = net.virtual_networks.begin_create_or_update(
            "rg-cli",
            "vnet",
            {
                "location": "eastus",
                "properties": {"addressSpace": {"addressPrefixes": ["10.9.0.0/16"]}},
            },
        )
        token = poller.continuation_token()
    finally:
        proc.terminate()
        proc.wait(10)
    port = int(info["url"].rsplit(":", 1)[1])
    proc, again = _serve(tmp_path, port)
    try:
        assert again["url"] == info["url"] and again["client_secret"] == info["client_secret"]
        resumed = NetworkManagementClient(credential, info["subscription_id"], **options)
        vnet = resumed.virtual_networks.begin_create_or_update(
            "rg-cli", "vnet", None, continuation_token=token
        ).result()
        assert vnet.provisioning_state == "Succeeded"
        assert rc.resource_groups.check_existence("rg-cli")  # same cached token still accepted
    finally:
        proc.terminate()
        proc.wait(10)
