"""Key Vault, Windows VMs and the WinRM guest of the ARM emulator, through the real clients.

The SDKs (azure-mgmt-keyvault, azure-mgmt-compute) create the vault, the certificate
secret and the VM; pypsrp then talks WinRM over HTTPS to the VM's fake Windows guest,
pinning the certificate that went into Key Vault.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.keyvault import KeyVaultManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pypsrp.client import Client
from pypsrp.exceptions import AuthenticationError
from pypsrp.shell import Process, SignalCode, WinRS
from pypsrp.wsman import WSMan

from azurehelpers import vnet_and_nsg
from fakes.arm import ArmEmulator, RecordingVmBackend
from fakes.arm.tls import pfx, self_signed
from fakes.arm.winrm_guest import (
    IMAGE_STATE_COMPLETE,
    IMAGE_STATE_GENERALIZED,
    WindowsGuestBackend,
)

pytestmark = [pytest.mark.azure, pytest.mark.integration, pytest.mark.timeout(180)]

LOCATION = "westus2"
WINDOWS = {
    "publisher": "MicrosoftWindowsServer",
    "offer": "WindowsServer",
    "sku": "2022-datacenter-azure-edition",
    "version": "latest",
}
LINUX = {"publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "latest"}
USER = "packer"
PASSWORD = "Kx7#" + uuid.uuid4().hex[:20]  # 24 characters, 4 classes


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> WindowsGuestBackend:
    return WindowsGuestBackend(RecordingVmBackend(), tmp_path_factory.mktemp("guests"))


@pytest.fixture(scope="module")
def arm(backend: WindowsGuestBackend) -> Iterator[ArmEmulator]:
    emulator = ArmEmulator(
        lro_duration=0.05,
        retry_after=0.05,
        backend=backend,
        locations=["westus2", "eastus"],
        vm_sizes={"westus2": ["Standard_D2s_v5"], "eastus": ["Standard_D2s_v5"]},
    )
    with emulator:
        yield emulator


# --- helpers ------------------------------------------------------------------------------


def group(resources: ResourceManagementClient, name: str, location: str = LOCATION) -> str:
    return resources.resource_groups.create_or_update(name, {"location": location}).name


def vault_body(arm: ArmEmulator, **props: Any) -> dict[str, Any]:
    properties = {
        "tenantId": arm.tenant_id,
        "sku": {"family": "A", "name": "standard"},
        "accessPolicies": [],
        **props,
    }
    return {"location": props.pop("location", LOCATION), "properties": properties}


def kinds(arm: ArmEmulator, rg: str) -> list[tuple[str, str]]:
    """(type, name) of the group's resources (secrets are not among them, like subnets)."""
    return [(i.type, i.name) for i in arm.inventory(rg) if i.type.count("/") == 1 and i.name != rg]


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def make_certificate(ip: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed WinRM certificate for `ip` (SAN IP and DNS)."""
    return self_signed("kiln-build", ip)


def certificate_secret(cert: x509.Certificate, key: rsa.RSAPrivateKey, password: str) -> str:
    """The Key Vault secret a VM certificate must be: base64 JSON with a base64 PFX."""
    data = base64.b64encode(pfx(cert, key, password)).decode()
    doc = {"data": data, "dataType": "pfx", "password": password}
    return base64.b64encode(json.dumps(doc).encode()).decode()


def nic_with_ip(network: NetworkManagementClient, rg: str) -> tuple[str, str]:
    vnet, nsg = vnet_and_nsg(network, rg, LOCATION)
    pip = network.public_ip_addresses.begin_create_or_update(
        rg,
        "pip",
        {
            "location": LOCATION,
            "sku": {"name": "Standard"},
            "properties": {"publicIPAllocationMethod": "Static"},
        },
    ).result()
    nic = network.network_interfaces.begin_create_or_update(
        rg,
        "nic",
        {
            "location": LOCATION,
            "properties": {
                "networkSecurityGroup": {"id": nsg.id},
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "properties": {
                            "subnet": {"id": vnet.subnets[0].id},
                            "publicIPAddress": {"id": pip.id},
                        },
                    }
                ],
            },
        },
    ).result()
    return nic.id, pip.ip_address


def windows_vm(
    nic_id: str,
    vault_id: str | None = None,
    cert_url: str | None = None,
    *,
    image: dict[str, str] = WINDOWS,
    password: str | None = PASSWORD,
    user: str = USER,
    listener_url: str | None = None,
    linux: bool = False,
) -> dict[str, Any]:
    """The VM body Kiln sends for a Windows source image."""
    os_profile: dict[str, Any] = {"computerName": "kiln-build", "adminUsername": user}
    if password is not None:
        os_profile["adminPassword"] = password
    if vault_id and cert_url:
        os_profile["secrets"] = [
            {
                "sourceVault": {"id": vault_id},
                "vaultCertificates": [{"certificateUrl": cert_url, "certificateStore": "My"}],
            }
        ]
    os_profile["windowsConfiguration"] = {
        "provisionVMAgent": True,
        "enableAutomaticUpdates": False,
        "winRM": {
            "listeners": [{"protocol": "Https", "certificateUrl": listener_url or cert_url}]
            if (listener_url or cert_url)
            else []
        },
    }
    if linux:
        os_profile["linuxConfiguration"] = {"disablePasswordAuthentication": False}
    return {
        "location": LOCATION,
        "properties": {
            "hardwareProfile": {"vmSize": "Standard_D2s_v5"},
            "storageProfile": {
                "imageReference": image,
                "osDisk": {"createOption": "FromImage", "deleteOption": "Delete"},
            },
            "osProfile": os_profile,
            "networkProfile": {"networkInterfaces": [{"id": nic_id}]},
        },
    }


def encoded(script: str) -> str:
    return base64.b64encode(script.encode("utf-16-le")).decode()


def powershell(wsman: WSMan, script: str) -> tuple[str, str, int]:
    """What a Windows communicator does: powershell -EncodedCommand over a WinRS shell."""
    with WinRS(wsman) as shell:
        args = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass"]
        process = Process(shell, "powershell.exe", [*args, "-EncodedCommand", encoded(script)])
        process.invoke()
        process.signal(SignalCode.TERMINATE)
    return process.stdout.decode(), process.stderr.decode(), process.rc or 0


@pytest.fixture(scope="module")
def windows(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    compute: ComputeManagementClient,
    keyvault: KeyVaultManagementClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A running Windows VM whose WinRM certificate came from Key Vault."""
    rg = group(resources, "rg-win")
    nic_id, ip = nic_with_ip(network, rg)
    cert, key = make_certificate(ip)
    vault = keyvault.vaults.begin_create_or_update(
        rg, unique("kv-win"), vault_body(arm, enabledForDeployment=True)
    ).result()
    secret = keyvault.secrets.create_or_update(
        rg,
        vault.name,
        "winrm",
        {"properties": {"value": certificate_secret(cert, key, "pfx-pass")}},
    )
    vm = compute.virtual_machines.begin_create_or_update(
        rg, "vm-win", windows_vm(nic_id, vault.id, secret.properties.secret_uri_with_version)
    ).result()
    pem = tmp_path_factory.mktemp("winrm") / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {"rg": rg, "vm": vm, "ip": ip, "pem": str(pem), "vault": vault, "secret": secret}


def wsman(windows: dict[str, Any], **kwargs: Any) -> WSMan:
    options: dict[str, Any] = {
        "port": 5986,
        "ssl": True,
        "auth": "ntlm",
        "username": USER,
        "password": PASSWORD,
        "cert_validation": windows["pem"],
        "operation_timeout": 5,
        "read_timeout": 10,
        **kwargs,
    }
    return WSMan(windows["ip"], **options)


# --- Key Vault ----------------------------------------------------------------------------


def test_vault_and_secret(
    arm: ArmEmulator, resources: ResourceManagementClient, keyvault: KeyVaultManagementClient
) -> None:
    rg = group(resources, "rg-kv")
    name = unique("kv-")
    vault = keyvault.vaults.begin_create_or_update(rg, name, vault_body(arm)).result()
    props = vault.properties
    assert vault.type == "Microsoft.KeyVault/vaults"
    assert props.vault_uri == f"https://{name}.vault.azure.net/"
    assert props.enabled_for_deployment is False
    assert props.enable_soft_delete is True and props.soft_delete_retention_in_days == 90
    assert props.provisioning_state == "Succeeded" and props.sku.name == "standard"
    assert [v.name for v in keyvault.vaults.list_by_resource_group(rg)] == [name]
    assert kinds(arm, rg) == [("Microsoft.KeyVault/vaults", name)]

    first = keyvault.secrets.create_or_update(rg, name, "cert", {"properties": {"value": "v1"}})
    assert first.properties.secret_uri == f"https://{name}.vault.azure.net/secrets/cert"
    version = first.properties.secret_uri_with_version.rsplit("/", 1)[1]
    assert first.properties.secret_uri_with_version == f"{first.properties.secret_uri}/{version}"
    assert len(version) == 32 and int(version, 16) >= 0
    assert first.properties.value is None
    second = keyvault.secrets.create_or_update(rg, name, "cert", {"properties": {"value": "v2"}})
    assert second.properties.secret_uri_with_version != first.properties.secret_uri_with_version
    got = keyvault.secrets.get(rg, name, "cert")
    assert got.properties.value is None
    assert got.properties.secret_uri_with_version == second.properties.secret_uri_with_version
    assert "v2" not in json.dumps(got.as_dict())
    assert arm.vault_secret(first.properties.secret_uri_with_version) == "v1"
    assert arm.vault_secret(first.properties.secret_uri) == "v2"
    assert arm.vault_secret(f"https://{name}.vault.azure.net/secrets/nope") is None
    assert [s.name for s in keyvault.secrets.list(rg, name)] == ["cert"]
    assert kinds(arm, rg) == [("Microsoft.KeyVault/vaults", name)]


@pytest.mark.parametrize(
    "name", ["ab", "1vault", "kv--double", "kv-ends-", "kv_under", "k" * 25, "kv.dot"]
)
def test_vault_name_rules(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    keyvault: KeyVaultManagementClient,
    name: str,
) -> None:
    rg = group(resources, "rg-kv-names")
    with pytest.raises(HttpResponseError) as info:
        keyvault.vaults.begin_create_or_update(rg, name, vault_body(arm)).result()
    assert info.value.status_code == 400
    assert info.value.error.code == "VaultNameNotValid"


def test_vault_properties_are_checked(
    arm: ArmEmulator, resources: ResourceManagementClient, keyvault: KeyVaultManagementClient
) -> None:
    rg = group(resources, "rg-kv-props")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tenantId": None}, "tenantId"),
        ({"tenantId": str(uuid.uuid4())}, "tenant"),
        ({"sku": None}, "sku"),
        ({"sku": {"family": "A", "name": "basic"}}, "sku"),
        ({"accessPolicies": None}, "accessPolicies"),
    ]
    for props, word in cases:
        body = vault_body(arm)
        body["properties"].update(props)
        body["properties"] = {k: v for k, v in body["properties"].items() if v is not None}
        with pytest.raises(HttpResponseError) as info:
            keyvault.vaults.begin_create_or_update(rg, unique("kv-"), body).result()
        assert info.value.status_code == 400, props
        assert word in info.value.error.message, (props, info.value.error.message)
    body = vault_body(arm, enableRbacAuthorization=True)
    del body["properties"]["accessPolicies"]
    vault = keyvault.vaults.begin_create_or_update(rg, unique("kv-"), body).result()
    assert vault.properties.enable_rbac_authorization is True
    with pytest.raises(HttpResponseError) as info:
        keyvault.vaults.begin_create_or_update(
            rg, unique("kv-"), vault_body(arm, location="mars")
        ).result()
    assert info.value.status_code == 400


