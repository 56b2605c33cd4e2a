"""ImageBuildRun: one build of one template, AIB's Run action as a resource."""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Any

from pydantic import Field, ValidationError

from kiln.api.base import KubeModel
from kiln.api.distribution import DistributionPlan, TargetStatus
from kiln.api.status import Condition, RunOutput, conditions_field

CHECKPOINT_VERSION = 2


class RunState(StrEnum):
    Running = "Running"
    Canceling = "Canceling"
    Succeeded = "Succeeded"
    PartiallySucceeded = "PartiallySucceeded"
    Failed = "Failed"
    Canceled = "Canceled"


TERMINAL_RUN_STATES = frozenset(
    {RunState.Succeeded, RunState.PartiallySucceeded, RunState.Failed, RunState.Canceled}
)


class RunPhase(StrEnum):
    """Where the run driver's state machine is; derived from the persisted status."""

    Queued = "Queued"  # no snapshot yet: waiting for its template (admission)
    WaitingForSlot = "WaitingForSlot"  # admitted, snapshot taken, no build slot yet
    Building = "Building"  # holds a slot; startTime set; steps run in order
    CleaningUp = "CleaningUp"  # the ending is recorded; cleanup runs outside the slot
    Done = "Done"  # a terminal runState


class RunSubState(StrEnum):
    Queued = "Queued"
    Building = "Building"
    Customizing = "Customizing"
    Optimizing = "Optimizing"
    Validating = "Validating"
    Distributing = "Distributing"


