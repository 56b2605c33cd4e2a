"""ImageTemplate: the desired image, with every AIB imageTemplates property under its AIB name.

AIB API 2024-02-01 plus the 2025-10-01 additions (additionalDataDisks, optimize.workload,
File validators, replicationMode). Rules the CRD schema cannot state live in validation.py.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field

from kiln.api.base import KubeModel
from kiln.api.status import Condition, RunOutput

RUN_OUTPUT_NAME_PATTERN = r"^[A-Za-z0-9-_.]{1,64}$"
SHA256_PATTERN = r"^[A-Fa-f0-9]{64}$"


class Provider(StrEnum):
    azure = "azure"
    local = "local"


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

    type: Literal["PlatformImage"] = Field(description="Kind of source image.")
    publisher: str = Field(description="Image publisher, e.g. Debian or Canonical.")
    offer: str = Field(description="Image offer, e.g. debian-12.")
    sku: str = Field(description="Image SKU, e.g. 12-gen2.")
    version: str = Field(
        description="Image version, or 'latest' to resolve the newest when a run starts; "
        "the run's status records the exact version used."
    )
    plan_info: PlanInfo | None = Field(
        default=None, description="Purchase plan for marketplace images that need one."
    )


class ManagedImageSource(KubeModel):
    """A managed image, e.g. the output of an earlier build."""

    type: Literal["ManagedImage"] = Field(description="Kind of source image.")
    image_id: str = Field(
        description="Resource ID of the managed image: "
        "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/images/NAME."
    )


class SharedImageVersionSource(KubeModel):
    """An Azure Compute Gallery image version (or the local gallery's)."""

    type: Literal["SharedImageVersion"] = Field(description="Kind of source image.")
    image_version_id: str = Field(
        description="Resource ID of the gallery image version; a version name of 'latest' "
        "resolves to the newest version not excluded from latest when a run starts."
    )


Source = Annotated[
    PlatformImageSource | ManagedImageSource | SharedImageVersionSource,
    Field(discriminator="type"),
]


# --- customizers and validators -------------------------------------------------------------


class ScriptFields(KubeModel):
    """A script given inline or by URI (exactly one of the two)."""

    name: str | None = Field(default=None, description="Friendly name of this step.")
    script_uri: str | None = Field(
        default=None,
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

    type: Literal["File"] = Field(description="Kind of step.")
    name: str | None = Field(default=None, description="Friendly name of this step.")
    source_uri: str = Field(description="URI of the file (https://, http:// or file://).")
    destination: str = Field(
        description="Absolute path on the VM, its directory already existing; on Linux it "
        "must be under /tmp (move it in a later Shell step)."
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
        pattern=r"^[0-9]+[smh]$",
        description="How long to wait, as a number and unit, e.g. 5m or 2h. Default: 5m.",
    )


class WindowsUpdateStep(KubeModel):
    """Installs Windows updates."""

    type: Literal["WindowsUpdate"] = Field(description="Kind of step.")
    name: str | None = Field(default=None, description="Friendly name of this step.")
    search_criteria: str | None = Field(
        default=None, description="Criteria to search updates. Default: all."
    )
    filters: list[str] | None = Field(default=None, description="Filters to select updates.")
    update_limit: int | None = Field(
        default=None, ge=0, description="Most updates applied at a time. 0 or unset: 1000."
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

    name: str = Field(description="Region name, e.g. westeurope.")
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
        description="Name of this output in the run's runOutputs; unique in the template.",
    )
    artifact_tags: dict[str, str] | None = Field(
        default=None, description="Tags put on the artifact this distributor creates."
    )


class ManagedImageDistributor(DistributorFields):
    """Captures a managed image."""

    type: Literal["ManagedImage"] = Field(description="Kind of distribution.")
    image_id: str = Field(
        description="Resource ID of the managed image to create or replace: "
        "/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/images/NAME."
    )
    location: str = Field(description="Region of the image.")


class SharedImageDistributor(DistributorFields):
    """Publishes a new version of a gallery image definition."""

    type: Literal["SharedImage"] = Field(description="Kind of distribution.")
    gallery_image_id: str = Field(
        description="Resource ID of the gallery image definition (/subscriptions/SUB/"
        "resourceGroups/RG/providers/Microsoft.Compute/galleries/G/images/DEF), or of a "
        "version (…/versions/1.2.3) to publish that exact version."
    )
    target_regions: list[TargetRegion] | None = Field(
        default=None,
        description="Regions to replicate to, with replica counts; not with replicationRegions.",
    )
    replication_regions: list[str] | None = Field(
        default=None,
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

    subnet_id: str | None = Field(
        default=None, description="Resource ID of an existing subnet for the build VM."
    )
    container_instance_subnet_id: str | None = Field(
        default=None,
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
    user_assigned_identities: list[str] | None = Field(
        default=None, description="Resource IDs of user-assigned identities for the build VM."
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
    type: Literal["None", "UserAssigned"] = Field(description="None or UserAssigned.")
    user_assigned_identities: dict[str, dict[str, str]] | None = Field(
        default=None,
        description="The identity, keyed by its resource ID (values are empty objects).",
    )


class ScheduleTrigger(KubeModel):
    """Starts a run on a cron schedule (UTC)."""

    kind: Literal["Schedule"] = Field(description="Kind of trigger.")
    schedule: str = Field(description="Cron expression in UTC, e.g. '0 3 * * 1'.")


class SourceImageTrigger(KubeModel):
    """Starts a run when the source's 'latest' resolves to a new version."""

    kind: Literal["SourceImage"] = Field(description="Kind of trigger.")


Trigger = Annotated[ScheduleTrigger | SourceImageTrigger, Field(discriminator="kind")]


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

    source: Source = Field(description="The image to start from.")
    customize: list[Customizer] | None = Field(
        default=None, description="Customization steps, run in order on the build VM."
    )
    validate_: Validate | None = Field(
        default=None, alias="validate", description="Validation of the built image."
    )
    distribute: list[Distributor] = Field(
        min_length=1, description="Where the image goes; each target is one run output."
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
    identity: Identity | None = Field(
        default=None, description="The template's user-assigned identity (Azure)."
    )
    managed_resource_tags: dict[str, str] | None = Field(
        default=None, description="Tags put on the staging group and the resources Kiln creates."
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
    triggers: list[Trigger] | None = Field(
        default=None, description="What starts runs besides you and autoRun."
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
    conditions: list[Condition] | None = Field(default=None, description="Current conditions.")
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
