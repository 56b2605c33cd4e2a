"""The distribution plan: one provider-neutral decision of what every target publishes."""

from __future__ import annotations

from typing import Any

import pytest

from kiln import distribution
from kiln.api.distribution import DistributionPlan, PlannedRegion, TargetState
from kiln.api.run import Checkpoint, TemplateIdentity
from kiln.api.status import RunOutput
from kiln.api.template import ImageTemplateSpec
from kubehelpers import valid_spec

Body = dict[str, Any]
SUB = "/subscriptions/0000/resourceGroups/images/providers/Microsoft.Compute"
DEFINITION = f"{SUB}/galleries/kiln/images/base"
OTHER_DEFINITION = f"{SUB}/galleries/kiln/images/other"
IMAGE = f"{SUB}/images/base"
SOURCE_VERSION = "0.20241111.1927"


def sig(name: str = "sig", **fields: Any) -> Body:
    return {"type": "SharedImage", "runOutputName": name, "galleryImageId": DEFINITION} | fields


def vhd(name: str = "vhd", **fields: Any) -> Body:
    return {"type": "VHD", "runOutputName": name} | fields


def planned(*targets: Body, location: str | None = "westeurope", **spec: Any) -> DistributionPlan:
    body = {**valid_spec(), "distribute": list(targets), **spec}
    if location:
        body["location"] = location
    return distribution.plan(ImageTemplateSpec.model_validate(body), SOURCE_VERSION)


@pytest.mark.parametrize(
    ("target", "artifact_id", "version"),
    [
        (
            {"type": "ManagedImage", "runOutputName": "mi", "imageId": IMAGE} | {"location": "x"},
            IMAGE,
            None,
        ),
        (sig(), None, None),  # Latest: decided from the gallery, in a pass of its own
        (sig(versioning={"scheme": "Latest", "major": 2}), None, None),
        (
            sig(galleryImageId=f"{DEFINITION}/versions/1.2.3"),
            f"{DEFINITION}/versions/1.2.3",
            "1.2.3",
        ),
        (
            sig(versioning={"scheme": "Source"}),
            f"{DEFINITION}/versions/{SOURCE_VERSION}",
            SOURCE_VERSION,
        ),
        (vhd(), None, None),  # the provider's staging place
        (vhd(uri="/srv/out/a.vhd"), "/srv/out/a.vhd", None),
        (
            vhd(uri="https://acct.blob.core.windows.net/c/a.vhd?sv=1&sig=SECRET"),
            "https://acct.blob.core.windows.net/c/a.vhd",
            None,
        ),
    ],
    ids=[
        "managed",
        "latest",
        "latest-major",
        "explicit",
        "source",
        "vhd-staging",
        "vhd-file",
        "vhd-sas",
    ],
)
def test_what_each_target_publishes(
    target: Body, artifact_id: str | None, version: str | None
) -> None:
    [one] = planned(target).targets
    assert (one.artifact_id, one.version, one.state) == (artifact_id, version, TargetState.Pending)
    assert "SECRET" not in one.model_dump_json()  # a SAS never reaches the persisted plan


@pytest.mark.parametrize(
    ("fields", "location", "regions"),
    [
        ({}, "westeurope", [("westeurope", 1, "Standard_LRS")]),
        ({}, None, [("local", 1, "Standard_LRS")]),
        (
            {"targetRegions": [{"name": "northeurope", "replicaCount": 2}]},
            "westeurope",
            [("northeurope", 2, "Standard_LRS"), ("westeurope", 1, "Standard_LRS")],
        ),
        (
            {"targetRegions": [{"name": "WestEurope", "storageAccountType": "Premium_LRS"}]},
            "westeurope",
            [("WestEurope", 1, "Premium_LRS")],
        ),
        (
            {"replicationRegions": ["eastus"], "storageAccountType": "Standard_ZRS"},
            "westeurope",
            [("eastus", 1, "Standard_ZRS"), ("westeurope", 1, "Standard_LRS")],
        ),
    ],
    ids=[
        "build-location",
        "local-default",
        "target-regions",
        "location-listed",
        "replication-regions",
    ],
)
def test_regions_always_include_where_the_version_is_made(
    fields: Body, location: str | None, regions: list[tuple[str, int, str]]
) -> None:
    [one] = planned(sig(**fields), location=location).targets
    assert one.regions == [
        PlannedRegion(name=n, replica_count=c, storage_account_type=t) for n, c, t in regions
    ]