def test_soft_delete_and_purge(
    arm: ArmEmulator, resources: ResourceManagementClient, keyvault: KeyVaultManagementClient
) -> None:
    rg, other = group(resources, "rg-kv-soft"), group(resources, "rg-kv-other")
    name = unique("kv-")
    vault = keyvault.vaults.begin_create_or_update(rg, name, vault_body(arm)).result()
    secret = keyvault.secrets.create_or_update(rg, name, "s", {"properties": {"value": "x"}})
    with pytest.raises(HttpResponseError) as info:  # names are global
        keyvault.vaults.begin_create_or_update(other, name, vault_body(arm)).result()
    assert info.value.status_code == 409 and info.value.error.code == "VaultAlreadyExists"

    keyvault.vaults.delete(rg, name)
    with pytest.raises(ResourceNotFoundError):
        keyvault.vaults.get(rg, name)
    assert arm.vault_secret(secret.properties.secret_uri) is None
    deleted = keyvault.vaults.get_deleted(name, LOCATION)
    assert deleted.properties.vault_id == vault.id
    assert deleted.properties.location == LOCATION
    assert deleted.properties.scheduled_purge_date > deleted.properties.deletion_date
    assert name in arm.deleted_vaults()
    assert name in [d.name for d in keyvault.vaults.list_deleted()]
    with pytest.raises(HttpResponseError) as info:  # soft-deleted names stay taken
        keyvault.vaults.begin_create_or_update(other, name, vault_body(arm)).result()
    assert info.value.status_code == 409 and info.value.error.code == "VaultAlreadyExists"
    assert "purged" in info.value.error.message
    with pytest.raises(ResourceNotFoundError):
        keyvault.vaults.get_deleted(name, "eastus")

    keyvault.vaults.begin_purge_deleted(name, LOCATION).result()
    assert name not in arm.deleted_vaults()
    with pytest.raises(ResourceNotFoundError):
        keyvault.vaults.get_deleted(name, LOCATION)
    again = keyvault.vaults.begin_create_or_update(other, name, vault_body(arm)).result()
    assert again.properties.provisioning_state == "Succeeded"
    with pytest.raises(ResourceNotFoundError):  # a new vault: the old secrets were purged
        keyvault.secrets.get(other, name, "s")
    keyvault.vaults.delete(other, name)
    keyvault.vaults.begin_purge_deleted(name, LOCATION).result()


