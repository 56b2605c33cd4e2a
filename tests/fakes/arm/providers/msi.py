"""Microsoft.ManagedIdentity/userAssignedIdentities: what a VM's identity block names.

PUT and DELETE answer synchronously, as the service does; the principal and client IDs
are fixed at creation and read-only. A VM that names an identity that does not exist is
refused (compute.py), with ARM's FailedIdentityOperation.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..models import StoredResource
from .base import Ctx, ResourceType, require_group

USER_ASSIGNED_IDENTITY = "Microsoft.ManagedIdentity/userAssignedIdentities"


class UserAssignedIdentities(ResourceType):
    type_name = USER_ASSIGNED_IDENTITY
    put_style = "sync"
    delete_style = "sync"

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        require_group(ctx)
        res = self.base_resource(ctx, existing, body)
        fixed = existing.body["properties"] if existing is not None else {}
        res.body["properties"] = {
            "tenantId": ctx.emu.tenant_id,
            "principalId": fixed.get("principalId") or str(uuid.uuid4()),
            "clientId": fixed.get("clientId") or str(uuid.uuid4()),
            "isolationScope": (body.get("properties") or {}).get("isolationScope", "None"),
        }
        return res
