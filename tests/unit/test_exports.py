"""spec.exportOutputs: what the ConfigMap holds, and which ConfigMaps Kiln may change."""

from __future__ import annotations

import json

from kiln.reconcile import exports

TEMPLATE = {
    "apiVersion": "kiln.dev/v1alpha1",
    "kind": "ImageTemplate",
    "metadata": {"name": "app", "namespace": "images", "uid": "uid-1"},
}
GALLERY_ID = (
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/app"
    "/versions/1.0.7"
)


def test_each_output_has_flat_keys_and_the_version_of_a_gallery_image() -> None:
    outputs = [
        {"runOutputName": "gallery", "artifactId": GALLERY_ID},
        {"runOutputName": "vhd", "artifactUri": "file:///gallery/app.vhd"},
    ]
    data = exports.config_map_data(outputs, "app-3")
    assert data["gallery_artifactId"] == GALLERY_ID
    assert data["gallery_version"] == "1.0.7"
    assert data["vhd_artifactUri"] == "file:///gallery/app.vhd"
    assert "vhd_version" not in data and "vhd_artifactId" not in data
    assert data["run"] == "app-3"
    assert json.loads(data["outputs.json"]) == outputs


def test_the_config_map_is_owned_by_the_template_and_labelled_with_its_uid() -> None:
    manifest = exports.config_map(TEMPLATE, "app-image", {"run": "app-3"})
    assert manifest["metadata"]["namespace"] == "images"
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert exports.is_ours(manifest, TEMPLATE)


def test_a_config_map_kiln_did_not_create_is_not_ours() -> None:
    foreign = {"metadata": {"name": "app-image", "labels": {"team": "x"}}}
    other_template = {"metadata": {"labels": {"kiln.dev/template-uid": "uid-2"}}}
    assert not exports.is_ours(foreign, TEMPLATE)
    assert not exports.is_ours(other_template, TEMPLATE)


def test_keys_are_variable_names_whatever_the_run_output_is_called() -> None:
    data = exports.config_map_data([{"runOutputName": "1st-image.v2", "artifactId": "x"}], None)
    assert set(data) == {"outputs.json", "_1st_image_v2_artifactId"}