def test_group_delete_soft_deletes_vaults(
    arm: ArmEmulator, resources: ResourceManagementClient, keyvault: KeyVaultManagementClient
) -> None:
    rg = group(resources, "rg-kv-group")
    name = unique("kv-")
    keyvault.vaults.begin_create_or_update(rg, name, vault_body(arm)).result()
    resources.resource_groups.begin_delete(rg).result()
    assert arm.inventory(rg) == []
    assert name in arm.deleted_vaults()
    assert keyvault.vaults.get_deleted(name, LOCATION).name == name
    keyvault.vaults.begin_purge_deleted(name, LOCATION).result()
    assert name not in arm.deleted_vaults()


# --- Windows VM validation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def staging(
    arm: ArmEmulator,
    resources: ResourceManagementClient,
    network: NetworkManagementClient,
    keyvault: KeyVaultManagementClient,
) -> dict[str, Any]:
    """A group with a NIC, a deployment-enabled vault holding a good certificate, and not."""
    rg = group(resources, "rg-win-rules")
    nic_id, ip = nic_with_ip(network, rg)
    cert, key = make_certificate(ip)
    good = keyvault.vaults.begin_create_or_update(
        rg, unique("kv-ok"), vault_body(arm, enabledForDeployment=True)
    ).result()
    closed = keyvault.vaults.begin_create_or_update(rg, unique("kv-no"), vault_body(arm)).result()
    value = certificate_secret(cert, key, "")
    url = keyvault.secrets.create_or_update(
        rg, good.name, "winrm", {"properties": {"value": value}}
    ).properties.secret_uri_with_version
    closed_url = keyvault.secrets.create_or_update(
        rg, closed.name, "winrm", {"properties": {"value": value}}
    ).properties.secret_uri_with_version
    bad_url = keyvault.secrets.create_or_update(
        rg,
        good.name,
        "garbage",
        {"properties": {"value": base64.b64encode(b'{"data": "bm9wZQ=="}').decode()}},
    ).properties.secret_uri_with_version
    return {
        "rg": rg,
        "nic": nic_id,
        "good": good,
        "closed": closed,
        "url": url,
        "closed_url": closed_url,
        "bad_url": bad_url,
    }


