"""`kiln import`: AIB template JSON in the shapes AIB users have, as ImageTemplates."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kiln.api.template import ImageTemplateSpec, PowerShellStep, SharedImageDistributor
from kiln.commands.importer import ImportProblem, import_document, kubernetes_name

DATA = Path(__file__).parent / "data"
SUBSCRIPTION = "0b1f6471-1bf0-4dda-aec3-111122223333"


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def test_an_arm_template_is_resolved_with_its_parameters_and_variables() -> None:
    [one] = import_document(load("aib-arm-template.json"), {"imageTemplateName": "Ubuntu_Web"})
    manifest = one.manifest
    assert manifest["apiVersion"] == "kiln.dev/v1alpha1" and manifest["kind"] == "ImageTemplate"
    assert manifest["metadata"] == {"name": "ubuntu-web"}
    spec = manifest["spec"]
    assert spec["provider"] == "azure" and spec["location"] == "westus2"  # the defaultValue
    target = spec["distribute"][0]
    assert target["imageId"].endswith("/Microsoft.Compute/images/ubuntu-web")  # a variable
    assert target["location"] == "westus2"
    assert [step["name"] for step in spec["customize"]] == [
        "RunScriptFromSource",
        "downloadBuildArtifacts",
        "setupBuildPath",
    ]
    assert list(spec["identity"]["userAssignedIdentities"]) == [
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/aib"
    ]
    parsed = ImageTemplateSpec.model_validate(spec)
    assert parsed.build_timeout_in_minutes == 80 and parsed.vm_profile is not None
    assert any("tags" in note for note in one.notes)
    assert "spec.resourceGroup is not set: the operator's default applies" in one.notes


def test_az_image_builder_show_output_keeps_where_the_template_lives() -> None:
    [one] = import_document(load("aib-show.json"), namespace="images")
    assert one.manifest["metadata"] == {"name": "win2022-base", "namespace": "images"}
    spec = one.manifest["spec"]
    assert spec["subscriptionId"] == SUBSCRIPTION and spec["resourceGroup"] == "aib-templates"
    assert spec["location"] == "westeurope"
    for output in ("provisioningState", "lastRunStatus", "exactStagingResourceGroup"):
        assert output not in spec
        assert f"properties.{output} is AIB's output, dropped" in one.notes
    identities = spec["identity"]["userAssignedIdentities"]
    assert all(value == {} for value in identities.values())  # no principalId/clientId
    parsed = ImageTemplateSpec.model_validate(spec)
    assert isinstance(parsed.customize and parsed.customize[0], PowerShellStep)
    target = parsed.distribute[0]
    assert isinstance(target, SharedImageDistributor) and target.target_regions
    assert target.target_regions[1].storage_account_type == "Standard_ZRS"


def test_properties_alone_need_a_name() -> None:
    properties = load("aib-show.json")["properties"]
    with pytest.raises(ImportProblem, match="no name; give one with --name"):
        import_document(properties)
    [one] = import_document(properties, name="win")
    assert one.manifest["metadata"]["name"] == "win"


def test_a_missing_parameter_is_named_with_the_fix() -> None:
    with pytest.raises(ImportProblem) as problem:
        import_document(load("aib-arm-template.json"))
    assert str(problem.value) == (
        "resources[0].name: parameters 'imageTemplateName' has no value "
        "(give it with --parameters FILE)"
    )


def test_other_arm_expressions_are_refused_where_they_are() -> None:
    document = load("aib-arm-template.json")
    properties = document["resources"][0]["properties"]
    properties["source"]["sku"] = "[concat('22_04', '-lts-gen2')]"
    with pytest.raises(ImportProblem) as problem:
        import_document(document, {"imageTemplateName": "x"})
    message = str(problem.value)
    assert message.startswith("resources[0].properties.source.sku: [concat(")
    assert "put its value in its place" in message


def test_an_escaped_bracket_is_a_literal() -> None:
    document = load("aib-arm-template.json")
    document["resources"][0]["properties"]["customize"][2]["inline"] = ["[[ -d /x ] || true"]
    [one] = import_document(document, {"imageTemplateName": "x"})
    assert one.manifest["spec"]["customize"][2]["inline"] == ["[ -d /x ] || true"]


def test_properties_kiln_does_not_know_are_refused_in_aib_terms() -> None:
    document = copy.deepcopy(load("aib-show.json"))
    document["properties"]["vmProfile"]["vmSizee"] = "Standard_D2s_v5"
    with pytest.raises(ImportProblem) as problem:
        import_document(document)
    message = str(problem.value)
    assert "properties.vmProfile.vmSizee: is not a known field" in message


def test_documents_without_an_image_template_are_refused() -> None:
    with pytest.raises(ImportProblem, match="no resource of type"):
        import_document({"resources": [{"type": "Microsoft.Compute/images"}]})
    with pytest.raises(ImportProblem, match="no AIB image template found"):
        import_document({"hello": "world"})
    with pytest.raises(ImportProblem, match="not a JSON object"):
        import_document([1, 2])


@pytest.mark.parametrize(
    ("aib", "kubernetes"),
    [("Win2022_Base", "win2022-base"), ("my.template--v2", "my-template--v2"), ("-x-", "x")],
)
def test_aib_names_become_kubernetes_names(aib: str, kubernetes: str) -> None:
    assert kubernetes_name(aib) == kubernetes


def test_a_name_without_usable_characters_asks_for_one() -> None:
    with pytest.raises(ImportProblem, match="use --name"):
        kubernetes_name("___")