class StepState(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Skipped = "Skipped"


class TemplateRef(KubeModel):
    name: str = Field(min_length=1, description="Name of the ImageTemplate in this namespace.")


class ImageBuildRunSpec(KubeModel):
    """Which template to build; set cancel to stop."""

    template_ref: TemplateRef = Field(description="The template to build.")
    cancel: bool | None = Field(
        default=None, description="Set to true to stop the run and clean up its resources."
    )


class StepRecord(KubeModel):
    """The checkpoint of one pipeline step; the reconciler resumes from these."""

    name: str = Field(description="Step name, e.g. customize.")
    state: StepState = Field(description="Pending, Running, Succeeded, Failed or Skipped.")
    start_time: str | None = Field(default=None, description="When the step started.")
    end_time: str | None = Field(default=None, description="When the step ended.")
    exit_code: int | None = Field(default=None, description="Exit code of a failed script.")
    message: str | None = Field(default=None, description="What the step did or why it failed.")
    log_tail: list[str] | None = Field(default=None, description="Last lines of the step's log.")


def _f(description: str, default: Any = None, **kwargs: Any) -> Any:
    return Field(default=default, description=description, **kwargs)


def _map(description: str) -> Any:
    return Field(default_factory=dict, description=description)


class TemplateIdentity(KubeModel):
    """The template a run was started from (its snapshot's origin)."""

    namespace: str = Field(description="The template's namespace.")
    name: str = Field(description="The template's name.")
    uid: str = Field(description="The template's UID.")


class Endpoint(KubeModel):
    """How to reach a build VM's communicator."""

    host: str = Field(description="Address of the build VM.")
    port: int = Field(description="Port of its SSH or WinRM listener.")
    user: str = Field(description="The login user.")


class Ending(KubeModel):
    """How the run ends, recorded before cleanup (persist intent, then act)."""

    state: RunState = Field(description="The runState the run ends in.")
    reason: str = Field(description="The condition reason it ends with.")
    message: str = Field(description="The message it ends with.")
    keep_vm: bool = _f("Keep the build VM (errorHandling abort).", False)
    cleanup_attempts: int = _f("Cleanup attempts that failed so far.", 0)
    cleanup_error: str | None = _f("The last cleanup error.")


class BootFiles(KubeModel):
    """The local source image: its disk, and the firmware generation it boots with."""

    disk: str = Field(description="The source disk image.")
    hyper_v_generation: str = Field(description="V1 (BIOS) or V2 (UEFI), as Azure says.")


class LocalVm(KubeModel):
    """The QEMU process of a local build VM."""

    pid: int = Field(description="Process ID.")
    ssh_port: int = Field(description="The loopback port forwarded to its SSH.")


class CapturedDataDisk(KubeModel):
    """A data disk captured beside the OS disk: a qcow2 and a fixed VHD, each with its sha256."""

    lun: int = Field(description="Its index in spec.additionalDataDisks.")
    qcow2: str = Field(description="File name of the qcow2.")
    qcow2_sha256: str = Field(description="sha256 of the qcow2.")
    vhd: str = Field(description="File name of the fixed VHD.")
    vhd_sha256: str = Field(description="sha256 of the VHD.")


class LocalCheckpoint(KubeModel):
    """What the local provider needs to resume: the source files and the QEMU VM."""

    source: BootFiles | None = _f("The resolved source image files.")
    vm_started: bool = _f("The build VM was started (a missing one is an error).", False)
    vm: LocalVm | None = _f("The running build VM.")
    stop_requested_at: float | None = _f("When the VM was asked to power off (epoch s).")
    data_disks: list[CapturedDataDisk] = Field(
        default_factory=list, description="The captured data disks."
    )
    disk_sha256: str | None = _f("SHA-256 of the captured disk.")


class VhdCopy(KubeModel):
    """A VHD target's page copy of the OS disk: its id (in the blob's metadata) is saved
    before the blob is created, and how far it got after every slice, so a retried or
    resumed copy goes on from there."""

    copy_id: str = Field(description="Marks the destination blob this copy created.")
    size: int | None = _f("The disk's size in bytes.")
    offset: int = _f("Bytes copied so far.", 0)


class AzureCheckpoint(KubeModel):
    """What the azure provider needs to resume: operation tokens and decided names."""

    operations: dict[str, str] = _map("Long-running operations: key -> token, or done.")
    image_reference: dict[str, str] | None = _f("The build VM's imageReference.")
    hyper_v_generation: str | None = _f("The source image's Hyper-V generation.")
    source_data_disk_luns: list[int] = Field(
        default_factory=list,
        description="LUNs of the source image's own data disks (additionalDataDisks follow).",
    )
    vm_id: str | None = _f("The build VM's resource ID.")
    winrm_certificate_url: str | None = _f("Key Vault secret URL of the WinRM certificate.")
    generalized: bool = _f("The build VM was deallocated and generalized.", False)
    vhd_copies: dict[str, VhdCopy] = _map("distribute index -> its VHD copy.")


class WindowsRestart(KubeModel):
    """A restart of a Windows build VM in flight: the boot it must leave behind."""

    boot_time: str = Field(description="LastBootUpTime before the restart was asked for.")
    deadline: float = Field(description="When waiting for the VM gives up (epoch s).")
    issued: bool = _f("The restart command was sent.", False)
    seen: str | None = _f("What the last look at the VM found (for a timeout's message).")


class WindowsUpdateProgress(KubeModel):
    """Where a WindowsUpdate step is: its search/install cycles, and a restart between."""

    cycle: int = _f("The current cycle (1 first); each is one job on the VM.", 1)
    installed: int = _f("Updates installed so far.", 0)
    failed: dict[str, str] = _map("Update ID -> the HResult its install failed with.")
    pending: dict[str, int] = _map("Update ID -> cycles in a row it was installed again.")
    restart: WindowsRestart | None = _f("The restart after a cycle that needed one.")


class WindowsProgress(KubeModel):
    """The Windows step in flight (customize or validate); cleared when it ends."""

    step: str = Field(description="The step it belongs to, e.g. customize-03.")
    restart: WindowsRestart | None = _f("A WindowsRestart step's restart.")
    update: WindowsUpdateProgress | None = _f("A WindowsUpdate step's progress.")


class Checkpoint(KubeModel):
    """The run driver's persisted state between passes; a restart resumes from it."""

    version: int = _f("Version of this checkpoint's format.", CHECKPOINT_VERSION)
    template: TemplateIdentity = Field(description="The template the run builds.")
    log_path: str | None = _f("The customization log on the operator's machine.")
    log_uri: str | None = _f("Where the provider published the log (no SAS).")
    staging: str | None = _f("The staging resource group or directory.")
    exact_source: str | None = _f("The exact source image version.")
    source_version: str | None = _f("The source image's version number.")
    os_type: str | None = _f("Linux or Windows, from the source image.")
    endpoint: Endpoint | None = _f("How to reach the build VM.")
    vm_note: str | None = _f("What the provider says of the build VM (its size, capped).")
    boot_deadline: float | None = _f("When waiting for the VM's login gives up (epoch s).")
    collected: bool = _f("Boot files were fetched from the VM before shutdown.", False)
    poweroff_requested: bool = _f("Deprovisioning ended and the VM powers off.", False)
    script_index: dict[str, int] = _map("customize/validate -> index of the next step.")
    distribution: DistributionPlan | None = _f(
        "What each distribute target publishes and how far it got; planned before anything "
        "is published."
    )
    windows: WindowsProgress | None = _f("The Windows step in flight: restarts, updates.")
    validation_failure: str | None = _f("Why validation failed (continueDistributeOnFailure).")
    vm_kept: bool = _f("The build VM was kept (errorHandling abort).", False)
    ending: Ending | None = _f("How the run ends; cleanup follows.")
    connection_errors: int = _f("Consecutive lost connections to the build VM.", 0)
    step_errors: int = _f("Consecutive unexpected errors of the current step.", 0)
    cloud_retries: int = _f("Consecutive retryable cloud errors (the retry budget).", 0)
    local: LocalCheckpoint = Field(
        default_factory=LocalCheckpoint, description="State of the local provider."
    )
    azure: AzureCheckpoint = Field(
        default_factory=AzureCheckpoint, description="State of the azure provider."
    )


class CheckpointUnreadable(ValueError):
    """A persisted checkpoint this operator cannot resume from (a format it does not know)."""


UPGRADED_MID_DISTRIBUTION = (
    "The operator was upgraded while this run was distributing; the new operator plans "
    "distribution differently and cannot tell which targets the old one published, so the "
    "run ends here (its build resources are cleaned up). Check the targets, then start a "
    "new run."
)


def load_checkpoint(data: dict[str, Any]) -> Checkpoint:
    """A run's checkpoint as status holds it, upgraded when an earlier operator wrote it:
    a run in flight across an operator upgrade resumes, or ends cleanly with the reason."""
    data = copy.deepcopy(data)
    version = data.get("version", CHECKPOINT_VERSION)
    if version == 1:
        # Format 1 (before distribution was planned) kept what distribute published here.
        azure = data.get("azure") or {}
        retired = [
            data.pop("outputs", None),
            azure.pop("galleryVersions", None),
            azure.pop("copiedVhds", None),
        ]
        data["version"] = CHECKPOINT_VERSION
        if any(retired) and not data.get("ending"):
            data["ending"] = {
                "state": RunState.Failed.value,
                "reason": "Failed",
                "message": UPGRADED_MID_DISTRIBUTION,
            }
    elif version != CHECKPOINT_VERSION:
        raise CheckpointUnreadable(
            f"the run's checkpoint has format {version}; this operator reads formats 1 to "
            f"{CHECKPOINT_VERSION} (was it written by a newer operator?)"
        )
    try:
        return Checkpoint.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False)
        )
        raise CheckpointUnreadable(f"the run's checkpoint cannot be read ({problems})") from None


