"""ImageTemplates with provider azure, built by the operator against the ARM emulator.

The emulator's VMs are real QEMU machines reached over SSH, its storage accounts are
Azurite, and the operator talks to both only through the real Azure SDKs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.storage.blob import BlobServiceClient
from kubernetes import client as kube_client
from kubernetes import config

from azurehelpers import (
    WINDOWS_SERVER_2022,
    create_gallery,
    emulator_operator,
    managed_image_target,
    windows_template,
)
from conftest import OPERATOR_NAMESPACE, OperatorProcess, sample
from fakes.arm import ArmEmulator
from fakes.azurite import Azurite
from kiln.metrics import arm_operation
from kubehelpers import Kiln, condition, ended, run, template, wait_ended
from secretscan import RunRecorder

pytestmark = [pytest.mark.e2e, pytest.mark.azure]

NAMESPACE = "azure-builds"
LOCATION = "westeurope"
VM_TYPE = "Microsoft.Compute/virtualMachines"
VERSION_TYPE = "Microsoft.Compute/galleries/images/versions"
BUILD_TYPES = {
    VM_TYPE,
    "Microsoft.Compute/disks",
    "Microsoft.Network/networkInterfaces",
    "Microsoft.Network/publicIPAddresses",
    "Microsoft.Network/networkSecurityGroups",
    "Microsoft.Network/virtualNetworks",
}


@pytest.fixture(scope="module")
def outputs(arm_qemu: ArmEmulator) -> dict[str, str]:
    return create_gallery(arm_qemu, "outputs", "kiln", "app", LOCATION)


@pytest.fixture(scope="module")
def azure_operator(
    control_plane: Any, arm_qemu: ArmEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """An operator for one namespace, configured for the emulator as it would be for Azure."""
    data = tmp_path_factory.mktemp("azure-operator")
    with emulator_operator(control_plane, arm_qemu, NAMESPACE, LOCATION, data) as operator:
        yield operator


@pytest.fixture(scope="module")
def kiln(control_plane: Any, azure_operator: OperatorProcess) -> Iterator[Kiln]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        yield Kiln(api, NAMESPACE)


@pytest.fixture(scope="module", autouse=True)
def recorder(kiln: Kiln) -> Iterator[RunRecorder]:
    """Every key and status of this module's runs, for the leak hunt at its end."""
    with RunRecorder(kiln.api.api_client, NAMESPACE, OPERATOR_NAMESPACE) as recording:
        yield recording


def azure_template(name: str, **spec: Any) -> dict:
    manifest = template(name, **spec)
    manifest["spec"]["provider"] = "azure"
    return manifest


def wait_for_blob_text(
    blobs: BlobServiceClient, container: str, name: str, text: str, timeout: float = 600
) -> bytes:
    """The blob's content once it holds `text` (while the run that writes it goes on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            content = blobs.get_blob_client(container, name).download_blob().readall()
        except ResourceNotFoundError:
            content = b""
        if text.encode() in content:
            return content
        time.sleep(2)
    raise AssertionError(f"{container}/{name} never held {text!r}")


def leftovers(arm: ArmEmulator) -> list[str]:
    return [item.id for item in arm.inventory() if item.type in BUILD_TYPES]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A file and its http:// URL (the azure provider takes http(s) sources, as AIB does)."""
    payload = tmp_path / "payload.txt"
    payload.write_text(f"azure payload {time.time_ns()}\n")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield payload, f"http://127.0.0.1:{server.server_address[1]}/payload.txt"
    server.shutdown()
    thread.join()


