"""ImageTemplate: the desired image, with every AIB imageTemplates property under its AIB name.

AIB API 2024-02-01 plus the 2025-10-01 additions (additionalDataDisks, optimize.workload,
File validators, replicationMode). Cross-field rules are declared here as CEL (`cel_rules`),
so the API server refuses a bad template at `kubectl apply`; api/validation.py checks the
same rules in the operator (the second line) and those CEL cannot state.

Lists and strings that rules read have maxItems/maxLength, which keeps the rules within
the API server's CEL cost budget.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from kiln.api.base import CelRule, KubeModel
from kiln.api.capabilities import CAPABILITIES, Provider, file_uri_provider, windows_provider
from kiln.api.status import Condition, RunOutput, conditions_field

RUN_OUTPUT_NAME_PATTERN = r"^[A-Za-z0-9-_.]{1,64}$"
SHA256_PATTERN = r"^[A-Fa-f0-9]{64}$"

# Azure resource IDs, matched without regard to case as Azure does; RE2 and Python agree
# on these, so CEL rules and api/validation.py use the same text.
_ARM = r"^/subscriptions/[^/]+/resourceGroups/[^/]+"
MANAGED_IMAGE_ID_PATTERN = _ARM + r"/providers/Microsoft\.Compute/images/[^/]+$"
GALLERY_IMAGE_ID_PATTERN = (
    _ARM + r"/providers/Microsoft\.Compute/galleries/[^/]+/images/[^/]+(/versions/[^/]+)?$"
)
GALLERY_IMAGE_VERSION_ID_PATTERN = (
    _ARM + r"/providers/Microsoft\.Compute/galleries/[^/]+/images/[^/]+/versions/[^/]+$"
)
RESOURCE_GROUP_ID_PATTERN = _ARM + r"$"
SUBNET_ID_PATTERN = _ARM + r"/providers/Microsoft\.Network/virtualNetworks/[^/]+/subnets/[^/]+$"
IDENTITY_ID_PATTERN = _ARM + r"/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/[^/]+$"
TAG_NAME_FORBIDDEN = r"[<>%&\\?/]"
MAX_TAG_NAME, MAX_TAG_VALUE, MAX_TAGS = 512, 256, 50  # Azure's limits

# Bounds: generous for real templates, and what the CEL cost estimate needs.
MAX_ID = 1024
MAX_URI = 2048
MAX_NAME = 256
MAX_STEPS = 100
MAX_TARGETS = 20
MAX_REGIONS = 64  # Azure has about 60 public regions
MAX_REGION_NAME = 64

WINDOWS_STEP_TYPES = ("PowerShell", "WindowsRestart", "WindowsUpdate")
DURATION_PATTERN = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"  # AIB's restartTimeout, e.g. 1h30m
_WINDOWS_CEL = "[" + ", ".join(f"'{t}'" for t in WINDOWS_STEP_TYPES) + "]"


def matches(field: str, pattern: str) -> str:
    """CEL: `self.<field>` matches an Azure ID pattern, case-insensitively."""
    return f"self.{field}.matches(r'(?i){pattern}')"


def _has(field: str, on: str) -> str:
    """CEL: on.field is present; `on` itself may be an optional field (self.validate)."""
    parent = f"has({on}) && " if "." in on else ""
    return f"{parent}has({on}.{field})"


def _set(field: str, on: str = "self") -> str:
    """CEL: an optional string or list field is present and not empty (Python's truth)."""
    return f"({_has(field, on)} && size({on}.{field}) > 0)"


def _true(field: str, on: str = "self") -> str:
    return f"({_has(field, on)} && {on}.{field})"


def _uri_scheme_rule(field: str) -> CelRule:
    return CelRule(
        rule=f"!{_set(field)} || self.{field}.startsWith('https://') || "
        f"self.{field}.startsWith('http://') || self.{field}.startsWith('file://')",
        message="must start with https:// or http:// (or file:// on the local provider)",
        field_path=f".{field}",
    )


def _tags_rule() -> dict[str, object]:
    return {
        "x-kubernetes-validations": [
            CelRule(
                rule=f"self.all(k, k.size() <= {MAX_TAG_NAME} && "
                f"!k.matches(r'{TAG_NAME_FORBIDDEN}'))",
                message=f"tag names have at most {MAX_TAG_NAME} characters and none of "
                "<>%&\\?/; rename the tag",
            ).wire()
        ]
    }


# The schema's bound only: the operator's own check words the message (validation.py).
TagValue = Annotated[str, Field(json_schema_extra={"maxLength": MAX_TAG_VALUE})]


class OnError(StrEnum):
    cleanup = "cleanup"
    abort = "abort"


class State(StrEnum):
    Enabled = "Enabled"
    Disabled = "Disabled"


# --- source -------------------------------------------------------------------------------


class PlanInfo(KubeModel):
    """Marketplace purchase plan; all three fields or none."""

    plan_name: str = Field(description="Name of the purchase plan.")
    plan_product: str = Field(description="Product of the purchase plan.")
    plan_publisher: str = Field(description="Publisher of the purchase plan.")


class PlatformImageSource(KubeModel):
    """A marketplace (platform) image, named as Azure names it."""

    cel_rules = tuple(
        CelRule(
            rule=f"self.{field}.trim() != ''",
            message="must not be empty",
            field_path=f".{field}",
        )
        for field in ("publisher", "offer", "sku", "version")
    )

    type: Literal["PlatformImage"] = Field(description="Kind of source image.")
    publisher: str = Field(
        max_length=MAX_NAME, description="Image publisher, e.g. Debian or Canonical."
    )
    offer: str = Field(max_length=MAX_NAME, description="Image offer, e.g. debian-12.")
    sku: str = Field(max_length=MAX_NAME, description="Image SKU, e.g. 12-gen2.")
    version: str = Field(
        max_length=MAX_NAME,
        description="Image version, or 'latest' to resolve the newest when a run starts; "
        "the run's status records the exact version used.",
    )
    plan_info: PlanInfo | None = Field(
        default=None, description="Purchase plan for marketplace images that need one."
    )


_MANAGED_IMAGE_ID_RULE = CelRule(
    rule=matches("imageId", MANAGED_IMAGE_ID_PATTERN),
    message="must be a managed image ID: /subscriptions/SUB/resourceGroups/RG/"
    "providers/Microsoft.Compute/images/NAME",
    field_path=".imageId",
)


class ManagedImageSource(KubeModel):
    """A managed image, e.g. the output of an earlier build."""

    cel_rules = (_MANAGED_IMAGE_ID_RULE,)

    type: Literal["ManagedImage"] = Field(description="Kind of source image.")
    image_id: str = Field(
        max_length=MAX_ID,
        description="Resource ID of the managed image: "
        "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/images/NAME.",
    )


class SharedImageVersionSource(KubeModel):
    """An Azure Compute Gallery image version (or the local gallery's)."""

    cel_rules = (
        CelRule(
            rule=matches("imageVersionId", GALLERY_IMAGE_VERSION_ID_PATTERN),
            message="must be a gallery image version ID: /subscriptions/SUB/resourceGroups/"
            "RG/providers/Microsoft.Compute/galleries/G/images/DEF/versions/VERSION "
            "(VERSION may be 'latest')",
            field_path=".imageVersionId",
        ),
    )

    type: Literal["SharedImageVersion"] = Field(description="Kind of source image.")
    image_version_id: str = Field(
        max_length=MAX_ID,
        description="Resource ID of the gallery image version; a version name of 'latest' "
        "resolves to the newest version not excluded from latest when a run starts.",
    )


Source = Annotated[
    PlatformImageSource | ManagedImageSource | SharedImageVersionSource,
    Field(discriminator="type"),
]


# --- customizers and validators -------------------------------------------------------------


class ScriptFields(KubeModel):
    """A script given inline or by URI (exactly one of the two)."""

    cel_rules = (
        CelRule(
            rule=f"{_set('scriptUri')} != {_set('inline')}",
            message="give exactly one of scriptUri and inline",
        ),
        _uri_scheme_rule("scriptUri"),
        CelRule(
            rule=f"!has(self.sha256Checksum) || {_set('scriptUri')}",
            message="only applies to scriptUri; remove it or use scriptUri",
            field_path=".sha256Checksum",
        ),
    )

    name: str | None = Field(default=None, description="Friendly name of this step.")
    script_uri: str | None = Field(
        default=None,
        max_length=MAX_URI,
        description="URI of the script (https://, http:// or file://). Exclusive with inline.",
    )
    sha256_checksum: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="SHA-256 of the script at scriptUri (64 hex digits); the build fails "
        "when the downloaded script differs.",
    )
    inline: list[str] | None = Field(
        default=None, description="Commands to run, one per item. Exclusive with scriptUri."
    )


