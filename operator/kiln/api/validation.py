"""Every rule on a template spec, as pure functions: the operator's own check.

Most of these rules also exist as CEL in the CRD (the models' `cel_rules` in
api/template.py), so the API server refuses them at `kubectl apply`; here they are the
second line (a CRD installed without its rules, an object stored before a rule existed)
and the only line for what CEL cannot state, each marked `No CEL twin:` with the reason.
Each problem names the field path and the fix, so a person reading `kubectl describe`
knows what to change without reading Kiln's source.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from croniter import croniter
from pydantic import ValidationError
from pydantic.alias_generators import to_snake

from kiln.api.base import KubeModel
from kiln.api.capabilities import capabilities, windows_provider
from kiln.api.template import (
    GALLERY_IMAGE_ID_PATTERN,
    GALLERY_IMAGE_VERSION_ID_PATTERN,
    IDENTITY_ID_PATTERN,
    MANAGED_IMAGE_ID_PATTERN,
    MAX_TAG_NAME,
    MAX_TAG_VALUE,
    RESOURCE_GROUP_ID_PATTERN,
    SUBNET_ID_PATTERN,
    TAG_NAME_FORBIDDEN,
    FileStep,
    ImageTemplateSpec,
    ManagedImageDistributor,
    PlatformImageSource,
    PowerShellStep,
    Provider,
    ScheduleTrigger,
    ScriptFields,
    SharedImageDistributor,
    SharedImageVersionSource,
    ShellStep,
    SourceImageTrigger,
    SourceVersioning,
    VhdDistributor,
    WindowsRestartStep,
    WindowsUpdateStep,
)
from kiln.api.tenancy import Refused, TenancyPolicy

MANAGED_IMAGE_ID = re.compile(MANAGED_IMAGE_ID_PATTERN, re.I)
GALLERY_IMAGE_ID = re.compile(GALLERY_IMAGE_ID_PATTERN, re.I)
GALLERY_IMAGE_VERSION_ID = re.compile(GALLERY_IMAGE_VERSION_ID_PATTERN, re.I)
RESOURCE_GROUP_ID = re.compile(RESOURCE_GROUP_ID_PATTERN, re.I)
SUBNET_ID = re.compile(SUBNET_ID_PATTERN, re.I)
IDENTITY_ID = re.compile(IDENTITY_ID_PATTERN, re.I)
VERSION_TRIPLE = re.compile(r"^\d+\.\d+\.\d+$")

# Union tags pydantic puts into error locations; a person never writes them in a path.
_UNION_TAGS = {
    "PlatformImage",
    "ManagedImage",
    "SharedImageVersion",
    "Shell",
    "PowerShell",
    "File",
    "WindowsRestart",
    "WindowsUpdate",
    "SharedImage",
    "VHD",
    "Latest",
    "Source",
    "Schedule",
    "SourceImage",
}
_WINDOWS_STEPS = (PowerShellStep, WindowsRestartStep, WindowsUpdateStep)


class SpecProblem(KubeModel):
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def field_path(loc: tuple[int | str, ...], root: str = "spec") -> str:
    """spec.customize[0].inline from pydantic's ('customize', 0, 'Shell', 'inline')."""
    path = root
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS and (isinstance(previous, int) or previous in _TAGGED_FIELDS):
            pass
        else:
            path += f".{part}"
        previous = part
    return path


_TAGGED_FIELDS = {"source", "versioning"}

_PYDANTIC_FIXES = {
    "missing": "is required; add it",
    "extra_forbidden": "is not a known field; remove it or correct its spelling",
}


def _explain(error: dict[str, Any]) -> str:
    if error["type"] in _PYDANTIC_FIXES:
        return _PYDANTIC_FIXES[error["type"]]
    if error["type"] == "union_tag_invalid":
        context = error["ctx"]
        return f"{context['tag']!r} is not a known type; use one of {context['expected_tags']}"
    return error["msg"]


def _problem(error: dict[str, Any]) -> SpecProblem:
    path = field_path(error["loc"])
    if error["type"] == "union_tag_invalid":
        path += "." + error["ctx"]["discriminator"].strip("'")
    return SpecProblem(path=path, message=_explain(error))


def parse_spec(raw: dict[str, Any]) -> tuple[ImageTemplateSpec | None, list[SpecProblem]]:
    """Parse a template spec; problems instead of an exception, for status messages."""
    try:
        return ImageTemplateSpec.model_validate(raw), []
    except ValidationError as error:
        return None, [_problem(e) for e in error.errors(include_url=False)]


