"""integrations/flux: health checks name real templates, and every key the examples take
from Kiln's ConfigMap is one Kiln writes for that template."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kiln.reconcile.exports import config_map_data

REPO = Path(__file__).resolve().parents[2]
FLUX = REPO / "integrations" / "flux"


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def example_templates() -> dict[str, dict[str, Any]]:
    templates = [doc for p in (REPO / "examples").glob("*.yaml") for doc in documents(p)]
    return {t["metadata"]["name"]: t for t in templates if t["kind"] == "ImageTemplate"}


def exported_keys(template: dict[str, Any]) -> tuple[str, set[str]]:
    """The ConfigMap a template exports to, and its keys for a run of every output."""
    outputs = [
        {"runOutputName": d["runOutputName"], "artifactId": "/x/versions/1.0.0", "artifactUri": "u"}
        for d in template["spec"]["distribute"]
    ]
    return template["spec"]["exportOutputs"]["configMapName"], set(config_map_data(outputs, "r"))


def test_health_checks_name_example_templates() -> None:
    templates = example_templates()
    checks = [
        check
        for doc in documents(FLUX / "kustomization.yaml")
        for check in doc["spec"].get("healthChecks", [])
    ]
    assert checks
    for check in checks:
        assert (check["apiVersion"], check["kind"]) == ("kiln.dev/v1alpha1", "ImageTemplate")
        assert check["name"] in templates


def test_values_and_substitutions_come_from_keys_kiln_writes() -> None:
    exports = dict(
        exported_keys(t) for t in example_templates().values() if "exportOutputs" in t["spec"]
    )
    release = documents(FLUX / "helmrelease.yaml")[0]
    for source in release["spec"]["valuesFrom"]:
        assert source["valuesKey"] in exports[source["name"]]
    substitutions = [
        source["name"]
        for doc in documents(FLUX / "kustomization.yaml")
        for source in (doc["spec"].get("postBuild") or {}).get("substituteFrom", [])
    ]
    assert substitutions and all(name in exports for name in substitutions)
    variable = re.compile(r"^[_a-zA-Z][_a-zA-Z0-9]*$")
    for keys in exports.values():
        assert all(variable.match(k) for k in keys - {"outputs.json"}), keys