def refused(compute: ComputeManagementClient, rg: str, body: dict[str, Any]) -> Any:
    with pytest.raises(HttpResponseError) as info:
        compute.virtual_machines.begin_create_or_update(rg, "vm-bad", body).result()
    return info.value


def test_windows_vm_rules(compute: ComputeManagementClient, staging: dict[str, Any]) -> None:
    rg, nic, vault, url = staging["rg"], staging["nic"], staging["good"].id, staging["url"]
    err = refused(compute, rg, windows_vm(nic, vault, url, password=None))
    assert (err.status_code, err.error.code) == (400, "InvalidParameter")
    assert "adminPassword" in err.error.message
    for weak in ("short1!", "alllowercase1", "Password1!", "P@ssw0rd"):
        err = refused(compute, rg, windows_vm(nic, vault, url, password=weak))
        assert err.error.code == "InvalidParameter" and err.error.target == "adminPassword", weak
    for user in ("administrator", "Admin", "root", "u" * 21):
        err = refused(compute, rg, windows_vm(nic, vault, url, user=user))
        assert err.error.target == "adminUsername", user
    err = refused(compute, rg, windows_vm(nic, vault, url, linux=True))
    assert err.error.code == "InvalidParameter" and "linuxConfiguration" in err.error.message
    linux = windows_vm(nic, image=LINUX)
    err = refused(compute, rg, linux)
    assert err.error.code == "InvalidParameter" and "windowsConfiguration" in err.error.message
    err = refused(compute, rg, windows_vm(nic, staging["closed"].id, staging["closed_url"]))
    assert (err.status_code, err.error.code) == (400, "KeyVaultAccessForbidden")
    assert "not been enabled for deployment" in err.error.message
    err = refused(compute, rg, windows_vm(nic, vault, url, listener_url=staging["bad_url"]))
    assert err.status_code == 400 and "osProfile.secrets" in err.error.message
    err = refused(compute, rg, windows_vm(nic, vault, url.rsplit("/", 1)[0] + "/" + "0" * 32))
    assert err.error.code == "KeyVaultSecretDoesNotExist"
    no_store = windows_vm(nic, vault, url)
    del no_store["properties"]["osProfile"]["secrets"][0]["vaultCertificates"][0][
        "certificateStore"
    ]
    assert "certificateStore" in refused(compute, rg, no_store).error.message
    missing_vault = windows_vm(nic, vault.replace(staging["good"].name, "kv-missing"), url)
    assert refused(compute, rg, missing_vault).status_code == 400


