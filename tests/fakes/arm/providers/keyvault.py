"""Microsoft.KeyVault: vaults (soft delete, purge) and their secrets (management plane).

Vault names are global, like DNS names: a live or soft-deleted vault anywhere holds its
name until purged. Secrets live inside their vault's record (they are child resources and
go wherever the vault goes); their values never leave the emulator through ARM, but a VM's
`osProfile.secrets` and the test API `arm.vault_secret(url)` read them.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .. import ids
from ..errors import ArmError, resource_not_found
from ..models import StoredResource, iso, utcnow
from ..validation import validate_vault_name
from .base import Ctx, Reply, ResourceType, require_group

if TYPE_CHECKING:
    from ..emulator import ArmEmulator

VAULT = "Microsoft.KeyVault/vaults"
SECRET = "Microsoft.KeyVault/vaults/secrets"
DELETED_VAULT = "Microsoft.KeyVault/deletedVaults"
VAULT_DNS_SUFFIX = ".vault.azure.net"

_SECRET_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION = re.compile(r"^[0-9a-f]{32}$")


def bad_request(message: str, code: str = "BadRequest") -> ArmError:
    return ArmError(400, code, message)


def vault_uri(name: str) -> str:
    return f"https://{name.lower()}{VAULT_DNS_SUFFIX}/"


def deleted_vault_id(subscription: str, location: str, name: str) -> str:
    return (
        f"/subscriptions/{subscription}/providers/Microsoft.KeyVault/locations/{location}/"
        f"deletedVaults/{name}"
    )


def sweep_purged(emu: ArmEmulator) -> None:
    """Forget soft-deleted vaults whose purge operation has succeeded (the name is free)."""
    for key, record in list(emu.state.deleted_vaults.items()):
        op_id = record.meta.get("purge_operation")
        op = emu.state.operations.get(op_id) if op_id else None
        if op is not None and op.status == "Succeeded":
            del emu.state.deleted_vaults[key]
            emu.touch()


def live_vaults(emu: ArmEmulator) -> list[StoredResource]:
    return emu.resources_of(VAULT)


def name_taken(emu: ArmEmulator, name: str, except_id: str | None = None) -> bool:
    sweep_purged(emu)
    if name.lower() in emu.state.deleted_vaults:
        return True
    return any(
        v.name.lower() == name.lower() and not ids.same_id(v.id, except_id)
        for v in live_vaults(emu)
    )


def vault_already_exists(name: str) -> ArmError:
    return ArmError(
        409,
        "VaultAlreadyExists",
        f"The vault name '{name}' is already in use. Vault names are globally unique so it is "
        "possible that the name is already taken. If you are sure that the vault name was not "
        "taken then it is possible that a vault with the same name was recently deleted but not "
        "purged after being placed in a recoverable state. If the vault is in a recoverable "
        "state then the vault will need to be purged before reusing the name.",
    )


# --- secrets: storage and lookup ----------------------------------------------------------


def secrets_of(vault: StoredResource) -> dict[str, dict[str, Any]]:
    """{lower name: {"name", "versions": [{"version", "value", "created"}], "contentType"}}."""
    return vault.meta.setdefault("secrets", {})


def secret_uri(vault: StoredResource, name: str, version: str | None = None) -> str:
    base = f"{vault_uri(vault.name)}secrets/{name}"
    return f"{base}/{version}" if version else base


def parse_secret_url(url: str) -> tuple[str, str, str | None] | None:
    """`https://<vault>.vault.azure.net/secrets/<name>[/<version>]` -> (vault, name, version)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or not host.endswith(VAULT_DNS_SUFFIX):
        return None
    segs = [s for s in parts.path.split("/") if s]
    if len(segs) not in (2, 3) or segs[0].lower() != "secrets":
        return None
    return host.removesuffix(VAULT_DNS_SUFFIX), segs[1], segs[2] if len(segs) == 3 else None


def find_secret(emu: ArmEmulator, url: str) -> tuple[StoredResource, str, str] | None:
    """The live vault, version and value a secret URL names (latest version when none)."""
    parsed = parse_secret_url(url)
    if parsed is None:
        return None
    vault_name, name, version = parsed
    vault = next((v for v in live_vaults(emu) if v.name.lower() == vault_name), None)
    if vault is None:
        return None
    secret = secrets_of(vault).get(name.lower())
    if secret is None or not secret["versions"]:
        return None
    if version is None:
        latest = secret["versions"][-1]
        return vault, latest["version"], latest["value"]
    for v in secret["versions"]:
        if v["version"] == version.lower():
            return vault, v["version"], v["value"]
    return None


# --- vaults -------------------------------------------------------------------------------


