"""ImageTemplates on the real kube-apiserver with the operator running as a process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import CoreV1Api

from kubehelpers import (
    Kiln,
    argocd_health,
    condition,
    condition_status,
    kstatus,
    kubectl,
    run,
    server_dry_run,
    template,
    wait_until,
)

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def kiln(kube_api: Any, kiln_operator: Any) -> Kiln:
    return Kiln(kube_api)


def is_ready(body: dict | None) -> bool:
    return condition_status(body, "Ready") == "True"


def is_stalled(body: dict | None) -> bool:
    return condition_status(body, "Stalled") == "True"


def test_every_example_applies(control_plane: Any) -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        result = kubectl(control_plane.kubeconfig, "apply", "--dry-run=server", "-f", str(path))
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
        assert "(server dry run)" in result.stdout


PLAN = {"planName": "p"}
SOURCE = {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12"}
SA_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"buildTimeoutInMinutes": 961}, "spec.buildTimeoutInMinutes"),
        ({"distribute": [{"type": "VHD", "runOutputName": "has space"}]}, "runOutputName"),
        ({"distribute": []}, "spec.distribute"),
        ({"customize": [{"type": "Ansible", "inline": ["x"]}]}, "spec.customize"),
        ({"vmProfile": {"osDiskSizeGB": -1}}, "spec.vmProfile.osDiskSizeGB"),
        ({"provider": "gcp"}, "spec.provider"),
        (
            {"source": {**SOURCE, "version": "1", "planInfo": PLAN}},
            "spec.source.planInfo.planProduct",
        ),
    ],
)
def test_schema_rejects_with_the_field_named(control_plane: Any, patch: dict, field: str) -> None:
    manifest = template("schema-check", **patch)
    result = server_dry_run(control_plane.kubeconfig, manifest)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


# Rules only the operator can check (the API server refuses the rest at apply time,
# tests/integration/test_cel_rules.py): cron syntax, the operator's default provider,
# settings it fills in, and what its settings let a template reach.
WINDOWS_STEP = {"type": "PowerShell", "inline": ["Write-Output hi"]}
INVALID = [
    (
        {"triggers": [{"kind": "Schedule", "schedule": "61 * * * *"}]},
        "spec.triggers[0].schedule",
        "not a cron expression",
    ),
    (
        {"customize": [{"type": "Shell", "scriptUri": f"file://{SA_TOKEN}"}]},
        "spec.customize[0].scriptUri",
        "not under a directory templates may read (/kiln/examples,",
    ),
    (
        {"customize": [{"type": "Shell", "scriptUri": "http://169.254.169.254/metadata"}]},
        "spec.customize[0].scriptUri",
        "169.254.169.254 is in 169.254.0.0/16",
    ),
    (
        {"distribute": [{"type": "VHD", "runOutputName": "v", "uri": "/etc/cron.d/x.vhd"}]},
        "spec.distribute[0].uri",
        "outside the directories Kiln may write",
    ),
]


@pytest.mark.parametrize(("patch", "path", "words"), INVALID)
def test_invalid_template_stalls_naming_the_field(
    kiln: Kiln, patch: dict, path: str, words: str, request: pytest.FixtureRequest
) -> None:
    name = f"invalid-{request.node.callspec.id.lower()}"[:60].rstrip("-")
    name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
    manifest = template(name, **patch)
    manifest["spec"] = {k: v for k, v in manifest["spec"].items() if v is not None}
    kiln.create("imagetemplates", manifest)
    try:
        body = kiln.wait_for("imagetemplates", name, is_stalled, timeout=30, what="Stalled")
        stalled = condition(body, "Stalled")
        assert stalled is not None
        assert stalled["reason"] == "InvalidSpec"
        assert path in stalled["message"] and words in stalled["message"]
        assert condition_status(body, "Ready") == "False"
        assert condition_status(body, "Accepted") == "False"
        assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    finally:
        kiln.delete("imagetemplates", name)


def test_fixing_the_spec_clears_stalled(kiln: Kiln) -> None:
    bad = template("fix-me", triggers=[{"kind": "Schedule", "schedule": "0 25 * * *"}])
    kiln.create("imagetemplates", bad)
    try:
        stalled = kiln.wait_for("imagetemplates", "fix-me", is_stalled, timeout=30)
        assert argocd_health(stalled or {})["status"] == "Degraded"
        kiln.patch(
            "imagetemplates",
            "fix-me",
            {"spec": {"triggers": [{"kind": "Schedule", "schedule": "0 23 * * *"}]}},
        )
        body = kiln.wait_for("imagetemplates", "fix-me", is_ready, timeout=30, what="Ready")
        assert condition_status(body, "Stalled") == "False"
        assert condition_status(body, "Reconciling") == "False"
        assert condition(body, "Ready")["observedGeneration"] == 2
        assert body["status"]["observedGeneration"] == 2
        assert argocd_health(body)["status"] == "Healthy"
    finally:
        kiln.delete("imagetemplates", "fix-me")


def test_valid_template_is_ready_and_shows_in_printer_columns(
    kiln: Kiln, control_plane: Any
) -> None:
    kiln.create("imagetemplates", template("columns"))
    try:
        body = kiln.wait_for("imagetemplates", "columns", is_ready, timeout=30, what="Ready")
        assert condition(body, "Ready")["reason"] == "SpecValid"
        assert condition_status(body, "Reconciling") == "False"
        assert body["status"]["provider"] == "local"
        assert "IT_local_columns_" in body["status"]["exactStagingResourceGroup"]
        table = kubectl(control_plane.kubeconfig, "get", "it", "columns").stdout.split("\n")
        assert table[0].split() == ["NAME", "READY", "REASON", "PROVIDER", "LAST", "RUN", "AGE"]
        assert table[1].split()[:4] == ["columns", "True", "SpecValid", "local"]
        kinds = kubectl(control_plane.kubeconfig, "get", "kiln").stdout
        assert "imagetemplate.kiln.dev/columns" in kinds
    finally:
        kiln.delete("imagetemplates", "columns")


SUBNET = (
    "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/b"
)


def test_properties_the_provider_does_not_use_are_named_and_the_template_stays_ready(
    kiln: Kiln,
) -> None:
    """Accepted, never in silence: a condition and a warning event name each ignored
    property and why; kstatus and Argo CD still see a healthy template."""
    manifest = template(
        "unused",
        vmProfile={"vnetConfig": {"subnetId": SUBNET}},
        optimize={"vmBoot": {"state": "Enabled"}},
    )
    kiln.create("imagetemplates", manifest)
    try:
        body = kiln.wait_for("imagetemplates", "unused", is_ready, timeout=30, what="Ready")
        noted = condition(body, "PropertiesNotUsed")
        assert noted is not None and noted["status"] == "True", noted
        assert noted["reason"] == "PropertyNotUsed"
        assert "spec.vmProfile.vnetConfig.subnetId" in noted["message"]
        assert "spec.optimize.vmBoot" in noted["message"]
        assert [s["status"] for s in kstatus(body)] == ["Current"]
        assert argocd_health(body)["status"] == "Healthy"

        def warned() -> list[Any]:
            events = CoreV1Api(kiln.api.api_client).list_namespaced_event(
                kiln.namespace, field_selector="involvedObject.name=unused"
            )
            return [e for e in events.items if e.reason == "PropertyNotUsed"]

        wait_until(lambda: bool(warned()), 30, "a PropertyNotUsed event")
        [event] = warned()
        assert event.type == "Warning" and "spec.optimize.vmBoot" in event.message
        kiln.patch("imagetemplates", "unused", {"spec": {"vmProfile": None, "optimize": None}})
        body = kiln.wait_for(
            "imagetemplates",
            "unused",
            lambda b: condition_status(b, "PropertiesNotUsed") == "False",
            timeout=30,
            what="clear of unused properties",
        )
        assert condition(body, "PropertiesNotUsed")["reason"] == "AllPropertiesUsed"
    finally:
        kiln.delete("imagetemplates", "unused")


def test_deleting_a_template_removes_the_finalizer(kiln: Kiln) -> None:
    kiln.create("imagetemplates", template("doomed"))
    body = kiln.wait_for("imagetemplates", "doomed", is_ready, timeout=30, what="Ready")
    assert "kiln.dev/finalizer" in body["metadata"]["finalizers"]
    kiln.delete("imagetemplates", "doomed")
    kiln.wait_for("imagetemplates", "doomed", lambda b: b is None, timeout=30, what="deleted")


def test_a_run_for_a_missing_template_waits_queued(kiln: Kiln, control_plane: Any) -> None:
    kiln.create("imagebuildruns", run("orphan", "no-such-template"))
    try:
        body = kiln.wait_for(
            "imagebuildruns",
            "orphan",
            lambda b: condition(b, "Reconciling") is not None,
            timeout=30,
        )
        assert body["status"]["runState"] == "Running"
        assert body["status"]["runSubState"] == "Queued"
        assert condition(body, "Reconciling")["reason"] == "TemplateNotFound"
        assert "no-such-template" in body["status"]["message"]
        assert condition_status(body, "Ready") == "False"
        table = kubectl(control_plane.kubeconfig, "get", "ibr", "orphan").stdout.split("\n")
        assert table[1].split()[:4] == ["orphan", "no-such-template", "Running", "Queued"]
    finally:
        kiln.delete("imagebuildruns", "orphan")


def test_examples_templates_become_ready(kiln: Kiln, control_plane: Any) -> None:
    """The examples' templates are valid as they are (runs are left out: they would build)."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "ImageTemplate":
                continue
            name = doc["metadata"]["name"]
            assert kubectl(control_plane.kubeconfig, "apply", "-f", str(path)).returncode == 0
            try:
                kiln.wait_for("imagetemplates", name, is_ready, timeout=30, what="Ready")
            finally:
                kiln.delete("imagetemplates", name)
                kiln.wait_for("imagetemplates", name, lambda b: b is None, timeout=30)


