"""The generic ARM resource behaviour every type shares: PUT/GET/PATCH/DELETE/list and LROs.

A ResourceType subclass says how its PUT body is validated and rendered, which LRO shape
its resource provider uses, and what happens when an operation completes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aiohttp import web

from .. import ids
from ..errors import (
    ArmError,
    another_operation_in_progress,
    invalid_request_content,
    resource_group_not_found,
    resource_not_found,
)
from ..faults import format_seconds
from ..models import Operation, StoredResource, utcnow
from ..validation import validate_tags

if TYPE_CHECKING:
    from ..emulator import ArmEmulator

LroStyle = Literal["sync", "async", "location", "async+location"]


@dataclass
class Reply:
    """An HTTP answer before it becomes an aiohttp response."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Ctx:
    """One ARM request as handlers see it."""

    emu: ArmEmulator
    request: web.Request
    method: str
    path: ids.ArmPath | None
    query: Mapping[str, str]
    raw_body: bytes
    api_version: str | None = None
    _json: Any = None

    def json(self, *, required: bool = True) -> dict[str, Any]:
        """The JSON body, or ARM's InvalidRequestContent."""
        if self._json is not None:
            return self._json
        if not self.raw_body.strip():
            if not required:
                return {}
            raise invalid_request_content("The request body is empty")
        try:
            value = json.loads(self.raw_body)
        except ValueError as exc:
            raise invalid_request_content(str(exc)) from None
        if not isinstance(value, dict):
            raise invalid_request_content("The request body must be a JSON object")
        self._json = value
        return value


Action = Callable[["Ctx", StoredResource], Awaitable[Reply]]
ActionDone = Callable[["ArmEmulator", Operation, StoredResource], Awaitable[dict[str, Any] | None]]


