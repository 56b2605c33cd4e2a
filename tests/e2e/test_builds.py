"""Whole builds on the local provider: real control plane, real operator process, real VMs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config
from kubernetes.client import CoreV1Api

import vmboot
from conftest import OPERATOR_NAMESPACE
from kiln.naming import run_secret_name
from kiln.providers.local import qemu
from kiln.providers.local.disks import check_fixed_vhd, sha256_file
from kubehelpers import Kiln, condition, condition_status, kstatus, run, template, wait_ended
from processes import Process, descendants, live
from secretscan import RunRecorder

pytestmark = pytest.mark.e2e

BUILD_TIMEOUT = 1200
SUB = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/e2e"
GALLERY_IMAGE = f"{SUB}/providers/Microsoft.Compute/galleries/g/images/base"
MANAGED_IMAGE = f"{SUB}/providers/Microsoft.Compute/images/base"


@pytest.fixture(scope="module")
def kiln(control_plane: Any, kiln_operator: Any) -> Iterator[Kiln]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as client:
        yield Kiln(client)


@pytest.fixture(scope="module", autouse=True)
def recorder(kiln: Kiln) -> Iterator[RunRecorder]:
    """Every key and status of this module's runs, for the leak hunt at its end."""
    with RunRecorder(kiln.api.api_client, "default", OPERATOR_NAMESPACE) as recording:
        yield recording


def step(body: dict, name: str) -> dict:
    return next(s for s in body["status"]["steps"] if s["name"] == name)


def build_vm_dir(operator: Any, body: dict) -> Path:
    return operator.data_dir / "vm" / body["metadata"]["uid"]


def assert_cleaned(kiln: Kiln, operator: Any, body: dict) -> None:
    """No VM process, overlay or Secret is left after a run."""
    assert not build_vm_dir(operator, body).exists()
    assert (
        f"kiln-{body['metadata']['name']}"
        not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    )
    secrets = CoreV1Api(kiln.api.api_client).list_namespaced_secret(OPERATOR_NAMESPACE).items
    assert run_secret_name(body["metadata"]["uid"]) not in [s.metadata.name for s in secrets]


@pytest.fixture(scope="module")
def payload(kiln_operator: Any) -> Path:
    path = kiln_operator.file_root / "payload.txt"  # where the operator lets templates read
    path.write_text(f"payload {time.time_ns()}\n")
    return path


# A data disk (LUN 0) partitioned, formatted and written by a customizer; the VM's shape
# checked against vmProfile.vmSize Standard_B2s (2 vCPUs, 4 GiB; the default is 1 GiB).
DATA_DISK_STEP = [
    "d=/dev/disk/by-id/virtio-lun0",
    "test -b $d",
    "echo 'start=2048, type=83' | sudo sfdisk -q $d",
    "sudo udevadm settle",
    "sudo mkfs.ext4 -q $d-part1",
    "sudo mkdir -p /mnt/data && sudo mount $d-part1 /mnt/data",
    "echo kiln-data | sudo tee /mnt/data/marker",
    "sudo umount /mnt/data",
    "echo vm-shape $(nproc) $(awk '/MemTotal/ {print $2}' /proc/meminfo)",
]
WORKLOAD_SCRIPT = "#!/bin/sh -e\necho workload-optimized | sudo tee /etc/kiln-workload\n"


@pytest.fixture(scope="module")
def workload(kiln_operator: Any) -> Path:
    path = kiln_operator.file_root / "workload.sh"
    path.write_text(WORKLOAD_SCRIPT)
    return path