def test_malformed_certificate_fails_the_create(
    arm: ArmEmulator, compute: ComputeManagementClient, staging: dict[str, Any]
) -> None:
    rg, bad = staging["rg"], staging["bad_url"]
    poller = compute.virtual_machines.begin_create_or_update(
        rg, "vm-badcert", windows_vm(staging["nic"], staging["good"].id, bad)
    )
    with pytest.raises(HttpResponseError) as info:
        poller.result()
    assert "CertificateImproperlyFormatted" in str(info.value)
    assert "improperly formatted" in str(info.value)
    assert compute.virtual_machines.get(rg, "vm-badcert").provisioning_state == "Failed"
    compute.virtual_machines.begin_delete(rg, "vm-badcert").result()


def test_password_never_leaves(
    arm: ArmEmulator, compute: ComputeManagementClient, windows: dict[str, Any]
) -> None:
    vm = compute.virtual_machines.get(windows["rg"], "vm-win")
    assert vm.os_profile.admin_password is None
    assert PASSWORD not in json.dumps(vm.as_dict())
    assert PASSWORD not in json.dumps(arm.resource(vm.id))
    assert all(PASSWORD not in r.model_dump_json() for r in arm.requests)
    info = arm.vm_info(vm.id)
    assert info.admin_password == PASSWORD and PASSWORD not in repr(info)
    [listener] = info.winrm_listeners
    assert listener.protocol == "Https"
    assert listener.certificate_url == windows["secret"].properties.secret_uri_with_version
    assert listener.certificate_pem and "PRIVATE KEY" in (listener.private_key_pem or "")
    assert listener.private_key_pem not in repr(info)


# --- the WinRM guest --------------------------------------------------------------------------


