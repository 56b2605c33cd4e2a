"""Azure resources that tests create themselves, through the real SDK clients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from kubernetes import client as kube_client
from kubernetes import config

from conftest import OperatorProcess
from kubehelpers import template

WINDOWS_SERVER_2022 = {
    "type": "PlatformImage",
    "publisher": "MicrosoftWindowsServer",
    "offer": "WindowsServer",
    "sku": "2022-datacenter-azure-edition",
    "version": "latest",
}

SSH_RULE = {
    "name": "AllowSSH",
    "properties": {
        "protocol": "Tcp",
        "access": "Allow",
        "direction": "Inbound",
        "priority": 100,
        "sourceAddressPrefix": "*",
        "sourcePortRange": "*",
        "destinationAddressPrefix": "*",
        "destinationPortRange": "22",
    },
}


def vnet_and_nsg(network: NetworkManagementClient, rg: str, location: str) -> tuple[Any, Any]:
    """A vnet with one subnet and an NSG admitting SSH."""
    vnet = network.virtual_networks.begin_create_or_update(
        rg,
        "vnet",
        {
            "location": location,
            "properties": {
                "addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
                "subnets": [{"name": "default", "properties": {"addressPrefix": "10.0.0.0/24"}}],
            },
        },
    ).result()
    nsg = network.network_security_groups.begin_create_or_update(
        rg, "nsg", {"location": location, "properties": {"securityRules": [SSH_RULE]}}
    ).result()
    return vnet, nsg


def create_gallery(
    arm: Any, group: str, gallery: str, definition: str, location: str, os_type: str = "Linux"
) -> dict[str, str]:
    """A resource group with a gallery and an image definition: where AIB publishes."""
    arm.client(ResourceManagementClient).resource_groups.create_or_update(
        group, {"location": location}
    )
    compute = arm.client(ComputeManagementClient)
    compute.galleries.begin_create_or_update(group, gallery, {"location": location}).result()
    properties = {
        "osType": os_type,
        "osState": "Generalized",
        "hyperVGeneration": "V2",
        "identifier": {"publisher": "kiln", "offer": definition, "sku": "1"},
    }
    compute.gallery_images.begin_create_or_update(
        group, gallery, definition, {"location": location, "properties": properties}
    ).result()
    prefix = f"/subscriptions/{arm.subscription_id}/resourceGroups/{group}/providers"
    return {
        "image": f"{prefix}/Microsoft.Compute/images/{definition}",
        "gallery": f"{prefix}/Microsoft.Compute/galleries/{gallery}/images/{definition}",
    }


def create_identity(arm: Any, group: str, name: str, location: str) -> Any:
    """A user-assigned managed identity (there is no azure-mgmt-msi here: the generic
    resources API PUTs it, as `az resource create` would)."""
    resource = arm.client(ResourceManagementClient)
    resource.resource_groups.create_or_update(group, {"location": location})
    prefix = f"/subscriptions/{arm.subscription_id}/resourceGroups/{group}/providers"
    identity_id = f"{prefix}/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    return resource.resources.begin_create_or_update_by_id(
        identity_id, {"location": location}, api_version="2023-01-31"
    ).result()


# What a Kiln build creates in Azure and its cleanup must remove (the leak checks).
BUILD_RESOURCE_TYPES = {
    "Microsoft.Compute/virtualMachines",
    "Microsoft.Compute/disks",
    "Microsoft.Network/networkInterfaces",
    "Microsoft.Network/publicIPAddresses",
    "Microsoft.Network/networkSecurityGroups",
    "Microsoft.Network/virtualNetworks",
    "Microsoft.KeyVault/vaults",
}


def operator_settings(arm: Any, namespace: str, location: str) -> dict[str, str]:
    """An operator's environment for the emulator, as it would be set for Azure."""
    credentials = {k: v for k, v in arm.environment().items() if k.startswith("AZURE_")}
    return {
        "KILN_NAMESPACES": namespace,
        "KILN_DEFAULT_PROVIDER": "azure",
        "KILN_AZURE_ARM_ENDPOINT": arm.url,
        "KILN_AZURE_AUTHORITY": arm.url,
        "KILN_AZURE_CA_BUNDLE": str(arm.ca_path),
        "KILN_SUBSCRIPTION_ID": arm.subscription_id,
        "KILN_LOCATION": location,
        "KILN_RESOURCE_GROUP": "images",
        "KILN_AZURE_COMMUNICATOR_SOURCE": "127.0.0.0/8",
        # The tests' file server is on loopback; the other default ranges stay blocked.
        "KILN_DOWNLOAD_BLOCKED_RANGES": "169.254.0.0/16,168.63.129.16/32,fe80::/10",
        **credentials,
    }


def managed_image_target(image_id: str, location: str) -> dict[str, str]:
    """A ManagedImage distributor with runOutputName 'image'."""
    return {
        "type": "ManagedImage",
        "runOutputName": "image",
        "imageId": image_id,
        "location": location,
    }


def windows_template(
    arm: Any, name: str, group: str, gallery: str, location: str
) -> dict[str, Any]:
    """The quickest whole azure build: a Windows VM (a WinRM guest) to a managed image."""
    ids = create_gallery(arm, group, gallery, name, location, os_type="Windows")
    manifest = template(
        name,
        source=WINDOWS_SERVER_2022,
        customize=[],
        distribute=[managed_image_target(ids["image"], location)],
    )
    manifest["spec"]["provider"] = "azure"
    return manifest


@contextlib.contextmanager
def emulator_operator(
    control_plane: Any, arm: Any, namespace: str, location: str, data: Path
) -> Iterator[OperatorProcess]:
    """An operator process for one namespace, configured for the emulator as for Azure."""
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        core = kube_client.CoreV1Api(api)
        if namespace not in [n.metadata.name for n in core.list_namespace().items]:
            core.create_namespace({"metadata": {"name": namespace}})
    process = OperatorProcess(
        control_plane.kubeconfig,
        data,
        data / "operator.log",
        **operator_settings(arm, namespace, location),
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
