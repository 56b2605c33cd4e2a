"""Run lifecycle without build VMs: autoRun and triggers create runs, failures stall them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.providers.local.gallery import ImageManifest, LocalGallery
from kubehelpers import Kiln, condition, ended, template
from kubehelpers import run as run_manifest

pytestmark = pytest.mark.integration

SUB = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/it"
MISSING_IMAGE = {
    "type": "ManagedImage",
    "imageId": f"{SUB}/providers/Microsoft.Compute/images/none",
}
DEFINITION = f"{SUB}/providers/Microsoft.Compute/galleries/g/images/trigger-src"


@pytest.fixture
def kiln(kube_api: Any, kiln_operator: Any) -> Kiln:
    return Kiln(kube_api)


def runs_of(kiln: Kiln, template_name: str) -> list[dict]:
    items = kiln.api.list_namespaced_custom_object(
        "kiln.dev", "v1alpha1", "default", "imagebuildruns"
    )["items"]
    return [r for r in items if r["spec"]["templateRef"]["name"] == template_name]


def wait_runs(kiln: Kiln, template_name: str, count: int, timeout: float) -> list[dict]:
    found: list[dict] = []

    def enough(_: dict | None) -> bool:
        found[:] = runs_of(kiln, template_name)
        return len(found) >= count

    kiln.wait_for("imagetemplates", template_name, enough, timeout, f"{count} run(s)")
    return sorted(found, key=lambda r: r["metadata"]["creationTimestamp"])


def test_autorun_runs_each_generation_and_a_failed_build_stalls_the_template(kiln: Kiln) -> None:
    kiln.create(
        "imagetemplates", template("auto", source=MISSING_IMAGE, autoRun={"state": "Enabled"})
    )
    try:
        (first,) = wait_runs(kiln, "auto", 1, 30)
        assert first["metadata"]["labels"]["kiln.dev/trigger"] == "autoRun"
        assert first["metadata"]["ownerReferences"][0]["kind"] == "ImageTemplate"
        body = kiln.wait_for("imagebuildruns", first["metadata"]["name"], ended, 60)
        assert body["status"]["runState"] == "Failed"
        source = next(s for s in body["status"]["steps"] if s["name"] == "source")
        assert source["state"] == "Failed" and "not in the local gallery" in source["message"]
        assert next(s for s in body["status"]["steps"] if s["name"] == "vm")["state"] == "Pending"
        stalled = kiln.wait_for(
            "imagetemplates",
            "auto",
            lambda b: (condition(b, "Stalled") or {}).get("status") == "True",
            30,
        )
        assert condition(stalled, "Stalled")["reason"] == "BuildFailed"
        assert stalled["status"]["lastRun"]["runState"] == "Failed"
        kiln.patch("imagetemplates", "auto", {"spec": {"buildTimeoutInMinutes": 30}})
        runs = wait_runs(kiln, "auto", 2, 30)
        assert runs[1]["metadata"]["labels"]["kiln.dev/template-generation"] == "2"
    finally:
        kiln.delete("imagetemplates", "auto")
        for run in runs_of(kiln, "auto"):
            kiln.delete("imagebuildruns", run["metadata"]["name"])


def test_schedule_trigger_starts_a_run(kiln: Kiln) -> None:
    kiln.create(
        "imagetemplates",
        template(
            "cron", source=MISSING_IMAGE, triggers=[{"kind": "Schedule", "schedule": "* * * * *"}]
        ),
    )
    try:
        (run,) = wait_runs(kiln, "cron", 1, 150)
        assert run["metadata"]["name"].startswith("cron-sched-")
        assert run["metadata"]["labels"]["kiln.dev/trigger"] == "Schedule"
        # recorded right after the run is created (a crash between them creates the same
        # run again, by its name), so it may show a moment later
        kiln.wait_for(
            "imagetemplates",
            "cron",
            lambda b: bool(((b or {}).get("status") or {}).get("lastScheduledTime")),
            30,
            "lastScheduledTime",
        )
    finally:
        kiln.delete("imagetemplates", "cron")
        for run in runs_of(kiln, "cron"):
            kiln.delete("imagebuildruns", run["metadata"]["name"])


def _publish(gallery: LocalGallery, version: str, tmp_path: Path) -> None:
    image = tmp_path / version
    image.mkdir()
    (image / "disk.qcow2").write_bytes(b"not a real image")
    manifest = ImageManifest(
        id=f"{DEFINITION}/versions/{version}",
        location="local",
        source="test",
        run=f"test/{version}",
        disk_sha256="0" * 64,
    )
    gallery.publish(gallery.definition_dir(DEFINITION) / version, image, manifest, replace=False)


def test_source_image_trigger_starts_a_run_when_latest_moves(
    kiln: Kiln, kiln_operator: Any, tmp_path: Path
) -> None:
    gallery = LocalGallery(kiln_operator.data_dir / "gallery")
    _publish(gallery, "1.0.0", tmp_path)
    source = {"type": "SharedImageVersion", "imageVersionId": f"{DEFINITION}/versions/latest"}
    kiln.create(
        "imagetemplates", template("follower", source=source, triggers=[{"kind": "SourceImage"}])
    )
    try:
        seen = kiln.wait_for(
            "imagetemplates",
            "follower",
            lambda b: ((b or {}).get("status") or {}).get("sourceImageVersion"),
            90,
        )
        assert seen["status"]["sourceImageVersion"] == f"{DEFINITION}/versions/1.0.0"
        assert runs_of(kiln, "follower") == []  # the first version seen is only recorded
        _publish(gallery, "1.0.1", tmp_path)
        (run,) = wait_runs(kiln, "follower", 1, 90)
        kiln.patch("imagebuildruns", run["metadata"]["name"], {"spec": {"cancel": True}})
        assert run["metadata"]["labels"]["kiln.dev/trigger"] == "SourceImage"
        body = kiln.get("imagetemplates", "follower")
        assert body["status"]["sourceImageVersion"] == f"{DEFINITION}/versions/1.0.1"
        kiln.wait_for("imagebuildruns", run["metadata"]["name"], ended, 120)
    finally:
        kiln.delete("imagetemplates", "follower")
        for run in runs_of(kiln, "follower"):
            kiln.delete("imagebuildruns", run["metadata"]["name"])


def test_a_run_canceled_while_queued_never_starts(kiln: Kiln) -> None:
    kiln.create("imagebuildruns", run_manifest("early-cancel", "nothing-here", cancel=True))
    try:
        body = kiln.wait_for("imagebuildruns", "early-cancel", ended, 30)
        assert body["status"]["runState"] == "Canceled"
        assert "templateSnapshot" not in body["status"]
    finally:
        kiln.delete("imagebuildruns", "early-cancel")


def _staging_after_a_failed_run(kiln: Kiln, name: str, **spec: Any) -> Path:
    kiln.create("imagetemplates", template(name, source=MISSING_IMAGE, **spec))
    kiln.create("imagebuildruns", run_manifest(f"{name}-1", name))
    body = kiln.wait_for("imagebuildruns", f"{name}-1", ended, 60)
    staging = Path(body["status"]["checkpoint"]["staging"])
    assert (staging / f"{name}-1" / "customization.log").parent.is_dir()
    return staging


def test_deleting_a_template_removes_its_staging_directory(kiln: Kiln) -> None:
    staging = _staging_after_a_failed_run(kiln, "stage")
    assert staging.name.startswith("IT_local_stage_")
    kiln.delete("imagetemplates", "stage")
    kiln.wait_for("imagetemplates", "stage", lambda b: b is None, 30)
    assert not staging.exists()
    kiln.delete("imagebuildruns", "stage-1")


def test_a_custom_staging_group_is_emptied_not_removed(kiln: Kiln) -> None:
    group = f"{SUB.rsplit('/', 2)[0]}/resourceGroups/kiln-custom-staging"
    staging = _staging_after_a_failed_run(kiln, "custom", stagingResourceGroup=group)
    assert staging.name == "kiln-custom-staging"
    kiln.delete("imagetemplates", "custom")
    kiln.wait_for("imagetemplates", "custom", lambda b: b is None, 30)
    assert staging.is_dir() and list(staging.iterdir()) == []
    kiln.delete("imagebuildruns", "custom-1")


def test_finished_runs_beyond_the_history_limit_are_deleted(kiln: Kiln) -> None:
    kiln.create("imagetemplates", template("hist", source=MISSING_IMAGE, failedRunsHistoryLimit=2))
    try:
        for index in range(1, 5):
            kiln.create("imagebuildruns", run_manifest(f"hist-{index}", "hist"))
            body = kiln.wait_for("imagebuildruns", f"hist-{index}", ended, 60)
            assert body["status"]["runState"] == "Failed"
        kiln.wait_for(
            "imagetemplates",
            "hist",
            lambda _: (
                sorted(r["metadata"]["name"] for r in runs_of(kiln, "hist")) == ["hist-3", "hist-4"]
            ),
            60,
            "the two newest failed runs kept",
        )
    finally:
        kiln.delete("imagetemplates", "hist")
        for run in runs_of(kiln, "hist"):
            kiln.delete("imagebuildruns", run["metadata"]["name"])


def test_a_template_made_invalid_still_removes_its_staging_when_deleted(kiln: Kiln) -> None:
    staging = _staging_after_a_failed_run(kiln, "spoiled")
    outside = [{"type": "File", "sourceUri": "file:///etc/hostname", "destination": "/tmp/h"}]
    kiln.patch("imagetemplates", "spoiled", {"spec": {"customize": outside}})
    kiln.wait_for(
        "imagetemplates",
        "spoiled",
        lambda b: (condition(b, "Stalled") or {}).get("reason") == "InvalidSpec",
        30,
        "the edit is refused by the operator",
    )
    assert kiln.get("imagetemplates", "spoiled")["status"]["exactStagingResourceGroup"]
    kiln.delete("imagetemplates", "spoiled")
    kiln.wait_for("imagetemplates", "spoiled", lambda b: b is None, 30)
    assert not staging.exists()
    kiln.delete("imagebuildruns", "spoiled-1")