class ShellStep(ScriptFields):
    """Runs a shell script on a Linux build VM as the build user; prefix commands with sudo
    for root, as in AIB. Inline commands run as one script that stops at the first error."""

    type: Literal["Shell"] = Field(description="Kind of step.")


class PowerShellStep(ScriptFields):
    """Runs a PowerShell script on a Windows build VM."""

    cel_rules = (
        CelRule(
            rule=f"!{_true('runAsSystem')} || {_true('runElevated')}",
            message="needs runElevated: true; set it or drop runAsSystem",
            field_path=".runAsSystem",
        ),
    )

    type: Literal["PowerShell"] = Field(description="Kind of step.")
    run_elevated: bool | None = Field(default=None, description="Run with elevated privileges.")
    run_as_system: bool | None = Field(
        default=None,
        description="Run as the Local System user; only together with runElevated: true.",
    )
    valid_exit_codes: list[int] | None = Field(
        default=None, description="Exit codes that count as success. Default: [0]."
    )


class FileStep(KubeModel):
    """Copies a file onto the build VM (20 MiB at most, as in AIB)."""

    cel_rules = (
        _uri_scheme_rule("sourceUri"),
        CelRule(
            rule="!self.destination.startsWith('/') || self.destination.startsWith('/tmp/')",
            message="on Linux files can only be uploaded under /tmp; upload to /tmp/... and "
            "move the file with a Shell step",
            field_path=".destination",
        ),
        CelRule(
            rule="self.destination.startsWith('/') || "
            "self.destination.matches(r'^[A-Za-z]:[\\\\/]')",
            message="must be an absolute path on the build VM",
            field_path=".destination",
        ),
        CelRule(
            rule="!self.destination.endsWith('/') && !self.destination.endsWith('\\\\')",
            message="must name a file, not a directory",
            field_path=".destination",
        ),
    )

    type: Literal["File"] = Field(description="Kind of step.")
    name: str | None = Field(default=None, description="Friendly name of this step.")
    source_uri: str = Field(
        max_length=MAX_URI, description="URI of the file (https://, http:// or file://)."
    )
    destination: str = Field(
        max_length=MAX_URI,
        description="Absolute path on the VM, its directory already existing; on Linux it "
        "must be under /tmp (move it in a later Shell step).",
    )
    sha256_checksum: str | None = Field(
        default=None,
        pattern=SHA256_PATTERN,
        description="SHA-256 of the file at sourceUri (64 hex digits).",
    )