def check_rules(spec: ImageTemplateSpec, provider: Provider) -> list[SpecProblem]:
    """Every cross-field rule AIB enforces, plus what the chosen provider can do."""
    return list(_rules(spec, provider))


def _rules(spec: ImageTemplateSpec, provider: Provider) -> Iterator[SpecProblem]:
    yield from _source_rules(spec, provider)
    customize = spec.customize or []
    for index, step in enumerate(customize):
        yield from _step_rules(step, f"spec.customize[{index}]", provider)
    validate = spec.validate_
    validations = (validate.in_vm_validations if validate else None) or []
    for index, step in enumerate(validations):
        yield from _step_rules(step, f"spec.validate.inVMValidations[{index}]", provider)
    yield from _os_rules([*customize, *validations], provider)
    if validate and validate.source_validation_only:
        if customize:
            yield SpecProblem(
                path="spec.customize",
                message="must be empty when validate.sourceValidationOnly is true; remove the "
                "customizers or set sourceValidationOnly to false",
            )
        if not validations:
            yield SpecProblem(
                path="spec.validate.inVMValidations",
                message="needs at least one validation when sourceValidationOnly is true",
            )
    yield from _distribute_rules(spec, provider)
    yield from _vm_profile_rules(spec)
    yield from _tag_rules(spec.managed_resource_tags, "spec.managedResourceTags")
    yield from _identity_rules(spec)
    yield from _trigger_rules(spec)
    if spec.staging_resource_group and not RESOURCE_GROUP_ID.match(spec.staging_resource_group):
        yield SpecProblem(
            path="spec.stagingResourceGroup",
            message="must be a resource group ID: /subscriptions/SUB/resourceGroups/NAME",
        )
    # No CEL twin: the operator's default location, resource group and subscription fill
    # these in, and the API server does not know them.
    for field in capabilities(provider).account_fields:
        if not getattr(spec, to_snake(field)):
            yield SpecProblem(
                path=f"spec.{field}",
                message=f"is required for the {provider} provider (or set the operator's "
                f"default {field}); add it",
            )


def _source_rules(spec: ImageTemplateSpec, provider: Provider) -> Iterator[SpecProblem]:
    source = spec.source
    if isinstance(source, PlatformImageSource):
        for field in ("publisher", "offer", "sku", "version"):
            if not getattr(source, field).strip():
                yield SpecProblem(path=f"spec.source.{field}", message="must not be empty")
    elif isinstance(source, SharedImageVersionSource):
        if not GALLERY_IMAGE_VERSION_ID.match(source.image_version_id):
            yield SpecProblem(
                path="spec.source.imageVersionId",
                message="must be a gallery image version ID: /subscriptions/SUB/resourceGroups/"
                "RG/providers/Microsoft.Compute/galleries/G/images/DEF/versions/VERSION "
                "(VERSION may be 'latest')",
            )
    elif not MANAGED_IMAGE_ID.match(source.image_id):
        yield SpecProblem(
            path="spec.source.imageId",
            message="must be a managed image ID: /subscriptions/SUB/resourceGroups/RG/"
            "providers/Microsoft.Compute/images/NAME",
        )


def _uri_rule(uri: str, path: str, provider: Provider) -> Iterator[SpecProblem]:
    # CEL twins: the scheme on each step; file:// on azure when spec.provider names it
    # (unset, the operator's default provider decides, which only the operator knows).
    schemes = ("https://", "http://", "file://")
    if not capabilities(provider).file_uris:
        schemes = schemes[:2]
    if not uri.startswith(schemes):
        yield SpecProblem(
            path=path,
            message=f"must start with {' or '.join(schemes)} for the {provider} provider",
        )