def test_a_template_builds_in_azure_with_every_distribution(
    kiln: Kiln,
    arm_qemu: ArmEmulator,
    azurite: Azurite,
    outputs: dict[str, str],
    served: tuple[Path, str],
    tmp_path: Path,
) -> None:
    payload, url = served
    checksum = hashlib.sha256(payload.read_bytes()).hexdigest()
    kiln.create(
        "imagetemplates",
        azure_template(
            "app",
            customize=[
                {
                    "type": "Shell",
                    "inline": ["echo azure-build-marker | sudo tee /etc/kiln-marker"],
                },
                {
                    "type": "File",
                    "sourceUri": url,
                    "sha256Checksum": checksum,
                    "destination": "/tmp/payload.txt",
                },
                {
                    "type": "Shell",
                    "inline": ["cmp /tmp/payload.txt /tmp/payload.txt && echo copied"],
                },
                {"type": "Shell", "inline": ["echo streamed-marker", "sleep 60"]},
                {  # the empty data disk, at LUN 0: written raw, captured beside the OS disk
                    "type": "Shell",
                    "inline": [
                        "echo kiln-data-disk | sudo dd of=/dev/disk/by-id/virtio-lun0 conv=fsync"
                    ],
                },
            ],
            additionalDataDisks=[{"sizeGB": 1}],
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "image",
                    "imageId": outputs["image"],
                    "location": LOCATION,
                },
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": outputs["gallery"],
                    "targetRegions": [
                        {"name": LOCATION},
                        {"name": "northeurope", "replicaCount": 2},
                    ],
                    "versioning": {"scheme": "Latest", "major": 1},
                    "artifactTags": {"team": "platform"},
                },
                {"type": "VHD", "runOutputName": "vhd"},
            ],
        ),
    )
    kiln.create("imagebuildruns", run("app-1", "app"))
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    streamed = wait_for_blob_text(blobs, "packerlogs", "app-1/customization.log", "streamed-marker")
    assert not ended(kiln.get("imagebuildruns", "app-1")), "the log came only at the end"
    assert b"azure-build-marker" in streamed
    body = wait_ended(kiln, "app-1")
    status = body["status"]
    assert status["runState"] == "Succeeded", status["message"]
    assert status["exactSource"].startswith("Debian:debian-12:12-gen2:")
    found = {o["runOutputName"]: o for o in status["runOutputs"]}
    assert found["image"]["artifactId"] == outputs["image"]
    assert found["gallery"]["artifactId"] == f"{outputs['gallery']}/versions/1.0.0"
    assert found["vhd"]["artifactUri"].endswith("/vhds/app-1-vhd.vhd")
    assert "?" not in found["vhd"]["artifactUri"]  # never a SAS in status
    log_uri = status["checkpoint"]["logUri"]  # where `kiln logs` sends people
    assert log_uri.endswith("/packerlogs/app-1/customization.log") and "?" not in log_uri
    assert leftovers(arm_qemu) == []
    staging = body["status"]["checkpoint"]["staging"].rsplit("/", 1)[-1]
    in_staging = sorted(i.type for i in arm_qemu.inventory(staging))
    assert in_staging == ["Microsoft.Resources/resourceGroups", "Microsoft.Storage/storageAccounts"]
    log = blobs.get_blob_client("packerlogs", "app-1/customization.log").download_blob().readall()
    assert b"azure-build-marker" in log and b"copied" in log
    vhd = blobs.get_blob_client("vhds", "app-1-vhd.vhd").get_blob_properties()
    assert vhd.blob_type == "PageBlob" and vhd.size % 512 == 0
    compute = arm_qemu.client(ComputeManagementClient)
    image = compute.images.get("outputs", "app")
    assert [(d.lun, d.disk_size_gb) for d in image.storage_profile.data_disks] == [(0, 1)]
    version = compute.gallery_image_versions.get("outputs", "kiln", "app", "1.0.0")
    assert [d.lun for d in version.storage_profile.data_disk_images] == [0]
    captured = arm_qemu.backend.image_dir(version.id) / "data-lun0.qcow2"
    raw = tmp_path / "data-lun0.head"
    command = ["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=4096", "count=1"]
    subprocess.run([*command, f"if={captured}", f"of={raw}"], check=True, timeout=60)
    assert raw.read_bytes().startswith(b"kiln-data-disk\n")


def test_faults_and_an_operator_killed_during_vm_create(
    kiln: Kiln, arm_qemu: ArmEmulator, outputs: dict[str, str], azure_operator: OperatorProcess
) -> None:
    kiln.create(
        "imagetemplates",
        azure_template(
            "flaky",
            customize=[{"type": "Shell", "inline": ["echo flaky"]}],
            distribute=[
                {
                    "type": "ManagedImage",
                    "runOutputName": "image",
                    "location": LOCATION,
                    "imageId": outputs["image"].replace("/app", "/flaky"),
                }
            ],
        ),
    )
    arm_qemu.set_lro_duration(15.0, VM_TYPE, "create")
    arm_qemu.set_failure_rate(0.1, statuses=(429, 500, 503), retry_after=0.5, seed=11)
    try:
        kiln.create("imagebuildruns", run("flaky-1", "flaky"))
        kiln.wait_for(
            "imagebuildruns",
            "flaky-1",
            lambda b: "creating the build VM" in ((b or {}).get("status") or {}).get("message", ""),
            300,
            "creating the VM",
        )
        azure_operator.kill()
        time.sleep(2)
        azure_operator.start()
        arm_qemu.set_lro_duration(0.1, VM_TYPE, "create")
        body = wait_ended(kiln, "flaky-1")
    finally:
        arm_qemu.clear_faults()
        arm_qemu.set_lro_duration(0.1, VM_TYPE, "create")
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    assert any(r.status in (429, 500, 503) for r in arm_qemu.requests)
    vm_id = body["status"]["checkpoint"]["azure"]["vmId"]
    assert arm_qemu.creation_count(vm_id) == 1
    assert all(count == 1 for count in arm_qemu.creations().values())
    assert leftovers(arm_qemu) == []