class WindowsRestartStep(KubeModel):
    """Restarts a Windows build VM and waits for it to come back."""

    type: Literal["WindowsRestart"] = Field(description="Kind of step.")
    name: str | None = Field(default=None, description="Friendly name of this step.")
    restart_command: str | None = Field(
        default=None,
        description="Command that restarts the VM. "
        'Default: shutdown /r /f /t 0 /c "packer restart".',
    )
    restart_check_command: str | None = Field(
        default=None, description="Command whose success shows the restart finished."
    )
    restart_timeout: str | None = Field(
        default=None,
        min_length=2,
        pattern=DURATION_PATTERN,
        description="How long to wait for the VM to come back, as numbers with units, e.g. "
        "5m, 2h or 1h30m. Default: 5m.",
    )


class WindowsUpdateStep(KubeModel):
    """Installs Windows updates, restarting when they need it, until none applies."""

    cel_rules = (
        CelRule(
            rule="!has(self.filters) || self.filters.all(f, f.startsWith('include:') || "
            "f.startsWith('exclude:'))",
            message="each filter is include:<expression> or exclude:<expression>, e.g. "
            "exclude:$_.Title -like '*Preview*'",
            field_path=".filters",
        ),
    )

    type: Literal["WindowsUpdate"] = Field(description="Kind of step.")
    name: str | None = Field(default=None, description="Friendly name of this step.")
    search_criteria: str | None = Field(
        default=None,
        max_length=1000,
        description="Windows Update search criteria. Default: BrowseOnly=0 and IsInstalled=0.",
    )
    filters: list[str] | None = Field(
        default=None,
        max_length=50,
        description="include:<PowerShell expression on $_> or exclude:<...>; the first "
        "that matches an update decides, none matching excludes it. Default: "
        "exclude:$_.Title -like '*Preview*', include:$true.",
    )
    update_limit: int | None = Field(
        default=None, ge=0, description="Most updates installed by this step. 0 or unset: 1000."
    )


Customizer = Annotated[
    ShellStep | PowerShellStep | FileStep | WindowsRestartStep | WindowsUpdateStep,
    Field(discriminator="type"),
]
InVmValidator = Annotated[ShellStep | PowerShellStep | FileStep, Field(discriminator="type")]


class Validate(KubeModel):
    """Checks run on the customized image (or on the source alone)."""

    in_vm_validations: list[InVmValidator] | None = Field(
        default=None,
        max_length=MAX_STEPS,
        alias="inVMValidations",
        description="Validation steps run on the build VM after customization.",
    )
    continue_distribute_on_failure: bool | None = Field(
        default=None,
        description="Distribute even when validation fails (the run still reports Failed).",
    )
    source_validation_only: bool | None = Field(
        default=None,
        description="Validate the source image itself: no customization, no distribution.",
    )


# --- distribution ---------------------------------------------------------------------------