def _step_rules(step: KubeModel, path: str, provider: Provider) -> Iterator[SpecProblem]:
    if isinstance(step, ScriptFields):
        has_uri, has_inline = bool(step.script_uri), bool(step.inline)
        if has_uri == has_inline:
            yield SpecProblem(
                path=path,
                message="give exactly one of scriptUri and inline"
                + (" (both are set)" if has_uri else " (neither is set)"),
            )
        if step.script_uri:
            yield from _uri_rule(step.script_uri, f"{path}.scriptUri", provider)
        if step.sha256_checksum and not step.script_uri:
            yield SpecProblem(
                path=f"{path}.sha256Checksum",
                message="only applies to scriptUri; remove it or use scriptUri",
            )
    if isinstance(step, WindowsUpdateStep):
        for index, rule in enumerate(step.filters or []):
            if not rule.startswith(("include:", "exclude:")):
                yield SpecProblem(
                    path=f"{path}.filters[{index}]",
                    message="each filter is include:<expression> or exclude:<expression>, "
                    "e.g. exclude:$_.Title -like '*Preview*'",
                )
    if isinstance(step, PowerShellStep) and step.run_as_system and not step.run_elevated:
        yield SpecProblem(
            path=f"{path}.runAsSystem",
            message="needs runElevated: true; set it or drop runAsSystem",
        )
    if isinstance(step, FileStep):
        yield from _uri_rule(step.source_uri, f"{path}.sourceUri", provider)
        destination = step.destination
        if destination.startswith("/") and not destination.startswith("/tmp/"):
            yield SpecProblem(
                path=f"{path}.destination",
                message="on Linux files can only be uploaded under /tmp; upload to /tmp/... "
                "and move the file with a Shell step",
            )
        if not destination.startswith("/") and not re.match(r"^[A-Za-z]:[\\/]", destination):
            yield SpecProblem(
                path=f"{path}.destination", message="must be an absolute path on the build VM"
            )
        if destination.endswith(("/", "\\")):
            yield SpecProblem(
                path=f"{path}.destination", message="must name a file, not a directory"
            )
    # CEL twin when spec.provider is local; the operator's default provider otherwise.
    if not capabilities(provider).windows_build_vms and isinstance(step, _WINDOWS_STEPS):
        yield SpecProblem(
            path=f"{path}.type",
            message=f"{step.type} needs a Windows build VM, which the {provider} provider "
            f"cannot run; set spec.provider: {windows_provider()}",
        )


def _os_rules(steps: list[KubeModel], provider: Provider) -> Iterator[SpecProblem]:
    # CEL twin when spec.provider is azure; the operator's default provider otherwise.
    linux = any(isinstance(s, ShellStep) for s in steps)
    windows = any(isinstance(s, _WINDOWS_STEPS) for s in steps)
    if linux and windows and capabilities(provider).windows_build_vms:
        yield SpecProblem(
            path="spec.customize",
            message="mixes Shell (Linux) with PowerShell/WindowsRestart/WindowsUpdate "
            "(Windows) steps; a build VM runs one OS, so keep the steps of one",
        )


def _distribute_rules(spec: ImageTemplateSpec, provider: Provider) -> Iterator[SpecProblem]:
    seen: dict[str, int] = {}
    for index, target in enumerate(spec.distribute):
        path = f"spec.distribute[{index}]"
        name = target.run_output_name.lower()  # Azure names ignore case
        if name in seen:
            yield SpecProblem(
                path=f"{path}.runOutputName",
                message=f"{target.run_output_name!r} is already used by "
                f"spec.distribute[{seen[name]}]; "
                "runOutputName must be unique",
            )
        seen.setdefault(name, index)
        yield from _tag_rules(target.artifact_tags, f"{path}.artifactTags")
        if isinstance(target, ManagedImageDistributor):
            if not MANAGED_IMAGE_ID.match(target.image_id):
                yield SpecProblem(
                    path=f"{path}.imageId",
                    message="must be a managed image ID: /subscriptions/SUB/resourceGroups/RG/"
                    "providers/Microsoft.Compute/images/NAME",
                )
        elif isinstance(target, SharedImageDistributor):
            yield from _shared_image_rules(spec, target, path)
        elif isinstance(target, VhdDistributor) and target.uri:
            yield from _vhd_rules(target, path, provider)


