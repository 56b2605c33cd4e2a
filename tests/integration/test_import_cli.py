"""`kiln import` output is what the API server takes: kubectl apply of the YAML it prints,
for every shape of AIB file the importer reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ControlPlane
from kubehelpers import kubectl

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[1] / "unit" / "data"
SCOPE = [
    "--subscription-id",
    "0b1f6471-1bf0-4dda-aec3-111122223333",
    "--resource-group",
    "images",
    "--location",
    "westus3",
]


def kiln_import(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("KILN_")}
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", "import", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | (env or {}),
    )


def test_imported_templates_apply_to_the_api_server(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    parameters = tmp_path / "parameters.json"
    parameters.write_text(
        '// the deployment\'s values\n{"parameters": {"imageTemplateName": {"value": "web"},'
        ' "svclocation": {"value": "westus2"}}}'
    )
    runs = {
        "arm": kiln_import(str(DATA / "aib-arm-template.json"), "--parameters", str(parameters)),
        "show": kiln_import("-", "-n", "imported", stdin=(DATA / "aib-show.json").read_text()),
        "bicep": kiln_import(str(DATA / "aib-bicep.json"), *SCOPE),
        "module": kiln_import(str(DATA / "aib-bicep-module.json"), *SCOPE),
        "jsonc": kiln_import(str(DATA / "aib-commented.jsonc"), *SCOPE),
        "2019": kiln_import(
            str(DATA / "aib-2019-05-01-preview.json"),
            "--parameters",
            str(parameters),
            "--name",
            "centos",
        ),
        "2018": kiln_import(str(DATA / "aib-2018-02-01-preview.json")),
        "defaults": kiln_import(
            str(DATA / "aib-commented.jsonc"),
            "--name",
            "web-defaults",
            env={
                "KILN_LOCATION": "uksouth",
                "KILN_RESOURCE_GROUP": "ops",
                "KILN_SUBSCRIPTION_ID": "0b1f6471-1bf0-4dda-aec3-111122223333",
            },
        ),
    }
    for run in runs.values():
        assert run.returncode == 0, run.stderr
    assert "web: spec.resourceGroup is not set: the operator's default applies" in (
        runs["arm"].stderr
    )
    assert "properties.customize[0].script (API 2019-02-01-preview" in runs["2018"].stderr
    printed = {
        manifest["metadata"]["name"]: manifest
        for run in runs.values()
        for manifest in yaml.safe_load_all(run.stdout)
    }
    assert sorted(printed) == [
        "avd-win11-multi", "centos", "debian-12-gen2", "legacy-ubuntu", "web", "web-defaults",
        "web-ubuntu", "win2022-base",
    ]  # fmt: skip
    kubectl(control_plane.kubeconfig, "create", "namespace", "imported")
    applied = kubectl(
        control_plane.kubeconfig,
        "apply",
        "-n",
        "imported",
        "--server-side",
        "-f",
        "-",
        input_text="---\n".join(run.stdout for run in runs.values()),
    )
    assert applied.returncode == 0, applied.stderr
    stored = kubectl(
        control_plane.kubeconfig, "get", "-n", "imported", "imagetemplates", "-o", "json"
    )
    items = {item["metadata"]["name"]: item for item in json.loads(stored.stdout)["items"]}
    for name, manifest in printed.items():
        assert items[name]["spec"] == manifest["spec"], name  # nothing pruned or defaulted away
        for field in ("labels", "annotations"):
            assert (
                manifest["metadata"].get(field, {}).items()
                <= (items[name]["metadata"].get(field) or {}).items()
            )
    assert items["avd-win11-multi"]["spec"]["triggers"] == [{"kind": "SourceImage"}]
    assert items["win2022-base"]["spec"]["customize"][1] == {
        "type": "WindowsRestart",
        "restartTimeout": "10m",
    }
    assert items["web-defaults"]["spec"]["location"] == "uksouth"


def test_what_cannot_be_imported_exits_1_with_the_field(tmp_path: Path) -> None:
    broken = json.loads((DATA / "aib-show.json").read_text())
    del broken["properties"]["source"]["offer"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = kiln_import(str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert "kiln import: properties.source.offer: is required; add it" in result.stderr
    placeholders = kiln_import(str(DATA / "aib-placeholders.json"))
    assert placeholders.returncode == 1 and placeholders.stdout == ""
    assert (
        "kiln import: properties.distribute[0].runOutputName: '<runOutputName>': "
        "fill in <runOutputName>\n" in placeholders.stderr
    )
    scope = kiln_import(str(DATA / "aib-bicep.json"))
    assert scope.returncode == 1
    assert "give --location (or set the operator default KILN_LOCATION)" in scope.stderr
    not_json = tmp_path / "not.json"
    not_json.write_text('{\n  "resources": [\n    {"type": x}\n  ]\n}\n')
    result = kiln_import(str(not_json))
    assert result.returncode == 1
    assert (
        result.stderr == f"kiln import: {not_json}: line 3, column 14: not JSON: Expecting value\n"
    )
    piped = kiln_import("-", stdin="{\n  // az printed nothing\n")
    assert piped.stderr.startswith("kiln import: stdin: line 3, column 1: not JSON: Expecting")
    missing = kiln_import(str(tmp_path / "absent.json"))
    assert missing.returncode == 1 and "absent.json" in missing.stderr