class TargetRegion(KubeModel):
    """A region that receives replicas of a gallery image version."""

    name: str = Field(max_length=MAX_REGION_NAME, description="Region name, e.g. westeurope.")
    replica_count: int | None = Field(
        default=None, ge=1, description="Replicas in this region. Default: 1."
    )
    storage_account_type: str | None = Field(
        default=None,
        description="Standard_LRS (default), Standard_ZRS or Premium_LRS.",
        json_schema_extra={"enum": ["Standard_LRS", "Standard_ZRS", "Premium_LRS"]},
    )


class LatestVersioning(KubeModel):
    """Next version after the newest one (optionally within one major version)."""

    scheme: Literal["Latest"] = Field(description="Version numbering scheme.")
    major: int | None = Field(
        default=None, ge=-1, description="Major version to count within; -1 or unset: any."
    )


class SourceVersioning(KubeModel):
    """Version number taken from the source image's version."""

    scheme: Literal["Source"] = Field(description="Version numbering scheme.")


Versioning = Annotated[LatestVersioning | SourceVersioning, Field(discriminator="scheme")]


class DistributorFields(KubeModel):
    run_output_name: str = Field(
        pattern=RUN_OUTPUT_NAME_PATTERN,
        max_length=64,
        description="Name of this output in the run's runOutputs; unique in the template.",
    )
    artifact_tags: dict[str, TagValue] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description="Tags put on the artifact this distributor creates.",
        json_schema_extra=_tags_rule(),
    )


class ManagedImageDistributor(DistributorFields):
    """Captures a managed image."""

    cel_rules = (_MANAGED_IMAGE_ID_RULE,)

    type: Literal["ManagedImage"] = Field(description="Kind of distribution.")
    image_id: str = Field(
        max_length=MAX_ID,
        description="Resource ID of the managed image to create or replace: "
        "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/images/NAME.",
    )
    location: str = Field(description="Region of the image.")


class SharedImageDistributor(DistributorFields):
    """Publishes a new version of a gallery image definition."""

    cel_rules = (
        CelRule(
            rule=matches("galleryImageId", GALLERY_IMAGE_ID_PATTERN),
            message="must be a gallery image ID: /subscriptions/SUB/resourceGroups/RG/"
            "providers/Microsoft.Compute/galleries/G/images/DEF",
            field_path=".galleryImageId",
        ),
        CelRule(
            rule="!has(self.targetRegions) || !has(self.replicationRegions)",
            message="cannot be used with targetRegions; move the regions into targetRegions",
            field_path=".replicationRegions",
        ),
        CelRule(
            rule=f"!has(self.storageAccountType) || {_set('replicationRegions')}",
            message="only applies with replicationRegions; set storageAccountType on each "
            "targetRegions entry instead",
            field_path=".storageAccountType",
        ),
        CelRule(
            rule="!has(self.targetRegions) || self.targetRegions.all(r, self.targetRegions"
            ".filter(o, o.name.lowerAscii() == r.name.lowerAscii()).size() == 1)",
            message="lists a region more than once; list each region once",
            field_path=".targetRegions",
        ),
        CelRule(
            rule="!has(self.replicationRegions) || self.replicationRegions.all(r, "
            "self.replicationRegions.filter(o, o.lowerAscii() == r.lowerAscii()).size() == 1)",
            message="lists a region more than once; list each region once",
            field_path=".replicationRegions",
        ),
        CelRule(
            rule="!self.galleryImageId.lowerAscii().contains('/versions/') || "
            "!has(self.versioning)",
            message="cannot be used when galleryImageId names a version; drop one of them",
            field_path=".versioning",
        ),
        CelRule(
            rule="!self.galleryImageId.lowerAscii().contains('/versions/') || "
            "self.galleryImageId.matches(r'/[0-9]+\\.[0-9]+\\.[0-9]+$')",
            message="the version must be MAJOR.MINOR.PATCH, e.g. 1.0.0",
            field_path=".galleryImageId",
        ),
    )

    type: Literal["SharedImage"] = Field(description="Kind of distribution.")
    gallery_image_id: str = Field(
        max_length=MAX_ID,
        description="Resource ID of the gallery image definition (/subscriptions/SUB/"
        "resourceGroups/RG/providers/Microsoft.Compute/galleries/G/images/DEF), or of a "
        "version (…/versions/1.2.3) to publish that exact version.",
    )
    target_regions: list[TargetRegion] | None = Field(
        default=None,
        max_length=MAX_REGIONS,
        description="Regions to replicate to, with replica counts; not with replicationRegions.",
    )
    replication_regions: list[Annotated[str, Field(max_length=MAX_REGION_NAME)]] | None = Field(
        default=None,
        max_length=MAX_REGIONS,
        description="Deprecated: regions to replicate to; use targetRegions instead.",
    )
    storage_account_type: str | None = Field(
        default=None,
        description="Deprecated: storage type for replicationRegions; use targetRegions.",
        json_schema_extra={"enum": ["Standard_LRS", "Standard_ZRS", "Premium_LRS"]},
    )
    exclude_from_latest: bool | None = Field(
        default=None, description="Keep this version out of 'latest'. Default: false."
    )
    versioning: Versioning | None = Field(
        default=None, description="How the new version number is chosen. Default: Latest."
    )
    replication_mode: str | None = Field(
        default=None,
        description="Full (default) or Shallow replication.",
        json_schema_extra={"enum": ["Full", "Shallow"]},
    )