def test_an_operator_killed_during_gallery_replication_resumes_it(
    kiln: Kiln, arm_qemu: ArmEmulator, outputs: dict[str, str], azure_operator: OperatorProcess
) -> None:
    kiln.create(
        "imagetemplates",
        azure_template(
            "replicate",
            customize=[{"type": "Shell", "inline": ["echo replicate"]}],
            distribute=[
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": f"{outputs['gallery']}/versions/7.0.0",
                    "targetRegions": [{"name": LOCATION}, {"name": "northeurope"}],
                }
            ],
        ),
    )
    arm_qemu.set_lro_duration(20.0, VERSION_TYPE, "create")
    try:
        kiln.create("imagebuildruns", run("replicate-1", "replicate"))
        kiln.wait_for(
            "imagebuildruns",
            "replicate-1",
            lambda b: "publishing" in ((b or {}).get("status") or {}).get("message", ""),
            600,
            "replicating the gallery version",
        )
        azure_operator.kill()
        time.sleep(2)
        azure_operator.start()
        body = wait_ended(kiln, "replicate-1")
    finally:
        arm_qemu.set_lro_duration(0.1, VERSION_TYPE, "create")
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    version_id = f"{outputs['gallery']}/versions/7.0.0"
    assert body["status"]["runOutputs"][0]["artifactId"] == version_id
    assert arm_qemu.creation_count(version_id) == 1
    creates = [
        r for r in arm_qemu.requests if r.method == "PUT" and r.path.lower() == version_id.lower()
    ]
    assert creates, "the version was created through ARM"
    assert arm_qemu.creation_count(body["status"]["checkpoint"]["azure"]["vmId"]) == 1
    assert leftovers(arm_qemu) == []


def test_a_windows_template_builds_over_winrm_and_is_sysprepped(
    kiln: Kiln, arm_qemu: ArmEmulator, azurite: Azurite, azure_operator: OperatorProcess
) -> None:
    ids = create_gallery(arm_qemu, "winout", "kilnwin", "server", LOCATION, os_type="Windows")
    kiln.create(
        "imagetemplates",
        azure_template(
            "win",
            source=WINDOWS_SERVER_2022,
            customize=[],
            distribute=[
                managed_image_target(ids["image"], LOCATION),
                {
                    "type": "SharedImage",
                    "runOutputName": "gallery",
                    "galleryImageId": ids["gallery"],
                    "versioning": {"scheme": "Latest", "major": 2},
                },
                {"type": "VHD", "runOutputName": "vhd"},
            ],
        ),
    )
    kiln.create("imagebuildruns", run("win-1", "win"))
    body = wait_ended(kiln, "win-1")
    status = body["status"]
    assert status["runState"] == "Succeeded", status["message"]
    assert status["exactSource"].startswith("MicrosoftWindowsServer:WindowsServer:")
    found = {o["runOutputName"]: o for o in status["runOutputs"]}
    assert found["image"]["artifactId"] == ids["image"]
    assert found["gallery"]["artifactId"] == f"{ids['gallery']}/versions/2.0.0"
    assert found["vhd"]["artifactUri"].endswith("/vhds/win-1-vhd.vhd")
    vm_id = status["checkpoint"]["azure"]["vmId"]
    guest = arm_qemu.backend.guest(vm_id)
    assert any("Sysprep.exe /oobe /generalize" in script for script in guest.scripts)
    password = guest.vm.admin_password
    assert password and password not in json.dumps(body)
    assert password not in azure_operator.log()
    events = kube_client.CoreV1Api(kiln.api.api_client).list_namespaced_event(NAMESPACE)
    assert all(password not in (event.message or "") for event in events.items)
    assert leftovers(arm_qemu) == []
    staging = status["checkpoint"]["staging"].rsplit("/", 1)[-1]
    in_staging = sorted(i.type for i in arm_qemu.inventory(staging))
    assert in_staging == ["Microsoft.Resources/resourceGroups", "Microsoft.Storage/storageAccounts"]
    assert arm_qemu.deleted_vaults() == []
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    log = blobs.get_blob_client("packerlogs", "win-1/customization.log").download_blob().readall()
    assert b">>> Sysprep complete" in log
    assert arm_qemu.client(ComputeManagementClient).images.get("winout", "server")


