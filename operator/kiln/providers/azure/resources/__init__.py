"""Azure resources as small specs over one generic ensure and delete (CAPZ's services).

A spec names one resource (kind, path: group and name(s)), its body and Kiln's tags.
ensure() starts every spec whose dependencies are done, saves each continuation token in
the run's checkpoint and polls it on later passes (operations.track); delete() removes
specs in the order given, each only when its tags say Kiln made it for this owner: the
one place that decides what Kiln may delete.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln.providers.azure import operations as ops
from kiln.providers.azure.clients import AzureClients
from kiln.providers.base import ProviderError, RunContext

ROLE_TAG, TEMPLATE_TAG, RUN_TAG = "kiln-role", "kiln-template-uid", "kiln-run-uid"
_ARM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/(?P<ns>[^/]+)/"
    r"(?P<rest>.+)$",
    re.I,
)


def parse_id(resource_id: str) -> tuple[str, str, list[str]]:
    """(subscription, resource group, [type, name, type, name, ...]) of an ARM ID."""
    match = _ARM_ID.match(resource_id)
    if not match:
        raise ProviderError(f"{resource_id!r} is not an Azure resource ID")
    return match["sub"], match["rg"], match["rest"].split("/")


@dataclass(frozen=True)
class Kind:
    """An ARM resource type and its SDK operation group; begin_* methods are long-running."""

    type: str
    operations: Callable[[AzureClients], Any]
    create: str = "begin_create_or_update"
    delete: str = "begin_delete"
    get: str = "get"


@dataclass(frozen=True)
class Spec:
    """One resource: path is what the SDK's calls take before the body (group, name...)."""

    kind: Kind
    path: tuple[str, ...]
    tags: dict[str, str]
    location: str | None = None
    body: Callable[[], dict[str, Any]] = dict  # the rest, built when the PUT goes out
    key: str = ""  # its operation in the checkpoint
    what: str = ""  # what a pass waits for, in words
    needs: tuple[str, ...] = field(default=())  # keys of the specs it needs done first
    id: str = ""  # its resource ID, when it was found by listing

    @property
    def name(self) -> str:
        return self.path[-1]


def tags(ctx: RunContext, role: str, run: bool = True) -> dict[str, str]:
    """AIB's tags, the template's managedResourceTags, and Kiln's ownership tags."""
    found = dict(ctx.spec.managed_resource_tags or {})
    found |= {
        "createdBy": "AzureVMImageBuilder",
        "imageTemplateName": ctx.template.name,
        "imageTemplateResourceGroupName": ctx.spec.resource_group or "",
        ROLE_TAG: role,
        TEMPLATE_TAG: ctx.template.uid,
    }
    if run:
        found[RUN_TAG] = ctx.run_uid
    return found


def owner(run: str | None = None, template: str | None = None) -> dict[str, str]:
    """The ownership tags a deletion checks (a run's resources, or a template's)."""
    return {RUN_TAG: run} if run else {TEMPLATE_TAG: template or ""}


def owned(found: dict[str, str] | None, ours: dict[str, str]) -> bool:
    """Kiln made it for this owner: its run tag (else its template tag) is ours."""
    key = RUN_TAG if RUN_TAG in ours else TEMPLATE_TAG
    return bool(ours.get(key)) and (found or {}).get(key) == ours[key]


async def _ensure(clients: AzureClients, operations: dict[str, str], spec: Spec) -> bool:
    create = getattr(spec.kind.operations(clients), spec.kind.create)

    def begin(**kw: Any) -> Any:
        return create(
            *spec.path, {"location": spec.location, **spec.body(), "tags": spec.tags}, **kw
        )

    if spec.kind.create.startswith("begin_"):
        return await ops.track(operations, spec.key, begin)
    await ops.call(begin())
    operations[spec.key] = ops.DONE
    return True