def test_winrm_runs_powershell(backend: WindowsGuestBackend, windows: dict[str, Any]) -> None:
    with wsman(windows) as client:
        out, err, rc = powershell(
            client, "Write-Output 'hello'\n$env:COMPUTERNAME\nWrite-Error 'oops'\nexit 3"
        )
    assert (out, err, rc) == ("hello\r\nkiln-build\r\n", "oops\r\n", 3)
    guest = backend.guest(windows["vm"].id)
    assert guest.scripts[-1].startswith("Write-Output 'hello'")
    guest.files["C:\\kiln\\ready"] = ""
    with wsman(windows, auth="negotiate") as client:
        out, _, rc = powershell(client, "Test-Path 'C:\\kiln\\ready'; Test-Path C:\\nope")
    assert (out, rc) == ("True\r\nFalse\r\n", 0)


def test_execute_cmd_and_handler(backend: WindowsGuestBackend, windows: dict[str, Any]) -> None:
    guest = backend.guest(windows["vm"].id)
    with Client(
        windows["ip"],
        port=5986,
        auth="ntlm",
        username=USER,
        password=PASSWORD,
        cert_validation=windows["pem"],
    ) as client:
        assert client.execute_cmd("hostname") == ("kiln-build\r\n", "", 0)
        assert client.execute_cmd("cmd.exe /c echo hi") == ("hi\r\n", "", 0)
        guest.handler = lambda script: ("handled\n", "", 7) if "custom" in script else None
        try:
            assert client.execute_cmd("custom-tool --flag") == ("handled\n", "", 7)
            assert client.execute_cmd("echo plain") == ("plain\r\n", "", 0)
        finally:
            guest.handler = None
    assert guest.scripts[-4:] == ["hostname", "echo hi", "custom-tool --flag", "echo plain"]