class ImageBuildRunStatus(KubeModel):
    """AIB's lastRunStatus plus per-step records, outputs and conditions."""

    observed_generation: int | None = Field(
        default=None, description="The generation this status describes."
    )
    conditions: list[Condition] | None = conditions_field()
    run_state: RunState | None = Field(default=None, description="AIB's runState.")
    run_sub_state: RunSubState | None = Field(default=None, description="AIB's runSubState.")
    message: str | None = Field(default=None, description="What is happening or went wrong.")
    start_time: str | None = Field(default=None, description="When the build started (UTC).")
    end_time: str | None = Field(default=None, description="When the run ended (UTC).")
    provider: str | None = Field(default=None, description="The provider building it.")
    template_generation: int | None = Field(
        default=None, description="The template's generation when the snapshot was taken."
    )
    template_hash: str | None = Field(
        default=None, description="SHA-256 of the template spec snapshot this run builds."
    )
    template_snapshot: dict[str, Any] | None = Field(
        default=None,
        description="The template spec as it was when the run started; the run builds this.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    exact_source: str | None = Field(
        default=None, description="The exact source image version the run resolved."
    )
    steps: list[StepRecord] | None = Field(default=None, description="Pipeline steps.")
    run_outputs: list[RunOutput] | None = Field(default=None, description="Distributed artifacts.")
    distribution: list[TargetStatus] | None = Field(
        default=None,
        description="Every distribute target: Pending, Succeeded or Failed, with the error of "
        "a failed one and the retries of one still being tried.",
    )
    checkpoint: Checkpoint | None = Field(
        default=None,
        description="The driver's state needed to resume (resource names, operation tokens).",
    )
