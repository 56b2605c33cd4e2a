"""What a build publishes from its generalized VM: a managed image, a gallery image
version. Outputs carry the target's artifactTags, not Kiln's: they outlive the run and
resources.delete never removes them."""

from __future__ import annotations

from typing import Any

from kiln.api.distribution import PlannedTarget
from kiln.providers.azure.resources import GALLERY_VERSION, IMAGE, Spec, parse_id
from kiln.providers.azure.resources.vm import generation
from kiln.providers.base import RunContext


def managed_image(
    ctx: RunContext, image_id: str, location: str | None, tags: dict[str, str], key: str
) -> Spec:
    _, group, parts = parse_id(image_id)
    return Spec(
        IMAGE,
        (group, parts[-1]),
        tags,
        location,
        lambda: {
            "properties": {
                "sourceVirtualMachine": {"id": ctx.checkpoint.azure.vm_id},
                "hyperVGeneration": generation(ctx),
            }
        },
        key=key,
        what=f"creating managed image {parts[-1]}",
    )


def publishing_profile(target: PlannedTarget) -> dict[str, Any]:
    """The planned regions (the build's region always among them, kiln.distribution),
    excludeFromLatest, replicationMode."""
    profile: dict[str, Any] = {
        "targetRegions": [
            {
                "name": r.name,
                "regionalReplicaCount": r.replica_count,
                "storageAccountType": r.storage_account_type,
            }
            for r in target.regions
        ],
        "excludeFromLatest": target.exclude_from_latest,
    }
    if target.replication_mode:
        profile["replicationMode"] = target.replication_mode
    return profile


def gallery_version(
    ctx: RunContext,
    definition_id: str,
    version: str,
    profile: dict[str, Any],
    tags: dict[str, str],
    key: str,
) -> Spec:
    """definition_id: the gallery image (a version in it is ignored); profile: its
    publishingProfile."""
    _, group, parts = parse_id(definition_id)
    gallery, definition = parts[1], parts[3]
    return Spec(
        GALLERY_VERSION,
        (group, gallery, definition, version),
        tags,
        ctx.spec.location,
        lambda: {
            "properties": {
                "publishingProfile": profile,
                "storageProfile": {"source": {"id": ctx.checkpoint.azure.vm_id}},
            }
        },
        key=key,
        what=f"publishing {definition} {version}",
    )
