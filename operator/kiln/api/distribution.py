"""The distribution plan: what each distribute target publishes, decided once per run.

The plan is made from the template's snapshot before anything is published and is kept
in the run's checkpoint, so every provider publishes from the same decisions (artifact
IDs, gallery version numbers, regions) and a resumed run publishes what it planned, never
a second version. Each target carries its own state: one that fails is recorded with its
error and the others are still tried.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from kiln.api.base import KubeModel

DEFAULT_STORAGE_TYPE = "Standard_LRS"


class TargetKind(StrEnum):
    ManagedImage = "ManagedImage"
    SharedImage = "SharedImage"
    VHD = "VHD"


class TargetState(StrEnum):
    Pending = "Pending"  # not published yet (or being published)
    Succeeded = "Succeeded"
    Failed = "Failed"


class VersionScheme(StrEnum):
    """How a gallery version number is chosen: given in galleryImageId, the source
    image's version (AIB's Source), or one above the newest (AIB's Latest)."""

    Explicit = "Explicit"
    Source = "Source"
    Latest = "Latest"


def _f(description: str, default: Any = None, **kwargs: Any) -> Any:
    return Field(default=default, description=description, **kwargs)


class PlannedRegion(KubeModel):
    """A region a gallery version replicates to."""

    name: str = Field(description="Region name.")
    replica_count: int = _f("Replicas in the region.", 1)
    storage_account_type: str = _f("Storage type of the replicas.", DEFAULT_STORAGE_TYPE)


class PlannedTarget(KubeModel):
    """One distribute target: what it publishes, and how far it got."""

    index: int = Field(description="Its index in spec.distribute.")
    run_output_name: str = Field(description="The target's runOutputName.")
    type: TargetKind = Field(description="ManagedImage, SharedImage or VHD.")
    location: str | None = _f("Region of the artifact (images and gallery versions).")
    artifact_id: str | None = _f(
        "ID of what it publishes: the image, the gallery version (once its number is "
        "decided) or the VHD's destination (once the provider chose it)."
    )
    gallery_image_id: str | None = _f("The gallery image definition (SharedImage).")
    scheme: VersionScheme | None = _f("How the version number is chosen (SharedImage).")
    major: int | None = _f("Latest within this major version (SharedImage).")
    version: str | None = _f("The gallery version number, saved before it is published.")
    regions: list[PlannedRegion] = Field(
        default_factory=list, description="Replication regions (SharedImage)."
    )
    exclude_from_latest: bool = _f("Keep the version out of 'latest'.", False)
    replication_mode: str | None = _f("Full or Shallow replication.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags on the artifact.")
    uri: str | None = _f("The VHD's destination as the template gives it; unset: staging.")
    state: TargetState = _f("Pending, Succeeded or Failed.", TargetState.Pending)
    artifact_uri: str | None = _f("Where the published artifact is (no SAS).")
    error_code: str | None = _f("The cloud's error code of the failure or the last retry.")
    message: str | None = _f("Why the target failed, or what it is retrying.")
    retries: int = _f("Retryable errors in a row (its retry budget).", 0)

    @property
    def needs_version(self) -> bool:
        return self.type == TargetKind.SharedImage and self.version is None

    @property
    def done(self) -> bool:
        return self.state != TargetState.Pending

    @property
    def path(self) -> str:
        return f"spec.distribute[{self.index}]"


class DistributionPlan(KubeModel):
    """Every distribute target of the run, in spec order."""

    targets: list[PlannedTarget] = Field(default_factory=list, description="The targets.")


class TargetStatus(KubeModel):
    """One distribute target as the run's status shows it (beside runOutputs)."""

    run_output_name: str = Field(description="The target's runOutputName.")
    type: TargetKind = Field(description="ManagedImage, SharedImage or VHD.")
    state: TargetState = Field(description="Pending, Succeeded or Failed.")
    artifact_id: str | None = _f("What it publishes (decided before it is published).")
    error_code: str | None = _f("The cloud's error code of the failure or the last retry.")
    message: str | None = _f("Why it failed, or what it is retrying.")
    retries: int | None = _f("Retryable errors in a row.")
