"""The ARM emulator with real QEMU VMs and Azurite, driven only through the real SDK clients.

What Kiln's Azure provider does on Azure, end to end: network, a Debian VM from the
marketplace with an injected SSH host key, SSH to its public IP on port 22, deallocate,
generalize, managed image, gallery image version, a second VM from the image (the first
VM's changes are there), the OS disk exported as a fixed VHD through its SAS URL, cleanup.
Two VM boots under TCG.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.compute import models as cm
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.mgmt.storage import StorageManagementClient
from azure.storage.blob import BlobClient, BlobServiceClient

from azurehelpers import vnet_and_nsg
from fakes.arm import ArmEmulator, VmInfo
from fakes.arm.qemu_backend import QemuVmBackend, user_data
from fakes.azurite import Azurite
from kiln.communicators.ssh import KeyPair, SshCommunicator, generate_keypair
from kiln.providers.local import gptdisk
from kiln.providers.local.disks import MIB, VHD_FOOTER_SIZE, check_fixed_vhd

pytestmark = [pytest.mark.e2e, pytest.mark.azure, pytest.mark.timeout(1500)]

LOCATION = "westeurope"
USER = "kiln"
SSH_TIMEOUT = 120.0
EXT4_MAGIC = b"\x53\xef"  # at byte 56 of the superblock, 1024 bytes into the root partition
SUPERBLOCK = gptdisk.ROOT_START_MIB * MIB + 1024


def host_key_custom_data(host: KeyPair) -> str:
    """The cloud-config Kiln sends as customData: the host key the VM must present."""
    doc = {
        "ssh_keys": {
            "ed25519_private": host.private_key.get_secret_value(),
            "ed25519_public": host.public_key,
        },
        "ssh_deletekeys": True,
    }
    return base64.b64encode(("#cloud-config\n" + yaml.safe_dump(doc)).encode()).decode()


def vm_model(
    nic_id: str, client: KeyPair, host: KeyPair, image: cm.ImageReference, size: str, **disk: Any
) -> cm.VirtualMachine:
    return cm.VirtualMachine(
        location=LOCATION,
        tags={"kiln-run": "qemu"},
        hardware_profile=cm.HardwareProfile(vm_size=size),
        storage_profile=cm.StorageProfile(
            image_reference=image,
            os_disk=cm.OSDisk(
                create_option="FromImage",
                managed_disk=cm.ManagedDiskParameters(storage_account_type="StandardSSD_LRS"),
                **disk,
            ),
        ),
        os_profile=cm.OSProfile(
            admin_username=USER,
            custom_data=host_key_custom_data(host),
            linux_configuration=cm.LinuxConfiguration(
                disable_password_authentication=True,
                ssh=cm.SshConfiguration(
                    public_keys=[
                        cm.SshPublicKey(
                            path=f"/home/{USER}/.ssh/authorized_keys", key_data=client.public_key
                        )
                    ]
                ),
            ),
        ),
        network_profile=cm.NetworkProfile(
            network_interfaces=[cm.NetworkInterfaceReference(id=nic_id, primary=True)]
        ),
    )


def nic(
    network: NetworkManagementClient, rg: str, name: str, subnet_id: str, nsg_id: str, pip: Any
) -> Any:
    ipconfig: dict[str, Any] = {"subnet": {"id": subnet_id}}
    if pip is not None:
        ipconfig["publicIPAddress"] = {"id": pip.id}
    return network.network_interfaces.begin_create_or_update(
        rg,
        name,
        {
            "location": LOCATION,
            "properties": {
                "networkSecurityGroup": {"id": nsg_id},
                "ipConfigurations": [{"name": "ipconfig1", "properties": ipconfig}],
            },
        },
    ).result()


async def ssh(address: str, client: KeyPair, host: KeyPair) -> SshCommunicator:
    comm = SshCommunicator()
    await comm.connect(
        address,
        22,
        USER,
        client.private_key.get_secret_value(),
        host.public_key,
        timeout=SSH_TIMEOUT,
    )
    return comm


def download_sparse(url: str, ca: str, dst: Path) -> int:
    """Stream the blob to dst, seeking over zero chunks (a fixed VHD is mostly zeros)."""
    total = 0
    zero = bytes(MIB)
    with requests.get(url, stream=True, verify=ca, timeout=60) as response:
        response.raise_for_status()
        with open(dst, "wb") as fh:
            for chunk in response.iter_content(MIB):
                if chunk == zero[: len(chunk)]:
                    fh.seek(len(chunk), 1)
                else:
                    fh.write(chunk)
                total += len(chunk)
            fh.truncate(total)
    return total


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (daemonized QEMU is reaped by init, later)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_vm_ssh_capture_and_vhd_export(arm_qemu: ArmEmulator, tmp_path: Path) -> None:
    arm = arm_qemu
    backend = arm.backend
    assert isinstance(backend, QemuVmBackend)
    ca = str(arm.ca_path)
    resources = arm.client(ResourceManagementClient)
    network = arm.client(NetworkManagementClient)
    compute = arm.client(ComputeManagementClient)
    timings: dict[str, float] = {}
    began = time.monotonic()

    def lap(name: str) -> None:
        nonlocal began
        timings[name] = round(time.monotonic() - began, 1)
        began = time.monotonic()

    rg = "rg-qemu-e2e"
    resources.resource_groups.create_or_update(rg, {"location": LOCATION})
    vnet, nsg = vnet_and_nsg(network, rg, LOCATION)
    pip = network.public_ip_addresses.begin_create_or_update(
        rg,
        "pip1",
        {
            "location": LOCATION,
            "sku": {"name": "Standard"},
            "properties": {"publicIPAllocationMethod": "Static"},
        },
    ).result()
    nic1 = nic(network, rg, "nic1", vnet.subnets[0].id, nsg.id, pip)
    lap("network")

    # --- VM 1 from the marketplace, SSH on its public IP:22 with the injected host key
    client1, host1 = generate_keypair(), generate_keypair()
    debian = cm.ImageReference(
        publisher="Debian", offer="debian-12", sku="12-gen2", version="latest"
    )
    model1 = vm_model(nic1.id, client1, host1, debian, "Standard_D2ds_v4")
    model1.storage_profile.data_disks = [
        cm.DataDisk(lun=0, create_option="Empty", disk_size_gb=1, delete_option="Delete")
    ]
    vm1 = compute.virtual_machines.begin_create_or_update(rg, "vm1", model1).result()
    lap("vm1 create (boot to sshd)")
    assert vm1.provisioning_state == "Succeeded"
    assert vm1.storage_profile.image_reference.exact_version == arm.marketplace[0].versions[-1]
    address = network.public_ip_addresses.get(rg, "pip1").ip_address
    assert address.startswith("127.0.2.") and arm.vm_info(vm1.id).address == address
    marker = f"kiln-marker-{uuid.uuid4().hex}"
    comm = await ssh(address, client1, host1)
    try:
        result = await comm.run(
            f"hostname; id -un; sudo -n sh -c 'echo {marker} > /etc/kiln-marker'; "
            f"echo {marker} | sudo -n dd of=/dev/disk/by-id/virtio-lun0 conv=fsync 2>/dev/null; "
            "cat /etc/kiln-marker; sudo -n cat /var/lib/waagent/CustomData"
        )
        assert result.exit_status == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[:3] == ["vm1", USER, marker]
        assert "ed25519_private" in "\n".join(lines[3:])  # customData kept, as Azure does
    finally:
        await comm.close()
    lap("vm1 ssh")

    # --- deallocate, generalize, capture: managed image, gallery image version
    compute.virtual_machines.begin_deallocate(rg, "vm1").result()
    lap("vm1 deallocate")
    assert backend.handle(vm1.id) is None
    compute.virtual_machines.generalize(rg, "vm1")
    image = compute.images.begin_create_or_update(
        rg,
        "img1",
        {
            "location": LOCATION,
            "properties": {"sourceVirtualMachine": {"id": vm1.id}, "hyperVGeneration": "V2"},
        },
    ).result()
    assert image.provisioning_state == "Succeeded"
    lap("managed image")
    compute.galleries.begin_create_or_update(rg, "kilngallery", {"location": LOCATION}).result()
    compute.gallery_images.begin_create_or_update(
        rg,
        "kilngallery",
        "debian",
        {
            "location": LOCATION,
            "properties": {
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "identifier": {"publisher": "kiln", "offer": "debian", "sku": "12"},
            },
        },
    ).result()
    version = compute.gallery_image_versions.begin_create_or_update(
        rg,
        "kilngallery",
        "debian",
        "1.0.0",
        {
            "location": LOCATION,
            "properties": {
                "publishingProfile": {"targetRegions": [{"name": LOCATION}]},
                "storageProfile": {"source": {"id": image.id}},
            },
        },
    ).result()
    assert version.provisioning_state == "Succeeded"
    assert (backend.image_dir(image.id) / "disk.qcow2").is_file()
    assert [d.lun for d in image.storage_profile.data_disks] == [0]
    assert (backend.image_dir(version.id) / "data-lun0.qcow2").is_file()
    assert (backend.image_dir(version.id) / "disk.qcow2").is_file()
    lap("gallery version")

    # --- VM 2 from the managed image, private IP only, bigger disk: VM 1's markers are there
    #     (its data disk too, which Azure attaches from the image at the same LUN)
    client2, host2 = generate_keypair(), generate_keypair()
    nic2 = nic(network, rg, "nic2", vnet.subnets[0].id, nsg.id, None)
    vm2 = compute.virtual_machines.begin_create_or_update(
        rg,
        "vm2",
        vm_model(
            nic2.id,
            client2,
            host2,
            cm.ImageReference(id=image.id),
            "Standard_D1_v2",
            disk_size_gb=6,
            delete_option="Delete",
        ),
    ).result()
    lap("vm2 create (boot to sshd)")
    private = nic2.ip_configurations[0].private_ip_address
    assert private.startswith("127.0.3.")
    comm = await ssh(private, client2, host2)
    try:
        assert [d.lun for d in vm2.storage_profile.data_disks] == [0]
        result = await comm.run(
            "hostname; cat /etc/kiln-marker; cat /sys/block/vda/size; "
            f"sudo -n head -c {len(marker)} /dev/disk/by-id/virtio-lun0"
        )
        assert result.exit_status == 0, result.stderr
        assert result.stdout.split() == ["vm2", marker, str(6 * 1024**3 // 512), marker]
    finally:
        await comm.close()
    lap("vm2 ssh")

    # --- VM 1's OS disk as a fixed VHD through the SAS URL
    disk_name = vm1.storage_profile.os_disk.name
    with pytest.raises(HttpResponseError) as refused:
        compute.disks.begin_grant_access(
            rg, vm2.storage_profile.os_disk.name, {"access": "Read", "durationInSeconds": 600}
        )
    assert refused.value.error.code == "OperationNotAllowed"  # vm2 runs
    sas = compute.disks.begin_grant_access(
        rg, disk_name, {"access": "Read", "durationInSeconds": 3600}
    ).result()
    url = sas.access_sas
    assert url.startswith(arm.url + "/md-")
    query = {p.split("=")[0] for p in url.split("?")[1].split("&")}
    assert {"sv", "sr", "sp", "se", "sig"} <= query
    head = requests.head(url, verify=ca, timeout=600)  # converts the disk on first use
    lap("vhd convert")
    assert head.status_code == 200, head.text
    size = int(head.headers["Content-Length"])
    assert size == 4 * 1024**3 + VHD_FOOTER_SIZE
    assert head.headers["x-ms-blob-type"] == "PageBlob"
    span = f"{SUPERBLOCK}-{SUPERBLOCK + 1023}"
    superblock = requests.get(url, headers={"Range": f"bytes={span}"}, verify=ca, timeout=60)
    assert superblock.status_code == 206
    assert superblock.headers["Content-Range"] == f"bytes {span}/{size}"
    assert len(superblock.content) == 1024 and superblock.content[56:58] == EXT4_MAGIC
    gpt = requests.get(url, headers={"Range": "bytes=512-1023"}, verify=ca, timeout=60)
    assert gpt.content.startswith(b"EFI PART")  # the GPT header, after the protective MBR
    footer = requests.get(url, headers={"Range": "bytes=-512"}, verify=ca, timeout=60)
    assert footer.status_code == 206 and footer.content.startswith(b"conectix")
    ranged = BlobClient.from_blob_url(url, connection_verify=ca).download_blob(
        offset=SUPERBLOCK, length=1024
    )
    assert ranged.readall() == superblock.content  # azure-storage-blob reads it (x-ms-range)
    tampered = url.replace("sp=r", "sp=rw")
    assert requests.get(tampered, verify=ca, timeout=60).status_code == 403
    vhd = tmp_path / "vm1.vhd"
    assert download_sparse(url, ca, vhd) == size
    lap("vhd download")
    check_fixed_vhd(vhd)
    compute.disks.begin_revoke_access(rg, disk_name).result()
    gone = requests.get(url, headers={"Range": "bytes=0-511"}, verify=ca, timeout=60)
    assert gone.status_code == 404 and gone.headers["x-ms-error-code"] == "ResourceNotFound"
    short = compute.disks.begin_grant_access(
        rg, disk_name, {"access": "Read", "durationInSeconds": 1}
    ).result()
    time.sleep(1.5)
    expired = requests.head(short.access_sas, verify=ca, timeout=60)
    assert expired.status_code == 403
    assert expired.headers["x-ms-error-code"] == "AuthenticationFailed"
    compute.disks.begin_revoke_access(rg, disk_name).result()

    # --- cleanup: no VM process, disk or image of this test is left behind
    running = backend.handle(vm2.id)
    assert running is not None and running.pid in backend.qemu_pids()
    compute.virtual_machines.begin_delete(rg, "vm2").result()
    with pytest.raises(ResourceNotFoundError):
        compute.disks.get(rg, vm2.storage_profile.os_disk.name)  # deleteOption Delete
    resources.resource_groups.begin_delete(rg).result()
    lap("delete")
    assert not alive(running.pid) and running.pid not in backend.qemu_pids()
    assert backend.handle(vm1.id) is None and backend.handle(vm2.id) is None
    left = [
        backend.vm_dir(vm1.id),
        backend.vm_dir(vm2.id),
        backend.disk_dir(vm1.storage_profile.os_disk.managed_disk.id),
        backend.disk_dir(vm2.storage_profile.os_disk.managed_disk.id),
        *(backend.disk_dir(d.managed_disk.id) for d in vm1.storage_profile.data_disks),
        *(backend.disk_dir(d.managed_disk.id) for d in vm2.storage_profile.data_disks),
        backend.image_dir(image.id),
        backend.image_dir(version.id),
    ]
    assert [p for p in left if p.exists()] == []
    assert arm.inventory(rg) == []
    print("timings (s):", timings)


def test_seed_user_data_merges_custom_data() -> None:
    """Kiln's cloud-config keeps its keys; the admin user comes first; scripts still run."""
    host = generate_keypair()
    info = VmInfo(
        id="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v",
        name="v",
        resource_group="rg",
        location=LOCATION,
        vm_size="Standard_D2ds_v4",
        os_type="Linux",
        computer_name="build-vm",
        admin_username=USER,
        ssh_public_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB8 kiln"],
        custom_data=host_key_custom_data(host),
    )
    doc = yaml.safe_load(user_data(info))
    assert doc["hostname"] == "build-vm" and doc["ssh_pwauth"] is False
    assert doc["users"][0]["name"] == USER and doc["users"][0]["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert doc["ssh_keys"]["ed25519_public"] == host.public_key
    assert doc["write_files"][0]["path"] == "/var/lib/waagent/CustomData"
    script = base64.b64encode(b"#!/bin/sh\necho hi\n").decode()
    multipart = user_data(info.model_copy(update={"custom_data": script}))
    assert "text/cloud-config" in multipart and "text/x-shellscript" in multipart


def test_storage_account_blob_endpoint_is_azurite(arm_qemu: ArmEmulator, azurite: Azurite) -> None:
    resources = arm_qemu.client(ResourceManagementClient)
    storage = arm_qemu.client(StorageManagementClient)
    rg = "rg-qemu-storage"
    name = f"kilnlogs{uuid.uuid4().hex[:8]}"
    resources.resource_groups.create_or_update(rg, {"location": LOCATION})
    account = storage.storage_accounts.begin_create(
        rg,
        name,
        {"location": LOCATION, "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"},
    ).result()
    endpoint = account.primary_endpoints.blob
    assert endpoint == azurite.blob_endpoint
    key = storage.storage_accounts.list_keys(rg, name).keys_property[0].value
    service = BlobServiceClient(endpoint, credential=key)  # account name from the endpoint
    container = service.create_container(f"logs-{uuid.uuid4().hex[:8]}")
    container.upload_blob("customization.log", b"step 1 ok\n")
    assert container.download_blob("customization.log").readall() == b"step 1 ok\n"
    assert [b.name for b in container.list_blobs()] == ["customization.log"]
    container.delete_container()
    resources.resource_groups.begin_delete(rg).result()
