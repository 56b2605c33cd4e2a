"""The API server refuses invalid templates at `kubectl apply`, naming the field and the
fix (the CRD's CEL rules), and the operator's own check (api/validation.py) agrees."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kiln.api.template import Provider
from kiln.api.validation import validate_template
from kubehelpers import kubectl, server_dry_run, template

pytestmark = pytest.mark.integration

SUB = "/subscriptions/s/resourceGroups/r"
SUBNET = f"{SUB}/providers/Microsoft.Network/virtualNetworks/v/subnets/a"
GALLERY_IMAGE = f"{SUB}/providers/Microsoft.Compute/galleries/g/images/d"
IMAGE = f"{SUB}/providers/Microsoft.Compute/images/i"
IDENTITY = f"{SUB}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u"
PINNED = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"}
SHELL = {"type": "Shell", "inline": ["true"]}
POWERSHELL = {"type": "PowerShell", "inline": ["Write-Output hi"]}
VHD = {"type": "VHD", "runOutputName": "vhd"}
AZURE = {"provider": "azure"}


def file_step(destination: str, source: str = "https://e.x/f") -> dict:
    return {"type": "File", "sourceUri": source, "destination": destination}


def gallery(**fields: Any) -> dict:
    return {
        "type": "SharedImage",
        "runOutputName": "sig",
        "galleryImageId": GALLERY_IMAGE,
        **fields,
    }


# (id, spec patch, field the API server names, words of its message)
CASES = [
    (
        "inline-and-uri",
        {"customize": [{**SHELL, "scriptUri": "https://e.x/s"}]},
        "spec.customize[0]",
        "exactly one of scriptUri and inline",
    ),
    (
        "neither-inline-nor-uri",
        {"customize": [{"type": "Shell"}]},
        "spec.customize[0]",
        "exactly one of scriptUri and inline",
    ),
    (
        "uri-scheme",
        {"customize": [{"type": "Shell", "scriptUri": "ftp://e.x/s"}]},
        "spec.customize[0].scriptUri",
        "must start with https://",
    ),
    (
        "checksum-without-uri",
        {"customize": [{**SHELL, "sha256Checksum": "a" * 64}]},
        "spec.customize[0].sha256Checksum",
        "only applies to scriptUri",
    ),
    (
        "system-without-elevated",
        {**AZURE, "customize": [{**POWERSHELL, "runAsSystem": True}]},
        "spec.customize[0].runAsSystem",
        "needs runElevated",
    ),
    (
        "update-filter",
        {**AZURE, "customize": [{"type": "WindowsUpdate", "filters": ["$_.Title -like '*x*'"]}]},
        "spec.customize[0].filters",
        "include:<expression> or exclude:<expression>",
    ),
    (
        "file-outside-tmp",
        {"customize": [file_step("/etc/x")]},
        "spec.customize[0].destination",
        "/tmp",
    ),
    (
        "file-relative",
        {"customize": [file_step("tmp/x")]},
        "spec.customize[0].destination",
        "absolute path",
    ),
    (
        "file-directory",
        {"customize": [file_step("/tmp/dir/")]},
        "spec.customize[0].destination",
        "not a directory",
    ),
    (
        "file-scheme",
        {"customize": [file_step("/tmp/x", source="s3://b/f")]},
        "spec.customize[0].sourceUri",
        "must start with https://",
    ),
    (
        "validation-scheme",
        {"validate": {"inVMValidations": [{"type": "Shell", "scriptUri": "ftp://e.x/s"}]}},
        "spec.validate.inVMValidations[0].scriptUri",
        "must start with https://",
    ),
    (
        "managed-source-id",
        {"source": {"type": "ManagedImage", "imageId": "my-image"}},
        "spec.source.imageId",
        "managed image ID",
    ),
    (
        "gallery-source-id",
        {"source": {"type": "SharedImageVersion", "imageVersionId": GALLERY_IMAGE}},
        "spec.source.imageVersionId",
        "gallery image version ID",
    ),
    (
        "blank-publisher",
        {"source": {**PINNED, "publisher": "  ", "version": "1"}},
        "spec.source.publisher",
        "must not be empty",
    ),
    (
        "staging-group-id",
        {"stagingResourceGroup": "IT_my_group"},
        "spec.stagingResourceGroup",
        "resource group ID",
    ),
    (
        "duplicate-output",
        {"distribute": [VHD, {**VHD, "runOutputName": "VHD"}]},
        "spec.distribute",
        "runOutputName must be unique",
    ),
    (
        "managed-target-id",
        {
            "distribute": [
                {"type": "ManagedImage", "runOutputName": "m", "imageId": "x", "location": "l"}
            ]
        },
        "spec.distribute[0].imageId",
        "managed image ID",
    ),
    (
        "gallery-target-id",
        {"distribute": [gallery(galleryImageId="g")]},
        "spec.distribute[0].galleryImageId",
        "gallery image ID",
    ),
    (
        "regions-both-ways",
        {"distribute": [gallery(targetRegions=[{"name": "a"}], replicationRegions=["b"])]},
        "spec.distribute[0].replicationRegions",
        "cannot be used with targetRegions",
    ),
    (
        "region-twice",
        {"distribute": [gallery(targetRegions=[{"name": "a"}, {"name": "A"}])]},
        "spec.distribute[0].targetRegions",
        "more than once",
    ),
    (
        "storage-type-without-regions",
        {"distribute": [gallery(storageAccountType="Standard_LRS")]},
        "spec.distribute[0].storageAccountType",
        "only applies with replicationRegions",
    ),
    (
        "version-and-versioning",
        {
            "distribute": [
                gallery(
                    galleryImageId=f"{GALLERY_IMAGE}/versions/1.0.0",
                    versioning={"scheme": "Latest"},
                )
            ]
        },
        "spec.distribute[0].versioning",
        "names a version",
    ),
    (
        "version-not-triple",
        {"distribute": [gallery(galleryImageId=f"{GALLERY_IMAGE}/versions/v1")]},
        "spec.distribute[0].galleryImageId",
        "MAJOR.MINOR.PATCH",
    ),
    (
        "source-versioning-needs-version",
        {
            "source": {"type": "ManagedImage", "imageId": IMAGE},
            "distribute": [gallery(versioning={"scheme": "Source"})],
        },
        "spec.distribute",
        "Source versioning",
    ),
    (
        "source-validation-with-customizers",
        {"validate": {"sourceValidationOnly": True, "inVMValidations": [SHELL]}},
        "spec.customize",
        "sourceValidationOnly",
    ),
    (
        "source-validation-without-checks",
        {"customize": None, "validate": {"sourceValidationOnly": True}},
        "spec.validate.inVMValidations",
        "at least one validation",
    ),
    (
        "subnet-id",
        {"vmProfile": {"vnetConfig": {"subnetId": "default"}}},
        "spec.vmProfile.vnetConfig.subnetId",
        "subnet ID",
    ),
    (
        "container-subnet-alone",
        {"vmProfile": {"vnetConfig": {"containerInstanceSubnetId": SUBNET}}},
        "spec.vmProfile.vnetConfig.containerInstanceSubnetId",
        "needs subnetId",
    ),
    (
        "proxy-without-subnet",
        {"vmProfile": {"vnetConfig": {"proxyVmSize": "Standard_A1_v2"}}},
        "spec.vmProfile.vnetConfig.proxyVmSize",
        "needs subnetId",
    ),
    (
        "proxy-and-container",
        {
            "vmProfile": {
                "vnetConfig": {
                    "subnetId": SUBNET,
                    "containerInstanceSubnetId": SUBNET,
                    "proxyVmSize": "Standard_A1_v2",
                }
            }
        },
        "spec.vmProfile.vnetConfig.proxyVmSize",
        "cannot be used with containerInstanceSubnetId",
    ),
    (
        "vm-identity-id",
        {"vmProfile": {"userAssignedIdentities": ["me"]}},
        "spec.vmProfile.userAssignedIdentities",
        "user-assigned identity ID",
    ),
    (
        "identity-none-listed",
        {"identity": {"type": "None", "userAssignedIdentities": {IDENTITY: {}}}},
        "spec.identity.userAssignedIdentities",
        "must be empty",
    ),
    (
        "identity-two",
        {
            "identity": {
                "type": "UserAssigned",
                "userAssignedIdentities": {IDENTITY: {}, IDENTITY + "2": {}},
            }
        },
        "spec.identity.userAssignedIdentities",
        "exactly one identity",
    ),
    (
        "identity-key",
        {"identity": {"type": "UserAssigned", "userAssignedIdentities": {"u": {}}}},
        "spec.identity.userAssignedIdentities",
        "user-assigned identity ID",
    ),
    (
        "tag-name",
        {"managedResourceTags": {"cost/centre": "1"}},
        "spec.managedResourceTags",
        "tag names",
    ),
    (
        "artifact-tag-name",
        {"distribute": [{**VHD, "artifactTags": {"a?b": "1"}}]},
        "spec.distribute[0].artifactTags",
        "tag names",
    ),
    (
        "cron-shape",
        {"triggers": [{"kind": "Schedule", "schedule": "every monday"}]},
        "spec.triggers[0].schedule",
        "not a cron expression",
    ),
    (
        "trigger-twice",
        {
            "triggers": [
                {"kind": "Schedule", "schedule": "0 3 * * 1"},
                {"kind": "Schedule", "schedule": "0 4 * * 1"},
            ]
        },
        "spec.triggers",
        "twice",
    ),
    (
        "source-trigger-pinned",
        {"source": {**PINNED, "version": "1.0"}, "triggers": [{"kind": "SourceImage"}]},
        "spec.triggers",
        "follows 'latest'",
    ),
    ("windows-step-locally", {"customize": [POWERSHELL]}, "spec.customize", "Windows build VM"),
    ("mixed-os", {**AZURE, "customize": [SHELL, POWERSHELL]}, "spec.customize", "mixes Shell"),
    (
        "file-uri-on-azure",
        {**AZURE, "customize": [{"type": "Shell", "scriptUri": "file:///s.sh"}]},
        "spec.customize",
        "must start with https:// or http:// for the azure provider",
    ),
    (
        "local-vhd-uri",
        {"distribute": [{**VHD, "uri": "https://a.blob/x.vhd"}]},
        "spec.distribute",
        "absolute file path",
    ),
    (
        "azure-vhd-uri",
        {**AZURE, "distribute": [{**VHD, "uri": "file:///x.vhd"}]},
        "spec.distribute",
        "https:// blob URL",
    ),
]


def manifest(name: str, patch: dict) -> dict:
    body = template(name, **patch)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    return body


@pytest.mark.parametrize(
    ("patch", "field", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_apply_refuses_naming_the_field_and_the_operator_agrees(
    control_plane: Any, patch: dict, field: str, words: str
) -> None:
    body = manifest("cel-check", patch)
    result = server_dry_run(control_plane.kubeconfig, body)
    assert result.returncode != 0, f"accepted: {body['spec']}"
    refusal = next((line for line in result.stderr.split("* ") if words in line), None)
    assert refusal is not None, result.stderr
    assert f"{field}:" in refusal, result.stderr

    provider = Provider(body["spec"].get("provider", "local"))
    problems = validate_template(body["spec"], provider)
    assert any(p.path.startswith(field) and words in p.message for p in problems), [
        str(p) for p in problems
    ]


def test_a_valid_template_of_every_kind_of_step_is_accepted(control_plane: Any) -> None:
    """The rules refuse only what they should: all step and target kinds, set as AIB
    documents them, apply."""
    body = manifest(
        "cel-valid",
        {
            "customize": [
                SHELL,
                {"type": "Shell", "scriptUri": "https://e.x/s.sh", "sha256Checksum": "a" * 64},
                file_step("/tmp/x"),
            ],
            "validate": {"inVMValidations": [SHELL], "continueDistributeOnFailure": True},
            "distribute": [
                VHD,
                gallery(
                    targetRegions=[{"name": "westeurope", "replicaCount": 2}],
                    versioning={"scheme": "Latest", "major": 1},
                ),
                {"type": "ManagedImage", "runOutputName": "m", "imageId": IMAGE, "location": "l"},
            ],
            "vmProfile": {"vnetConfig": {"subnetId": SUBNET}, "userAssignedIdentities": [IDENTITY]},
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}},
            "managedResourceTags": {"team": "images"},
            "triggers": [{"kind": "Schedule", "schedule": "@daily"}, {"kind": "SourceImage"}],
        },
    )
    result = kubectl(
        control_plane.kubeconfig,
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input_text=json.dumps(body),
    )
    assert result.returncode == 0, result.stderr
    assert validate_template(body["spec"], Provider.local) == []
