"""Per-run WinRM credentials, the Key Vault secret format, PowerShell encoding, pinning."""

from __future__ import annotations

import base64
import json
import ssl
import string
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from kiln.api.run import Checkpoint
from kiln.api.template import ImageTemplateSpec
from kiln.communicators.ssh import CommunicatorError
from kiln.communicators.winrm import (
    CertificateMismatch,
    WinRmCommunicator,
    WinRmCredentials,
    encoded_command,
    generate_password,
    generate_winrm_credentials,
    key_vault_certificate,
)
from kiln.pipeline.machine import _secret_data, decode_keys
from kiln.providers.azure.provider import check_steps_fit
from kiln.providers.base import ProviderError, RunContext, TemplateIdentity
from kubehelpers import valid_spec


@pytest.fixture(scope="module")
def credentials() -> WinRmCredentials:
    return generate_winrm_credentials("kiln-build")


def test_the_pfx_holds_the_certificate_and_its_key(credentials: WinRmCredentials) -> None:
    key, certificate, _ = pkcs12.load_key_and_certificates(
        base64.b64decode(credentials.pfx.get_secret_value()),
        credentials.pfx_password.get_secret_value().encode(),
    )
    assert key is not None and certificate is not None
    assert certificate.public_bytes(serialization.Encoding.PEM).decode() == (
        credentials.certificate_pem
    )
    assert credentials.fingerprint == certificate.fingerprint(hashes.SHA256()).hex()
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage


def test_the_key_vault_secret_is_the_json_azure_documents(credentials: WinRmCredentials) -> None:
    document = json.loads(base64.b64decode(key_vault_certificate(credentials)))
    assert document == {
        "data": credentials.pfx.get_secret_value(),
        "dataType": "pfx",
        "password": credentials.pfx_password.get_secret_value(),
    }


def test_each_run_gets_its_own_credentials(credentials: WinRmCredentials) -> None:
    other = generate_winrm_credentials("kiln-build")
    assert other.fingerprint != credentials.fingerprint
    assert other.password.get_secret_value() != credentials.password.get_secret_value()
    assert "*" in repr(other) and other.password.get_secret_value() not in repr(other)


@pytest.mark.parametrize("attempt", range(20))
def test_passwords_meet_azures_complexity_rules(attempt: int) -> None:
    password = generate_password()
    assert len(password) == 24
    for group in (string.ascii_lowercase, string.ascii_uppercase, string.digits, "!@#%^*-_=+"):
        assert any(c in group for c in password)


def test_powershell_runs_as_an_encoded_command() -> None:
    arguments = encoded_command("Write-Output 'héllo'")
    assert arguments[:-1] == [
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-EncodedCommand",
    ]
    script = base64.b64decode(arguments[-1]).decode("utf-16-le")
    assert script.endswith("Write-Output 'héllo'")
    assert "$ProgressPreference = 'SilentlyContinue'" in script
    with pytest.raises(CommunicatorError, match="too long"):
        encoded_command("x" * 20000)


def _context(os_type: str | None, **spec: object) -> RunContext:
    template = TemplateIdentity(namespace="default", name="t", uid="t-uid")
    checkpoint = Checkpoint(template=template, os_type=os_type)
    return RunContext(
        namespace="default",
        run_name="run-1",
        run_uid="uid-1",
        template=template,
        spec=ImageTemplateSpec.model_validate({**valid_spec(), **spec}),
        checkpoint=checkpoint,
        run_dir=Path("/nonexistent"),
        key_namespace="kiln-system",
    )


def test_a_windows_run_secret_carries_a_winrm_login_and_restores_it() -> None:
    windows = _context("Windows")
    data = _secret_data(windows)
    assert {"winrm-password", "winrm-certificate", "winrm-pfx", "winrm-pfx-password"} <= set(data)
    decode_keys(data, windows)
    assert windows.windows and windows.winrm is not None
    assert windows.winrm.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert windows.client_public_key.startswith("ssh-ed25519 ")
    linux = _context(None)
    linux_data = _secret_data(linux)
    assert not any(key.startswith("winrm-") for key in linux_data)
    decode_keys(linux_data, linux)
    assert not linux.windows and linux.winrm is None


@pytest.mark.parametrize(
    ("os_type", "step", "message"),
    [
        ("Linux", {"type": "PowerShell", "inline": ["Get-Date"]}, "needs Windows"),
        ("Windows", {"type": "Shell", "inline": ["date"]}, "needs Linux"),
    ],
)
def test_steps_must_suit_the_source_os(os_type: str, step: dict, message: str) -> None:
    spec = ImageTemplateSpec.model_validate({**valid_spec(), "customize": [step]})
    with pytest.raises(ProviderError, match=message) as failure:
        check_steps_fit(spec, os_type)
    assert "spec.customize[0]" in str(failure.value) and failure.value.fatal


@pytest.mark.parametrize(
    "step",
    [
        {"type": "PowerShell", "inline": ["Get-Date"]},
        {"type": "WindowsRestart"},
        {"type": "WindowsUpdate"},
        {"type": "File", "sourceUri": "https://example.com/a", "destination": "C:\\a.txt"},
    ],
)
def test_windows_steps_fit_a_windows_source(step: dict) -> None:
    spec = ImageTemplateSpec.model_validate({**valid_spec(), "customize": [step]})
    check_steps_fit(spec, "Windows")


def test_linux_steps_on_linux_and_no_steps_on_windows_fit() -> None:
    check_steps_fit(ImageTemplateSpec.model_validate(valid_spec()), "Linux")
    check_steps_fit(ImageTemplateSpec.model_validate({**valid_spec(), "customize": []}), "Windows")


class _Refuse(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", "Negotiate")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def https_server(credentials: WinRmCredentials, tmp_path: Path) -> Iterator[int]:
    """An HTTPS endpoint with the run's certificate that refuses every login."""
    key, _, _ = pkcs12.load_key_and_certificates(
        base64.b64decode(credentials.pfx.get_secret_value()),
        credentials.pfx_password.get_secret_value().encode(),
    )
    assert key is not None
    (tmp_path / "cert.pem").write_text(credentials.certificate_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join()


async def test_a_different_certificate_is_never_sent_a_password(https_server: int) -> None:
    stranger = generate_winrm_credentials("kiln-build")
    with pytest.raises(CertificateMismatch, match="other than this run's"):
        await WinRmCommunicator().connect("127.0.0.1", https_server, "packer", stranger, timeout=5)


async def test_the_pinned_certificate_gets_to_the_login(
    https_server: int, credentials: WinRmCredentials
) -> None:
    with pytest.raises(CommunicatorError) as failure:
        await WinRmCommunicator().connect(
            "127.0.0.1", https_server, "packer", credentials, timeout=5
        )
    assert not isinstance(failure.value, CertificateMismatch)
    assert credentials.password.get_secret_value() not in str(failure.value)