@pytest.fixture(scope="module")
def base_build(kiln: Kiln, payload: Path, workload: Path) -> dict:
    """The first template, built by autoRun: Shell, File, validation, three targets, a
    data disk, a VM size and a workload optimization."""
    checksum = hashlib.sha256(payload.read_bytes()).hexdigest()
    manifest = template(
        "base",
        customize=[
            {
                "type": "Shell",
                "name": "marker",
                "inline": ["echo building-marker", "echo kiln-e2e | sudo tee /etc/kiln-marker"],
            },
            {
                "type": "File",
                "sourceUri": payload.as_uri(),
                "sha256Checksum": checksum,
                "destination": "/tmp/payload.txt",
            },
            {"type": "Shell", "inline": ["sudo mv /tmp/payload.txt /etc/kiln-payload"]},
            {"type": "Shell", "name": "data-disk", "inline": DATA_DISK_STEP},
        ],
        additionalDataDisks=[{"sizeGB": 1}],
        vmProfile={"vmSize": "Standard_B2s"},
        optimize={
            "workload": {
                "state": "Enabled",
                "scriptUri": workload.as_uri(),
                "sha256Checksum": hashlib.sha256(workload.read_bytes()).hexdigest(),
            }
        },
        validate={
            "inVMValidations": [{"type": "Shell", "inline": ["grep -qx kiln-e2e /etc/kiln-marker"]}]
        },
        distribute=[
            {
                "type": "SharedImage",
                "runOutputName": "gallery",
                "galleryImageId": GALLERY_IMAGE,
                "targetRegions": [{"name": "east", "replicaCount": 2}, {"name": "west"}],
                "versioning": {"scheme": "Latest", "major": 2},
            },
            {
                "type": "ManagedImage",
                "runOutputName": "managed",
                "imageId": MANAGED_IMAGE,
                "location": "local",
            },
            {"type": "VHD", "runOutputName": "vhd"},
        ],
        autoRun={"state": "Enabled"},
    )
    created = kiln.create("imagetemplates", manifest)
    name = f"base-g1-{created['metadata']['uid'][:5]}"
    kiln.wait_for("imagebuildruns", name, lambda b: b is not None, 30, "created by autoRun")
    return wait_ended(kiln, name)


def test_autorun_build_succeeds_with_outputs(
    kiln: Kiln, kiln_operator: Any, base_build: dict
) -> None:
    status = base_build["status"]
    assert status["runState"] == "Succeeded", status["message"]
    assert all(s["state"] == "Succeeded" for s in status["steps"]), status["steps"]
    assert status["exactSource"].startswith("Debian:debian-12:12-gen2:0.")
    assert status["templateHash"] and status["templateSnapshot"]["provider"] == "local"
    assert condition_status(base_build, "Ready") == "True"
    assert condition_status(base_build, "Stalled") == "False"
    template_body = kiln.get("imagetemplates", "base")
    assert [s["status"] for s in kstatus(base_build, template_body)] == ["Current", "Current"]
    outputs = {o["runOutputName"]: o for o in status["runOutputs"]}
    assert outputs["gallery"]["artifactId"] == f"{GALLERY_IMAGE}/versions/2.0.0"
    assert outputs["managed"]["artifactId"] == MANAGED_IMAGE
    assert all(o["provisioningState"] == "Succeeded" for o in outputs.values())
    assert condition(template_body, "Ready")["reason"] == "ImageBuilt"
    assert template_body["status"]["lastRun"] == {
        "name": base_build["metadata"]["name"],
        "runState": "Succeeded",
    }
    assert {o["runOutputName"] for o in template_body["status"]["latestOutputs"]} == set(outputs)
    assert_cleaned(kiln, kiln_operator, base_build)


def test_outputs_are_complete_images(base_build: dict) -> None:
    outputs = {o["runOutputName"]: o for o in base_build["status"]["runOutputs"]}
    version_dir = Path(outputs["gallery"]["artifactUri"].removeprefix("file://"))
    replicas = sorted(p.relative_to(version_dir) for p in version_dir.glob("replicas/*/*"))
    assert replicas == [  # targetRegions, and the version's own location (as in Azure)
        Path("replicas/east/0"),
        Path("replicas/east/1"),
        Path("replicas/local/0"),
        Path("replicas/west/0"),
    ]
    vhd = Path(outputs["vhd"]["artifactUri"].removeprefix("file://"))
    footer = check_fixed_vhd(vhd)
    assert footer.current_size % (1 << 20) == 0
    assert vhd.with_name(vhd.name + ".sha256").read_text().split()[0] == sha256_file(vhd)
    staging = vhd.parent
    assert sorted(p.name for p in staging.iterdir()) == [
        "customization.log",
        "logs",
        "vhd.vhd",
        "vhd.vhd.sha256",
    ]