@pytest.mark.parametrize(
    ("targets", "failed", "why"),
    [
        (
            [vhd("a", uri="/srv/x.vhd"), vhd("b", uri="/srv/x.vhd")],
            ["b"],
            "as spec.distribute[0] does",
        ),
        ([vhd("a", uri="/srv/X.vhd"), vhd("b", uri="/srv/y.vhd")], [], ""),
        (
            [
                sig("a", versioning={"scheme": "Source"}),
                sig("b", galleryImageId=f"{DEFINITION}/versions/{SOURCE_VERSION}"),
            ],
            ["b"],
            "give each target its own version",
        ),
        ([sig("a"), sig("b")], [], ""),  # two Latest targets get two numbers (decide_version)
        (
            [
                {"type": "ManagedImage", "runOutputName": n, "imageId": IMAGE, "location": "x"}
                for n in "ab"
            ],
            [],
            "",
        ),
    ],
    ids=["same-vhd", "other-vhd", "same-version", "two-latest", "managed-replaced"],
)
def test_two_targets_never_write_one_artifact(
    targets: list[Body], failed: list[str], why: str
) -> None:
    plan = planned(*targets)
    assert [t.run_output_name for t in plan.targets if t.state == TargetState.Failed] == failed
    for target in plan.targets:
        if target.state == TargetState.Failed:
            assert why in (target.message or "")


def test_a_source_version_that_is_no_triple_fails_only_its_target() -> None:
    spec = ImageTemplateSpec.model_validate(
        {**valid_spec(), "distribute": [sig(versioning={"scheme": "Source"}), vhd()]}
    )
    plan = distribution.plan(spec, "latest")
    assert [t.state for t in plan.targets] == [TargetState.Failed, TargetState.Pending]
    assert "spec.distribute[0].versioning" in (plan.targets[0].message or "")


@pytest.mark.parametrize(
    ("major", "existing", "others", "expected"),
    [
        (None, [], [], "0.0.1"),
        (None, ["1.0.0", "1.0.9", "0.9.0"], [], "1.0.10"),
        (1, ["1.0.3", "2.0.0"], [], "1.0.4"),
        (3, ["1.0.3"], [], "3.0.0"),
        (None, ["1.0.0"], [(DEFINITION, "1.0.1")], "1.0.2"),  # another target took 1.0.1
        (None, ["1.0.0"], [(OTHER_DEFINITION, "1.0.1")], "1.0.1"),  # another definition
    ],
)
def test_a_latest_version_is_above_every_version_taken(
    major: int | None, existing: list[str], others: list[tuple[str, str]], expected: str
) -> None:
    versioning = {"scheme": "Latest", "major": major} if major is not None else {"scheme": "Latest"}
    plan = planned(
        sig(versioning=versioning),
        *(sig(f"o{i}", galleryImageId=f"{d}/versions/{v}") for i, (d, v) in enumerate(others)),
    )
    target = plan.targets[0]
    assert target.needs_version
    distribution.decide_version(plan, target, existing)
    assert target.version == expected
    assert target.artifact_id == f"{DEFINITION}/versions/{expected}"
    assert not target.needs_version


def test_the_plan_survives_the_checkpoint_round_trip() -> None:
    """What is decided is what a resumed run reads back from status."""
    plan = planned(sig(), vhd())
    distribution.decide_version(plan, plan.targets[0], ["1.0.0"])
    identity = TemplateIdentity(namespace="n", name="t", uid="u")
    checkpoint = Checkpoint(template=identity, distribution=plan)
    again = Checkpoint.model_validate(checkpoint.wire())
    assert again.distribution == plan
    assert again.distribution.targets[0].version == "1.0.1"


def test_outputs_and_statuses_follow_each_target() -> None:
    plan = planned(vhd("a"), vhd("b"), vhd("c"))
    a, b, _ = plan.targets
    distribution.record_success(
        a, RunOutput(run_output_name="a", artifact_id="/x/a.vhd", artifact_uri="file:///x/a.vhd")
    )
    assert distribution.record_retry(b, "Azure ServerBusy: busy", "ServerBusy")
    statuses = {s.run_output_name: s for s in distribution.statuses(plan)}
    assert statuses["a"].state == TargetState.Succeeded and statuses["a"].artifact_id == "/x/a.vhd"
    assert (statuses["b"].state, statuses["b"].error_code, statuses["b"].retries) == (
        TargetState.Pending,
        "ServerBusy",
        1,
    )
    assert statuses["c"].state == TargetState.Pending
    for _ in range(distribution.MAX_TARGET_RETRIES - 1):
        assert distribution.record_retry(b, "Azure ServerBusy: busy", "ServerBusy")
    assert not distribution.record_retry(b, "Azure ServerBusy: busy", "ServerBusy")
    assert b.state == TargetState.Failed and "gave up after" in (b.message or "")
    outputs = {o.run_output_name: o for o in distribution.run_outputs(plan)}
    assert set(outputs) == {"a", "b"}  # c has not ended
    assert outputs["a"].provisioning_state == "Succeeded" and outputs["a"].message is None
    assert outputs["b"].provisioning_state == "Failed" and outputs["b"].artifact_id is None