def test_winrm_refuses_bad_clients(windows: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(AuthenticationError), wsman(windows, password=PASSWORD + "x") as client:
        powershell(client, "Write-Output 'no'")
    with pytest.raises(AuthenticationError), wsman(windows, auth="basic") as client:
        powershell(client, "Write-Output 'no'")
    with pytest.raises(AuthenticationError), wsman(windows, negotiate_send_cbt=False) as client:
        powershell(client, "Write-Output 'no'")
    other, _ = make_certificate(windows["ip"])
    pinned = tmp_path / "other.pem"
    pinned.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    with (
        pytest.raises(requests.exceptions.SSLError),
        wsman(windows, cert_validation=str(pinned)) as client,
    ):
        powershell(client, "Write-Output 'no'")
    response = requests.post(
        f"https://{windows['ip']}:5986/wsman",
        data=b"<x/>",
        headers={"Content-Type": "application/soap+xml;charset=UTF-8"},
        auth=(USER, PASSWORD),
        verify=windows["pem"],
        timeout=10,
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Negotiate"


def test_long_command_spans_receives(backend: WindowsGuestBackend, windows: dict[str, Any]) -> None:
    with wsman(windows, operation_timeout=1) as client, WinRS(client) as shell:
        script = "Write-Output 'start'\nStart-Sleep -Seconds 3\nWrite-Output 'end'"
        process = Process(
            shell, "powershell.exe", ["-NoProfile", "-EncodedCommand", encoded(script)]
        )
        process.begin_invoke()
        polls = 0
        began = time.monotonic()
        while (
            process.state
            != "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/Done"
        ):
            process.poll_invoke()
            polls += 1
        assert time.monotonic() - began >= 2.5
        assert polls >= 3
        assert process.stdout == b"start\r\nend\r\n" and process.rc == 0
        # a running command stopped with ctrl_c
        sleeper = Process(shell, "powershell.exe", ["-EncodedCommand", encoded("Start-Sleep 30")])
        sleeper.begin_invoke()
        sleeper.signal(SignalCode.CTRL_C)
        sleeper.end_invoke()
        assert sleeper.rc != 0


def test_sysprep_generalizes_and_shuts_down(
    arm: ArmEmulator,
    backend: WindowsGuestBackend,
    compute: ComputeManagementClient,
    windows: dict[str, Any],
) -> None:
    guest = backend.guest(windows["vm"].id)
    state = (
        "(Get-ItemProperty HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\State)"
        ".ImageState"
    )
    sysprep = "& $env:SystemRoot\\System32\\Sysprep\\Sysprep.exe /oobe /generalize /quiet"
    with wsman(windows) as client:
        assert powershell(client, state)[0] == f"{IMAGE_STATE_COMPLETE}\r\n"
        assert powershell(client, sysprep + " /quit /mode:vm")[2] == 0
        assert guest.image_state == IMAGE_STATE_GENERALIZED
        assert powershell(client, state)[0] == f"{IMAGE_STATE_GENERALIZED}\r\n"
        shutdown = (
            "& $env:SystemRoot\\System32\\Sysprep\\Sysprep.exe /oobe /generalize /quiet /shutdown"
        )
        assert powershell(client, shutdown)[2] == 0
    deadline = time.monotonic() + 10
    view = None
    while time.monotonic() < deadline:
        view = compute.virtual_machines.instance_view(windows["rg"], "vm-win")
        if any(s.code == "PowerState/stopped" for s in view.statuses):
            break
        time.sleep(0.2)
    assert view is not None and any(s.code == "PowerState/stopped" for s in view.statuses)
    assert backend.server(windows["vm"].id) is None
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"https://{windows['ip']}:5986/wsman", verify=False, timeout=3)
    # the build goes on as in Azure: deallocate, generalize, capture, export the disk
    compute.virtual_machines.begin_deallocate(windows["rg"], "vm-win").result()
    compute.virtual_machines.generalize(windows["rg"], "vm-win")
    disk = compute.virtual_machines.get(windows["rg"], "vm-win").storage_profile.os_disk
    access = compute.disks.begin_grant_access(
        windows["rg"], disk.name, {"access": "Read", "durationInSeconds": 600}
    ).result()
    head = requests.get(
        access.access_sas,
        headers={"Range": "bytes=-512"},
        verify=str(arm.ca_path),
        timeout=10,
    )
    assert head.status_code == 206 and head.content.startswith(b"conectix")
    compute.disks.begin_revoke_access(windows["rg"], disk.name).result()
    image = compute.images.begin_create_or_update(
        windows["rg"],
        "img-win",
        {
            "location": LOCATION,
            "properties": {
                "sourceVirtualMachine": {"id": windows["vm"].id},
                "hyperVGeneration": "V2",
            },
        },
    ).result()
    assert image.storage_profile.os_disk.os_type == "Windows"
    assert ("capture", windows["vm"].id, image.id) in backend.disk_calls


def test_qemu_backend_serves_windows_guests(tmp_path: Path) -> None:
    """The arm_qemu fixture's backend: Windows VMs become WinRM guests, no QEMU started."""
    from fakes.arm.qemu_backend import QemuVmBackend, QemuWindowsVmBackend

    backend = QemuWindowsVmBackend(tmp_path / "vms")
    assert isinstance(backend, QemuVmBackend)
    with ArmEmulator(
        lro_duration=0.05,
        retry_after=0.05,
        backend=backend,
        locations=[LOCATION],
        vm_sizes=["Standard_D2s_v5"],
    ) as arm:
        resources, network = (
            arm.client(ResourceManagementClient),
            arm.client(NetworkManagementClient),
        )
        compute, keyvault = (
            arm.client(ComputeManagementClient),
            arm.client(KeyVaultManagementClient),
        )
        rg = group(resources, "rg-qemu-win")
        nic_id, ip = nic_with_ip(network, rg)
        cert, key = make_certificate(ip)
        vault = keyvault.vaults.begin_create_or_update(
            rg, unique("kv-q"), vault_body(arm, enabledForDeployment=True)
        ).result()
        url = keyvault.secrets.create_or_update(
            rg, vault.name, "winrm", {"properties": {"value": certificate_secret(cert, key, "")}}
        ).properties.secret_uri_with_version
        vm = compute.virtual_machines.begin_create_or_update(
            rg, "vm", windows_vm(nic_id, vault.id, url)
        ).result()
        pem = tmp_path / "cert.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        with wsman({"ip": ip, "pem": str(pem)}) as client:
            assert powershell(client, "hostname") == ("kiln-build\r\n", "", 0)
        assert backend.guest(vm.id).scripts == ["hostname"]
        assert backend.qemu_pids() == [] and backend.handle(vm.id) is None
        resources.resource_groups.begin_delete(rg).result()
        assert backend.windows.server(vm.id) is None
        keyvault.vaults.begin_purge_deleted(vault.name, LOCATION).result()
        assert arm.deleted_vaults() == []
