"""Distribution planned once, the same for every provider: pure functions over the plan.

plan() turns the template's distribute targets, the build's location and the source
version into a DistributionPlan (artifact IDs, regions, version numbers where the spec
fixes them); decide_version() picks a Latest version number from the versions that
exist; the record_* functions move a target to its end. Providers only publish what the
plan says; the distribute step persists each decision before the action it leads to.
"""

from __future__ import annotations

from kiln.api.distribution import (
    DEFAULT_STORAGE_TYPE,
    DistributionPlan,
    PlannedRegion,
    PlannedTarget,
    TargetKind,
    TargetState,
    TargetStatus,
    VersionScheme,
)
from kiln.api.status import RunOutput
from kiln.api.template import (
    Distributor,
    ImageTemplateSpec,
    LatestVersioning,
    ManagedImageDistributor,
    SharedImageDistributor,
    SourceVersioning,
)
from kiln.versions import VersioningError, next_version

LOCAL_LOCATION = "local"
SOURCE = SourceVersioning(scheme="Source")
MAX_TARGET_RETRIES = 12  # retryable errors in a row before a target fails (as the run's)


def plan(spec: ImageTemplateSpec, source_version: str) -> DistributionPlan:
    """The plan of every target; a target that cannot be planned is Failed already.
    Gallery versions are made in the build's location (the local provider's is 'local')."""
    location = spec.location or LOCAL_LOCATION
    result = DistributionPlan()
    for index, target in enumerate(spec.distribute):
        planned = _planned(index, target, location)
        result.targets.append(planned)
        if planned.scheme == VersionScheme.Source:
            try:
                _set_version(planned, next_version([], SOURCE, source_version))
            except VersioningError as error:
                record_failure(planned, f"{planned.path}.versioning: {error}")
                continue
        _refuse_duplicate(result, planned)
    return result


def _planned(index: int, target: Distributor, location: str) -> PlannedTarget:
    base = {
        "index": index,
        "run_output_name": target.run_output_name,
        "tags": dict(target.artifact_tags or {}),
    }
    if isinstance(target, ManagedImageDistributor):
        return PlannedTarget(
            **base,
            type=TargetKind.ManagedImage,
            location=target.location,
            artifact_id=target.image_id,
        )
    if isinstance(target, SharedImageDistributor):
        return _planned_version(base, target, location)
    # a SAS in a VHD uri never goes into the plan (it is persisted in status)
    uri = target.uri.split("?", 1)[0] if target.uri else None
    return PlannedTarget(**base, type=TargetKind.VHD, artifact_id=uri)


def _planned_version(
    base: dict[str, object], target: SharedImageDistributor, location: str
) -> PlannedTarget:
    definition, _, explicit = target.gallery_image_id.partition("/versions/")
    regions = [
        PlannedRegion(
            name=region.name,
            replica_count=region.replica_count or 1,
            storage_account_type=region.storage_account_type or DEFAULT_STORAGE_TYPE,
        )
        for region in target.target_regions or []
    ]
    regions += [
        PlannedRegion(
            name=name, storage_account_type=target.storage_account_type or DEFAULT_STORAGE_TYPE
        )
        for name in target.replication_regions or []
    ]
    if not any(r.name.lower() == location.lower() for r in regions):
        regions.append(PlannedRegion(name=location))  # a version always lives where it is made
    versioning = target.versioning
    if explicit:
        scheme = VersionScheme.Explicit
    elif isinstance(versioning, SourceVersioning):
        scheme = VersionScheme.Source
    else:
        scheme = VersionScheme.Latest
    planned = PlannedTarget(
        **base,
        type=TargetKind.SharedImage,
        location=location,
        gallery_image_id=definition,
        scheme=scheme,
        major=versioning.major if isinstance(versioning, LatestVersioning) else None,
        regions=regions,
        exclude_from_latest=bool(target.exclude_from_latest),
        replication_mode=target.replication_mode,
    )
    if explicit:
        _set_version(planned, explicit)
    return planned


