"""Status shapes shared by both kinds: conditions (metav1.Condition) and run outputs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kiln.api.base import KubeModel


class Condition(KubeModel):
    """metav1.Condition, so kstatus, Argo CD and Flux read it as they read built-in kinds."""

    type: str = Field(description="Condition type: Ready, Reconciling, Stalled, Accepted, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="What happened and what to do next.")
    observed_generation: int | None = Field(
        default=None, description="The generation this condition describes."
    )
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")


def conditions_field() -> Any:
    """status.conditions as Kubernetes' own kinds declare it: a list-map keyed by type,
    so server-side apply and kstatus treat each condition as one entry."""
    return Field(
        default=None,
        description="Current conditions, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


class RunOutput(KubeModel):
    """One distributed artifact, as AIB's runOutputs report it."""

    run_output_name: str = Field(description="The distributor's runOutputName.")
    artifact_id: str | None = Field(default=None, description="ID of the artifact.")
    artifact_uri: str | None = Field(default=None, description="Where the artifact is.")
    provisioning_state: str | None = Field(
        default=None, description="Succeeded or Failed for this output."
    )
    message: str | None = Field(default=None, description="Why this output failed, if it did.")
