"""A Windows build's Key Vault: the WinRM certificate the VM agent installs, as Packer's
azure-arm builder does it. Per run; deleted and purged with the run (resources.delete)."""

from __future__ import annotations

import hashlib

from kiln.communicators.winrm import key_vault_certificate
from kiln.providers.azure import operations as ops
from kiln.providers.azure.clients import AzureClients
from kiln.providers.azure.resources import VAULT, Spec, tags
from kiln.providers.base import RunContext

SECRET = "winrm-certificate"


def vault_name(run_uid: str) -> str:
    """3-24 characters starting with a letter, unique per run (vault names are global)."""
    return "kiln" + hashlib.sha256(run_uid.encode()).hexdigest()[:20]


def spec(ctx: RunContext, group: str, tenant: str = "") -> Spec:
    """tenant: the Entra tenant the vault trusts (needed only to create it)."""
    return Spec(
        VAULT,
        (group, vault_name(ctx.run_uid)),
        tags(ctx, "winrm-vault"),
        ctx.spec.location,
        lambda: {
            "properties": {
                "tenantId": tenant,
                "sku": {"family": "A", "name": "standard"},
                "accessPolicies": [],
                "enabledForDeployment": True,
                "softDeleteRetentionInDays": 7,
            }
        },
        key="vault",
        what="creating the Key Vault for the WinRM certificate",
    )


async def store_certificate(ctx: RunContext, clients: AzureClients, group: str) -> str:
    """The certificate's versioned secret URL, saved in the checkpoint (one version)."""
    assert ctx.winrm is not None
    if ctx.checkpoint.azure.winrm_certificate_url is None:
        secret = await ops.call(
            clients.keyvault.secrets.create_or_update(
                group,
                vault_name(ctx.run_uid),
                SECRET,
                {
                    "properties": {
                        "value": key_vault_certificate(ctx.winrm),
                        "contentType": "application/x-pkcs12",
                    }
                },
            )
        )
        ctx.checkpoint.azure.winrm_certificate_url = secret.properties.secret_uri_with_version
    return ctx.checkpoint.azure.winrm_certificate_url
