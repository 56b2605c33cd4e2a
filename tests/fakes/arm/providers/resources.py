"""Microsoft.Resources: resource groups (with cascading LRO delete) and generic listings."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .. import ids
from ..errors import ArmError, resource_group_not_found
from ..models import Operation, StoredResource, utcnow
from ..validation import validate_resource_group_name, validate_tags
from .base import Ctx, Reply, ResourceType

if TYPE_CHECKING:
    from ..emulator import ArmEmulator


class ResourceGroups(ResourceType):
    """PUT/GET/HEAD/PATCH synchronous; DELETE an LRO (202 + Location) deleting the contents."""

    type_name = "Microsoft.Resources/resourceGroups"
    put_style = "sync"
    delete_style = "location"
    top_level_fields = ("managedBy",)

    def lookup(self, ctx: Ctx) -> StoredResource | None:
        assert ctx.path is not None and ctx.path.resource_group is not None
        return ctx.emu.lookup(ids.format_id(ctx.path.subscription, ctx.path.resource_group))

    def not_found(self, ctx: Ctx) -> ArmError:
        assert ctx.path is not None and ctx.path.resource_group is not None
        return resource_group_not_found(ctx.path.resource_group)

    def render(
        self, emu: ArmEmulator, res: StoredResource, ctx: Ctx | None = None
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": res.id,
            "name": res.name,
            "type": res.type,
            "location": res.location,
            "properties": {"provisioningState": res.provisioning_state},
        }
        if res.tags:
            doc["tags"] = dict(res.tags)
        if res.body.get("managedBy"):
            doc["managedBy"] = res.body["managedBy"]
        return doc

    async def put(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None and ctx.path.resource_group is not None
        name = ctx.path.resource_group
        validate_resource_group_name(name)
        body = ctx.json()
        location = ctx.emu.check_location(body.get("location"), self.type_name)
        tags = validate_tags(body.get("tags"))
        existing = self.lookup(ctx)
        if existing is not None:
            if existing.provisioning_state == "Deleting":
                raise being_deleted(existing.name)
            if existing.location != location:
                raise ArmError(
                    409,
                    "InvalidResourceGroupLocation",
                    f"Invalid resource group location '{location}'. The Resource group already "
                    f"exists in location '{existing.location}'.",
                )
            existing.tags = tags
            if body.get("managedBy"):
                existing.body["managedBy"] = body["managedBy"]
            existing.changed_at = utcnow()
            ctx.emu.touch()
            return Reply(200, self.render(ctx.emu, existing, ctx))
        res = StoredResource(
            id=ids.format_id(ctx.path.subscription, name),
            type=self.type_name,
            name=name,
            subscription=ctx.path.subscription,
            resource_group=name,
            location=location,
            tags=tags,
            api_version=ctx.api_version or "",
        )
        if body.get("managedBy"):
            res.body["managedBy"] = body["managedBy"]
        ctx.emu.store(res, new=True)
        return Reply(201, self.render(ctx.emu, res, ctx))

    async def patch(self, ctx: Ctx) -> Reply:
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        if res.provisioning_state == "Deleting":
            raise being_deleted(res.name)
        return await super().patch(ctx)

    async def delete(self, ctx: Ctx) -> Reply:
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        emu = ctx.emu
        op = emu.active_operation(res)
        if op is None:
            res.provisioning_state = "Deleting"
            for inner in emu.resources_in_group(res.subscription, res.name):
                inner_op = emu.active_operation(inner)
                if inner_op is not None:
                    emu.cancel_operation(inner_op)
                inner.provisioning_state = "Deleting"
            op = emu.start_operation(ctx, res, "delete")
        return emu.lro_reply(ctx, op, 202, None, "location")

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        """Delete everything inside, dependents first, as ARM's group deletion does."""
        inner = emu.resources_in_group(res.subscription, res.name)
        order = [
            "microsoft.compute/virtualmachines",
            "microsoft.network/networkinterfaces",
            "microsoft.network/publicipaddresses",
            "microsoft.network/networksecuritygroups",
            "microsoft.network/virtualnetworks",
            "microsoft.compute/disks",
            "microsoft.compute/galleries/images/versions",
            "microsoft.compute/galleries/images",
            "microsoft.compute/galleries",
            "microsoft.compute/images",
            "microsoft.storage/storageaccounts",
        ]

        def rank(r: StoredResource) -> int:
            t = r.type.lower()
            return order.index(t) if t in order else len(order)

        for r in sorted(inner, key=rank):
            if emu.lookup(r.id) is not None:
                await emu.delete_resource(r)

    def on_failed(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        res.provisioning_state = "Succeeded"


def being_deleted(name: str) -> ArmError:
    return ArmError(
        409,
        "ResourceGroupBeingDeleted",
        f"The resource group '{name}' is in deprovisioning state and cannot perform this "
        "operation.",
    )


_TAG_FILTER = re.compile(
    r"^\s*tagName\s+eq\s+'([^']*)'(?:\s+and\s+tagValue\s+eq\s+'([^']*)')?\s*$", re.I
)
_TYPE_FILTER = re.compile(r"^\s*resourceType\s+eq\s+'([^']*)'\s*$", re.I)


def filter_resources(items: list[StoredResource], odata: str | None) -> list[StoredResource]:
    """The $filter forms Kiln uses: `tagName eq 'k' [and tagValue eq 'v']`, `resourceType eq`."""
    if not odata:
        return items
    m = _TAG_FILTER.match(odata)
    if m:
        name, value = m.group(1), m.group(2)
        out = []
        for r in items:
            match = next((v for k, v in r.tags.items() if k.lower() == name.lower()), None)
            if match is not None and (value is None or match == value):
                out.append(r)
        return out
    m = _TYPE_FILTER.match(odata)
    if m:
        return [r for r in items if r.type.lower() == m.group(1).lower()]
    raise ArmError(
        400,
        "InvalidFilterInQueryString",
        f"The $filter '{odata}' is not supported by the emulator.",
    )


def generic_item(res: StoredResource) -> dict[str, Any]:
    """A GenericResource as `resources.list*` returns it."""
    item: dict[str, Any] = {"id": res.id, "name": res.name, "type": res.type}
    if res.location:
        item["location"] = res.location
    if res.tags:
        item["tags"] = dict(res.tags)
    for f in ("sku", "kind", "managedBy", "plan", "identity"):
        if res.body.get(f) is not None:
            item[f] = res.body[f]
    return item


def list_resource_groups(ctx: Ctx, subscription: str) -> Reply:
    groups = [
        r
        for r in ctx.emu.all_resources()
        if r.type == ResourceGroups.type_name and r.subscription.lower() == subscription.lower()
    ]
    groups = filter_resources(groups, ctx.query.get("$filter"))
    top = ctx.query.get("$top")
    if top:
        groups = groups[: int(top)]
    handler = ResourceGroups()
    return Reply(200, {"value": [handler.render(ctx.emu, g, ctx) for g in groups]})


def list_resources(ctx: Ctx, subscription: str, resource_group: str | None) -> Reply:
    """Top-level resources of a group (or the subscription), as ARM's resources API lists them."""
    if resource_group is not None:
        items = ctx.emu.resources_in_group(subscription, resource_group, top_level_only=True)
    else:
        items = [
            r
            for r in ctx.emu.all_resources()
            if r.subscription.lower() == subscription.lower()
            and r.type != ResourceGroups.type_name
            and r.type.count("/") == 1
        ]
    items = filter_resources(items, ctx.query.get("$filter"))
    top = ctx.query.get("$top")
    if top:
        items = items[: int(top)]
    return Reply(200, {"value": [generic_item(r) for r in items]})