@pytest.mark.parametrize(
    ("artifact", "generation"), [("gallery", "V2"), ("vhd", "V1")], ids=["qcow2-uefi", "vhd-bios"]
)
async def test_the_built_image_boots_with_the_customization(
    base_build: dict, payload: Path, tmp_path: Path, artifact: str, generation: str
) -> None:
    """Each distributed disk boots by firmware alone (OVMF, and SeaBIOS for the VHD)."""
    outputs = {o["runOutputName"]: o for o in base_build["status"]["runOutputs"]}
    path = Path(outputs[artifact]["artifactUri"].removeprefix("file://"))
    disk = path / "disk.qcow2" if path.is_dir() else path
    if path.is_dir():
        assert sorted(p.name for p in path.iterdir() if p.is_file()) == [
            "datadisk-0.qcow2",
            "datadisk-0.vhd",
            "disk.qcow2",
            "image.json",
        ]
    with vmboot.booted(disk, tmp_path, "kiln-check", generation=generation) as vm:
        comm = await vm.connect(timeout=vmboot.BOOT_TIMEOUT)
        try:
            result = await comm.run(
                "cat /etc/kiln-marker /etc/kiln-payload; id packer 2>&1; ls /var/lib/kiln 2>&1"
            )
        finally:
            await comm.close()
    lines = result.stdout.splitlines()
    assert lines[0] == "kiln-e2e"
    assert lines[1] == payload.read_text().strip()
    assert "no such user" in lines[2]  # deprovisioning removed the build user
    assert "No such file" in lines[3]  # ... and Kiln's job files


def test_the_build_vm_had_the_size_and_the_data_disk(base_build: dict) -> None:
    """Standard_B2s: 2 vCPUs and 4 GiB (the guest sees a little less); the workload
    script ran after the customizers."""
    log = Path(base_build["status"]["checkpoint"]["logPath"]).read_text()
    shape = next(line.split() for line in log.splitlines() if line.startswith("vm-shape "))
    assert shape[1] == "2" and int(shape[2]) > 3_500_000, shape
    vm_step = step(base_build, "vm")
    assert "Standard_B2s: 2 vCPU(s), 4096 MiB" in vm_step["message"]
    assert log.index("Shell 'data-disk'") < log.index("Shell 'optimize.workload'")
    assert "workload-optimized" in log