def _set_version(target: PlannedTarget, version: str) -> None:
    target.version = version
    target.artifact_id = f"{target.gallery_image_id}/versions/{version}"


def _refuse_duplicate(result: DistributionPlan, planned: PlannedTarget) -> None:
    """Two targets that would write the same artifact: the later one fails, so neither
    overwrites the other (managed images are replaced by design, so only IDs that are
    versions or VHD files count)."""
    if planned.done or planned.artifact_id is None or planned.type == TargetKind.ManagedImage:
        return
    for other in result.targets[: planned.index]:
        if other.artifact_id and other.artifact_id.lower() == planned.artifact_id.lower():
            what = "uri" if planned.type == TargetKind.VHD else "version"
            record_failure(
                planned,
                f"{planned.path} publishes {planned.artifact_id}, as {other.path} does; "
                f"give each target its own {what}",
            )
            return


def decide_version(result: DistributionPlan, target: PlannedTarget, existing: list[str]) -> None:
    """A Latest version number: one above the newest of what exists and what other
    targets of this plan publish to the same definition."""
    definition = (target.gallery_image_id or "").lower()
    taken = [
        other.version
        for other in result.targets
        if other is not target
        and other.version
        and (other.gallery_image_id or "").lower() == definition
    ]
    versioning = LatestVersioning(scheme="Latest", major=target.major)
    _set_version(target, next_version([*existing, *taken], versioning, ""))


def record_success(target: PlannedTarget, output: RunOutput) -> None:
    target.state = TargetState.Succeeded
    target.artifact_id = output.artifact_id
    target.artifact_uri = output.artifact_uri
    target.error_code = target.message = None
    target.retries = 0


def existing_version_message(target: PlannedTarget) -> str:
    """Why a gallery version that exists already is not published over, and what to do:
    AIB requires a version distinct from every version in the gallery."""
    where = f"{target.path} ({target.run_output_name}): {target.artifact_id} exists already"
    if target.scheme == VersionScheme.Explicit:
        fix = (
            "put a new version in galleryImageId, or remove /versions/... from it to let "
            "versioning pick the next one"
        )
    elif target.scheme == VersionScheme.Source:
        fix = (
            "versioning Source publishes one version per source image version: build from a "
            "newer source image, or use versioning Latest"
        )
    else:
        fix = "another build published it after this run chose its number: run the build again"
    return (
        f"{where}; a gallery image version is never overwritten (AIB requires a new "
        f"version): {fix}, or delete that version first"
    )


def record_failure(target: PlannedTarget, message: str, code: str | None = None) -> None:
    target.state = TargetState.Failed
    target.message = message
    target.error_code = code


def record_retry(target: PlannedTarget, message: str, code: str | None) -> bool:
    """Count a retryable error; True while the target's budget lasts, else it failed."""
    target.retries += 1
    target.error_code = code
    target.message = message
    if target.retries > MAX_TARGET_RETRIES:
        record_failure(target, f"gave up after {MAX_TARGET_RETRIES} retries: {message}", code)
        return False
    return True


def run_outputs(result: DistributionPlan) -> list[RunOutput]:
    """AIB's runOutputs: one per target that ended."""
    return [
        RunOutput(
            run_output_name=t.run_output_name,
            artifact_id=t.artifact_id if t.state == TargetState.Succeeded else None,
            artifact_uri=t.artifact_uri,
            provisioning_state=t.state,
            message=t.message if t.state == TargetState.Failed else None,
        )
        for t in result.targets
        if t.done
    ]


def statuses(result: DistributionPlan) -> list[TargetStatus]:
    """Every target's state for the run's status, pending ones and their retries too."""
    return [
        TargetStatus(
            run_output_name=t.run_output_name,
            type=t.type,
            state=t.state,
            artifact_id=t.artifact_id,
            error_code=t.error_code,
            message=t.message,
            retries=t.retries or None,
        )
        for t in result.targets
    ]
