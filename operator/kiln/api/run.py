"""ImageBuildRun: one build of one template, AIB's Run action as a resource."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from kiln.api.base import KubeModel
from kiln.api.status import Condition, RunOutput, conditions_field


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
    checkpoint: dict[str, Any] | None = Field(
        default=None,
        description="Provider state needed to resume (resource names, operation tokens).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
