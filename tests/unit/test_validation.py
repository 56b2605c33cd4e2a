"""Template validation: every cross-field rule, each broken once, and pydantic's own errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kiln.api.template import Provider
from kiln.api.tenancy import FileRoot, TenancyPolicy
from kiln.api.validation import SpecProblem, field_path, parse_spec, validate_template
from kubehelpers import valid_spec

SUB = "/subscriptions/0000/resourceGroups/rg"
MANAGED_IMAGE = f"{SUB}/providers/Microsoft.Compute/images/base"
GALLERY_IMAGE = f"{SUB}/providers/Microsoft.Compute/galleries/g/images/def"
SUBNET = f"{SUB}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/build"
IDENTITY = f"{SUB}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/builder"
SHA = "a" * 64

Spec = dict[str, Any]

BASE: Spec = valid_spec()
AZURE_PLACE = {"location": "westeurope", "resourceGroup": "images", "subscriptionId": "sub"}


def spec(**changes: Any) -> Spec:
    """The base spec with top-level fields replaced (None removes one)."""
    result = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = copy.deepcopy(value)
    return result


def shell(**fields: Any) -> dict[str, Any]:
    return {"type": "Shell", **fields}


def powershell(**fields: Any) -> dict[str, Any]:
    return {"type": "PowerShell", **fields}


def file_step(destination: str, source_uri: str = "https://example.com/f.txt") -> dict[str, Any]:
    return {"type": "File", "sourceUri": source_uri, "destination": destination}


def shared(**fields: Any) -> dict[str, Any]:
    return {
        "type": "SharedImage",
        "runOutputName": "sig",
        "galleryImageId": GALLERY_IMAGE,
        **fields,
    }


def vhd(uri: str) -> dict[str, Any]:
    return {"type": "VHD", "runOutputName": "vhd", "uri": uri}


def vnet(**fields: Any) -> dict[str, Any]:
    return {"vnetConfig": fields}


def azure(**changes: Any) -> Spec:
    return spec(**AZURE_PLACE, **changes)


LOCAL, AZURE = Provider.local, Provider.azure

# (id, provider, spec, expected path, fragment of the message)
CASES: list[tuple[str, Provider, Spec, str, str]] = [
    # scripts
    (
        "script-both-uri-and-inline",
        LOCAL,
        spec(customize=[shell(scriptUri="https://e.com/s.sh", inline=["true"])]),
        "spec.customize[0]",
        "exactly one of scriptUri and inline (both are set)",
    ),
    (
        "script-neither-uri-nor-inline",
        LOCAL,
        spec(customize=[shell(name="empty")]),
        "spec.customize[0]",
        "exactly one of scriptUri and inline (neither is set)",
    ),
    (
        "script-empty-inline-counts-as-unset",
        LOCAL,
        spec(customize=[shell(inline=[])]),
        "spec.customize[0]",
        "(neither is set)",
    ),
    (
        "sha256-without-script-uri",
        LOCAL,
        spec(customize=[shell(inline=["true"], sha256Checksum=SHA)]),
        "spec.customize[0].sha256Checksum",
        "only applies to scriptUri",
    ),
    (
        "validation-step-rules-use-validation-path",
        LOCAL,
        spec(validate={"inVMValidations": [shell(name="empty")]}),
        "spec.validate.inVMValidations[0]",
        "exactly one of scriptUri and inline",
    ),
    (
        "run-as-system-without-run-elevated",
        AZURE,
        azure(customize=[powershell(inline=["whoami"], runAsSystem=True)]),
        "spec.customize[0].runAsSystem",
        "needs runElevated: true",
    ),
    (
        "run-as-system-with-run-elevated-false",
        AZURE,
        azure(customize=[powershell(inline=["whoami"], runAsSystem=True, runElevated=False)]),
        "spec.customize[0].runAsSystem",
        "needs runElevated: true",
    ),
    # File destinations
    (
        "file-destination-outside-tmp",
        LOCAL,
        spec(customize=[file_step("/etc/motd")]),
        "spec.customize[0].destination",
        "only be uploaded under /tmp",
    ),
    (
        "file-destination-is-tmp-itself",
        LOCAL,
        spec(customize=[file_step("/tmp")]),
        "spec.customize[0].destination",
        "only be uploaded under /tmp",
    ),
    (
        "file-destination-relative",
        LOCAL,
        spec(customize=[file_step("tmp/motd")]),
        "spec.customize[0].destination",
        "must be an absolute path",
    ),
    (
        "file-destination-directory",
        LOCAL,
        spec(customize=[file_step("/tmp/files/")]),
        "spec.customize[0].destination",
        "must name a file, not a directory",
    ),
    (
        "file-destination-windows-directory",
        AZURE,
        azure(customize=[file_step("C:\\files\\")]),
        "spec.customize[0].destination",
        "must name a file, not a directory",
    ),
    # URI schemes
    (
        "script-uri-file-on-azure",
        AZURE,
        azure(customize=[shell(scriptUri="file:///srv/s.sh")]),
        "spec.customize[0].scriptUri",
        "must start with https:// or http:// for the azure provider",
    ),
    (
        "script-uri-ftp-on-local",
        LOCAL,
        spec(customize=[shell(scriptUri="ftp://e.com/s.sh")]),
        "spec.customize[0].scriptUri",
        "must start with https:// or http:// or file:// for the local provider",
    ),
    (
        "file-source-uri-file-on-azure",
        AZURE,
        azure(customize=[file_step("/tmp/f", source_uri="file:///srv/f")]),
        "spec.customize[0].sourceUri",
        "for the azure provider",
    ),
    (
        "file-source-uri-bare-path-on-local",
        LOCAL,
        spec(customize=[file_step("/tmp/f", source_uri="/srv/f")]),
        "spec.customize[0].sourceUri",
        "must start with https:// or http:// or file://",
    ),
    # operating systems
    (
        "powershell-on-local",
        LOCAL,
        spec(customize=[powershell(inline=["dir"])]),
        "spec.customize[0].type",
        "PowerShell needs a Windows build VM",
    ),
    (
        "windows-restart-on-local",
        LOCAL,
        spec(customize=[{"type": "WindowsRestart"}]),
        "spec.customize[0].type",
        "WindowsRestart needs a Windows build VM",
    ),
    (
        "windows-update-on-local",
        LOCAL,
        spec(customize=[{"type": "WindowsUpdate"}]),
        "spec.customize[0].type",
        "WindowsUpdate needs a Windows build VM",
    ),
    (
        "powershell-validation-on-local",
        LOCAL,
        spec(validate={"inVMValidations": [powershell(inline=["dir"])]}),
        "spec.validate.inVMValidations[0].type",
        "needs a Windows build VM",
    ),
    (
        "shell-and-powershell-on-azure",
        AZURE,
        azure(customize=[shell(inline=["true"]), powershell(inline=["dir"])]),
        "spec.customize",
        "mixes Shell (Linux) with PowerShell",
    ),
    (
        "shell-customizer-and-windows-validation-on-azure",
        AZURE,
        azure(validate={"inVMValidations": [{"type": "PowerShell", "inline": ["dir"]}]}),
        "spec.customize",
        "a build VM runs one OS",
    ),
    # validate
    (
        "source-validation-only-with-customizers",
        LOCAL,
        spec(validate={"sourceValidationOnly": True, "inVMValidations": [shell(inline=["t"])]}),
        "spec.customize",
        "must be empty when validate.sourceValidationOnly is true",
    ),
    (
        "source-validation-only-without-validations",
        LOCAL,
        spec(customize=None, validate={"sourceValidationOnly": True}),
        "spec.validate.inVMValidations",
        "needs at least one validation",
    ),
    # sources
    (
        "platform-image-blank-sku",
        LOCAL,
        spec(source={**BASE["source"], "sku": "  "}),
        "spec.source.sku",
        "must not be empty",
    ),
    (
        "managed-image-source-bad-id",
        LOCAL,
        spec(source={"type": "ManagedImage", "imageId": "base"}),
        "spec.source.imageId",
        "must be a managed image ID",
    ),
    (
        "shared-image-version-source-without-version",
        LOCAL,
        spec(source={"type": "SharedImageVersion", "imageVersionId": GALLERY_IMAGE}),
        "spec.source.imageVersionId",
        "must be a gallery image version ID",
    ),
    # distribute
    (
        "duplicate-run-output-name",
        LOCAL,
        spec(distribute=[vhd("/srv/a.vhd"), vhd("/srv/b.vhd")]),
        "spec.distribute[1].runOutputName",
        "'vhd' is already used by spec.distribute[0]",
    ),
    (
        "managed-image-distributor-bad-id",
        LOCAL,
        spec(
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "mi",
                    "imageId": f"{SUB}/providers/Microsoft.Compute/disks/d",
                    "location": "local",
                }
            ]
        ),
        "spec.distribute[0].imageId",
        "must be a managed image ID",
    ),
    (
        "gallery-image-id-bad",
        LOCAL,
        spec(distribute=[shared(galleryImageId=f"{SUB}/providers/Microsoft.Compute/galleries/g")]),
        "spec.distribute[0].galleryImageId",
        "must be a gallery image ID",
    ),
    (
        "target-regions-with-replication-regions",
        LOCAL,
        spec(distribute=[shared(targetRegions=[{"name": "a"}], replicationRegions=["b"])]),
        "spec.distribute[0].replicationRegions",
        "cannot be used with targetRegions",
    ),
    (
        "storage-account-type-without-replication-regions",
        LOCAL,
        spec(distribute=[shared(targetRegions=[{"name": "a"}], storageAccountType="Premium_LRS")]),
        "spec.distribute[0].storageAccountType",
        "only applies with replicationRegions",
    ),
    (
        "duplicate-target-regions",
        LOCAL,
        spec(distribute=[shared(targetRegions=[{"name": "west"}, {"name": "west"}])]),
        "spec.distribute[0].targetRegions",
        "lists west more than once",
    ),
    (
        "duplicate-replication-regions",
        LOCAL,
        spec(distribute=[shared(replicationRegions=["east", "east"])]),
        "spec.distribute[0].targetRegions",
        "lists east more than once",
    ),
    (
        "explicit-version-with-versioning",
        LOCAL,
        spec(
            distribute=[
                shared(
                    galleryImageId=f"{GALLERY_IMAGE}/versions/1.2.3",
                    versioning={"scheme": "Latest"},
                )
            ]
        ),
        "spec.distribute[0].versioning",
        "cannot be used when galleryImageId names a version",
    ),
    (
        "explicit-version-not-a-triple",
        LOCAL,
        spec(distribute=[shared(galleryImageId=f"{GALLERY_IMAGE}/versions/1.2")]),
        "spec.distribute[0].galleryImageId",
        "MAJOR.MINOR.PATCH",
    ),
    (
        "explicit-version-latest-is-not-a-triple",
        LOCAL,
        spec(distribute=[shared(galleryImageId=f"{GALLERY_IMAGE}/versions/latest")]),
        "spec.distribute[0].galleryImageId",
        "MAJOR.MINOR.PATCH",
    ),
    (
        "source-versioning-with-managed-image-source",
        LOCAL,
        spec(
            source={"type": "ManagedImage", "imageId": MANAGED_IMAGE},
            distribute=[shared(versioning={"scheme": "Source"})],
        ),
        "spec.distribute[0].versioning.scheme",
        "Source versioning needs a PlatformImage or SharedImageVersion source",
    ),
    (
        "vhd-https-uri-on-local",
        LOCAL,
        spec(distribute=[vhd("https://acct.blob.core.windows.net/c/os.vhd")]),
        "spec.distribute[0].uri",
        "absolute file path or file:/// URL",
    ),
    (
        "vhd-relative-path-on-local",
        LOCAL,
        spec(distribute=[vhd("out/os.vhd")]),
        "spec.distribute[0].uri",
        "absolute file path or file:/// URL",
    ),
    (
        "vhd-file-uri-on-azure",
        AZURE,
        azure(distribute=[vhd("file:///srv/os.vhd")]),
        "spec.distribute[0].uri",
        "must be an https:// blob URL ending in .vhd",
    ),
    (
        "vhd-not-ending-in-vhd-on-azure",
        AZURE,
        azure(distribute=[vhd("https://acct.blob.core.windows.net/c/os.vhdx")]),
        "spec.distribute[0].uri",
        "ending in .vhd",
    ),
    # vmProfile
    (
        "container-instance-subnet-without-subnet",
        AZURE,
        azure(vmProfile=vnet(containerInstanceSubnetId=SUBNET)),
        "spec.vmProfile.vnetConfig.containerInstanceSubnetId",
        "needs subnetId as well",
    ),
    (
        "container-instance-subnet-with-proxy-vm-size",
        AZURE,
        azure(
            vmProfile=vnet(
                subnetId=SUBNET, containerInstanceSubnetId=SUBNET, proxyVmSize="Standard_A1_v2"
            )
        ),
        "spec.vmProfile.vnetConfig.proxyVmSize",
        "cannot be used with containerInstanceSubnetId",
    ),
    (
        "proxy-vm-size-without-subnet",
        AZURE,
        azure(vmProfile=vnet(proxyVmSize="Standard_A1_v2")),
        "spec.vmProfile.vnetConfig.proxyVmSize",
        "needs subnetId as well",
    ),
    (
        "bad-subnet-id",
        AZURE,
        azure(vmProfile=vnet(subnetId=f"{SUB}/providers/Microsoft.Network/virtualNetworks/v")),
        "spec.vmProfile.vnetConfig.subnetId",
        "must be a subnet ID",
    ),
    (
        "bad-vm-user-assigned-identity",
        AZURE,
        azure(vmProfile={"userAssignedIdentities": [IDENTITY, "builder"]}),
        "spec.vmProfile.userAssignedIdentities[1]",
        "must be a user-assigned identity ID",
    ),
    # identity
    (
        "user-assigned-identity-without-identities",
        AZURE,
        azure(identity={"type": "UserAssigned"}),
        "spec.identity.userAssignedIdentities",
        "needs exactly one identity",
    ),
    (
        "user-assigned-identity-with-two",
        AZURE,
        azure(
            identity={
                "type": "UserAssigned",
                "userAssignedIdentities": {IDENTITY: {}, IDENTITY + "2": {}},
            }
        ),
        "spec.identity.userAssignedIdentities",
        "needs exactly one identity",
    ),
    (
        "identity-none-with-identities",
        AZURE,
        azure(identity={"type": "None", "userAssignedIdentities": {IDENTITY: {}}}),
        "spec.identity.userAssignedIdentities",
        "must be empty when type is None",
    ),
    (
        "identity-bad-key",
        AZURE,
        azure(identity={"type": "UserAssigned", "userAssignedIdentities": {"builder": {}}}),
        "spec.identity.userAssignedIdentities",
        "'builder' is not a user-assigned identity ID",
    ),
    # tags
    (
        "tag-name-too-long",
        LOCAL,
        spec(managedResourceTags={"n" * 513: "v"}),
        "spec.managedResourceTags." + "n" * 513,
        "tag names have at most 512 characters",
    ),
    (
        "tag-name-with-slash",
        LOCAL,
        spec(managedResourceTags={"team/owner": "v"}),
        "spec.managedResourceTags.team/owner",
        "none of <>%&\\?/",
    ),
    (
        "tag-value-too-long",
        LOCAL,
        spec(managedResourceTags={"team": "v" * 257}),
        "spec.managedResourceTags.team",
        "tag values have at most 256 characters",
    ),
    (
        "artifact-tag-name-with-percent",
        LOCAL,
        spec(distribute=[{**vhd("/srv/a.vhd"), "artifactTags": {"100%": "x"}}]),
        "spec.distribute[0].artifactTags.100%",
        "tag names have at most 512 characters",
    ),
    # staging resource group
    (
        "staging-resource-group-not-an-id",
        AZURE,
        azure(stagingResourceGroup="my-staging"),
        "spec.stagingResourceGroup",
        "must be a resource group ID",
    ),
    (
        "staging-resource-group-with-provider-suffix",
        AZURE,
        azure(stagingResourceGroup=f"{SUB}/providers/Microsoft.Compute/images/x"),
        "spec.stagingResourceGroup",
        "must be a resource group ID",
    ),
    # triggers
    (
        "bad-cron",
        LOCAL,
        spec(triggers=[{"kind": "Schedule", "schedule": "every monday"}]),
        "spec.triggers[0].schedule",
        "'every monday' is not a cron expression",
    ),
    (
        "cron-minute-out-of-range",
        LOCAL,
        spec(triggers=[{"kind": "Schedule", "schedule": "61 * * * *"}]),
        "spec.triggers[0].schedule",
        "is not a cron expression",
    ),
    (
        "duplicate-trigger-kinds",
        LOCAL,
        spec(
            triggers=[
                {"kind": "Schedule", "schedule": "0 3 * * 1"},
                {"kind": "Schedule", "schedule": "0 4 * * 1"},
            ]
        ),
        "spec.triggers[1].kind",
        "Schedule is listed twice",
    ),
    (
        "source-image-trigger-with-pinned-version",
        LOCAL,
        spec(source={**BASE["source"], "version": "12.1.0"}, triggers=[{"kind": "SourceImage"}]),
        "spec.triggers[0].kind",
        "SourceImage needs a source that follows 'latest'",
    ),
    (
        "source-image-trigger-with-managed-image",
        LOCAL,
        spec(
            source={"type": "ManagedImage", "imageId": MANAGED_IMAGE},
            triggers=[{"kind": "SourceImage"}],
        ),
        "spec.triggers[0].kind",
        "SourceImage needs a source that follows 'latest'",
    ),
    # azure needs a place
    (
        "azure-without-location",
        AZURE,
        spec(resourceGroup="images", subscriptionId="sub"),
        "spec.location",
        "is required for the azure provider",
    ),
    (
        "azure-without-resource-group",
        AZURE,
        spec(location="westeurope", subscriptionId="sub"),
        "spec.resourceGroup",
        "is required for the azure provider",
    ),
    (
        "azure-without-subscription",
        AZURE,
        spec(location="westeurope", resourceGroup="images"),
        "spec.subscriptionId",
        "is required for the azure provider",
    ),
    # pydantic-level errors
    (
        "unknown-top-level-field",
        LOCAL,
        spec(customise=[]),
        "spec.customise",
        "is not a known field",
    ),
    (
        "unknown-field-in-step",
        LOCAL,
        spec(customize=[shell(inline=["t"], inlne=["t"])]),
        "spec.customize[0].inlne",
        "is not a known field",
    ),
    (
        "unknown-field-in-versioning",
        LOCAL,
        spec(distribute=[shared(versioning={"scheme": "Latest", "minor": 1})]),
        "spec.distribute[0].versioning.minor",
        "is not a known field",
    ),
    (
        "missing-source",
        LOCAL,
        spec(source=None),
        "spec.source",
        "is required",
    ),
    (
        "missing-file-destination",
        LOCAL,
        spec(customize=[{"type": "File", "sourceUri": "https://e.com/f"}]),
        "spec.customize[0].destination",
        "is required",
    ),
    (
        "missing-gallery-image-id",
        LOCAL,
        spec(distribute=[{"type": "SharedImage", "runOutputName": "sig"}]),
        "spec.distribute[0].galleryImageId",
        "is required",
    ),
    (
        "bad-sha256-pattern",
        LOCAL,
        spec(customize=[shell(scriptUri="https://e.com/s.sh", sha256Checksum="abc")]),
        "spec.customize[0].sha256Checksum",
        "pattern",
    ),
    (
        "bad-run-output-name",
        LOCAL,
        spec(distribute=[{"type": "VHD", "runOutputName": "has space"}]),
        "spec.distribute[0].runOutputName",
        "pattern",
    ),
    (
        "build-timeout-too-long",
        LOCAL,
        spec(buildTimeoutInMinutes=961),
        "spec.buildTimeoutInMinutes",
        "960",
    ),
    (
        "empty-distribute",
        LOCAL,
        spec(distribute=[]),
        "spec.distribute",
        "at least 1 item",
    ),
]


def _matches(problems: list[SpecProblem], path: str, fragment: str) -> bool:
    return any(p.path == path and fragment in p.message for p in problems)


@pytest.mark.parametrize(
    ("provider", "raw", "path", "fragment"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_rule_is_reported(provider: Provider, raw: Spec, path: str, fragment: str) -> None:
    problems = validate_template(raw, provider)
    assert _matches(problems, path, fragment), [str(p) for p in problems]
    # Each case breaks one rule, so nothing else may be reported.
    assert [p.path for p in problems] == [path]


def test_case_ids_are_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


def test_base_spec_is_valid_for_local() -> None:
    assert validate_template(spec(), Provider.local) == []


def test_base_spec_is_valid_for_azure_with_a_place() -> None:
    assert validate_template(azure(), Provider.azure) == []


def test_base_spec_on_azure_without_a_place_names_every_missing_field() -> None:
    paths = {p.path for p in validate_template(spec(), Provider.azure)}
    assert paths == {"spec.location", "spec.resourceGroup", "spec.subscriptionId"}


VALID_VARIANTS: list[tuple[str, Provider, Spec]] = [
    ("script-uri-file-on-local", LOCAL, spec(customize=[shell(scriptUri="file:///srv/s.sh")])),
    (
        "script-uri-with-checksum",
        LOCAL,
        spec(customize=[shell(scriptUri="https://e.com/s.sh", sha256Checksum=SHA)]),
    ),
    ("file-under-tmp", LOCAL, spec(customize=[file_step("/tmp/motd")])),
    ("file-windows-path", AZURE, azure(customize=[file_step("C:\\Windows\\Temp\\f.txt")])),
    (
        "run-as-system-elevated",
        AZURE,
        azure(customize=[powershell(inline=["whoami"], runAsSystem=True, runElevated=True)]),
    ),
    (
        "windows-steps-on-azure",
        AZURE,
        azure(
            customize=[
                powershell(inline=["dir"]),
                {"type": "WindowsRestart", "restartTimeout": "10m"},
                {"type": "WindowsUpdate", "updateLimit": 20},
            ]
        ),
    ),
    (
        "source-validation-only",
        LOCAL,
        spec(
            customize=None,
            validate={"sourceValidationOnly": True, "inVMValidations": [shell(inline=["t"])]},
        ),
    ),
    ("vhd-absolute-path-on-local", LOCAL, spec(distribute=[vhd("/srv/os.vhd")])),
    ("vhd-file-url-on-local", LOCAL, spec(distribute=[vhd("file:///srv/os.vhd")])),
    (
        "vhd-blob-on-azure",
        AZURE,
        azure(distribute=[vhd("https://acct.blob.core.windows.net/c/OS.VHD")]),
    ),
    (
        "shared-image-full",
        LOCAL,
        spec(
            distribute=[
                shared(
                    targetRegions=[{"name": "a", "replicaCount": 2}, {"name": "b"}],
                    versioning={"scheme": "Source"},
                )
            ]
        ),
    ),
    (
        "shared-image-replication-regions",
        LOCAL,
        spec(distribute=[shared(replicationRegions=["a"], storageAccountType="Standard_ZRS")]),
    ),
    (
        "shared-image-explicit-version",
        LOCAL,
        spec(distribute=[shared(galleryImageId=f"{GALLERY_IMAGE}/versions/1.2.3")]),
    ),
    (
        "managed-image-source-and-distributor",
        LOCAL,
        spec(
            source={"type": "ManagedImage", "imageId": MANAGED_IMAGE},
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "mi",
                    "imageId": MANAGED_IMAGE + "2",
                    "location": "local",
                }
            ],
        ),
    ),
    (
        "gallery-latest-source-with-source-trigger",
        LOCAL,
        spec(
            source={
                "type": "SharedImageVersion",
                "imageVersionId": f"{GALLERY_IMAGE}/versions/latest",
            },
            triggers=[{"kind": "SourceImage"}, {"kind": "Schedule", "schedule": "0 3 * * 1"}],
        ),
    ),
    (
        "vnet-and-identity",
        AZURE,
        azure(
            vmProfile={
                "userAssignedIdentities": [IDENTITY],
                "vnetConfig": {"subnetId": SUBNET, "containerInstanceSubnetId": SUBNET},
            },
            identity={"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}},
            stagingResourceGroup="/subscriptions/0000/resourceGroups/staging",
        ),
    ),
    (
        "tags-at-limits",
        LOCAL,
        spec(managedResourceTags={"n" * 512: "v" * 256}),
    ),
]


@pytest.mark.parametrize(
    ("provider", "raw"),
    [case[1:] for case in VALID_VARIANTS],
    ids=[case[0] for case in VALID_VARIANTS],
)
def test_valid_variants_have_no_problems(provider: Provider, raw: Spec) -> None:
    assert [str(p) for p in validate_template(raw, provider)] == []


def test_every_problem_is_reported_not_just_the_first() -> None:
    raw = spec(
        customize=[shell(name="empty"), file_step("/etc/x")],
        distribute=[vhd("/a.vhd"), vhd("/b.vhd")],
    )
    paths = {p.path for p in validate_template(raw, Provider.local)}
    assert {
        "spec.customize[0]",
        "spec.customize[1].destination",
        "spec.distribute[1].runOutputName",
    } <= paths


@pytest.mark.parametrize(
    ("raw", "path", "tags"),
    [
        (
            spec(source={"type": "Nope"}),
            "spec.source.type",
            ["PlatformImage", "ManagedImage", "SharedImageVersion"],
        ),
        (
            spec(customize=[{"type": "Bash", "inline": ["t"]}]),
            "spec.customize[0].type",
            ["Shell", "PowerShell", "File", "WindowsRestart", "WindowsUpdate"],
        ),
        (
            spec(validate={"inVMValidations": [{"type": "WindowsRestart"}]}),
            "spec.validate.inVMValidations[0].type",
            ["Shell", "PowerShell", "File"],
        ),
        (
            spec(distribute=[{"type": "Blob", "runOutputName": "x"}]),
            "spec.distribute[0].type",
            ["ManagedImage", "SharedImage", "VHD"],
        ),
        (
            spec(distribute=[shared(versioning={"scheme": "Newest"})]),
            "spec.distribute[0].versioning.scheme",
            ["Latest", "Source"],
        ),
        (
            spec(triggers=[{"kind": "Webhook"}]),
            "spec.triggers[0].kind",
            ["Schedule", "SourceImage"],
        ),
    ],
)
def test_unknown_type_tag_lists_the_known_ones(raw: Spec, path: str, tags: list[str]) -> None:
    spec_, problems = parse_spec(raw)
    assert spec_ is None
    [problem] = problems
    assert problem.path == path
    assert "is not a known type" in problem.message
    for tag in tags:
        assert repr(tag) in problem.message


def test_parse_spec_returns_the_model_without_problems() -> None:
    parsed, problems = parse_spec(spec())
    assert problems == []
    assert parsed is not None
    assert parsed.distribute[0].run_output_name == "vhd"


def test_problem_str_is_path_then_message() -> None:
    assert str(SpecProblem(path="spec.x", message="is bad")) == "spec.x: is bad"


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("customize", 0, "Shell", "inline"), "spec.customize[0].inline"),
        (("customize", 2, "File", "destination"), "spec.customize[2].destination"),
        (("source", "ManagedImage", "imageId"), "spec.source.imageId"),
        (
            ("distribute", 1, "SharedImage", "versioning", "Latest", "major"),
            "spec.distribute[1].versioning.major",
        ),
        (("customize", 0, "Shell", "inline", 3), "spec.customize[0].inline[3]"),
        (
            ("validate", "inVMValidations", 0, "PowerShell", "runAsSystem"),
            "spec.validate.inVMValidations[0].runAsSystem",
        ),
        (("triggers", 0, "Schedule", "schedule"), "spec.triggers[0].schedule"),
        # A user's own key that happens to equal a tag is kept.
        (("managedResourceTags", "Shell"), "spec.managedResourceTags.Shell"),
        (
            ("distribute", 0, "VHD", "artifactTags", "Source"),
            "spec.distribute[0].artifactTags.Source",
        ),
        ((), "spec"),
    ],
)
def test_field_path(loc: tuple[int | str, ...], expected: str) -> None:
    assert field_path(loc) == expected


def test_field_path_root() -> None:
    assert field_path(("templateRef", "name"), root="run.spec") == "run.spec.templateRef.name"


# --- what the operator's settings let a template reach --------------------------------------

POLICY = TenancyPolicy(
    file_source_roots=[FileRoot.parse("/srv/kiln-files")],
    output_roots=[Path("/srv/images")],
    communicator_source="203.0.113.7/32",
)

# (id, provider, spec, expected path, fragment of the message)
TENANCY_CASES: list[tuple[str, Provider, Spec, str, str]] = [
    (
        "file-source-outside-roots",
        LOCAL,
        spec(customize=[file_step("/tmp/f", source_uri="file:///etc/shadow")]),
        "spec.customize[0].sourceUri",
        "not under a directory templates may read (/srv/kiln-files)",
    ),
    (
        "service-account-token",
        LOCAL,
        spec(
            customize=[
                shell(scriptUri="file:///var/run/secrets/kubernetes.io/serviceaccount/token")
            ]
        ),
        "spec.customize[0].scriptUri",
        "not under a directory templates may read",
    ),
    (
        "dot-dot-out-of-a-root",
        LOCAL,
        spec(customize=[shell(scriptUri="file:///srv/kiln-files/../../root/.ssh/id_rsa")]),
        "spec.customize[0].scriptUri",
        "without '..'",
    ),
    (
        "validation-file-outside-roots",
        LOCAL,
        spec(validate={"inVMValidations": [file_step("/tmp/f", source_uri="file:///etc/passwd")]}),
        "spec.validate.inVMValidations[0].sourceUri",
        "not under",
    ),
    (
        "metadata-service-literal",
        LOCAL,
        spec(customize=[shell(scriptUri="http://169.254.169.254/metadata/identity")]),
        "spec.customize[0].scriptUri",
        "169.254.169.254 is in 169.254.0.0/16",
    ),
    (
        "wireserver-literal",
        AZURE,
        azure(customize=[file_step("/tmp/f", source_uri="http://168.63.129.16/machine")]),
        "spec.customize[0].sourceUri",
        "KILN_DOWNLOAD_BLOCKED_RANGES",
    ),
    (
        "loopback-ipv6-literal",
        LOCAL,
        spec(customize=[shell(scriptUri="http://[::1]:8080/s.sh")]),
        "spec.customize[0].scriptUri",
        "::1 is in ::1/128",
    ),
    (
        "vhd-outside-output-roots",
        LOCAL,
        spec(distribute=[vhd("/etc/cron.d/os.vhd")]),
        "spec.distribute[0].uri",
        "outside the directories Kiln may write (/srv/images, ",
    ),
    (
        "vhd-dot-dot",
        LOCAL,
        spec(distribute=[vhd("file:///srv/images/../../etc/os.vhd")]),
        "spec.distribute[0].uri",
        "without '..'",
    ),
]


@pytest.mark.parametrize(
    ("provider", "raw", "path", "fragment"),
    [case[1:] for case in TENANCY_CASES],
    ids=[case[0] for case in TENANCY_CASES],
)
def test_tenancy_rule_is_reported(provider: Provider, raw: Spec, path: str, fragment: str) -> None:
    policy = POLICY.model_copy(update={"output_roots": [Path("/srv/images"), Path("/gallery")]})
    problems = validate_template(raw, provider, policy)
    assert _matches(problems, path, fragment), [str(p) for p in problems]
    assert [p.path for p in problems] == [path]


def test_without_file_roots_file_sources_are_off() -> None:
    raw = spec(customize=[shell(scriptUri="file:///srv/kiln-files/s.sh")])
    [problem] = validate_template(raw, LOCAL, TenancyPolicy())
    assert "file:// sources are off in this operator" in problem.message
    assert "KILN_FILE_SOURCE_ROOTS" in problem.message


def test_allowed_sources_and_outputs_pass() -> None:
    raw = spec(
        customize=[
            shell(scriptUri="file:///srv/kiln-files/setup.sh"),
            file_step("/tmp/f", source_uri="file:///srv/kiln-files/sub/f.txt"),
            shell(scriptUri="https://artifacts.example.com/s.sh"),
            shell(scriptUri="http://10.1.2.3/s.sh"),  # a private artifact server
        ],
        distribute=[vhd("/srv/images/team-a/os.vhd")],
    )
    assert validate_template(raw, LOCAL, POLICY) == []


def test_azure_public_build_needs_a_communicator_source() -> None:
    policy = POLICY.model_copy(update={"communicator_source": None})
    [problem] = validate_template(azure(), AZURE, policy)
    assert problem.path == "spec.vmProfile.vnetConfig.subnetId"
    assert "KILN_AZURE_COMMUNICATOR_SOURCE" in problem.message
    assert "settings.azure.communicatorSource" in problem.message
    private = azure(vmProfile=vnet(subnetId=SUBNET))
    assert validate_template(private, AZURE, policy) == []
    assert validate_template(azure(), AZURE, POLICY) == []


def test_without_the_operators_identity_a_service_account_is_required() -> None:
    policy = POLICY.model_copy(update={"operator_identity": False})
    [problem] = validate_template(azure(), AZURE, policy)
    assert problem.path == "spec.serviceAccountName"
    assert "KILN_AZURE_OPERATOR_IDENTITY" in problem.message
    assert validate_template(azure(serviceAccountName="team-a-builder"), AZURE, policy) == []
    assert validate_template(spec(), LOCAL, policy) == []  # local builds use no identity


def test_a_service_account_name_must_be_a_kubernetes_name() -> None:
    [problem] = validate_template(azure(serviceAccountName="../other"), AZURE)
    assert problem.path == "spec.serviceAccountName"