class VhdDistributor(DistributorFields):
    """Exports the OS disk as a fixed VHD."""

    type: Literal["VHD"] = Field(description="Kind of distribution.")
    uri: str | None = Field(
        default=None,
        max_length=MAX_URI,
        description="Where to write the VHD (a blob URL, or a file path on the local "
        "provider). Unset: the staging storage.",
    )


Distributor = Annotated[
    ManagedImageDistributor | SharedImageDistributor | VhdDistributor,
    Field(discriminator="type"),
]


# --- build VM and the rest -------------------------------------------------------------------


class VnetConfig(KubeModel):
    """An existing subnet to build in, privately (no public IP)."""

    cel_rules = (
        CelRule(
            rule=f"!{_set('subnetId')} || " + matches("subnetId", SUBNET_ID_PATTERN),
            message="must be a subnet ID: /subscriptions/SUB/resourceGroups/RG/providers/"
            "Microsoft.Network/virtualNetworks/VNET/subnets/SUBNET",
            field_path=".subnetId",
        ),
        CelRule(
            rule=f"!{_set('containerInstanceSubnetId')} || {_set('subnetId')}",
            message="needs subnetId as well; set subnetId to the build VM's subnet",
            field_path=".containerInstanceSubnetId",
        ),
        CelRule(
            rule=f"!({_set('containerInstanceSubnetId')} && {_set('proxyVmSize')})",
            message="cannot be used with containerInstanceSubnetId (no proxy VM is deployed "
            "then); remove one of them",
            field_path=".proxyVmSize",
        ),
        CelRule(
            rule=f"!{_set('proxyVmSize')} || {_set('subnetId')}",
            message="needs subnetId as well; set subnetId or remove proxyVmSize",
            field_path=".proxyVmSize",
        ),
    )

    subnet_id: str | None = Field(
        default=None,
        max_length=MAX_ID,
        description="Resource ID of an existing subnet for the build VM.",
    )
    container_instance_subnet_id: str | None = Field(
        default=None,
        max_length=MAX_ID,
        description="Subnet for AIB's isolated-build container; only with subnetId, "
        "not with proxyVmSize.",
    )
    proxy_vm_size: str | None = Field(
        default=None, description="Size of AIB's proxy VM; not with containerInstanceSubnetId."
    )


class VmProfile(KubeModel):
    """How the build VM is set up."""

    vm_size: str | None = Field(
        default=None,
        description="VM size. Default: Standard_D1_v2 (Gen1) or Standard_D2ds_v4 (Gen2); "
        "the local provider maps sizes to vCPUs and memory.",
    )
    os_disk_size_gb: int | None = Field(
        default=None,
        ge=0,
        alias="osDiskSizeGB",
        description="OS disk size in GB; 0 or unset keeps the source's size (grow only).",
    )
    user_assigned_identities: list[Annotated[str, Field(max_length=MAX_ID)]] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description="Resource IDs of user-assigned identities for the build VM.",
        json_schema_extra={
            "x-kubernetes-validations": [
                CelRule(
                    rule="self.all(i, i.matches(r'(?i)" + IDENTITY_ID_PATTERN + "'))",
                    message="each must be a user-assigned identity ID: /subscriptions/SUB/"
                    "resourceGroups/RG/providers/Microsoft.ManagedIdentity/"
                    "userAssignedIdentities/NAME",
                ).wire()
            ]
        },
    )
    vnet_config: VnetConfig | None = Field(
        default=None, description="Build in an existing subnet instead of a new network."
    )


class ErrorHandling(KubeModel):
    """Whether a failed build keeps its VM for debugging."""

    on_customizer_error: OnError | None = Field(
        default=None,
        description="cleanup (default) removes the build VM when a customizer fails; "
        "abort keeps it for debugging.",
    )
    on_validation_error: OnError | None = Field(
        default=None,
        description="cleanup (default) removes the build VM when validation fails; abort keeps it.",
    )


class AutoRun(KubeModel):
    state: State | None = Field(
        default=None, description="Enabled: start a run when the template is created or changed."
    )


class VmBoot(KubeModel):
    state: State | None = Field(default=None, description="Optimize the image for boot time.")


