"""The generated CRDs: in sync with crds/, structural, documented, and shaped as AIB's API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.api.crd import image_build_run_crd, image_template_crd, render_crds

REPO = Path(__file__).resolve().parents[2]
CRDS_DIR = REPO / "crds"
CHECKED_IN = [CRDS_DIR, REPO / "charts" / "kiln" / "crds"]
FORBIDDEN_KEYWORDS = ("$ref", "anyOf", "oneOf", "allOf")

Node = dict[str, Any]


def _crds() -> list[Node]:
    return [image_template_crd(), image_build_run_crd()]


def _root(crd: Node) -> Node:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: Node, path: str, is_property: bool = False) -> Iterator[tuple[str, Node, bool]]:
    """Every schema node under node, with its path and whether it is a named property."""
    yield path, node, is_property
    for name, child in (node.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}", True)
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _all_nodes() -> list[tuple[str, Node, bool]]:
    return [entry for crd in _crds() for entry in _nodes(_root(crd), crd["spec"]["names"]["kind"])]


def _keys_anywhere(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from _keys_anywhere(child)
    elif isinstance(value, list):
        for child in value:
            yield from _keys_anywhere(child)


def _spec_props(crd: Node) -> Node:
    return _root(crd)["properties"]["spec"]["properties"]


@pytest.mark.parametrize("directory", CHECKED_IN, ids=["crds", "chart"])
@pytest.mark.parametrize("name", sorted(render_crds()))
def test_checked_in_crd_matches_generated(name: str, directory: Path) -> None:
    rendered = render_crds()[name]
    path = directory / name
    assert path.is_file(), f"{path} is missing; run `make crds`"
    assert path.read_text() == rendered, f"{path} is out of date; run `make crds`"


def test_render_crds_names_both_files() -> None:
    assert set(render_crds()) == {"imagetemplates.kiln.dev.yaml", "imagebuildruns.kiln.dev.yaml"}


def test_rendered_yaml_parses_back_to_the_crd() -> None:
    rendered = render_crds()
    assert yaml.safe_load(rendered["imagetemplates.kiln.dev.yaml"]) == image_template_crd()
    assert yaml.safe_load(rendered["imagebuildruns.kiln.dev.yaml"]) == image_build_run_crd()


def test_every_property_has_a_description_except_metadata() -> None:
    missing = [
        path
        for path, node, is_property in _all_nodes()
        if is_property and not path.endswith(".metadata") and not node.get("description")
    ]
    assert missing == []


def test_the_schema_walk_reaches_deep_nodes() -> None:
    paths = {path for path, _, _ in _all_nodes()}
    assert "ImageTemplate.spec.customize[].inline[]" in paths
    assert "ImageTemplate.spec.distribute[].targetRegions[].replicaCount" in paths
    assert "ImageTemplate.spec.identity.userAssignedIdentities{}" in paths
    assert "ImageBuildRun.status.steps[].logTail" in paths


@pytest.mark.parametrize("keyword", FORBIDDEN_KEYWORDS)
def test_schemas_are_structural(keyword: str) -> None:
    for crd in _crds():
        assert keyword not in set(_keys_anywhere(_root(crd))), crd["metadata"]["name"]


def test_every_schema_node_has_a_type() -> None:
    untyped = [path for path, node, _ in _all_nodes() if not node.get("type")]
    assert untyped == []


def test_customize_step_type_enum() -> None:
    items = _spec_props(image_template_crd())["customize"]["items"]
    assert items["type"] == "object"
    assert items["properties"]["type"]["enum"] == [
        "Shell",
        "PowerShell",
        "File",
        "WindowsRestart",
        "WindowsUpdate",
    ]
    # Every variant's fields are admitted by the merged object.
    for field in ("inline", "scriptUri", "runElevated", "destination", "restartTimeout"):
        assert field in items["properties"], field
    assert items["required"] == ["type"]


def test_source_and_distribute_type_enums() -> None:
    spec = _spec_props(image_template_crd())
    assert spec["source"]["properties"]["type"]["enum"] == [
        "PlatformImage",
        "ManagedImage",
        "SharedImageVersion",
    ]
    assert spec["distribute"]["items"]["properties"]["type"]["enum"] == [
        "ManagedImage",
        "SharedImage",
        "VHD",
    ]


def test_build_timeout_bounds() -> None:
    timeout = _spec_props(image_template_crd())["buildTimeoutInMinutes"]
    assert timeout["type"] == "integer"
    assert timeout["minimum"] == 0
    assert timeout["maximum"] == 960


def test_run_output_name_pattern() -> None:
    item = _spec_props(image_template_crd())["distribute"]["items"]
    assert item["properties"]["runOutputName"]["pattern"] == "^[A-Za-z0-9-_.]{1,64}$"
    assert "runOutputName" in item["required"]


def test_distribute_needs_at_least_one_target() -> None:
    spec_schema = _root(image_template_crd())["properties"]["spec"]
    assert spec_schema["properties"]["distribute"]["minItems"] == 1
    assert set(spec_schema["required"]) == {"source", "distribute"}


def test_preserve_unknown_fields_only_where_declared() -> None:
    status = _root(image_build_run_crd())["properties"]["status"]["properties"]
    assert status["templateSnapshot"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-preserve-unknown-fields" not in status["checkpoint"]  # typed
    spec = _root(image_template_crd())["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec


@pytest.mark.parametrize(
    ("crd", "kind", "plural", "short_name"),
    [
        (image_template_crd(), "ImageTemplate", "imagetemplates", "it"),
        (image_build_run_crd(), "ImageBuildRun", "imagebuildruns", "ibr"),
    ],
)
def test_names_and_subresources(crd: Node, kind: str, plural: str, short_name: str) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{plural}.kiln.dev"
    spec = crd["spec"]
    assert spec["group"] == "kiln.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "shortNames": [short_name],
        "categories": ["kiln"],
    }
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
    assert _root(crd)["required"] == ["spec"]


def _columns(crd: Node) -> list[tuple[str, str, str, int]]:
    return [
        (c["name"], c["type"], c["jsonPath"], c.get("priority", 0))
        for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]
    ]


def test_image_template_printer_columns() -> None:
    assert _columns(image_template_crd()) == [
        ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0),
        ("Reason", "string", '.status.conditions[?(@.type=="Ready")].reason', 0),
        ("Provider", "string", ".status.provider", 0),
        ("Last Run", "string", ".status.lastRun.runState", 0),
        ("Run", "string", ".status.lastRun.name", 1),
        ("Age", "date", ".metadata.creationTimestamp", 0),
    ]


def test_image_build_run_printer_columns() -> None:
    assert _columns(image_build_run_crd()) == [
        ("Template", "string", ".spec.templateRef.name", 0),
        ("State", "string", ".status.runState", 0),
        ("Sub State", "string", ".status.runSubState", 0),
        ("Message", "string", ".status.message", 1),
        ("Age", "date", ".metadata.creationTimestamp", 0),
    ]


def test_printer_column_paths_exist_in_the_schema() -> None:
    for crd in _crds():
        root = _root(crd)
        for name, _, json_path, _ in _columns(crd):
            if json_path.startswith(".metadata") or "conditions[" in json_path:
                continue
            node = root
            for part in json_path.lstrip(".").split("."):
                node = node["properties"][part]
            assert node["type"] == "string", name
