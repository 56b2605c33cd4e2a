"""The staging resource group and its storage account (scripts and logs, as AIB's)."""

from __future__ import annotations

import hashlib

from kiln.providers.azure import operations as ops
from kiln.providers.azure.clients import AzureClients
from kiln.providers.azure.resources import GROUP, STORAGE, TEMPLATE_TAG, Spec, tags
from kiln.providers.base import ProviderError, RunContext


def storage_account_name(template_uid: str) -> str:
    """3-24 lowercase letters and digits, unique per template (accounts are global)."""
    return "kiln" + hashlib.sha256(template_uid.encode()).hexdigest()[:20]


def specs(ctx: RunContext, group: str) -> list[Spec]:
    """The group, then its account; both the template's (they outlive its runs)."""
    account = {
        "sku": {"name": "Standard_LRS"},
        "kind": "StorageV2",
        "properties": {"minimumTlsVersion": "TLS1_2", "allowBlobPublicAccess": False},
    }
    return [
        Spec(
            GROUP,
            (group,),
            tags(ctx, "staging", run=False),
            ctx.spec.location,
            key="group",
            what="creating the staging resource group",
        ),
        Spec(
            STORAGE,
            (group, storage_account_name(ctx.template.uid)),
            tags(ctx, "staging-storage", run=False),
            ctx.spec.location,
            lambda: account,
            key="storage",
            what="creating the staging storage account",
            needs=("group",),
        ),
    ]


async def check_free(clients: AzureClients, group: str, template_uid: str) -> None:
    """A group that exists must be this template's, or empty (spec.stagingResourceGroup)."""
    groups = clients.resource.resource_groups
    if not await ops.call(groups.check_existence(group)):
        return
    current = await ops.call(groups.get(group))
    found = (current.tags or {}).get(TEMPLATE_TAG)
    if found == template_uid:
        return
    resources = [r async for r in clients.resource.resources.list_by_resource_group(group)]
    if found is not None or resources:
        raise ProviderError(
            f"staging resource group {group} is not empty and not this template's; "
            "spec.stagingResourceGroup must name an empty or new group"
        )
