"""`kiln import`: AIB template JSON in the shapes AIB users have, as ImageTemplates."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kiln.api.template import (
    ImageTemplateSpec,
    ManagedImageDistributor,
    PowerShellStep,
    SharedImageDistributor,
    VhdDistributor,
)
from kiln.commands.armtemplate import DeploymentScope
from kiln.commands.importer import (
    TAGS_ANNOTATION,
    ImportProblem,
    import_document,
    kubernetes_name,
    parameter_values,
    read_json,
)

DATA = Path(__file__).parent / "data"
SUBSCRIPTION = "0b1f6471-1bf0-4dda-aec3-111122223333"
FLAGS = DeploymentScope(subscription_id=SUBSCRIPTION, resource_group="images", location="westus3")


def load(name: str) -> dict[str, Any]:
    return read_json(DATA / name)


def problems_of(document: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ImportProblem) as problem:
        import_document(document, **kwargs)
    return str(problem.value).splitlines()


def test_an_arm_template_is_resolved_with_its_parameters_and_variables() -> None:
    [one] = import_document(load("aib-arm-template.json"), {"imageTemplateName": "Ubuntu_Web"})
    manifest = one.manifest
    assert manifest["apiVersion"] == "kiln.dev/v1alpha1" and manifest["kind"] == "ImageTemplate"
    assert manifest["metadata"] == {
        "name": "ubuntu-web",
        "labels": {"imagebuilderTemplate": "ubuntu2204", "userIdentity": "enabled"},  # the tags
    }
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


def test_bicep_output_with_symbolic_resources_a_trigger_and_everyday_functions() -> None:
    [one] = import_document(load("aib-bicep.json"), scope=FLAGS)
    metadata, spec = one.manifest["metadata"], one.manifest["spec"]
    assert metadata["name"] == "avd-win11-multi" and metadata["labels"] == {"workload": "avd"}
    assert json.loads(metadata["annotations"][TAGS_ANNOTATION]) == {"Cost Center": "Desktop & Apps"}
    assert spec["location"] == "westus3"  # [resourceGroup().location] through a parameter
    assert (spec["subscriptionId"], spec["resourceGroup"]) == (SUBSCRIPTION, "images")
    assert spec["triggers"] == [{"kind": "SourceImage"}]  # the sibling triggers resource
    assert list(spec["identity"]["userAssignedIdentities"]) == [  # a key that is an expression
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/aib-identity"
    ]
    assert "vnetConfig" not in spec["vmProfile"]  # if(empty(...), null(), ...) dropped
    assert "stagingResourceGroup" not in spec  # a literal null dropped
    assert spec["customize"][0]["inline"] == [
        "[System.Net.ServicePointManager]::SecurityProtocol = "
        "[System.Net.SecurityProtocolType]::Tls12",
        "[string]::Format('{0}', 'built by {1}') | Out-Null",
        'Write-Host "Prod image for AVD-WIN11-MULTI-PROD"',
    ]
    target = spec["distribute"][0]
    assert target["galleryImageId"] == (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images/providers/Microsoft.Compute/"
        "galleries/avdGallery/images/avd-win11-multi-prod"
    )
    assert target["runOutputName"] == "AVD-Win11-Multi-sig"
    assert [region["name"] for region in target["targetRegions"]] == ["westus3", "northeurope"]
    ImageTemplateSpec.model_validate(spec)


def test_json_with_comments_a_nested_trigger_and_the_bracket_rule() -> None:
    [one] = import_document(load("aib-commented.jsonc"), scope=FLAGS)
    spec = one.manifest["spec"]
    assert spec["buildTimeoutInMinutes"] == 60  # if(variables('isProd'), 120, 60)
    assert spec["customize"][0]["scriptUri"] == "https://example.org/aib/scripts/setup.sh"
    assert spec["customize"][1]["inline"] == [
        "[[ -f /etc/os-release ]] && echo ok",
        "[ -d /opt/web ]",
        "echo '// not a comment /* either */'",
    ]
    target = spec["distribute"][0]
    assert target["imageId"].endswith(
        "/resourceGroups/images/providers/Microsoft.Compute/images/img-web-ubuntu-22"
    )
    assert target["artifactTags"] == {"stage": "DEV"} and target["runOutputName"] == "webUbuntu"
    assert spec["triggers"] == [{"kind": "SourceImage"}]  # provisioningState dropped
    assert "exactVersion" not in spec["source"]
    assert "properties.source.exactVersion is AIB's output, dropped" in one.notes
    assert next(iter(spec["identity"]["userAssignedIdentities"])).startswith(
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/identities/"
    )


def test_a_bicep_module_is_a_nested_deployment_with_its_own_parameters() -> None:
    [one] = import_document(load("aib-bicep-module.json"), scope=FLAGS)
    spec = one.manifest["spec"]
    assert one.manifest["metadata"]["name"] == "debian-12-gen2"  # format() in the outer scope
    assert spec["location"] == "swedencentral"
    assert spec["vmProfile"]["vnetConfig"]["subnetId"] == (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images/providers/Microsoft.Network/"
        "virtualNetworks/build-vnet/subnets/build"
    )
    assert spec["distribute"] == [{"type": "VHD", "runOutputName": "debian-12-gen2-vhd"}]
    assert list(spec["customize"][0]) == ["type", "name", "inline"]  # in the order written


def test_a_nested_deployment_of_outer_scope_uses_the_outer_parameters() -> None:
    document = load("aib-bicep-module.json")
    deployment = document["resources"]["imageBuild"]["properties"]
    del deployment["expressionEvaluationOptions"]
    resource = deployment["template"]["resources"][0]
    resource["name"] = "[concat(variables('prefix'), '-outer')]"
    resource["location"] = "[parameters('location')]"
    resource["properties"]["vmProfile"].pop("vnetConfig")
    resource["properties"]["distribute"][0]["runOutputName"] = "vhd"
    [one] = import_document(document, {"location": "norwayeast"})
    assert one.manifest["metadata"]["name"] == "debian-outer"
    assert one.manifest["spec"]["location"] == "norwayeast"
    deployment["expressionEvaluationOptions"] = {"scope": "inner"}
    [line] = problems_of(document)
    assert line.startswith(
        "resources.imageBuild: properties.parameters.subnetId.value: [format('{0}/subnets/build'"
    )
    assert line.endswith(
        "give --subscription-id (or set the operator default KILN_SUBSCRIPTION_ID)"
    )


def test_operator_defaults_fill_expressions_but_do_not_pin_the_manifest() -> None:
    defaults = DeploymentScope(
        subscription_id=SUBSCRIPTION, resource_group="ops", location="uksouth"
    )
    [one] = import_document(load("aib-commented.jsonc"), defaults=defaults)
    spec = one.manifest["spec"]
    assert spec["location"] == "uksouth"  # the resource's location, [resourceGroup().location]
    assert "resourceGroup" not in spec and "subscriptionId" not in spec
    assert "/resourceGroups/ops/" in spec["distribute"][0]["imageId"]


def test_a_missing_scope_value_is_named_with_its_flag_everywhere_it_is_used() -> None:
    lines = problems_of(load("aib-commented.jsonc"))
    assert lines[0] == (
        "resources[0]: location: [resourceGroup().location]: resourceGroup().location has no "
        "value; give --location (or set the operator default KILN_LOCATION)"
    )
    assert [line.split(": ")[1] for line in lines] == [
        "location",
        "identity.userAssignedIdentities",
        "properties.distribute[0].imageId",
        "properties.distribute[0].location",
    ]


def test_api_2019_05_01_preview_imports_as_it_is() -> None:
    parameters = {"imageTemplateName": "centos", "svclocation": "westus2"}
    [one] = import_document(load("aib-2019-05-01-preview.json"), parameters)
    parsed = ImageTemplateSpec.model_validate(one.manifest["spec"])
    sig, vhd = parsed.distribute
    assert isinstance(sig, SharedImageDistributor) and sig.replication_regions == [
        "westus2",
        "eastus",
    ]
    assert isinstance(vhd, VhdDistributor)
    assert parsed.vm_profile and parsed.vm_profile.vm_size == "Standard_D2_v2"
    assert parsed.build_timeout_in_minutes == 100


def test_api_2018_02_01_preview_names_are_mapped_to_todays() -> None:
    [one] = import_document(load("aib-2018-02-01-preview.json"))
    spec = one.manifest["spec"]
    assert spec["customize"] == [
        {"type": "Shell", "name": "hello", "scriptUri": "https://example.org/aib/hello.sh"}
    ]
    assert isinstance(ImageTemplateSpec.model_validate(spec).distribute[0], ManagedImageDistributor)
    assert "properties.customize[0].type 'shell' is 'Shell' in today's API" in one.notes
    assert (
        "properties.customize[0].script (API 2019-02-01-preview and before) is now scriptUri"
        in (one.notes)
    )
    assert "properties.distribute[0].type 'managedImage' is 'ManagedImage' in today's API" in (
        one.notes
    )


def test_an_iso_source_of_the_early_previews_is_refused_with_what_to_do() -> None:
    document = load("aib-2018-02-01-preview.json")
    document["properties"]["source"] = {"type": "ISO", "sourceURI": "https://x/rhel.iso"}
    [line] = problems_of(document)
    assert line.startswith("properties.source.type: ISO sources were removed from AIB in API")
    assert "start from a PlatformImage" in line


def test_placeholders_are_listed_as_values_to_fill_in() -> None:
    lines = problems_of(load("aib-placeholders.json"))
    assert lines == [
        "location: '<region>': fill in <region>",
        "identity.userAssignedIdentities: '/subscriptions/<subscriptionID>/resourcegroups/"
        "<rgName>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<imgBuilderId>': "
        "fill in <subscriptionID>, <rgName>, <imgBuilderId>",
        "properties.distribute[0].imageId: '/subscriptions/<subscriptionID>/resourceGroups/"
        "<rgName>/providers/Microsoft.Compute/images/<imageName>': fill in <subscriptionID>, "
        "<rgName>, <imageName>",
        "properties.distribute[0].location: '<region>': fill in <region>",
        "properties.distribute[0].runOutputName: '<runOutputName>': fill in <runOutputName>",
        "name: the template has no name; give one with --name",
    ]  # the inline <html> of the script is the script's own


def test_placeholders_filled_in_import() -> None:
    text = (DATA / "aib-placeholders.json").read_text()
    for placeholder, value in {
        "<region>": "westus2",
        "<subscriptionID>": SUBSCRIPTION,
        "<rgName>": "aib",
        "<imgBuilderId>": "aibIdentity",
        "<imageName>": "ubuntu1804",
        "<runOutputName>": "ubuntu1804",
    }.items():
        text = text.replace(placeholder, value)
    [one] = import_document(json.loads(text), name="ubuntu1804")
    assert "<html>" in one.manifest["spec"]["customize"][0]["inline"][0]


def test_a_missing_parameter_is_named_with_the_fix() -> None:
    [line] = problems_of(load("aib-arm-template.json"))
    assert line == (
        "resources[0]: name: [parameters('imageTemplateName')]: parameter 'imageTemplateName' "
        "has no value; give it with --parameters FILE"
    )


def test_expressions_only_azure_can_evaluate_are_refused_where_they_are() -> None:
    document = load("aib-arm-template.json")
    properties = document["resources"][0]["properties"]
    properties["source"]["sku"] = "[concat('22_04', uniqueString(resourceGroup().id))]"
    properties["vmProfile"]["vmSize"] = "[reference('vm').hardwareProfile.vmSize]"
    lines = problems_of(document, parameters={"imageTemplateName": "x"})
    assert [line.split(": ")[1] for line in lines] == [
        "properties.vmProfile.vmSize",
        "properties.source.sku",
    ]
    assert lines[1].endswith(
        "uniqueString() has a value only in an Azure deployment; put that value in its place"
    )


def test_properties_kiln_does_not_know_are_refused_in_aib_terms() -> None:
    document = copy.deepcopy(load("aib-show.json"))
    document["properties"]["vmProfile"]["vmSizee"] = "Standard_D2s_v5"
    document["identity"]["type"] = "SystemAssigned"
    lines = problems_of(document)
    assert "properties.vmProfile.vmSizee: is not a known field" in lines[0]
    assert any(line.startswith("identity.type: ") for line in lines)


def test_a_trigger_without_its_template_is_named() -> None:
    document = load("aib-bicep.json")
    document["resources"]["sourceTrigger"]["name"] = "other/source"
    [line] = problems_of(document, scope=FLAGS)
    assert line.startswith("resources.sourceTrigger: name: is a trigger of 'other', but the file")


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ({}, None),
        ({"type": "None"}, None),
        (
            {"userAssignedIdentities": {"ID": {}}},
            {"type": "UserAssigned", "userAssignedIdentities": {"ID": {}}},
        ),
        (
            {"type": "userassigned", "userAssignedIdentities": {"ID": {"principalId": "p"}}},
            {"type": "UserAssigned", "userAssignedIdentities": {"ID": {}}},
        ),
    ],
)
def test_identity_shapes(identity: dict[str, Any], expected: dict[str, Any] | None) -> None:
    identity_id = (
        f"/subscriptions/{SUBSCRIPTION}/resourceGroups/x/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/aib"
    )
    document = load("aib-2018-02-01-preview.json")
    document["identity"] = json.loads(json.dumps(identity).replace("ID", identity_id))
    [one] = import_document(document)
    wanted = json.loads(json.dumps(expected).replace("ID", identity_id)) if expected else None
    assert one.manifest["spec"].get("identity") == wanted


def test_a_false_condition_and_unknown_resource_keys_are_noted() -> None:
    document = load("aib-commented.jsonc")
    document["resources"][0]["condition"] = "[equals(parameters('stage'), 'prod')]"
    document["resources"][0]["sku"] = {"name": "x"}
    [one] = import_document(document, scope=FLAGS)
    assert "its condition is false, so ARM would not deploy it; imported all the same" in one.notes
    assert "sku is not an imageTemplates property; dropped" in one.notes


def test_parameters_files_give_values_and_unknown_names_are_noted() -> None:
    values = parameter_values(
        {"parameters": {"imageTemplateName": {"value": "web"}, "extra": {"value": 1}}}
    )
    [one] = import_document(load("aib-arm-template.json"), values)
    assert one.manifest["metadata"]["name"] == "web"
    assert "the template declares no parameter extra; not used" in one.notes
    vault = {"reference": {"keyVault": {"id": "/x"}, "secretName": "s"}}
    with pytest.raises(ImportProblem, match=r"parameters\.pw: is a Key Vault reference"):
        parameter_values({"parameters": {"pw": vault}})
    with pytest.raises(ImportProblem, match="no 'parameters' object"):
        parameter_values([])


def test_the_spec_is_written_as_the_crd_schema_takes_it() -> None:
    document = load("aib-2018-02-01-preview.json")
    document["properties"]["buildTimeoutInMinutes"] = "90"  # as a parameter of type string
    [one] = import_document(document)
    assert one.manifest["spec"]["buildTimeoutInMinutes"] == 90
    document["properties"] = "[concat('not', 'an object')]"
    assert problems_of({"resources": [document]}) == [
        "resources[0]: properties: is str, not an object"
    ]


def test_properties_alone_need_a_name() -> None:
    properties = load("aib-show.json")["properties"]
    assert problems_of(properties) == ["name: the template has no name; give one with --name"]
    [one] = import_document(properties, name="win")
    assert one.manifest["metadata"]["name"] == "win"


def test_documents_without_an_image_template_are_refused() -> None:
    with pytest.raises(ImportProblem, match="no resource of type"):
        import_document({"resources": [{"type": "Microsoft.Compute/images"}]})
    with pytest.raises(ImportProblem, match="no AIB image template found"):
        import_document({"hello": "world"})
    with pytest.raises(ImportProblem, match="not a JSON object"):
        import_document([1, 2])
    with pytest.raises(ImportProblem, match="copy loops are not imported"):
        import_document(
            {"resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", "copy": {}}]}
        )


def test_what_nests_too_deep_is_refused() -> None:
    document = load("aib-2018-02-01-preview.json")
    deep: list[Any] = []
    for _ in range(900):  # within what the JSON reader takes
        deep = [deep]
    document["properties"]["customize"][0]["inline"] = deep
    with pytest.raises(ImportProblem, match="nests deeper than kiln import follows"):
        import_document(document)


def test_a_file_that_is_not_json_is_named_with_line_and_column(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "properties": {\n    "source": {,\n  }\n}\n')
    with pytest.raises(ImportProblem) as problem:
        read_json(broken)
    assert (
        str(problem.value)
        == f"{broken}: line 3, column 16: not JSON: Expecting property name enclosed in double "
        "quotes"
    )
    with pytest.raises(ImportProblem, match="No such file"):
        read_json(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("aib", "kubernetes"),
    [("Win2022_Base", "win2022-base"), ("my.template--v2", "my-template--v2"), ("-x-", "x")],
)
def test_aib_names_become_kubernetes_names(aib: str, kubernetes: str) -> None:
    assert kubernetes_name(aib) == kubernetes


def test_a_name_without_usable_characters_asks_for_one() -> None:
    with pytest.raises(ImportProblem, match="use --name"):
        kubernetes_name("___")