class Vaults(ResourceType):
    """PUT is an LRO (RegisteringDns, then Succeeded); DELETE is synchronous and soft."""

    type_name = VAULT
    put_style = "async"
    put_created_status = 200
    delete_style = "sync"
    creating_state = "RegisteringDns"
    updating_state = "Succeeded"
    top_level_fields = ()

    def validate_name(self, name: str) -> None:
        validate_vault_name(name)

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        emu = ctx.emu
        res = self.base_resource(ctx, existing, body)
        if name_taken(emu, res.name, except_id=res.id):
            raise vault_already_exists(res.name)
        props = res.body["properties"]
        if props.get("createMode") not in (None, "default"):
            raise bad_request(
                "createMode 'recover' is not supported by the ARM emulator; purge the deleted "
                "vault instead."
            )
        tenant = props.get("tenantId")
        if not tenant:
            raise bad_request("The parameter properties.tenantId is required.")
        if str(tenant).lower() != emu.tenant_id.lower():
            raise bad_request(
                f"The tenant id '{tenant}' of the vault does not match the tenant "
                f"'{emu.tenant_id}' of subscription '{res.subscription}'.",
                "InvalidTenantId",
            )
        sku = props.get("sku")
        if not isinstance(sku, dict) or not sku.get("name") or not sku.get("family"):
            raise bad_request("The parameter properties.sku (family, name) is required.")
        if sku["family"] != "A":
            raise bad_request(f"The sku family '{sku['family']}' is invalid: use 'A'.")
        if str(sku["name"]).lower() not in ("standard", "premium"):
            raise bad_request(
                f"The sku name '{sku['name']}' is invalid: use 'standard' or 'premium'."
            )
        props["sku"] = {"family": "A", "name": str(sku["name"]).lower()}
        rbac = bool(props.get("enableRbacAuthorization", False))
        policies = props.get("accessPolicies")
        if policies is None and not rbac:
            raise bad_request(
                "The parameter accessPolicies is required unless enableRbacAuthorization is true."
            )
        if not isinstance(policies or [], list):
            raise bad_request("The parameter accessPolicies must be an array.")
        for policy in policies or []:
            missing = [k for k in ("tenantId", "objectId", "permissions") if not policy.get(k)]
            if missing:
                raise bad_request(f"An access policy is missing {', '.join(missing)}.")
        if props.get("enableSoftDelete") is False:
            raise bad_request(
                'The property "enableSoftDelete" has been set to false. Enabling the \'soft '
                "delete' functionality is mandatory for all key vaults."
            )
        days = props.get("softDeleteRetentionInDays", 90)
        if not isinstance(days, int) or not 7 <= days <= 90:
            raise bad_request("softDeleteRetentionInDays must be between 7 and 90.")
        props.pop("createMode", None)
        props["accessPolicies"] = policies or []
        props["vaultUri"] = vault_uri(res.name)
        props["softDeleteRetentionInDays"] = days
        props["enableSoftDelete"] = True
        props["enableRbacAuthorization"] = rbac
        for flag in (
            "enabledForDeployment",
            "enabledForDiskEncryption",
            "enabledForTemplateDeployment",
        ):
            props[flag] = bool(props.get(flag, False))
        props.setdefault("publicNetworkAccess", "Enabled")
        return res

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        """Soft delete: the vault (and its secrets) waits in deletedVaults until purged."""
        now = utcnow()
        days = int(res.body["properties"].get("softDeleteRetentionInDays", 90))
        record = StoredResource(
            id=deleted_vault_id(res.subscription, res.location or "", res.name),
            type=DELETED_VAULT,
            name=res.name,
            subscription=res.subscription,
            location=res.location,
            tags=dict(res.tags),
            meta={
                "vault_id": res.id,
                "deletion_date": iso(now),
                "scheduled_purge_date": iso(now + timedelta(days=days)),
                "secrets": res.meta.get("secrets", {}),
            },
        )
        emu.state.deleted_vaults[res.name.lower()] = record
        emu.touch()


def render_deleted(record: StoredResource) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "type": DELETED_VAULT,
        "properties": {
            "vaultId": record.meta["vault_id"],
            "location": record.location,
            "deletionDate": record.meta["deletion_date"],
            "scheduledPurgeDate": record.meta["scheduled_purge_date"],
            "tags": dict(record.tags),
            "purgeProtectionEnabled": False,
        },
    }


def _deleted(ctx: Ctx, location: str, name: str) -> StoredResource:
    emu = ctx.emu
    sweep_purged(emu)
    record = emu.state.deleted_vaults.get(name.lower())
    if record is None or (record.location or "") != location.replace(" ", "").lower():
        raise ArmError(
            404,
            "DeletedVaultNotFound",
            f"The deleted vault '{name}' could not be found in location '{location}'.",
        )
    return record


def deleted_vault_route(ctx: Ctx, location: str, segs: list[str]) -> Reply:
    """`locations/{loc}/deletedVaults/{name}` (GET) and `.../{name}/purge` (POST, an LRO)."""
    low = [s.lower() for s in segs]
    if len(segs) == 2 and low[0] == "deletedvaults" and ctx.method == "GET":
        return Reply(200, render_deleted(_deleted(ctx, location, segs[1])))
    if len(segs) == 3 and low[0] == "deletedvaults" and low[2] == "purge":
        if ctx.method != "POST":
            raise ArmError(405, "HttpMethodNotAllowed", "Purge takes POST.")
        record = _deleted(ctx, location, segs[1])
        op = ctx.emu.active_operation(record)
        if op is None:
            op = ctx.emu.start_operation(ctx, record, "delete")
            record.meta["purge_operation"] = op.id
        return ctx.emu.lro_reply(ctx, op, 202, None, "location")
    raise ArmError(404, "NotFound", f"No ARM route for 'locations/{location}/{'/'.join(segs)}'.")


