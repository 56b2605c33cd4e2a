"""`kiln import` output is what the API server takes: kubectl apply of the YAML it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ControlPlane
from kubehelpers import kubectl

pytestmark = pytest.mark.integration

DATA = Path(__file__).parents[1] / "unit" / "data"


def kiln_import(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", "import", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_imported_templates_apply_to_the_api_server(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    parameters = tmp_path / "parameters.json"
    parameters.write_text(json.dumps({"parameters": {"imageTemplateName": {"value": "web"}}}))
    arm = kiln_import(str(DATA / "aib-arm-template.json"), "--parameters", str(parameters))
    assert arm.returncode == 0, arm.stderr
    assert "web: tags of the AIB resource are not carried over" in arm.stderr
    shown = kiln_import(str(DATA / "aib-show.json"), "-n", "imported")
    assert shown.returncode == 0, shown.stderr
    manifests = [*yaml.safe_load_all(arm.stdout), *yaml.safe_load_all(shown.stdout)]
    assert [m["metadata"]["name"] for m in manifests] == ["web", "win2022-base"]
    kubectl(control_plane.kubeconfig, "create", "namespace", "imported")
    applied = kubectl(
        control_plane.kubeconfig,
        "apply",
        "-n",
        "imported",
        "--server-side",
        "-f",
        "-",
        input_text=arm.stdout + "---\n" + shown.stdout,
    )
    assert applied.returncode == 0, applied.stderr
    stored = kubectl(
        control_plane.kubeconfig, "get", "-n", "imported", "imagetemplates", "-o", "json"
    )
    items = {item["metadata"]["name"]: item for item in json.loads(stored.stdout)["items"]}
    assert items["win2022-base"]["spec"]["customize"][1] == {
        "type": "WindowsRestart",
        "restartTimeout": "10m",
    }
    assert items["web"]["spec"] == yaml.safe_load(arm.stdout)["spec"]  # nothing pruned


def test_a_broken_template_exits_1_with_the_field(tmp_path: Path) -> None:
    broken = json.loads((DATA / "aib-show.json").read_text())
    del broken["properties"]["source"]["offer"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = kiln_import(str(path))
    assert result.returncode == 1 and result.stdout == ""
    assert "properties.source.offer: is required; add it" in result.stderr
    missing = kiln_import(str(tmp_path / "absent.json"))
    assert missing.returncode == 1 and "absent.json" in missing.stderr