def test_a_fatal_azure_error_stalls_the_run_and_cleans_up(
    kiln: Kiln, arm_qemu: ArmEmulator
) -> None:
    kiln.create(
        "imagetemplates", azure_template("nosize", vmProfile={"vmSize": "Standard_M416ms_v2"})
    )
    kiln.create("imagebuildruns", run("nosize-1", "nosize"))
    body = wait_ended(kiln, "nosize-1")
    assert body["status"]["runState"] == "Failed"
    stalled = condition(body, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ProviderError"
    assert "Azure SkuNotAvailable" in stalled["message"]
    assert leftovers(arm_qemu) == []


def test_deleting_a_template_removes_its_staging_group(kiln: Kiln, arm_qemu: ArmEmulator) -> None:
    body = kiln.get("imagebuildruns", "app-1")
    assert body is not None
    staging = body["status"]["checkpoint"]["staging"].rsplit("/", 1)[-1]
    resource = arm_qemu.client(ResourceManagementClient)
    assert resource.resource_groups.check_existence(staging)
    kiln.delete("imagetemplates", "app")
    kiln.wait_for("imagetemplates", "app", lambda b: b is None, 120, "deleted")
    assert not resource.resource_groups.check_existence(staging)
    assert arm_qemu.client(ComputeManagementClient).images.get("outputs", "app")  # outputs stay


def cloud_requests(operator: OperatorProcess) -> Counter[tuple[str, str]]:
    """kiln_cloud_api_requests_total as the operator exposes it, by operation and code."""
    return Counter(
        {
            (dict(labels)["operation"], dict(labels)["code"]): int(value)
            for (name, labels), value in operator.metrics().items()
            if name == "kiln_cloud_api_requests_total"
        }
    )


def test_cloud_requests_and_throttling_are_counted_as_the_emulator_saw_them(
    kiln: Kiln, arm_qemu: ArmEmulator, azure_operator: OperatorProcess
) -> None:
    """Every ARM request the emulator answered during a build is counted once, by
    operation and status code; the SDK retries a 429 and each attempt counts."""
    kiln.create(
        "imagetemplates", windows_template(arm_qemu, "counted", "countout", "kilncount", LOCATION)
    )
    before, throttled = cloud_requests(azure_operator), azure_operator.metrics()
    arm_qemu.clear_requests()  # from here on, only the operator talks to the emulator
    vnet_put = r"/providers/Microsoft\.Network/virtualNetworks/[^/]+$"
    arm_qemu.fail_next("PUT", vnet_put, 429, "TooManyRequests", times=2, retry_after=1)
    try:
        kiln.create("imagebuildruns", run("counted-1", "counted"))
        body = wait_ended(kiln, "counted-1", timeout=900)
    finally:
        arm_qemu.clear_faults()
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    seen = Counter(
        (arm_operation(r.method, r.path), str(r.status))
        for r in arm_qemu.requests
        if r.path.lower().startswith("/subscriptions")
    )
    after = azure_operator.metrics()
    assert cloud_requests(azure_operator) - before == seen
    assert seen[("PUT Microsoft.Network/virtualNetworks", "429")] == 2
    assert (
        sample(after, "kiln_cloud_api_throttled_total")
        - sample(throttled, "kiln_cloud_api_throttled_total")
        == 2
    )
    succeeded = {"provider": "azure", "result": "Succeeded"}
    assert (
        sample(after, "kiln_build_runs_total", **succeeded)
        - sample(throttled, "kiln_build_runs_total", **succeeded)
        == 1
    )
    assert sample(after, "kiln_build_runs_in_flight", provider="azure") == 0


def test_no_secret_in_status_events_or_the_operator_log(
    recorder: RunRecorder, arm_qemu: ArmEmulator, azure_operator: OperatorProcess
) -> None:
    """Linux and Windows runs above: their keys and WinRM logins, every access token the
    emulator's Entra issued, the client secret, the storage key and the disks' SAS query
    strings never show in a status (continuation tokens included), an event or the log."""
    sas = [url.split("?", 1)[1] for url in arm_qemu.granted_sas if "?" in url]
    assert sas, "the VHD distributions used no disk SAS"
    recorder.assert_nothing_leaked(
        azure_operator.log(),
        *arm_qemu.identity.issued_tokens,
        arm_qemu.client_secret,
        arm_qemu.storage_account_key or "",  # the staging account's key (listKeys)
        *sas,
    )