class Workload(KubeModel):
    state: State | None = Field(default=None, description="Run a workload optimization script.")
    script_uri: str | None = Field(default=None, description="URI of the optimization script.")
    sha256_checksum: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="SHA-256 of the script."
    )


class Optimize(KubeModel):
    vm_boot: VmBoot | None = Field(default=None, description="Boot time optimization.")
    workload: Workload | None = Field(default=None, description="Workload optimization.")


class DataDisk(KubeModel):
    size_gb: int = Field(alias="sizeGB", ge=1, description="Size of the data disk in GB.")


class Identity(KubeModel):
    cel_rules = (
        CelRule(
            rule="self.type != 'UserAssigned' || "
            "(has(self.userAssignedIdentities) && size(self.userAssignedIdentities) == 1)",
            message="needs exactly one identity when type is UserAssigned",
            field_path=".userAssignedIdentities",
        ),
        CelRule(
            rule=f"self.type != 'None' || !{_set('userAssignedIdentities')}",
            message="must be empty when type is None",
            field_path=".userAssignedIdentities",
        ),
        CelRule(
            rule="!has(self.userAssignedIdentities) || self.userAssignedIdentities.all(k, "
            "k.matches(r'(?i)" + IDENTITY_ID_PATTERN + "'))",
            message="each key must be a user-assigned identity ID: /subscriptions/SUB/"
            "resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME",
            field_path=".userAssignedIdentities",
        ),
    )

    type: Literal["None", "UserAssigned"] = Field(description="None or UserAssigned.")
    user_assigned_identities: dict[str, dict[str, str]] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description="The identity, keyed by its resource ID (values are empty objects).",
    )


class ConcurrencyPolicy(StrEnum):
    Allow = "Allow"
    Forbid = "Forbid"
    Replace = "Replace"


class ScheduleTrigger(KubeModel):
    """Starts a run on a cron schedule (UTC)."""

    # The shape only (a macro, or five to seven fields); the operator checks the syntax.
    cel_rules = (
        CelRule(
            rule="self.schedule.matches(r'^@[a-z]+$') || "
            "self.schedule.matches(r'^\\s*\\S+(\\s+\\S+){4,6}\\s*$')",
            message="is not a cron expression; use five fields, e.g. '0 3 * * 1' for "
            "Mondays at 03:00 UTC",
            field_path=".schedule",
        ),
    )

    kind: Literal["Schedule"] = Field(description="Kind of trigger.")
    schedule: str = Field(
        max_length=MAX_NAME, description="Cron expression in UTC, e.g. '0 3 * * 1'."
    )
    concurrency_policy: ConcurrencyPolicy | None = Field(
        default=None,
        description="When the schedule fires while a run of the template is unfinished: "
        "Allow queues another run (the default), Forbid skips this time, Replace cancels "
        "the unfinished runs and starts a new one (as CronJob's concurrencyPolicy).",
    )


class SourceImageTrigger(KubeModel):
    """Starts a run when the source's 'latest' resolves to a new version."""

    kind: Literal["SourceImage"] = Field(description="Kind of trigger.")


Trigger = Annotated[ScheduleTrigger | SourceImageTrigger, Field(discriminator="kind")]


_VALIDATIONS = "self.validate.inVMValidations"


def _all_steps(condition: str) -> str:
    """CEL: condition (over `s`) holds for every customize and inVMValidations step."""
    customize = f"(!has(self.customize) || self.customize.all(s, {condition}))"
    validations = (
        f"(!has(self.validate) || !has({_VALIDATIONS}) || {_VALIDATIONS}.all(s, {condition}))"
    )
    return f"{customize} && {validations}"


def _any_step(condition: str) -> str:
    customize = f"(has(self.customize) && self.customize.exists(s, {condition}))"
    validations = (
        f"(has(self.validate) && has({_VALIDATIONS}) && {_VALIDATIONS}.exists(s, {condition}))"
    )
    return f"({customize} || {validations})"


def _on_provider(provider: str, rule: str) -> str:
    """CEL: rule applies when the template names this provider (unset: the operator's
    default, which only the operator knows)."""
    return f"!has(self.provider) || self.provider != '{provider}' || ({rule})"


def _vhd_uris(condition: str) -> str:
    return f"self.distribute.all(d, d.type != 'VHD' || !{_set('uri', on='d')} || ({condition}))"


_VHD_URI_RULES = {
    "file": (
        "d.uri.startsWith('file:///') || d.uri.startsWith('/')",
        "a VHD uri on the {provider} provider is an absolute file path or file:/// URL",
    ),
    "blob": (
        "d.uri.startsWith('https://') && d.uri.lowerAscii().endsWith('.vhd')",
        "a VHD uri must be an https:// blob URL ending in .vhd (or unset for the staging "
        "storage account)",
    ),
}