def _shared_image_rules(
    spec: ImageTemplateSpec, target: SharedImageDistributor, path: str
) -> Iterator[SpecProblem]:
    if not GALLERY_IMAGE_ID.match(target.gallery_image_id):
        yield SpecProblem(
            path=f"{path}.galleryImageId",
            message="must be a gallery image ID: /subscriptions/SUB/resourceGroups/RG/"
            "providers/Microsoft.Compute/galleries/G/images/DEF",
        )
    if target.target_regions and target.replication_regions:
        yield SpecProblem(
            path=f"{path}.replicationRegions",
            message="cannot be used with targetRegions; move the regions into targetRegions",
        )
    if target.storage_account_type and not target.replication_regions:
        yield SpecProblem(
            path=f"{path}.storageAccountType",
            message="only applies with replicationRegions; set storageAccountType on each "
            "targetRegions entry instead",
        )
    regions = [r.name for r in target.target_regions or []] + list(target.replication_regions or [])
    names = [n.lower() for n in regions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        yield SpecProblem(
            path=f"{path}.targetRegions",
            message=f"lists {', '.join(duplicates)} more than once; list each region once",
        )
    explicit_version = "/versions/" in target.gallery_image_id.lower()
    if explicit_version and target.versioning:
        yield SpecProblem(
            path=f"{path}.versioning",
            message="cannot be used when galleryImageId names a version; drop one of them",
        )
    if explicit_version and not VERSION_TRIPLE.match(target.gallery_image_id.rsplit("/", 1)[-1]):
        yield SpecProblem(
            path=f"{path}.galleryImageId",
            message="the version must be MAJOR.MINOR.PATCH, e.g. 1.0.0",
        )
    if isinstance(target.versioning, SourceVersioning) and not isinstance(
        spec.source, PlatformImageSource | SharedImageVersionSource
    ):
        yield SpecProblem(
            path=f"{path}.versioning.scheme",
            message="Source versioning needs a PlatformImage or SharedImageVersion source; "
            "use scheme: Latest",
        )


def _vhd_rules(target: VhdDistributor, path: str, provider: Provider) -> Iterator[SpecProblem]:
    # CEL twin when spec.provider names the provider; the operator's default otherwise.
    uri = target.uri or ""
    if capabilities(provider).vhd_destination == "file":
        if not (uri.startswith("file:///") or uri.startswith("/")):
            yield SpecProblem(
                path=f"{path}.uri",
                message=f"for the {provider} provider give an absolute file path or file:/// URL",
            )
    elif not uri.startswith("https://") or not uri.lower().endswith(".vhd"):
        yield SpecProblem(
            path=f"{path}.uri",
            message="must be an https:// blob URL ending in .vhd (or unset for the staging "
            "storage account)",
        )


def _vm_profile_rules(spec: ImageTemplateSpec) -> Iterator[SpecProblem]:
    profile = spec.vm_profile
    if profile is None:
        return
    for index, identity in enumerate(profile.user_assigned_identities or []):
        if not IDENTITY_ID.match(identity):
            yield SpecProblem(
                path=f"spec.vmProfile.userAssignedIdentities[{index}]",
                message="must be a user-assigned identity ID: /subscriptions/SUB/resourceGroups/"
                "RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME",
            )
    vnet = profile.vnet_config
    if vnet is None:
        return
    if vnet.subnet_id and not SUBNET_ID.match(vnet.subnet_id):
        yield SpecProblem(
            path="spec.vmProfile.vnetConfig.subnetId",
            message="must be a subnet ID: /subscriptions/SUB/resourceGroups/RG/providers/"
            "Microsoft.Network/virtualNetworks/VNET/subnets/SUBNET",
        )
    if vnet.container_instance_subnet_id and not vnet.subnet_id:
        yield SpecProblem(
            path="spec.vmProfile.vnetConfig.containerInstanceSubnetId",
            message="needs subnetId as well; set subnetId to the build VM's subnet",
        )
    if vnet.container_instance_subnet_id and vnet.proxy_vm_size:
        yield SpecProblem(
            path="spec.vmProfile.vnetConfig.proxyVmSize",
            message="cannot be used with containerInstanceSubnetId (no proxy VM is deployed "
            "then); remove one of them",
        )
    if vnet.proxy_vm_size and not vnet.subnet_id:
        yield SpecProblem(
            path="spec.vmProfile.vnetConfig.proxyVmSize",
            message="needs subnetId as well; set subnetId or remove proxyVmSize",
        )


def _tag_rules(tags: dict[str, str] | None, path: str) -> Iterator[SpecProblem]:
    for name, value in (tags or {}).items():
        if len(name) > MAX_TAG_NAME or re.search(TAG_NAME_FORBIDDEN, name):
            yield SpecProblem(
                path=f"{path}.{name}",
                message=f"tag names have at most {MAX_TAG_NAME} characters and none of <>%&\\?/",
            )
        if len(value) > MAX_TAG_VALUE:
            yield SpecProblem(
                path=f"{path}.{name}", message=f"tag values have at most {MAX_TAG_VALUE} characters"
            )


def _identity_rules(spec: ImageTemplateSpec) -> Iterator[SpecProblem]:
    identity = spec.identity
    if identity is None:
        return
    identities = identity.user_assigned_identities or {}
    if identity.type == "UserAssigned" and len(identities) != 1:
        yield SpecProblem(
            path="spec.identity.userAssignedIdentities",
            message="needs exactly one identity when type is UserAssigned",
        )
    if identity.type == "None" and identities:
        yield SpecProblem(
            path="spec.identity.userAssignedIdentities",
            message="must be empty when type is None",
        )
    for key in identities:
        if not IDENTITY_ID.match(key):
            yield SpecProblem(
                path="spec.identity.userAssignedIdentities",
                message=f"{key!r} is not a user-assigned identity ID",
            )


def source_follows_latest(spec: ImageTemplateSpec) -> bool:
    source = spec.source
    if isinstance(source, PlatformImageSource):
        return source.version.lower() == "latest"
    if isinstance(source, SharedImageVersionSource):
        return source.image_version_id.lower().endswith("/versions/latest")
    return False


def _trigger_rules(spec: ImageTemplateSpec) -> Iterator[SpecProblem]:
    kinds: set[str] = set()
    for index, trigger in enumerate(spec.triggers or []):
        path = f"spec.triggers[{index}]"
        if trigger.kind in kinds:
            yield SpecProblem(path=f"{path}.kind", message=f"{trigger.kind} is listed twice")
        kinds.add(trigger.kind)
        # The CEL twin checks the shape only: cron's syntax (ranges, steps, names) is
        # more than a regular expression can check without refusing valid schedules.
        if isinstance(trigger, ScheduleTrigger) and not croniter.is_valid(trigger.schedule):
            yield SpecProblem(
                path=f"{path}.schedule",
                message=f"{trigger.schedule!r} is not a cron expression; use five fields, "
                "e.g. '0 3 * * 1' for Mondays at 03:00 UTC",
            )
        if isinstance(trigger, SourceImageTrigger) and not source_follows_latest(spec):
            yield SpecProblem(
                path=f"{path}.kind",
                message="SourceImage needs a source that follows 'latest' (PlatformImage "
                "version latest, or a SharedImageVersion ID ending in /versions/latest)",
            )


def _downloaded_uris(spec: ImageTemplateSpec) -> Iterator[tuple[str, str]]:
    """(field path, URI) of everything the operator fetches for a run."""
    phases = (
        ("spec.customize", spec.customize or []),
        (
            "spec.validate.inVMValidations",
            (spec.validate_ and spec.validate_.in_vm_validations) or [],
        ),
    )
    for prefix, steps in phases:
        for index, step in enumerate(steps):
            if isinstance(step, ScriptFields) and step.script_uri:
                yield f"{prefix}[{index}].scriptUri", step.script_uri
            if isinstance(step, FileStep):
                yield f"{prefix}[{index}].sourceUri", step.source_uri


def tenancy_rules(
    spec: ImageTemplateSpec, provider: Provider, policy: TenancyPolicy
) -> Iterator[SpecProblem]:
    """What the operator's settings let a template reach: files, outputs, addresses.

    No CEL twin: the roots, ranges and identity switch are operator settings, which the
    CRD does not know."""
    for path, uri in _downloaded_uris(spec):
        try:
            if uri.startswith("file://"):
                policy.check_file_uri(uri)
            else:
                policy.check_literal_host(uri)
        except Refused as refusal:
            yield SpecProblem(path=path, message=str(refusal))
    for index, target in enumerate(spec.distribute):
        local_vhd = provider == Provider.local and isinstance(target, VhdDistributor)
        path = (target.uri or "").removeprefix("file://") if local_vhd else ""
        if path.startswith("/"):  # other forms are refused by the VHD rules already
            try:
                policy.check_output_path(path)
            except Refused as refusal:
                yield SpecProblem(path=f"spec.distribute[{index}].uri", message=str(refusal))
    if (
        provider == Provider.azure
        and not spec.service_account_name
        and not policy.operator_identity
    ):
        yield SpecProblem(
            path="spec.serviceAccountName",
            message="is required: this operator lends its own Azure identity to no template "
            "(KILN_AZURE_OPERATOR_IDENTITY is false); name a ServiceAccount of this namespace "
            "with the azure.workload.identity/client-id annotation of your team's identity",
        )
    vnet = spec.vm_profile.vnet_config if spec.vm_profile else None
    private = bool(vnet and vnet.subnet_id)
    if provider == Provider.azure and not private and not policy.communicator_source:
        yield SpecProblem(
            path="spec.vmProfile.vnetConfig.subnetId",
            message="is needed: this operator has no KILN_AZURE_COMMUNICATOR_SOURCE (chart: "
            "settings.azure.communicatorSource), so a build VM with a public IP would have "
            "no address range allowed to reach it; build in an existing subnet, or ask the "
            "operator's admin to set the operator's egress range",
        )


def validate_template(
    raw_spec: dict[str, Any], provider: Provider, policy: TenancyPolicy | None = None
) -> list[SpecProblem]:
    """The spec's own rules, and with a policy what the operator lets it reach."""
    spec, problems = parse_spec(raw_spec)
    if spec is None:
        return problems
    problems = check_rules(spec, provider)
    if policy is not None:
        problems += tenancy_rules(spec, provider, policy)
    return problems