def test_the_gallery_version_holds_the_data_disk(base_build: dict, tmp_path: Path) -> None:
    """qcow2 + fixed VHD with their sha256, and the file the customizer wrote on it."""
    outputs = {o["runOutputName"]: o for o in base_build["status"]["runOutputs"]}
    version_dir = Path(outputs["gallery"]["artifactUri"].removeprefix("file://"))
    manifest = json.loads((version_dir / "image.json").read_text())
    [disk] = manifest["data_disks"]
    qcow2, vhd = version_dir / disk["qcow2"], version_dir / disk["vhd"]
    assert (disk["lun"], qcow2.name, vhd.name) == (0, "datadisk-0.qcow2", "datadisk-0.vhd")
    assert sha256_file(qcow2) == disk["qcow2_sha256"]
    assert sha256_file(vhd) == disk["vhd_sha256"]
    assert check_fixed_vhd(vhd).current_size == 1 << 30
    for replica in version_dir.glob("replicas/*/*"):
        assert (replica / qcow2.name).samefile(qcow2)
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(vhd)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    offset = table["partitiontable"]["partitions"][0]["start"] * 512
    marker = subprocess.run(
        ["debugfs", "-R", "cat /marker", f"{vhd}?offset={offset}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert marker.stdout == "kiln-data\n"


def test_kiln_logs_prints_the_customization_log(base_build: dict, kiln_operator: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "logs", base_build["metadata"]["name"]],
        env={"KUBECONFIG": str(kiln_operator.kubeconfig), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "==> customize[0] Shell 'marker'" in result.stdout
    assert "building-marker" in result.stdout
    assert result.stdout.index("==> validate[0]") < result.stdout.index("==> deprovision")


def test_a_chained_build_starts_from_the_gallery_output(kiln: Kiln, base_build: dict) -> None:
    kiln.create(
        "imagetemplates",
        template(
            "chained",
            source={
                "type": "SharedImageVersion",
                "imageVersionId": f"{GALLERY_IMAGE}/versions/latest",
            },
            customize=[{"type": "Shell", "inline": ["grep -qx kiln-e2e /etc/kiln-marker"]}],
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "app",
                    "location": "local",
                    "imageId": f"{SUB}/providers/Microsoft.Compute/images/app",
                }
            ],
        ),
    )
    kiln.create("imagebuildruns", run("chained-1", "chained"))
    body = wait_ended(kiln, "chained-1")
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    assert body["status"]["exactSource"] == f"{GALLERY_IMAGE}/versions/2.0.0"


def test_a_target_that_fails_leaves_the_others_published(kiln: Kiln, kiln_operator: Any) -> None:
    """Every target is tried: a VHD whose destination cannot be written (its directory is
    a file) fails alone, the gallery version is published, the run PartiallySucceeded."""
    vhds = kiln_operator.data_dir / "gallery" / "vhds"
    vhds.mkdir(parents=True, exist_ok=True)
    (vhds / "blocker").write_text("a file where the VHD's directory would be\n")
    definition = f"{SUB}/providers/Microsoft.Compute/galleries/g/images/partial"
    kiln.create(
        "imagetemplates",
        template(
            "partial",
            customize=[],
            distribute=[
                {"type": "SharedImage", "runOutputName": "gallery", "galleryImageId": definition},
                {"type": "VHD", "runOutputName": "vhd", "uri": str(vhds / "blocker" / "os.vhd")},
            ],
        ),
    )
    kiln.create("imagebuildruns", run("partial-1", "partial"))
    body = wait_ended(kiln, "partial-1")
    status = body["status"]
    assert status["runState"] == "PartiallySucceeded", status["message"]
    targets = {t["runOutputName"]: t for t in status["distribution"]}
    assert targets["gallery"]["state"] == "Succeeded"
    assert targets["gallery"]["artifactId"] == f"{definition}/versions/0.0.1"
    assert targets["vhd"]["state"] == "Failed"
    assert "spec.distribute[1]" in targets["vhd"]["message"]
    outputs = {o["runOutputName"]: o for o in status["runOutputs"]}
    assert outputs["gallery"]["provisioningState"] == "Succeeded"
    assert outputs["vhd"]["provisioningState"] == "Failed" and "artifactId" not in outputs["vhd"]
    published = Path(outputs["gallery"]["artifactUri"].removeprefix("file://"))
    assert (published / "disk.qcow2").is_file()
    assert "vhd:" in status["message"] and "1 of 2 outputs distributed" in status["message"]
    assert condition(body, "Stalled")["reason"] == "PartiallySucceeded"
    assert condition_status(body, "Ready") == "False"
    assert kstatus(body)[0]["status"] == "Failed"
    assert step(body, "distribute")["state"] == "Succeeded"
    assert_cleaned(kiln, kiln_operator, body)


def test_a_failing_step_fails_the_run_with_its_exit_code_and_log(
    kiln: Kiln, kiln_operator: Any
) -> None:
    kiln.create(
        "imagetemplates",
        template(
            "broken",
            customize=[
                {
                    "type": "Shell",
                    "name": "boom",
                    "inline": ["echo about to fail", "echo boom >&2", "exit 7"],
                }
            ],
        ),
    )
    kiln.create("imagebuildruns", run("broken-1", "broken"))
    kiln.create("imagebuildruns", run("broken-2", "broken"))
    queued = kiln.wait_for(
        "imagebuildruns", "broken-2", lambda b: condition(b, "Reconciling") is not None, 60
    )
    assert condition(queued, "Reconciling")["reason"] == "WaitingForActiveRun"
    assert "broken-1" in queued["status"]["message"]
    first = wait_ended(kiln, "broken-1")
    status = first["status"]
    assert status["runState"] == "Failed"
    assert condition(first, "Stalled")["reason"] == "CustomizerFailed"
    assert kstatus(first)[0]["status"] == "Failed"
    customize = step(first, "customize")
    assert customize["state"] == "Failed" and customize["exitCode"] == 7
    assert customize["logTail"][-2:] == ["about to fail", "boom"]
    assert "customize[0] Shell 'boom'" in status["message"]
    assert step(first, "cleanup")["state"] == "Succeeded"
    assert_cleaned(kiln, kiln_operator, first)
    events = (
        CoreV1Api(kiln.api.api_client)
        .list_namespaced_event("default", field_selector="involvedObject.name=broken-1")
        .items
    )
    assert any(e.reason == "CustomizerFailed" and "boom" in e.message for e in events)
    second = wait_ended(kiln, "broken-2")
    assert second["status"]["runState"] == "Failed"
    assert second["status"]["startTime"] >= status["endTime"]


def test_cancel_stops_the_build_and_cleans_up(kiln: Kiln, kiln_operator: Any) -> None:
    kiln.create(
        "imagetemplates", template("slow", customize=[{"type": "Shell", "inline": ["sleep 600"]}])
    )
    kiln.create("imagebuildruns", run("slow-1", "slow"))
    kiln.wait_for(
        "imagebuildruns",
        "slow-1",
        lambda b: (
            step(b, "customize")["state"] == "Running"
            if (b or {}).get("status", {}).get("steps")
            else False
        ),
        BUILD_TIMEOUT,
        "customizing",
    )
    kiln.patch("imagebuildruns", "slow-1", {"spec": {"cancel": True}})
    body = wait_ended(kiln, "slow-1")
    assert body["status"]["runState"] == "Canceled"
    assert condition(body, "Stalled")["reason"] == "Canceled"
    assert kstatus(body)[0]["status"] == "Failed"
    assert_cleaned(kiln, kiln_operator, body)


def _capture_convert(kiln: Kiln, operator: Any, run_name: str) -> Process:
    """The capture's qemu-img convert, once the operator runs it (polled closely: on a
    quiet machine it takes a few seconds)."""
    deadline, next_read = time.monotonic() + BUILD_TIMEOUT, 0.0
    while time.monotonic() < deadline:
        for process in descendants(operator.process.pid):
            if process.argv[:2] == ["qemu-img", "convert"]:
                return process
        if time.monotonic() > next_read:
            body = kiln.get("imagebuildruns", run_name)
            assert body["status"].get("runState") == "Running", body["status"]
            next_read = time.monotonic() + 5
        time.sleep(0.05)
    raise AssertionError("the capture's qemu-img convert never ran")


def test_an_operator_killed_mid_customization_finishes_the_same_run(
    kiln: Kiln, kiln_operator: Any
) -> None:
    """Killed twice: during a customization (the VM outlives the operator) and during the
    capture's qemu-img convert (which does not: it dies with the operator)."""
    kiln.create(
        "imagetemplates",
        template(
            "restart",
            customize=[
                {"type": "Shell", "inline": ["echo before", "sleep 25", "echo after-the-restart"]}
            ],
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "img",
                    "location": "local",
                    "imageId": f"{SUB}/providers/Microsoft.Compute/images/restart",
                }
            ],
        ),
    )
    kiln.create("imagebuildruns", run("restart-1", "restart"))
    body = kiln.wait_for(
        "imagebuildruns",
        "restart-1",
        lambda b: "running customize-00" in ((b or {}).get("status") or {}).get("message", ""),
        BUILD_TIMEOUT,
        "customizing",
    )
    vm = qemu.find(build_vm_dir(kiln_operator, body))
    assert vm is not None
    kiln_operator.kill()
    assert qemu.is_running(vm), "the build VM must outlive the operator"
    time.sleep(3)
    kiln_operator.start()
    convert = _capture_convert(kiln, kiln_operator, "restart-1")
    kiln_operator.kill()
    deadline = time.monotonic() + 5
    while convert.pid in {p.pid for p in live()}:
        assert time.monotonic() < deadline, f"{convert} outlived its operator"
        time.sleep(0.1)
    kiln_operator.start()
    body = wait_ended(kiln, "restart-1")
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    log = Path(body["status"]["checkpoint"]["staging"]) / "restart-1" / "customization.log"
    text = log.read_text()
    assert text.count("before") == 1 and text.count("after-the-restart") == 1
    starts = [
        line for line in kiln_operator.log().splitlines() if "started VM kiln-restart-1" in line
    ]
    assert len(starts) == 1, starts
    assert_cleaned(kiln, kiln_operator, body)