def _capability_rules() -> list[CelRule]:
    """The CEL twins of what api/capabilities.py says each provider cannot do."""
    rules = []
    for provider, can in CAPABILITIES.items():
        if not can.windows_build_vms:
            rules.append(
                CelRule(
                    rule=_on_provider(provider, _all_steps(f"!({_WINDOWS_STEP})")),
                    message="PowerShell, WindowsRestart and WindowsUpdate (in customize or "
                    f"validate.inVMValidations) need a Windows build VM, which the {provider} "
                    f"provider cannot run; set spec.provider: {windows_provider()}",
                    field_path=".customize",
                )
            )
    for provider, can in CAPABILITIES.items():
        if can.windows_build_vms:
            rules.append(
                CelRule(
                    rule=_on_provider(
                        provider, f"!({_any_step(_SHELL_STEP)} && {_any_step(_WINDOWS_STEP)})"
                    ),
                    message="mixes Shell (Linux) with PowerShell/WindowsRestart/WindowsUpdate "
                    "(Windows) steps; a build VM runs one OS, so keep the steps of one",
                    field_path=".customize",
                )
            )
    for provider, can in CAPABILITIES.items():
        if not can.file_uris:
            rules.append(
                CelRule(
                    rule=_on_provider(
                        provider,
                        _all_steps(
                            "!(has(s.scriptUri) && s.scriptUri.startsWith('file://')) && "
                            "!(has(s.sourceUri) && s.sourceUri.startsWith('file://'))"
                        ),
                    ),
                    message="scriptUri and sourceUri must start with https:// or http:// for "
                    f"the {provider} provider (file:// works only on the "
                    f"{file_uri_provider()} provider)",
                    field_path=".customize",
                )
            )
    for provider, can in CAPABILITIES.items():
        condition, message = _VHD_URI_RULES[can.vhd_destination]
        rules.append(
            CelRule(
                rule=_on_provider(provider, _vhd_uris(condition)),
                message=message.format(provider=provider),
                field_path=".distribute",
            )
        )
    return rules


_SHELL_STEP = "s.type == 'Shell'"
_WINDOWS_STEP = f"s.type in {_WINDOWS_CEL}"
_SOURCE_FOLLOWS_LATEST = (
    "(self.source.type == 'PlatformImage' && self.source.version.lowerAscii() == 'latest') || "
    "(self.source.type == 'SharedImageVersion' && "
    "self.source.imageVersionId.lowerAscii().endsWith('/versions/latest'))"
)


class ExportOutputs(KubeModel):
    """Where the latest run outputs go for tools that read ConfigMaps (CAPZ machine
    templates, Terraform's kubernetes_config_map, Flux valuesFrom)."""

    config_map_name: str = Field(
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="ConfigMap in the template's namespace that Kiln creates and keeps "
        "current with the latest successful run's outputs: <runOutputName>_artifactId, "
        "<runOutputName>_artifactUri, <runOutputName>_version (characters other than "
        "letters, digits and _ become _), run and outputs.json. Kiln "
        "never changes a ConfigMap of that name that it did not create.",
    )


