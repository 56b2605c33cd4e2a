"""Pure parts of the emulator's Key Vault, Windows VM and WinRM guest support."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from fakes.arm import validation
from fakes.arm.errors import ArmError
from fakes.arm.models import VmInfo, WinRmListener
from fakes.arm.providers.compute import load_vault_certificate
from fakes.arm.providers.keyvault import parse_secret_url, version_of
from fakes.arm.tls import pfx, self_signed
from fakes.arm.windows_os import split_statements
from fakes.arm.winrm_guest import (
    IMAGE_STATE_COMPLETE,
    IMAGE_STATE_GENERALIZED,
    FakeWindowsGuest,
    Output,
    certificate_hash,
    fixed_vhd,
    script_of,
)
from kiln.providers.local.disks import check_fixed_vhd

pytestmark = pytest.mark.azure


def code_of(fn, *args) -> str | None:
    try:
        fn(*args)
    except ArmError as err:
        return err.code
    return None


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("kv1", True),
        ("Kiln-Build-01", True),
        ("a" * 24, True),
        ("ab", False),
        ("a" * 25, False),
        ("1kv", False),
        ("kv--x", False),
        ("kv-", False),
        ("kv_x", False),
    ],
)
def test_vault_names(name: str, ok: bool) -> None:
    assert (code_of(validation.validate_vault_name, name) is None) == ok
    if not ok:
        assert code_of(validation.validate_vault_name, name) == "VaultNameNotValid"


@pytest.mark.parametrize("password", ["Password1!", "P@ssw0rd", "Password22", "abc@123"])
def test_disallowed_passwords(password: str) -> None:
    assert code_of(validation.validate_admin_password, password, "Windows") == "InvalidParameter"


def test_secret_urls() -> None:
    version = "0123456789abcdef0123456789abcdef"
    url = f"https://kv1.vault.azure.net/secrets/winrm/{version}"
    assert parse_secret_url(url) == ("kv1", "winrm", version)
    assert parse_secret_url("https://kv1.vault.azure.net/secrets/winrm") == ("kv1", "winrm", None)
    assert parse_secret_url("https://example.com/secrets/x") is None
    assert version_of(url) == version
    assert version_of("https://kv1.vault.azure.net/secrets/winrm/latest") is None


def _pfx(password: str) -> bytes:
    return pfx(*self_signed("t"), password)


def _secret(doc: object) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_vault_certificate_format() -> None:
    pfx = base64.b64encode(_pfx("pw")).decode()
    cert_pem, key_pem = load_vault_certificate(
        _secret({"data": pfx, "dataType": "pfx", "password": "pw"})
    ) or ("", "")
    assert cert_pem.startswith("-----BEGIN CERTIFICATE") and "PRIVATE KEY" in key_pem
    empty = base64.b64encode(_pfx("")).decode()
    assert load_vault_certificate(_secret({"data": empty, "dataType": "pfx", "password": ""}))
    for bad in (
        _secret({"data": pfx, "dataType": "pfx", "password": "wrong"}),
        _secret({"data": pfx, "dataType": "pem", "password": "pw"}),
        _secret({"dataType": "pfx"}),
        _secret({"data": "bm9wZQ==", "dataType": "pfx", "password": ""}),
        base64.b64encode(b"not json").decode(),
        "%%% not base64",
    ):
        assert load_vault_certificate(bad) is None


def test_vm_info_hides_secrets() -> None:
    info = _vm(
        admin_password="S3cret!pass",
        winrm_listeners=[WinRmListener(protocol="Https", private_key_pem="KEYDATA")],
    )
    assert "S3cret" not in repr(info) and "KEYDATA" not in repr(info)


@pytest.mark.parametrize(
    ("command", "script"),
    [
        (
            "powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -EncodedCommand "
            + base64.b64encode("Write-Output 'x'".encode("utf-16-le")).decode(),
            "Write-Output 'x'",
        ),
        (
            "powershell -EncodedCommand "
            + base64.b64encode("exit 2".encode("utf-16-le")).decode()
            + " -NoProfile",
            "exit 2",
        ),
        ('PowerShell.exe -NoProfile -Command "echo hi"', "echo hi"),
        ("cmd.exe /c echo hi", "echo hi"),
        (
            "cmd /c powershell -ep Bypass -enc "
            + base64.b64encode("hostname".encode("utf-16-le")).decode(),
            "hostname",
        ),
        ("hostname", "hostname"),
    ],
)
def test_script_of(command: str, script: str) -> None:
    assert script_of(command) == script


def test_split_statements() -> None:
    text = "# comment\r\nWrite-Output 'a;b'; exit 1\n\n  Start-Sleep 0 "
    assert split_statements(text) == ["Write-Output 'a;b'", "exit 1", "Start-Sleep 0"]


def _vm(**fields: Any) -> VmInfo:
    return VmInfo(
        id="/vm",
        name="vm",
        resource_group="rg",
        location="westus2",
        vm_size="Standard_D2s_v5",
        os_type="Windows",
        computer_name="kiln-build",
        admin_username="packer",
        **fields,
    )


def _run(guest: FakeWindowsGuest, script: str) -> tuple[str, str, int]:
    async def go() -> tuple[str, str, int]:
        out = Output()
        code = await guest.run(script, out)
        chunks = out.take()
        text = {s: b"".join(d for n, d in chunks if n == s).decode() for s in ("stdout", "stderr")}
        return text["stdout"], text["stderr"], code

    return asyncio.run(go())


def test_guest_interpreter() -> None:
    guest = FakeWindowsGuest(_vm())
    assert _run(guest, 'Write-Host "on $env:COMPUTERNAME"; echo done') == (
        "on kiln-build\r\ndone\r\n",
        "",
        0,
    )
    assert _run(guest, "Write-Error 'bad'\nexit 5\nWrite-Output 'never'") == ("", "bad\r\n", 5)
    state = "(Get-ItemProperty HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\State)"
    assert _run(guest, state + ".ImageState")[0] == IMAGE_STATE_COMPLETE + "\r\n"
    _run(guest, "C:\\Windows\\System32\\Sysprep\\Sysprep.exe /generalize /oobe /quit")
    assert guest.image_state == IMAGE_STATE_GENERALIZED and not guest.shutdown_requested
    _run(guest, "& sysprep.exe /generalize /shutdown")
    assert guest.shutdown_requested
    guest.handler = lambda script: ("custom", "", 9)
    assert _run(guest, "anything") == ("custom", "", 9)
    assert guest.scripts[-1] == "anything" and len(guest.scripts) == 6


def test_fixed_vhd_is_valid(tmp_path: Path) -> None:
    path = fixed_vhd(tmp_path / "disk.vhd")
    footer = check_fixed_vhd(path)
    assert footer.current_size == 8 * 1024 * 1024 and path.stat().st_blocks * 512 < 1024 * 1024


def test_certificate_hash_is_sha256_for_sha256_certificates() -> None:
    der = pkcs12.load_key_and_certificates(_pfx(""), None)[1].public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER
    )
    assert len(certificate_hash(der)) == 32