def test_deleting_a_template_removes_its_staging(kiln: Kiln, base_build: dict) -> None:
    staging = Path(base_build["status"]["checkpoint"]["staging"])
    assert staging.is_dir()
    kiln.delete("imagetemplates", "base")
    kiln.wait_for("imagetemplates", "base", lambda b: b is None, 60, "deleted")
    assert not staging.exists()


def test_abort_keeps_the_vm_until_the_run_is_deleted(kiln: Kiln, kiln_operator: Any) -> None:
    kiln.create(
        "imagetemplates",
        template(
            "keep",
            customize=[{"type": "Shell", "inline": ["exit 3"]}],
            errorHandling={"onCustomizerError": "abort"},
        ),
    )
    kiln.create("imagebuildruns", run("keep-1", "keep"))
    body = wait_ended(kiln, "keep-1")
    assert body["status"]["runState"] == "Failed"
    vm = qemu.find(build_vm_dir(kiln_operator, body))
    assert vm is not None, "errorHandling abort keeps the build VM"
    assert f"ssh -p {vm.ssh_port} packer@127.0.0.1" in body["status"]["message"]
    secret = f"{OPERATOR_NAMESPACE}/{run_secret_name(body['metadata']['uid'])}"
    assert f"the operator's Secret {secret}" in body["status"]["message"]
    kiln.delete("imagebuildruns", "keep-1")
    kiln.wait_for("imagebuildruns", "keep-1", lambda b: b is None, 120, "deleted")
    assert not qemu.is_running(vm)
    assert_cleaned(kiln, kiln_operator, body)


