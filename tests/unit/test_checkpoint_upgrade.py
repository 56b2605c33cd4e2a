"""A run in flight across an operator upgrade: its checkpoint, written by the earlier
operator, is upgraded when it can be resumed safely, and otherwise ends the run clearly."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.api.run import (
    CHECKPOINT_VERSION,
    CheckpointUnreadable,
    RunState,
    load_checkpoint,
)

TEMPLATE = {"namespace": "ns", "name": "t", "uid": "t-uid"}


def format_1(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "template": TEMPLATE, "staging": "/s", **fields}


def test_a_format_1_checkpoint_before_distribution_resumes_as_it_was() -> None:
    upgraded = load_checkpoint(format_1(azure={"vmId": "/vm", "galleryVersions": {}}, outputs={}))
    assert upgraded.version == CHECKPOINT_VERSION
    assert (upgraded.staging, upgraded.azure.vm_id, upgraded.ending) == ("/s", "/vm", None)


@pytest.mark.parametrize(
    "retired",
    [
        {"outputs": {"0": {"runOutputName": "img", "artifactId": "/images/img"}}},
        {"azure": {"galleryVersions": {"1": "1.0.3"}}},
        {"azure": {"copiedVhds": {"2": "https://a.blob/vhds/x.vhd"}}},
    ],
)
def test_a_format_1_checkpoint_mid_distribution_ends_the_run_with_the_reason(
    retired: dict[str, Any],
) -> None:
    upgraded = load_checkpoint(format_1(**retired))
    assert upgraded.ending is not None
    assert upgraded.ending.state == RunState.Failed
    assert "upgraded while this run was distributing" in upgraded.ending.message
    assert not upgraded.ending.keep_vm  # its build resources are cleaned up


def test_an_unknown_format_or_a_broken_checkpoint_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(CheckpointUnreadable, match="format 9; this operator reads formats 1 to"):
        load_checkpoint(format_1(version=9))
    with pytest.raises(CheckpointUnreadable, match="cannot be read"):
        load_checkpoint({"version": CHECKPOINT_VERSION, "template": TEMPLATE, "stagin": "/s"})


def test_the_stored_checkpoint_is_not_changed_by_reading_it() -> None:
    stored = format_1(outputs={"0": {"runOutputName": "img", "artifactId": "/i"}})
    load_checkpoint(stored)
    assert stored["version"] == 1 and "outputs" in stored
