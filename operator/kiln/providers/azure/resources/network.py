"""The build VM's network: with no vnetConfig a virtual network, an NSG that lets in
only the communicator port, a Standard public IP and a NIC; with vnetConfig.subnetId a
NIC in that subnet only (private IP)."""

from __future__ import annotations

from typing import Any

from kiln.providers.azure.resources import IP, NIC, NSG, VNET, Kind, Spec, tags
from kiln.providers.base import RunContext


def name(ctx: RunContext, kind: str) -> str:
    """The name of a run's build resource (vnet, nsg, pip, nic, vm, osdisk)."""
    return f"kiln-{ctx.run_uid[:8]}-{kind}"


def specs(ctx: RunContext, staging_id: str, source: str, port: int) -> list[Spec]:
    """In build order; source: the address prefix the NSG lets reach the port."""
    group, prefix = staging_id.rsplit("/", 1)[-1], f"{staging_id}/providers/Microsoft.Network"

    def spec(kind: Kind, key: str, what: str, body: dict[str, Any], *needs: str) -> Spec:
        path = (group, name(ctx, key))
        return Spec(
            kind, path, tags(ctx, "network"), ctx.spec.location, lambda: body, key, what, needs
        )

    vnet_config = ctx.spec.vm_profile.vnet_config if ctx.spec.vm_profile else None
    if vnet_config and vnet_config.subnet_id:
        ip_configuration = {"subnet": {"id": vnet_config.subnet_id}}
        return [
            spec(NIC, "nic", "creating the build VM's network interface", _nic(ip_configuration))
        ]
    rule = {
        "protocol": "Tcp",
        "access": "Allow",
        "direction": "Inbound",
        "priority": 100,
        "sourceAddressPrefix": source,
        "sourcePortRange": "*",
        "destinationAddressPrefix": "*",
        "destinationPortRange": str(port),
    }
    subnet = {"name": "build", "properties": {"addressPrefix": "10.0.0.0/24"}}
    space = {"addressPrefixes": ["10.0.0.0/24"]}
    ip_configuration = {
        "subnet": {"id": f"{prefix}/virtualNetworks/{name(ctx, 'vnet')}/subnets/build"},
        "publicIPAddress": {"id": f"{prefix}/publicIPAddresses/{name(ctx, 'pip')}"},
    }
    nsg_id = f"{prefix}/networkSecurityGroups/{name(ctx, 'nsg')}"
    network = "creating the build network"
    return [
        spec(VNET, "vnet", network, {"properties": {"addressSpace": space, "subnets": [subnet]}}),
        spec(
            NSG,
            "nsg",
            network,
            {"properties": {"securityRules": [{"name": "AllowCommunicator", "properties": rule}]}},
        ),
        spec(
            IP,
            "pip",
            network,
            {"sku": {"name": "Standard"}, "properties": {"publicIPAllocationMethod": "Static"}},
        ),
        spec(
            NIC,
            "nic",
            "creating the build VM's network interface",
            _nic(ip_configuration, networkSecurityGroup={"id": nsg_id}),
            "vnet",
            "nsg",
            "pip",
        ),
    ]


def _nic(ip_configuration: dict[str, Any], **properties: Any) -> dict[str, Any]:
    configuration = {"privateIPAllocationMethod": "Dynamic", **ip_configuration}
    return {
        "properties": {
            **properties,
            "ipConfigurations": [{"name": "build", "properties": configuration}],
        }
    }


def nic_id(staging_id: str, ctx: RunContext) -> str:
    return f"{staging_id}/providers/Microsoft.Network/networkInterfaces/{name(ctx, 'nic')}"