class ImageTemplateSpec(KubeModel):
    """The desired image: AIB's imageTemplates properties plus where to build it."""

    cel_rules = (
        CelRule(
            rule="!has(self.stagingResourceGroup) || "
            + matches("stagingResourceGroup", RESOURCE_GROUP_ID_PATTERN),
            message="must be a resource group ID: /subscriptions/SUB/resourceGroups/NAME",
            field_path=".stagingResourceGroup",
        ),
        CelRule(
            rule=f"!{_true('sourceValidationOnly', on='self.validate')} || !{_set('customize')}",
            message="must be empty when validate.sourceValidationOnly is true; remove the "
            "customizers or set sourceValidationOnly to false",
            field_path=".customize",
        ),
        CelRule(
            rule=f"!{_true('sourceValidationOnly', on='self.validate')} || "
            f"{_set('inVMValidations', on='self.validate')}",
            message="needs at least one validation when sourceValidationOnly is true",
            field_path=".validate.inVMValidations",
        ),
        CelRule(
            rule="self.distribute.all(d, self.distribute.filter(o, "
            "o.runOutputName.lowerAscii() == d.runOutputName.lowerAscii()).size() == 1)",
            message="runOutputName must be unique (Azure names ignore case); rename one of "
            "the targets",
            field_path=".distribute",
        ),
        CelRule(
            rule="!self.distribute.exists(d, d.type == 'SharedImage' && has(d.versioning) && "
            "d.versioning.scheme == 'Source') || "
            "self.source.type in ['PlatformImage', 'SharedImageVersion']",
            message="Source versioning needs a PlatformImage or SharedImageVersion source; "
            "use scheme: Latest",
            field_path=".distribute",
        ),
        CelRule(
            rule="!has(self.triggers) || self.triggers.all(t, "
            "self.triggers.filter(o, o.kind == t.kind).size() == 1)",
            message="lists a trigger kind twice; keep one trigger of each kind",
            field_path=".triggers",
        ),
        CelRule(
            rule="!has(self.triggers) || !self.triggers.exists(t, t.kind == 'SourceImage') || "
            + _SOURCE_FOLLOWS_LATEST,
            message="a SourceImage trigger needs a source that follows 'latest' (PlatformImage "
            "version latest, or a SharedImageVersion ID ending in /versions/latest)",
            field_path=".triggers",
        ),
        *_capability_rules(),
    )

    source: Source = Field(description="The image to start from.")
    customize: list[Customizer] | None = Field(
        default=None,
        max_length=MAX_STEPS,
        description="Customization steps, run in order on the build VM.",
    )
    validate_: Validate | None = Field(
        default=None, alias="validate", description="Validation of the built image."
    )
    distribute: list[Distributor] = Field(
        min_length=1,
        max_length=MAX_TARGETS,
        description="Where the image goes; each target is one run output.",
    )
    vm_profile: VmProfile | None = Field(default=None, description="The build VM.")
    optimize: Optimize | None = Field(default=None, description="Image optimizations.")
    build_timeout_in_minutes: int | None = Field(
        default=None,
        ge=0,
        le=960,
        description="Longest a run may take, customization to distribution; 0 or unset: 240.",
    )
    staging_resource_group: str | None = Field(
        default=None,
        max_length=MAX_ID,
        description="Resource ID of the staging resource group; unset: Kiln creates "
        "IT_<resourceGroup>_<template>_<id>. An existing group must be empty and is only "
        "emptied, never deleted.",
    )
    error_handling: ErrorHandling | None = Field(
        default=None, description="Keep or remove the build VM after a failure."
    )
    auto_run: AutoRun | None = Field(
        default=None, description="Build automatically when the template is created or changed."
    )
    successful_runs_history_limit: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="How many succeeded runs of this template to keep; older ones are "
        "deleted. Unset: 3.",
    )
    failed_runs_history_limit: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="How many failed, partly succeeded or canceled runs of this template to "
        "keep; older ones are deleted. Unset: 1.",
    )
    identity: Identity | None = Field(
        default=None, description="The template's user-assigned identity (Azure)."
    )
    managed_resource_tags: dict[str, TagValue] | None = Field(
        default=None,
        max_length=MAX_TAGS,
        description="Tags put on the staging group and the resources Kiln creates.",
        json_schema_extra=_tags_rule(),
    )
    additional_data_disks: list[DataDisk] | None = Field(
        default=None, description="Extra data disks added to the image."
    )
    provider: Provider | None = Field(
        default=None,
        description="Where to build: azure or local. Unset: the operator's default provider.",
    )
    location: str | None = Field(
        default=None, description="Region of the build. Unset: the operator's default."
    )
    resource_group: str | None = Field(
        default=None,
        description="The template's resource group; it names the staging group. "
        "Unset: the operator's default.",
    )
    subscription_id: str | None = Field(
        default=None, description="Azure subscription. Unset: the operator's default."
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Azure: a ServiceAccount in this template's namespace whose federated "
        "identity builds (annotation azure.workload.identity/client-id, and tenant-id unless "
        "the operator sets one); the operator exchanges a token of it with Entra ID. Unset: "
        "the operator's own identity, if its admin allows that.",
    )
    triggers: list[Trigger] | None = Field(
        default=None, max_length=10, description="What starts runs besides you and autoRun."
    )
    export_outputs: ExportOutputs | None = Field(
        default=None, description="Publish the latest run outputs in a ConfigMap."
    )


class LastRun(KubeModel):
    name: str = Field(description="Name of the ImageBuildRun.")
    run_state: str | None = Field(default=None, description="Its runState.")


class ImageTemplateStatus(KubeModel):
    """What the operator observed; written only by Kiln."""

    observed_generation: int | None = Field(
        default=None, description="The generation these conditions describe."
    )
    conditions: list[Condition] | None = conditions_field()
    provider: str | None = Field(default=None, description="The provider that builds it.")
    exact_staging_resource_group: str | None = Field(
        default=None, description="The staging resource group (or directory) in use."
    )
    last_run: LastRun | None = Field(default=None, description="The most recent run.")
    latest_outputs: list[RunOutput] | None = Field(
        default=None, description="Outputs of the most recent successful run."
    )
    source_image_version: str | None = Field(
        default=None, description="Exact source version the SourceImage trigger last saw."
    )
    last_scheduled_time: str | None = Field(
        default=None, description="When the Schedule trigger last started a run."
    )