def test_build_timeout_fails_and_cleans_up(kiln: Kiln, kiln_operator: Any) -> None:
    kiln.create(
        "imagetemplates",
        template(
            "late", customize=[{"type": "Shell", "inline": ["sleep 600"]}], buildTimeoutInMinutes=1
        ),
    )
    kiln.create("imagebuildruns", run("late-1", "late"))
    body = wait_ended(kiln, "late-1")
    assert body["status"]["runState"] == "Failed"
    assert condition(body, "Stalled")["reason"] == "TimedOut"
    assert "buildTimeoutInMinutes (1)" in body["status"]["message"]
    assert_cleaned(kiln, kiln_operator, body)


def test_deleting_an_active_run_removes_its_vm(kiln: Kiln, kiln_operator: Any) -> None:
    kiln.create(
        "imagetemplates", template("gone", customize=[{"type": "Shell", "inline": ["sleep 600"]}])
    )
    kiln.create("imagebuildruns", run("gone-1", "gone"))
    body = kiln.wait_for(
        "imagebuildruns",
        "gone-1",
        lambda b: "running customize-00" in ((b or {}).get("status") or {}).get("message", ""),
        BUILD_TIMEOUT,
        "customizing",
    )
    vm = qemu.find(build_vm_dir(kiln_operator, body))
    assert vm is not None
    kiln.delete("imagebuildruns", "gone-1")
    kiln.wait_for("imagebuildruns", "gone-1", lambda b: b is None, 120, "deleted")
    assert not qemu.is_running(vm)
    assert_cleaned(kiln, kiln_operator, body)


def _seconds(rfc3339: str) -> float:
    return time.mktime(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


@pytest.mark.slow
def test_a_frozen_build_vm_ends_at_the_timeout_and_a_run_behind_it_still_builds(
    kiln: Kiln, kiln_operator: Any
) -> None:
    """The issue's reproduction: a build VM frozen (SIGSTOP) mid-step used to keep its run
    Running until the VM was resumed, and a run queued behind it failed TimedOut without
    building. Now the step in flight is interrupted at the timeout and the VM killed."""
    kiln.create(
        "imagetemplates",
        template(
            "frozen",
            customize=[{"type": "Shell", "inline": ["sleep 900"]}],
            buildTimeoutInMinutes=4,
        ),
    )
    kiln.create("imagebuildruns", run("frozen-1", "frozen"))
    body = kiln.wait_for(
        "imagebuildruns",
        "frozen-1",
        lambda b: "running customize-00" in ((b or {}).get("status") or {}).get("message", ""),
        BUILD_TIMEOUT,
        "customizing",
    )
    kiln.create("imagebuildruns", run("frozen-2", "frozen"))  # queued behind frozen-1
    vm = qemu.find(build_vm_dir(kiln_operator, body))
    assert vm is not None
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        body = wait_ended(kiln, "frozen-1", timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGCONT)
    status = body["status"]
    assert status["runState"] == "Failed" and condition(body, "Stalled")["reason"] == "TimedOut"
    overran = _seconds(status["endTime"]) - _seconds(status["startTime"]) - 4 * 60
    assert overran < 60, f"the run ended {overran:.0f}s after its timeout"
    assert not qemu.is_running(vm), "the frozen VM is killed"
    assert_cleaned(kiln, kiln_operator, body)
    second = kiln.wait_for(
        "imagebuildruns",
        "frozen-2",
        lambda b: bool(((b or {}).get("status") or {}).get("startTime")),
        120,
        "started",
    )
    assert second["status"]["startTime"] >= status["endTime"]  # its timeout counts from here
    kiln.patch("imagebuildruns", "frozen-2", {"spec": {"cancel": True}})
    second = wait_ended(kiln, "frozen-2", timeout=600)
    assert second["status"]["runState"] == "Canceled"
    assert_cleaned(kiln, kiln_operator, second)


def test_no_secret_in_status_events_or_the_operator_log(
    recorder: RunRecorder, kiln_operator: Any
) -> None:
    """The keys of every run above never show in a status, an event or the log."""
    recorder.assert_nothing_leaked(kiln_operator.log())
