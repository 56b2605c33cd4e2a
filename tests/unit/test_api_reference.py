"""docs/api-reference.md is generated from the CRD schemas and kept current."""

from __future__ import annotations

from pathlib import Path

from kiln.api.crd import image_template_crd
from kiln.api.reference import render_reference

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "api-reference.md"


def test_the_checked_in_reference_is_current() -> None:
    assert REFERENCE.read_text() == render_reference(), "run `make crds` and commit docs/"


def test_every_template_spec_field_is_in_the_reference_with_its_description() -> None:
    text = render_reference()
    spec = image_template_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name, field in spec["properties"]["spec"]["properties"].items():
        assert f"| `spec.{name}` |" in text, name
        assert field["description"] in text
    assert "`spec.exportOutputs.configMapName` | string | yes |" in text