async def ensure(clients: AzureClients, operations: dict[str, str], specs: list[Spec]) -> None:
    """Every spec created, independent ones concurrently, in waves of what they need;
    Pending (naming what is awaited) until all are done. A fatal error wins over one
    that asks to retry, which wins over waiting."""
    while todo := [s for s in specs if operations.get(s.key) != ops.DONE]:
        waits = {s.key for s in todo}
        ready = [s for s in todo if not waits.intersection(s.needs)]
        outcomes = await asyncio.gather(
            *(_ensure(clients, operations, s) for s in ready), return_exceptions=True
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if errors:
            raise min(errors, key=lambda e: isinstance(e, ProviderError) and not e.fatal)
        if not all(outcomes):
            waiting = [s.what for s, done in zip(ready, outcomes, strict=True) if not done]
            raise ops.Pending(", ".join(dict.fromkeys(waiting)))


async def delete(clients: AzureClients, specs: Iterable[Spec]) -> list[Spec]:
    """Delete in the order given what exists and is Kiln's (owned); what was deleted.

    Deletes are not resumed from a saved continuation token as creates are (ops.track),
    on purpose: a pass cut short (a crash, its deadline) leaves the delete running in
    Azure, and the next pass reads the resource again and sends its DELETE again. That is
    safe, so it is not "doing a thing twice": a DELETE creates nothing; it is sent only
    after a GET shows the resource still there and tagged with this owner (a resource
    that took the name meanwhile is not Kiln's and is left alone); on a resource whose
    delete is in flight Azure answers 202 with that same operation, which the new
    poller then waits on; one already gone is a 404 on the GET and skipped. It is bounded
    as every cleanup is: each pass by its deadline, the passes by the cleanup attempts
    (then CleanupFailed with what is left) or, for the sweeper, by its timeout and period.
    A saved token would only spare one request per resource and pass."""
    deleted = []
    for spec in specs:
        group = spec.kind.operations(clients)
        found = await ops.find(getattr(group, spec.kind.get)(*spec.path))
        if found is not None and owned(found.tags, spec.tags):
            action = getattr(group, spec.kind.delete)(*spec.path)
            result = await ops.call(action)
            if spec.kind.delete.startswith("begin_"):
                await ops.call(result.result())
            deleted.append(spec)
        if spec.kind is VAULT:  # a soft-deleted vault keeps its name and its secret
            await _purge_vault(clients, spec)
    return deleted


async def _purge_vault(clients: AzureClients, spec: Spec) -> None:
    vaults = clients.keyvault.vaults
    gone = await ops.find(vaults.get_deleted(spec.name, spec.location))
    if gone is not None and owned(gone.properties.tags, spec.tags):
        poller = await ops.call(vaults.begin_purge_deleted(spec.name, spec.location))
        await ops.call(poller.result())


def found(resource: Any, group: str, ours: dict[str, str]) -> Spec | None:
    """A listed resource as a spec to delete (None: a type Kiln never creates)."""
    kind = next(
        (k for k in DELETION_ORDER if k.type.lower() == (resource.type or "").lower()), None
    )
    if kind is None:
        return None
    return Spec(kind, (group, resource.name), ours, resource.location, id=resource.id)


def deletion_order(specs: Iterable[Spec]) -> list[Spec]:
    """Dependents first: a build's order, reversed."""
    return sorted(specs, key=lambda s: DELETION_ORDER.index(s.kind))


GROUP = Kind(
    "Microsoft.Resources/resourceGroups",
    lambda c: c.resource.resource_groups,
    create="create_or_update",
)
STORAGE = Kind(
    "Microsoft.Storage/storageAccounts",
    lambda c: c.storage.storage_accounts,
    create="begin_create",
    delete="delete",
    get="get_properties",
)
VAULT = Kind("Microsoft.KeyVault/vaults", lambda c: c.keyvault.vaults, delete="delete")
VNET = Kind("Microsoft.Network/virtualNetworks", lambda c: c.network.virtual_networks)
NSG = Kind("Microsoft.Network/networkSecurityGroups", lambda c: c.network.network_security_groups)
IP = Kind("Microsoft.Network/publicIPAddresses", lambda c: c.network.public_ip_addresses)
NIC = Kind("Microsoft.Network/networkInterfaces", lambda c: c.network.network_interfaces)
VM = Kind("Microsoft.Compute/virtualMachines", lambda c: c.compute.virtual_machines)
IMAGE = Kind("Microsoft.Compute/images", lambda c: c.compute.images)
GALLERY_VERSION = Kind(
    "Microsoft.Compute/galleries/images/versions", lambda c: c.compute.gallery_image_versions
)
# What Kiln deletes from a listing (a staging group, the sweep), dependents first.
DELETION_ORDER = (VM, NIC, IP, NSG, VNET, VAULT, STORAGE)
