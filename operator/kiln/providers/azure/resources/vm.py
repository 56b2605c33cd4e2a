"""The build VM: Linux with a per-run SSH key and a host key through cloud-init, Windows
with a per-run password and a WinRM HTTPS listener on a Key Vault certificate."""

from __future__ import annotations

import base64
from typing import Any

import yaml

from kiln.api.template import ImageTemplateSpec, PlatformImageSource
from kiln.communicators.winrm import WINRM_HTTPS_PORT
from kiln.naming import BUILD_COMPUTER_NAME
from kiln.providers.azure.resources import VAULT, VM, Spec, tags
from kiln.providers.azure.resources.network import name, nic_id
from kiln.providers.azure.resources.vault import vault_name
from kiln.providers.base import RunContext

BUILD_USER = "packer"
SSH_PORT = 22


def port(ctx: RunContext) -> int:
    return WINRM_HTTPS_PORT if ctx.windows else SSH_PORT


def generation(ctx: RunContext) -> str:
    """The source image's Hyper-V generation, as resolved (V1 when Azure names none)."""
    return ctx.checkpoint.azure.hyper_v_generation or "V1"


def vm_size(ctx: RunContext) -> str:
    """AIB's defaults: Standard_D1_v2 for Gen1 images, Standard_D2ds_v4 for Gen2."""
    profile = ctx.spec.vm_profile
    if profile and profile.vm_size:
        return profile.vm_size
    return "Standard_D2ds_v4" if generation(ctx) == "V2" else "Standard_D1_v2"


def _custom_data(ctx: RunContext) -> str:
    """cloud-init: the host key Kiln generated, so the VM is verified, never trusted."""
    config = {
        "ssh_deletekeys": True,
        "ssh_keys": {
            "ed25519_private": ctx.host_private_key,
            "ed25519_public": ctx.host_public_key,
        },
    }
    document = "#cloud-config\n" + yaml.safe_dump(config)
    return base64.b64encode(document.encode()).decode()


def _os_profile(ctx: RunContext, vault_id: str) -> dict[str, Any]:
    """Linux: key login only, host key via cloud-init. Windows: password login over
    a WinRM HTTPS listener whose certificate the VM agent installs from Key Vault."""
    if not ctx.windows:
        return {
            "computerName": BUILD_COMPUTER_NAME,
            "adminUsername": BUILD_USER,
            "customData": _custom_data(ctx),
            "linuxConfiguration": {
                "disablePasswordAuthentication": True,
                "ssh": {
                    "publicKeys": [
                        {
                            "path": f"/home/{BUILD_USER}/.ssh/authorized_keys",
                            "keyData": ctx.client_public_key,
                        }
                    ]
                },
            },
        }
    assert ctx.winrm is not None
    certificate_url = ctx.checkpoint.azure.winrm_certificate_url
    return {
        "computerName": BUILD_COMPUTER_NAME,
        "adminUsername": BUILD_USER,
        "adminPassword": ctx.winrm.password.get_secret_value(),
        "secrets": [
            {
                "sourceVault": {"id": vault_id},
                "vaultCertificates": [
                    {"certificateUrl": certificate_url, "certificateStore": "My"}
                ],
            }
        ],
        "windowsConfiguration": {
            "provisionVMAgent": True,
            "enableAutomaticUpdates": False,
            "winRM": {"listeners": [{"protocol": "Https", "certificateUrl": certificate_url}]},
        },
    }


def identities(spec: ImageTemplateSpec) -> list[str]:
    """What AIB puts on the build VM: the template's user-assigned identity, then
    vmProfile.userAssignedIdentities (ARM IDs compare case-insensitively)."""
    named = [
        *((spec.identity.user_assigned_identities or {}) if spec.identity else {}),
        *((spec.vm_profile.user_assigned_identities if spec.vm_profile else None) or []),
    ]
    unique: dict[str, str] = {}
    for identity in named:
        unique.setdefault(identity.lower(), identity)
    return list(unique.values())


def data_disks(ctx: RunContext) -> list[dict[str, Any]]:
    """additionalDataDisks as empty managed disks at the LUNs after the source image's own
    data disks (Azure adds those itself); they go with the VM, and capture takes them into
    the image beside the OS disk."""
    first = max(ctx.checkpoint.azure.source_data_disk_luns, default=-1) + 1
    return [
        {
            "lun": lun,
            "name": name(ctx, f"datadisk{lun}"),
            "createOption": "Empty",
            "diskSizeGB": disk.size_gb,
            "deleteOption": "Delete",
            "managedDisk": {"storageAccountType": "Standard_LRS"},
        }
        for lun, disk in enumerate(ctx.spec.additional_data_disks or [], start=first)
    ]


def _body(ctx: RunContext, staging_id: str, vault_id: str) -> dict[str, Any]:
    profile = ctx.spec.vm_profile
    os_disk: dict[str, Any] = {
        "name": name(ctx, "osdisk"),
        "createOption": "FromImage",
        "deleteOption": "Delete",
        "managedDisk": {"storageAccountType": "Standard_LRS"},
    }
    if profile and profile.os_disk_size_gb:
        os_disk["diskSizeGB"] = profile.os_disk_size_gb
    body: dict[str, Any] = {
        "properties": {
            "hardwareProfile": {"vmSize": vm_size(ctx)},
            "storageProfile": {
                "imageReference": ctx.checkpoint.azure.image_reference,
                "osDisk": os_disk,
                "dataDisks": data_disks(ctx),
            },
            "osProfile": _os_profile(ctx, vault_id),
            "networkProfile": {
                "networkInterfaces": [
                    {"id": nic_id(staging_id, ctx), "properties": {"primary": True}}
                ]
            },
        },
    }
    source = ctx.spec.source
    if isinstance(source, PlatformImageSource) and source.plan_info:
        plan = source.plan_info
        body["plan"] = {
            "name": plan.plan_name,
            "product": plan.plan_product,
            "publisher": plan.plan_publisher,
        }
    if assigned := identities(ctx.spec):
        body["identity"] = {
            "type": "UserAssigned",
            "userAssignedIdentities": {identity: {} for identity in assigned},
        }
    return body


def spec(ctx: RunContext, staging_id: str) -> Spec:
    """Its OS disk goes with it (deleteOption Delete)."""
    vault_id = f"{staging_id}/providers/{VAULT.type}/{vault_name(ctx.run_uid)}"
    return Spec(
        VM,
        (staging_id.rsplit("/", 1)[-1], name(ctx, "vm")),
        tags(ctx, "build-vm"),
        ctx.spec.location,
        lambda: _body(ctx, staging_id, vault_id),
        key="vm",
        what="creating the build VM",
    )