def _field_paths(node: dict, path: str) -> list[str]:
    """Every property path under a schema node, through arrays, e.g. spec.customize.inline."""
    paths = []
    for name, child in (node.get("properties") or {}).items():
        paths.append(f"{path}.{name}")
        target = child.get("items", child)
        paths.extend(_field_paths(target, f"{path}.{name}"))
    return paths


@pytest.mark.parametrize("kind", ["imagetemplate", "imagebuildrun"])
def test_kubectl_explain_documents_every_field(control_plane: Any, kind: str) -> None:
    from kiln.api.crd import image_build_run_crd, image_template_crd

    crd = image_template_crd() if kind == "imagetemplate" else image_build_run_crd()
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for top in ("spec", "status"):
        paths = _field_paths(root["properties"][top], f"{kind}.{top}")
        deepest = max(paths, key=lambda p: p.count("."))
        for path in [f"{kind}.{top}", deepest, *paths[:: max(1, len(paths) // 15)]]:
            result = kubectl(control_plane.kubeconfig, "explain", path)
            assert result.returncode == 0, f"{path}: {result.stderr}"
            assert "DESCRIPTION:" in result.stdout and "<empty>" not in result.stdout, path
        listed = kubectl(control_plane.kubeconfig, "explain", f"{kind}.{top}", "--recursive")
        assert listed.returncode == 0, listed.stderr
        names = {
            line.split()[0]
            for line in listed.stdout.splitlines()
            if line[:1].isspace() and line.strip()
        }
        missing = {p.rsplit(".", 1)[-1] for p in paths} - names
        assert not missing, f"kubectl explain --recursive lacks {sorted(missing)}"