def list_deleted_vaults(ctx: Ctx) -> Reply:
    sweep_purged(ctx.emu)
    records = sorted(ctx.emu.state.deleted_vaults.values(), key=lambda r: r.name.lower())
    return Reply(200, {"value": [render_deleted(r) for r in records]})


# --- secrets ------------------------------------------------------------------------------


class Secrets(ResourceType):
    """Management-plane secrets: PUT (sync, a new version each time), GET, list; no values out."""

    type_name = SECRET
    put_style = "sync"
    has_location = False

    def validate_name(self, name: str) -> None:
        if not _SECRET_NAME.match(name):
            raise bad_request(
                f"The secret name '{name}' is invalid: 1-127 letters, digits and dashes."
            )

    def vault(self, ctx: Ctx) -> StoredResource:
        assert ctx.path is not None
        require_group(ctx)
        vault = ctx.emu.lookup(ids.parent_id(ctx.path.resource_id()))
        if vault is None:
            raise resource_not_found(VAULT, ctx.path.names[-2], ctx.path.resource_group or "")
        return vault

    def render_secret(self, vault: StoredResource, secret: dict[str, Any]) -> dict[str, Any]:
        latest = secret["versions"][-1]
        props: dict[str, Any] = {
            "attributes": {
                "enabled": secret.get("enabled", True),
                "created": secret["created"],
                "updated": latest["created"],
            },
            "secretUri": secret_uri(vault, secret["name"]),
            "secretUriWithVersion": secret_uri(vault, secret["name"], latest["version"]),
        }
        if secret.get("contentType"):
            props["contentType"] = secret["contentType"]
        doc: dict[str, Any] = {
            "id": f"{vault.id}/secrets/{secret['name']}",
            "name": secret["name"],
            "type": SECRET,
            "location": vault.location,
            "properties": props,
        }
        if secret.get("tags"):
            doc["tags"] = dict(secret["tags"])
        return doc

    async def get(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        vault = self.vault(ctx)
        secret = secrets_of(vault).get(ctx.path.name.lower())
        if secret is None:
            raise self.not_found(ctx)
        return Reply(200, self.render_secret(vault, secret))

    async def head(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        vault = self.vault(ctx)
        return Reply(204 if ctx.path.name.lower() in secrets_of(vault) else 404)

    async def put(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        vault = self.vault(ctx)
        self.validate_name(ctx.path.name)
        body = ctx.json()
        props = body.get("properties")
        if not isinstance(props, dict) or not isinstance(props.get("value"), str):
            raise bad_request("The parameter properties.value is required.")
        if len(props["value"].encode()) > 25 * 1024:
            raise bad_request("A secret value can be at most 25 KiB.")
        now = int(utcnow().timestamp())
        store = secrets_of(vault)
        secret = store.get(ctx.path.name.lower())
        new = secret is None
        if secret is None:
            secret = {"name": ctx.path.name, "created": now, "versions": []}
            store[ctx.path.name.lower()] = secret
            ctx.emu.count_creation(f"{vault.id}/secrets/{ctx.path.name}", SECRET)
        secret["versions"].append(
            {"version": uuid.uuid4().hex, "value": props["value"], "created": now}
        )
        if props.get("contentType") is not None:
            secret["contentType"] = props["contentType"]
        attributes = props.get("attributes") or {}
        if "enabled" in attributes:
            secret["enabled"] = bool(attributes["enabled"])
        if body.get("tags") is not None:
            secret["tags"] = dict(body["tags"])
        ctx.emu.touch()
        return Reply(201 if new else 200, self.render_secret(vault, secret))

    async def patch(self, ctx: Ctx) -> Reply:
        raise ArmError(405, "UnsupportedEmulatorOperation", "PATCH of a secret is not implemented.")

    async def delete(self, ctx: Ctx) -> Reply:
        raise ArmError(
            405,
            "HttpMethodNotAllowed",
            "Secrets cannot be deleted through the management plane; delete the vault.",
        )

    def list(self, ctx: Ctx, scope_id: str) -> Reply:
        vault = ctx.emu.lookup(scope_id)
        if vault is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{scope_id}' was not found.")
        secrets = sorted(secrets_of(vault).values(), key=lambda s: s["name"].lower())
        return Reply(200, {"value": [self.render_secret(vault, s) for s in secrets]})


def version_of(url: str) -> str | None:
    """The version part of a secret URL, if it is a 32-hex version."""
    parsed = parse_secret_url(url)
    if parsed is None or parsed[2] is None or not _VERSION.match(parsed[2].lower()):
        return None
    return parsed[2]
