"""Microsoft's Azurite blob service on a free loopback port, for the Azure provider's tests.

    with Azurite() as azurite:                       # scripts/setup-azurite.sh installs it
        ArmEmulator(blob_endpoint=azurite.blob_endpoint,
                    storage_account_key=azurite.account_key)
        BlobServiceClient.from_connection_string(azurite.connection_string)

Azurite knows one account, the well-known development account, so every storage account
created through the ARM emulator hands out that account's endpoint and key (the endpoint
has no `{account}` placeholder). Telemetry is off: no traffic leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCOUNT = "devstoreaccount1"
# Azurite's documented development key (public, like the account name).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
START_TIMEOUT = 60.0


class AzuriteError(RuntimeError):
    """Azurite is not installed, or did not start."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_azurite_blob() -> str | None:
    """Path of the `azurite-blob` command, or None (install: scripts/setup-azurite.sh)."""
    return shutil.which("azurite-blob")


class Azurite:
    """One `azurite-blob` process with its own workspace; stopped (and cleaned) on exit."""

    def __init__(
        self,
        location: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        https: bool = False,
        oauth: bool = False,
        log_path: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.https = https or oauth  # Azurite takes bearer tokens over https only
        self.oauth = oauth
        self._own_location = location is None
        self.location = Path(location) if location is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.ca_path: Path | None = None  # the CA to trust when https=True
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""

    # --------------------------------------------------------------- what clients use

    @property
    def account_name(self) -> str:
        return ACCOUNT

    @property
    def account_key(self) -> str:
        """The shared key; what the ARM emulator's `storage_account_key=` takes."""
        return ACCOUNT_KEY

    @property
    def blob_endpoint(self) -> str:
        """`http://127.0.0.1:PORT/devstoreaccount1/`: the ARM emulator's `blob_endpoint=`."""
        scheme = "https" if self.https else "http"
        return f"{scheme}://{self.host}:{self.port}/{ACCOUNT}/"

    @property
    def connection_string(self) -> str:
        scheme = "https" if self.https else "http"
        return (
            f"DefaultEndpointsProtocol={scheme};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint.rstrip('/')};"
        )

    def client_kwargs(self) -> dict[str, object]:
        """Extra keyword arguments for azure-storage-blob clients (the CA under https)."""
        return {"connection_verify": str(self.ca_path)} if self.https and self.ca_path else {}

    # --------------------------------------------------------------- lifecycle

    def start(self) -> Azurite:
        exe = find_azurite_blob()
        if exe is None:
            raise AzuriteError("azurite-blob is not installed; run scripts/setup-azurite.sh")
        if self.location is None:
            self.location = Path(tempfile.mkdtemp(prefix="azurite-"))
        self.location.mkdir(parents=True, exist_ok=True)
        self.version = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.strip()
        if not self.port:
            self.port = _free_port(self.host)
        argv = [exe, "--blobHost", self.host, "--blobPort", str(self.port)]
        argv += ["--location", str(self.location), "--loose", "--skipApiVersionCheck"]
        argv += ["--disableTelemetry", "--silent"]
        if self.https:
            from fakes.arm import tls

            files = tls.load_or_generate(self.location / ".tls", self.host)
            self.ca_path = files.ca_path
            argv += ["--cert", str(files.cert_path), "--key", str(files.key_path)]
        if self.oauth:  # bearer tokens: issuer, audience and expiry checked, as Azure does
            argv += ["--oauth", "basic"]
        log_path = self.log_path or self.location / "azurite.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, log_path: Path) -> None:
        """Until the blob service answers an HTTP request (any status: it is listening)."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        url = self.blob_endpoint + "?comp=list"
        context = None
        if self.https:
            import ssl

            context = ssl.create_default_context(cafile=str(self.ca_path))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AzuriteError(
                    f"azurite-blob exited with {self.process.returncode}: "
                    f"{log_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2, context=context):
                    return
            except urllib.error.HTTPError:
                return  # 403 without credentials: the service is up
            except OSError:
                time.sleep(0.2)
        raise AzuriteError(f"azurite-blob did not answer on {self.blob_endpoint} in time")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)
        if self._own_location and self.location is not None:
            shutil.rmtree(self.location, ignore_errors=True)

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
