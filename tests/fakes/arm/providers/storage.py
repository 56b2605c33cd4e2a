"""Microsoft.Storage/storageAccounts: PUT as Azure answers it (202 + Location), keys, names.

primaryEndpoints.blob points where the emulator was told (an Azurite URL in e2e tests),
and listKeys answers the key that endpoint accepts when one is configured.
"""

from __future__ import annotations

import base64
import secrets
from typing import TYPE_CHECKING, Any

from ..errors import ArmError, invalid_parameter
from ..models import StoredResource, iso, utcnow
from ..validation import (
    STORAGE_KINDS,
    STORAGE_SKUS,
    get_path,
    validate_storage_account_name,
    validate_tags,
)
from .base import Ctx, Reply, ResourceType

if TYPE_CHECKING:
    from ..emulator import ArmEmulator


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(64)).decode()


class StorageAccounts(ResourceType):
    type_name = "Microsoft.Storage/storageAccounts"
    put_style = "location"
    delete_style = "sync"
    max_tag_name = 128
    creating_state = "Creating"
    updating_state = "Succeeded"

    def __init__(self) -> None:
        super().__init__()
        self.actions[("POST", "listkeys")] = self.list_keys
        self.actions[("POST", "regeneratekey")] = self.regenerate_key

    def validate_name(self, name: str) -> None:
        validate_storage_account_name(name)

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        assert ctx.path is not None
        name = ctx.path.name
        for other in ctx.emu.all_resources():
            if (
                other.type == self.type_name
                and other.name.lower() == name.lower()
                and other.id.lower() != ctx.path.resource_id().lower()
            ):
                if other.subscription.lower() == ctx.path.subscription.lower():
                    raise ArmError(
                        409,
                        "StorageAccountAlreadyExists",
                        f"The storage account named {name} already exists under the subscription.",
                    )
                raise ArmError(
                    409,
                    "StorageAccountAlreadyTaken",
                    f"The storage account named {name} is already taken.",
                )
        sku = get_path(body, "sku.name")
        if not sku:
            raise invalid_parameter("The sku name is required.", "sku.name")
        if sku not in STORAGE_SKUS:
            raise ArmError(
                400,
                "InvalidValuesForRequestParameters",
                f"Values for request parameters are invalid: sku.name '{sku}'.",
            )
        kind = body.get("kind")
        if not kind:
            raise invalid_parameter("The kind is required.", "kind")
        if kind not in STORAGE_KINDS:
            raise ArmError(
                400,
                "InvalidValuesForRequestParameters",
                f"Values for request parameters are invalid: kind '{kind}'.",
            )
        if existing is not None and existing.body.get("kind") != kind:
            raise ArmError(
                409,
                "PropertyChangeNotAllowed",
                "Changing property 'kind' is not allowed.",
                target="kind",
            )
        res = self.base_resource(ctx, existing, body)
        props = res.body["properties"]
        tls = props.get("minimumTlsVersion", "TLS1_2")
        if tls not in ("TLS1_0", "TLS1_1", "TLS1_2", "TLS1_3"):
            raise ArmError(
                400,
                "InvalidValuesForRequestParameters",
                f"Values for request parameters are invalid: minimumTlsVersion '{tls}'.",
            )
        access_tier = props.get("accessTier")
        if access_tier is not None and access_tier not in ("Hot", "Cool", "Cold", "Premium"):
            raise ArmError(
                400,
                "InvalidValuesForRequestParameters",
                f"Values for request parameters are invalid: accessTier '{access_tier}'.",
            )
        res.body["sku"] = {
            "name": sku,
            "tier": "Premium" if sku.startswith("Premium") else "Standard",
        }
        res.body["kind"] = kind
        if "keys" not in res.meta:
            fixed = ctx.emu.storage_account_key
            now = iso(utcnow())
            res.meta["keys"] = [
                {
                    "keyName": "key1",
                    "value": fixed or new_key(),
                    "permissions": "FULL",
                    "creationTime": now,
                },
                {"keyName": "key2", "value": new_key(), "permissions": "FULL", "creationTime": now},
            ]
        return res

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        props = doc["properties"]
        blob = emu.blob_endpoint_for(res.name)
        base = f"https://{res.name}"
        props.setdefault("minimumTlsVersion", "TLS1_2")
        props.setdefault("supportsHttpsTrafficOnly", True)
        props.setdefault("allowBlobPublicAccess", False)
        props.setdefault("allowSharedKeyAccess", True)
        if res.body.get("kind") in ("StorageV2", "BlobStorage"):
            props.setdefault("accessTier", "Hot")
        props.setdefault(
            "encryption",
            {
                "services": {"blob": {"enabled": True, "keyType": "Account"}},
                "keySource": "Microsoft.Storage",
            },
        )
        props.setdefault(
            "networkAcls",
            {
                "bypass": "AzureServices",
                "defaultAction": "Allow",
                "ipRules": [],
                "virtualNetworkRules": [],
            },
        )
        props["primaryEndpoints"] = {
            "blob": blob,
            "queue": f"{base}.queue.core.windows.net/",
            "table": f"{base}.table.core.windows.net/",
            "file": f"{base}.file.core.windows.net/",
            "dfs": f"{base}.dfs.core.windows.net/",
            "web": f"{base}.z13.web.core.windows.net/",
        }
        props["primaryLocation"] = res.location
        props["statusOfPrimary"] = "available"
        props["creationTime"] = iso(res.created_at)
        props["keyCreationTime"] = {"key1": iso(res.created_at), "key2": iso(res.created_at)}

    async def put(self, ctx: Ctx) -> Reply:
        """Existing account: a synchronous 200 update; new account: 202 + Location LRO."""
        assert ctx.path is not None
        existing = self.lookup(ctx)
        if existing is None or existing.provisioning_state != "Succeeded":
            return await super().put(ctx)
        self.validate_name(ctx.path.name)
        self.busy(ctx, existing)
        res = self.build(ctx, existing, ctx.json())
        res.provisioning_state = "Succeeded"
        ctx.emu.store(res, new=False)
        return Reply(200, self.render(ctx.emu, res, ctx))

    async def patch(self, ctx: Ctx) -> Reply:
        res = self.lookup(ctx)
        if res is None:
            raise self.not_found(ctx)
        body = ctx.json()
        if "tags" in body:
            res.tags = validate_tags(body.get("tags"), max_name=self.max_tag_name)
        for k, v in (body.get("properties") or {}).items():
            res.body.setdefault("properties", {})[k] = v
        ctx.emu.touch()
        return Reply(200, self.render(ctx.emu, res, ctx))

    def _provisioned(self, res: StoredResource) -> None:
        if res.provisioning_state != "Succeeded":
            raise ArmError(
                409,
                "StorageAccountIsNotProvisioned",
                f"The storage account provisioning state must be 'Succeeded' before executing "
                f"the operation. Current state of {res.name} is '{res.provisioning_state}'.",
            )

    async def list_keys(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._provisioned(res)
        return Reply(200, {"keys": res.meta["keys"]})

    async def regenerate_key(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._provisioned(res)
        name = ctx.json().get("keyName")
        for k in res.meta["keys"]:
            if k["keyName"] == name:
                k["value"] = new_key()
                k["creationTime"] = iso(utcnow())
                ctx.emu.touch()
                return Reply(200, {"keys": res.meta["keys"]})
        raise ArmError(
            400,
            "InvalidValuesForRequestParameters",
            f"Values for request parameters are invalid: keyName '{name}'.",
        )


def check_name_availability(ctx: Ctx) -> Reply:
    body = ctx.json()
    name = str(body.get("name", ""))
    try:
        validate_storage_account_name(name)
    except ArmError as err:
        return Reply(
            200, {"nameAvailable": False, "reason": "AccountNameInvalid", "message": err.message}
        )
    taken = any(
        r.type == StorageAccounts.type_name and r.name.lower() == name.lower()
        for r in ctx.emu.all_resources()
    )
    if taken:
        return Reply(
            200,
            {
                "nameAvailable": False,
                "reason": "AlreadyExists",
                "message": f"The storage account named {name} is already taken.",
            },
        )
    return Reply(200, {"nameAvailable": True})