class ResourceType:
    """Generic behaviour; subclasses set the class attributes and override the hooks."""

    type_name: ClassVar[str]  # "Microsoft.Compute/virtualMachines"
    put_style: ClassVar[LroStyle] = "async"
    delete_style: ClassVar[LroStyle] = "async+location"
    action_style: ClassVar[LroStyle] = "async+location"
    has_location: ClassVar[bool] = True
    max_tag_name: ClassVar[int] = 512
    creating_state: ClassVar[str] = "Creating"
    updating_state: ClassVar[str] = "Updating"
    put_created_status: ClassVar[int] = 201
    top_level_fields: ClassVar[tuple[str, ...]] = ("sku", "kind", "plan", "identity", "zones")

    def __init__(self) -> None:
        self.actions: dict[tuple[str, str], Action] = {}
        self.action_done: dict[str, ActionDone] = {}

    @property
    def key(self) -> str:
        return self.type_name.lower()

    @property
    def namespace(self) -> str:
        return self.type_name.split("/", 1)[0]

    @property
    def short_type(self) -> str:
        return self.type_name.split("/", 1)[1]

    # hooks ------------------------------------------------------------------------------

    def validate_name(self, name: str) -> None:
        """Raise ArmError when `name` breaks the type's naming rule."""

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        """Validate a PUT body and return the resource to store (not stored yet)."""
        raise NotImplementedError

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        """Add derived, read-only fields (back references, instance view) to a GET document."""

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        """Raise ArmError when Azure refuses to delete this resource (it is in use)."""

    async def on_created(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        """Effects when a create/update operation completes (before Succeeded is recorded)."""

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        """Effects when the resource goes away (release IPs, tell the VM backend...)."""

    def on_failed(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        res.provisioning_state = "Failed"

    # helpers ----------------------------------------------------------------------------

    def base_resource(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        """Envelope checks shared by every type: location, tags, location changes."""
        assert ctx.path is not None
        path = ctx.path
        location: str | None = None
        if self.has_location:
            location = ctx.emu.check_location(body.get("location"), self.type_name)
            if existing is not None and existing.location and existing.location != location:
                raise ArmError(
                    409,
                    "InvalidResourceLocation",
                    f"The resource '{path.name}' already exists in location '{existing.location}'"
                    f" in resource group '{path.resource_group}'. A resource with the same name "
                    f"cannot be created in location '{location}'. Please select a new resource "
                    "name.",
                )
        tags = validate_tags(body.get("tags"), max_name=self.max_tag_name)
        props = body.get("properties")
        if props is not None and not isinstance(props, dict):
            raise invalid_request_content("properties must be an object")
        res = StoredResource(
            id=path.resource_id(),
            type=self.type_name,
            name=path.name,
            subscription=path.subscription,
            resource_group=path.resource_group,
            location=location,
            tags=tags,
            api_version=ctx.api_version or "",
        )
        if existing is not None:
            res.id = existing.id
            res.name = existing.name
            res.created_at = existing.created_at
            res.meta = copy.deepcopy(existing.meta)
        res.body = {"properties": copy.deepcopy(props or {})}
        for f in self.top_level_fields:
            if body.get(f) is not None:
                res.body[f] = copy.deepcopy(body[f])
        return res

    def render(
        self, emu: ArmEmulator, res: StoredResource, ctx: Ctx | None = None
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"id": res.id, "name": res.name, "type": res.type}
        if res.location:
            doc["location"] = res.location
        if res.tags:
            doc["tags"] = dict(res.tags)
        body = copy.deepcopy(res.body)
        props = body.pop("properties", {}) or {}
        doc.update(body)
        props["provisioningState"] = res.provisioning_state
        doc["properties"] = props
        self.decorate(emu, res, doc, ctx)
        return doc

    def lookup(self, ctx: Ctx) -> StoredResource | None:
        assert ctx.path is not None
        return ctx.emu.lookup(ctx.path.resource_id())

    def not_found(self, ctx: Ctx) -> ArmError:
        assert ctx.path is not None
        return resource_not_found(
            "/".join([self.namespace, *ctx.path.types]),
            "/".join(ctx.path.names),
            ctx.path.resource_group or "",
        )

    def busy(self, ctx: Ctx, res: StoredResource) -> None:
        """409 AnotherOperationInProgress while an operation runs on the resource."""
        op = ctx.emu.active_operation(res)
        if op is not None:
            err = another_operation_in_progress(res.id, ctx.emu.operation_url(op, monitor=False))
            err.headers["Retry-After"] = format_seconds(ctx.emu.retry_after)
            raise err

    # verbs ------------------------------------------------------------------------------

    async def get(self, ctx: Ctx) -> Reply:
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        return Reply(200, self.render(ctx.emu, res, ctx))

    async def head(self, ctx: Ctx) -> Reply:
        return Reply(204 if self.lookup(ctx) is not None else 404)

    async def put(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        body = ctx.json()
        self.validate_name(ctx.path.name)
        existing = self.lookup(ctx)
        if existing is not None:
            self.busy(ctx, existing)
        if_none = ctx.request.headers.get("If-None-Match")
        if if_none == "*" and existing is not None:
            raise ArmError(412, "PreconditionFailed", "The resource already exists.")
        if_match = ctx.request.headers.get("If-Match")
        if if_match and existing is None:
            raise ArmError(412, "PreconditionFailed", "The resource does not exist.")
        res = self.build(ctx, existing, body)
        emu = ctx.emu
        emu.store(res, new=existing is None)
        if self.put_style == "sync":
            res.provisioning_state = "Succeeded"
            await self.on_created(emu, None, res)  # type: ignore[arg-type]
            return Reply(200 if existing else self.put_created_status, self.render(emu, res, ctx))
        res.provisioning_state = self.updating_state if existing else self.creating_state
        op = emu.start_operation(ctx, res, "update" if existing else "create")
        status = 200 if existing else self.put_created_status
        body_out = self.render(emu, res, ctx)
        if self.put_style == "location":
            return emu.lro_reply(ctx, op, 202, None, "location")
        return emu.lro_reply(ctx, op, status, body_out, self.put_style)

    async def patch(self, ctx: Ctx) -> Reply:
        """Tags-only update, synchronous (what `update_tags` does for every type)."""
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        self.busy(ctx, res)
        body = ctx.json()
        if "tags" in body:
            res.tags = validate_tags(body.get("tags"), max_name=self.max_tag_name)
        res.changed_at = utcnow()
        ctx.emu.touch()
        return Reply(200, self.render(ctx.emu, res, ctx))

    async def delete(self, ctx: Ctx) -> Reply:
        res = self.lookup(ctx)
        if res is None:
            return Reply(204)
        emu = ctx.emu
        op_now = emu.active_operation(res)
        if op_now is not None:
            if op_now.kind == "delete":
                return emu.lro_reply(ctx, op_now, 202, None, self.delete_style)
            if op_now.kind in ("create", "update"):
                emu.cancel_operation(op_now)
            else:
                self.busy(ctx, res)
        self.check_delete(emu, res)
        if self.delete_style == "sync":
            await emu.delete_resource(res)
            return Reply(200)
        res.provisioning_state = "Deleting"
        op = emu.start_operation(ctx, res, "delete")
        return emu.lro_reply(ctx, op, 202, None, self.delete_style)

    async def action(self, ctx: Ctx, name: str) -> Reply:
        handler = self.actions.get((ctx.method, name.lower()))
        if handler is None:
            raise ArmError(
                405 if any(a == name.lower() for _, a in self.actions) else 404,
                "UnsupportedEmulatorOperation" if self.actions else "NotFound",
                f"'{ctx.method} {name}' on {self.type_name} is not implemented by the ARM "
                "emulator.",
            )
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        return await handler(ctx, res)

    async def start_action(
        self, ctx: Ctx, res: StoredResource, action: str, **params: Any
    ) -> Reply:
        """Run `action` as an LRO: 202 with Azure-AsyncOperation/Location, done later."""
        self.busy(ctx, res)
        op = ctx.emu.start_operation(ctx, res, "action", action=action, params=params)
        return ctx.emu.lro_reply(ctx, op, 202, None, self.action_style)

    def list(self, ctx: Ctx, scope_id: str) -> Reply:
        """Resources of this type whose parent is `scope_id` (a group, or a parent resource)."""
        emu = ctx.emu
        out = [self.render(emu, r, ctx) for r in emu.resources_of(self.type_name, scope_id)]
        return Reply(200, {"value": out})


def require_group(ctx: Ctx) -> StoredResource:
    """The request's resource group, or 404 ResourceGroupNotFound."""
    assert ctx.path is not None and ctx.path.resource_group is not None
    rg = ctx.emu.lookup(ids.format_id(ctx.path.subscription, ctx.path.resource_group))
    if rg is None:
        raise resource_group_not_found(ctx.path.resource_group)
    return rg
