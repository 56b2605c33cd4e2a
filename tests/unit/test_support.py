"""Properties a provider accepts but does not use are named, with why; VM sizes map to
vCPUs and memory, capped by the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln import reasons
from kiln.api.capabilities import Provider
from kiln.api.support import PROPERTIES, markdown_table, not_used
from kiln.api.template import ImageTemplateSpec
from kiln.api.validation import validate_template
from kiln.api.vmsizes import VM_SIZES, VmShape, capped, vm_shape
from kiln.reconcile.conditions import find
from kiln.reconcile.templates import template_status
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec

README = Path(__file__).resolve().parents[2] / "README.md"
SUBNET = (
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/b"
)
IDENTITY = (
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/"
    "userAssignedIdentities/builder"
)


def spec(**fields: Any) -> ImageTemplateSpec:
    return ImageTemplateSpec.model_validate({**valid_spec(), **fields})


def test_the_readme_has_the_property_table() -> None:
    assert markdown_table() in README.read_text()


def test_a_plain_template_uses_everything_it_sets() -> None:
    for provider in Provider:
        assert not_used(spec(), provider) == []


@pytest.mark.parametrize(
    ("fields", "provider", "paths"),
    [
        (
            {"vmProfile": {"vnetConfig": {"subnetId": SUBNET, "proxyVmSize": "Standard_A1"}}},
            Provider.azure,
            ["vmProfile.vnetConfig.proxyVmSize"],
        ),
        (
            {
                "vmProfile": {
                    "vnetConfig": {"subnetId": SUBNET, "containerInstanceSubnetId": SUBNET}
                }
            },
            Provider.azure,
            ["vmProfile.vnetConfig.containerInstanceSubnetId"],
        ),
        (
            {"vmProfile": {"vnetConfig": {"subnetId": SUBNET, "proxyVmSize": "Standard_A1"}}},
            Provider.local,
            ["vmProfile.vnetConfig.subnetId", "vmProfile.vnetConfig.proxyVmSize"],
        ),
        (
            {"identity": {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}}},
            Provider.local,
            ["identity"],
        ),
        (
            {"identity": {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}}},
            Provider.azure,
            [],
        ),
        ({"identity": {"type": "None"}}, Provider.local, []),
        ({"optimize": {"vmBoot": {"state": "Enabled"}}}, Provider.local, ["optimize.vmBoot"]),
        ({"optimize": {"vmBoot": {"state": "Disabled"}}}, Provider.azure, []),
        ({"additionalDataDisks": [{"sizeGB": 2}]}, Provider.local, []),
        ({"additionalDataDisks": [{"sizeGB": 2}]}, Provider.azure, []),
        ({"managedResourceTags": {"team": "a"}}, Provider.local, ["managedResourceTags"]),
        ({"vmProfile": {"vmSize": "Standard_B2s"}}, Provider.local, []),
    ],
)
def test_unused_properties_are_named(
    fields: dict[str, Any], provider: Provider, paths: list[str]
) -> None:
    found = not_used(spec(**fields), provider)
    assert [n.path for n in found] == paths
    assert all(n.why.startswith("not used: ") for n in found)


def test_every_row_names_a_real_property() -> None:
    """Each path's first segment is a spec field (a typo would never be flagged)."""
    names = {info.alias or name for name, info in ImageTemplateSpec.model_fields.items()}
    for prop in PROPERTIES:
        assert prop.path.split(".")[0].removesuffix("[]") in names, prop.path


def test_the_template_says_what_is_not_used_and_stays_ready() -> None:
    body = {
        "metadata": {"name": "t", "namespace": "n", "uid": "u", "generation": 3},
        "spec": {
            **valid_spec(),
            "provider": "azure",
            "location": "westeurope",
            "resourceGroup": "rg",
            "subscriptionId": "s",
            "vmProfile": {"vnetConfig": {"subnetId": SUBNET, "proxyVmSize": "Standard_A1"}},
        },
    }
    settings = OperatorSettings(default_provider=Provider.azure)
    status = template_status(body, [], settings, None, "2026-12-02T00:00:00Z")
    condition = find(status["conditions"], reasons.PROPERTIES_NOT_USED)
    assert condition is not None
    assert condition["status"] == "True" and condition["reason"] == reasons.PROPERTY_NOT_USED
    assert "spec.vmProfile.vnetConfig.proxyVmSize" in condition["message"]
    assert "reaches the build VM's private IP itself" in condition["message"]
    assert condition["observedGeneration"] == 3
    assert find(status["conditions"], reasons.READY)["status"] == "True"
    assert find(status["conditions"], reasons.STALLED)["status"] == "False"


# --- VM sizes ---------------------------------------------------------------------------


def test_sizes_are_found_without_regard_to_case() -> None:
    assert vm_shape("standard_d4s_v5") == VmShape(cpus=4, memory_mb=16384)
    assert vm_shape("Standard_DS1_v2") == VmShape(cpus=1, memory_mb=3584)
    assert vm_shape("Standard_Z99") is None


def test_a_size_within_the_host_is_given_whole() -> None:
    got, message = capped("Standard_B2s", VM_SIZES["Standard_B2s"], 8, 32768)
    assert got == VmShape(cpus=2, memory_mb=4096)
    assert message == "Standard_B2s: 2 vCPU(s), 4096 MiB"


def test_a_size_beyond_the_host_is_capped_with_a_message() -> None:
    got, message = capped("Standard_D8s_v5", VM_SIZES["Standard_D8s_v5"], 2, 24576)
    assert got == VmShape(cpus=2, memory_mb=12288)
    assert "8 vCPUs capped to the host's 2 CPUs" in message
    assert "32768 MiB capped to half the host's memory" in message


def test_an_unknown_size_is_refused_locally_and_accepted_on_azure() -> None:
    raw = {**valid_spec(), "vmProfile": {"vmSize": "Standard_Z99"}}
    problems = validate_template(raw, Provider.local)
    assert [p.path for p in problems] == ["spec.vmProfile.vmSize"]
    assert "Standard_D2s_v3" in problems[0].message
    azure = {**raw, "location": "l", "resourceGroup": "rg", "subscriptionId": "s"}
    assert validate_template(azure, Provider.azure) == []


def test_an_enabled_workload_needs_its_script() -> None:
    raw = {**valid_spec(), "optimize": {"workload": {"state": "Enabled"}}}
    problems = validate_template(raw, Provider.local)
    assert [p.path for p in problems] == ["spec.optimize.workload.scriptUri"]
