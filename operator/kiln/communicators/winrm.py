"""WinRM communicator (pypsrp): HTTPS pinned to the per-run certificate, NTLM, PowerShell.

A Windows build VM gets its WinRM listener certificate from Key Vault at provisioning,
and Kiln made that certificate for this run alone. The connection is therefore pinned to
the certificate's SHA-256 fingerprint instead of trusting a CA and a host name: the
address is an IP known only later, and only the build VM holds the private key. Azure's
Windows images accept Negotiate (NTLM) and refuse Basic; NTLM carries a channel binding
to the TLS certificate, which pypsrp sends.

pypsrp is synchronous (requests); every call runs in a worker thread. A command is
started and then polled, each poll bounded by the WSMan operation timeout, so the thread
notices a deadline or a cancel between polls and terminates the remote process.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import logging
import secrets
import string
import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, SecretStr
from pypsrp.exceptions import AuthenticationError, WinRMError
from pypsrp.shell import CommandState, Process, SignalCode, WinRS
from pypsrp.wsman import WSMan
from requests.exceptions import RequestException, SSLError

from kiln.communicators import winrm_jobs as jobs
from kiln.communicators.ssh import (
    CommandResult,
    CommunicatorError,
    HostKeyMismatch,
    JobNotFound,
    JobStatus,
)

log = logging.getLogger(__name__)
WINRM_HTTPS_PORT = 5986
CERTIFICATE_DAYS = 30
# CreateProcess takes 32767 characters; the encoded script is ~2.7 times the script.
MAX_ENCODED_COMMAND = 30000
_SPECIALS = "!@#%^*-_=+"
POWERSHELL_FLAGS = ("-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass")
_PREAMBLE = "$ProgressPreference = 'SilentlyContinue'\n"
COMMAND_TIMEOUT = 600.0  # one PowerShell command, sysprep included
TRANSFER_TIMEOUT = 600.0  # one file's chunks
POLL_SECONDS = 10  # one WSMan Receive: how soon a deadline or a cancel is noticed
SHORT_TIMEOUT = 120.0  # a job poll, a file check: commands that return at once


class CertificateMismatch(HostKeyMismatch):
    """The VM's WinRM listener presented a certificate other than the per-run one."""


class UploadRefused(Exception):
    """The VM cannot take the file where the template says (not a connection problem)."""


class WinRmCredentials(BaseModel):
    """The per-run Windows login and WinRM listener certificate (kept in the run's Secret)."""

    password: SecretStr
    certificate_pem: str
    pfx: SecretStr  # base64 PKCS#12 with the private key
    pfx_password: SecretStr

    @property
    def fingerprint(self) -> str:
        certificate = x509.load_pem_x509_certificate(self.certificate_pem.encode())
        return certificate.fingerprint(hashes.SHA256()).hex()


def generate_password(length: int = 24) -> str:
    """Meets Windows' and Azure's complexity rules: every character class is present."""
    classes = (string.ascii_lowercase, string.ascii_uppercase, string.digits, _SPECIALS)
    chosen = [secrets.choice(group) for group in classes]
    alphabet = "".join(classes)
    chosen += [secrets.choice(alphabet) for _ in range(length - len(chosen))]
    secrets.SystemRandom().shuffle(chosen)
    return "".join(chosen)


def generate_winrm_credentials(computer_name: str) -> WinRmCredentials:
    """A fresh admin password and a self-signed server certificate for the listener."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, computer_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(computer_name)]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hashes.SHA256())
    )
    pfx_password = secrets.token_urlsafe(24)
    # 3DES/SHA1 PKCS#12 imports on every Windows Server version Azure offers.
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(50000)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())
        .build(pfx_password.encode())
    )
    pfx = pkcs12.serialize_key_and_certificates(
        computer_name.encode(), key, certificate, None, encryption
    )
    return WinRmCredentials(
        password=SecretStr(generate_password()),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        pfx=SecretStr(base64.b64encode(pfx).decode()),
        pfx_password=SecretStr(pfx_password),
    )


def key_vault_certificate(credentials: WinRmCredentials) -> str:
    """The secret value Azure's VM agent installs: base64 of the JSON it documents."""
    document = json.dumps(
        {
            "data": credentials.pfx.get_secret_value(),
            "dataType": "pfx",
            "password": credentials.pfx_password.get_secret_value(),
        }
    )
    return base64.b64encode(document.encode()).decode()


def encoded_command(script: str) -> list[str]:
    """powershell.exe arguments that run the script without quoting problems."""
    encoded = base64.b64encode((_PREAMBLE + script).encode("utf-16-le")).decode()
    if len(encoded) > MAX_ENCODED_COMMAND:
        raise CommunicatorError(
            f"the PowerShell script is too long for one command ({len(script)} characters)"
        )
    return [
        "-NoProfile",
        "-NonInteractive",
        "-ExecutionPolicy",
        "Bypass",
        "-EncodedCommand",
        encoded,
    ]


class WinRmCommunicator:
    """One build VM's WinRM endpoint; each command runs in its own WinRS shell."""

    def __init__(self) -> None:
        self._wsman: WSMan | None = None
        self._host = ""
        self._user = ""

    async def connect(
        self,
        host: str,
        port: int,
        user: str,
        credentials: WinRmCredentials,
        timeout: float = 20.0,
    ) -> None:
        """Logs in and runs a trivial command, so a connected communicator is usable."""
        self._host = f"{host}:{port}"
        self._user = user
        self._wsman = await asyncio.to_thread(self._open, host, port, user, credentials, timeout)
        await self.run_powershell("$env:COMPUTERNAME")

    @staticmethod
    def _open(
        host: str, port: int, user: str, credentials: WinRmCredentials, timeout: float
    ) -> WSMan:
        wsman = WSMan(
            host,
            port=port,
            username=user,
            password=credentials.password.get_secret_value(),
            ssl=True,
            auth="ntlm",
            cert_validation=False,  # replaced by the fingerprint pin below
            connection_timeout=int(timeout),
            read_timeout=POLL_SECONDS + int(timeout),
            operation_timeout=POLL_SECONDS,
            reconnection_retries=0,
        )
        # pypsrp builds its requests session lazily; build it now to pin the certificate
        # on its HTTPS adapter (urllib3 checks assert_fingerprint on every handshake).
        session = wsman.transport._build_session()
        adapter: Any = session.get_adapter(f"https://{host}")
        adapter.poolmanager.connection_pool_kw["assert_fingerprint"] = credentials.fingerprint
        wsman.transport.session = session
        return wsman

    async def run_powershell(self, script: str, timeout: float = COMMAND_TIMEOUT) -> CommandResult:
        """Runs the script to its end, at most timeout seconds; a cancelled call stops the
        remote process. Output is decoded as UTF-8 (the console's OEM page on older
        Windows may differ; scripts that print non-ASCII should set it)."""
        (result,) = await self._run_scripts([script], timeout)
        return result

    async def _run_scripts(self, scripts: list[str], timeout: float) -> list[CommandResult]:
        """The scripts one after another in one WinRS shell; stops at the first that fails."""
        if self._wsman is None:
            raise CommunicatorError("not connected")
        stop = threading.Event()
        deadline = time.monotonic() + timeout
        commands = [encoded_command(script) for script in scripts]
        call = asyncio.to_thread(self._run, self._wsman, commands, deadline, stop)
        try:
            return await call
        except asyncio.CancelledError:
            stop.set()  # the worker thread terminates the process at its next poll
            raise

    def _run(
        self, wsman: WSMan, commands: list[list[str]], deadline: float, stop: threading.Event
    ) -> list[CommandResult]:
        results: list[CommandResult] = []
        try:
            with WinRS(wsman) as shell:
                for arguments in commands:
                    results.append(self._process(shell, arguments, deadline, stop))
                    if results[-1].exit_status != 0:
                        break
        except SSLError as error:
            if "fingerprint" in str(error).lower():
                raise CertificateMismatch(
                    f"{self._host} presented a WinRM certificate other than this run's; "
                    "refusing to send the password"
                ) from None
            raise CommunicatorError(f"TLS to {self._host}: {error}") from None
        except AuthenticationError as error:
            raise CommunicatorError(f"WinRM login to {self._host} refused: {error}") from None
        except (WinRMError, RequestException) as error:
            raise CommunicatorError(f"WinRM to {self._host}: {error}") from None
        return results

    def _process(
        self, shell: WinRS, arguments: list[str], deadline: float, stop: threading.Event
    ) -> CommandResult:
        process = Process(shell, "powershell.exe", arguments)
        process.begin_invoke()
        while process.state != CommandState.DONE:
            if stop.is_set() or time.monotonic() > deadline:
                process.signal(SignalCode.TERMINATE)
                raise CommunicatorError(
                    f"a PowerShell command on {self._host} was stopped: "
                    + ("canceled" if stop.is_set() else "it ran past its deadline")
                )
            process.poll_invoke()
        process.signal(SignalCode.TERMINATE)
        return CommandResult(
            exit_status=process.rc if process.rc is not None else -1,
            stdout=(process.stdout or b"").decode("utf-8", "replace"),
            stderr=(process.stderr or b"").decode("utf-8", "replace"),
        )

    async def _check(self, script: str, what: str, timeout: float = SHORT_TIMEOUT) -> str:
        result = await self.run_powershell(script, timeout)
        if result.exit_status != 0:
            raise CommunicatorError(f"{what} on {self._host}: {result.stderr.strip()[:500]}")
        return result.stdout

    async def boot_time(self) -> str:
        """When Windows last booted (UTC): a restart is proven by a different value."""
        return (await self._check(jobs.BOOT_TIME, "reading the boot time")).strip()

    async def upload(self, data: bytes, destination: str) -> None:
        """Copy bytes to destination (its directory must exist) in chunks under a temporary
        name, check the SHA-256 on the VM, then rename."""
        try:
            path = jobs.windows_path(destination)
        except ValueError as error:
            raise UploadRefused(str(error)) from None
        parent = jobs.parent_of(path)
        exists = await self._check(jobs.directory_exists_command(parent), "checking " + parent)
        if exists.strip() != "True":
            raise UploadRefused(
                f"the directory {parent} does not exist on the build VM; create it in an "
                "earlier PowerShell step"
            )
        results = await self._run_scripts(jobs.upload_commands(data, path), TRANSFER_TIMEOUT)
        if results[-1].exit_status != 0:
            raise CommunicatorError(f"writing {path}: {results[-1].stderr.strip()[:500]}")
        digest = (await self._check(jobs.hash_command(path), "hashing " + path)).strip()
        if digest.lower() != hashlib.sha256(data).hexdigest():
            raise CommunicatorError(f"{path} arrived with SHA-256 {digest.lower()!r}; retrying")
        await self._check(jobs.rename_command(path), "renaming " + path)

    async def _facts(self, job_id: str, offset: int, chunk: int) -> jobs.JobFacts:
        # a job that does not exist has no log to open: that fails, the facts are printed
        result = await self.run_powershell(jobs.poll_command(job_id, offset, chunk), SHORT_TIMEOUT)
        try:
            return jobs.parse_facts(result.stdout)
        except ValueError as error:
            raise CommunicatorError(str(error)) from None

    async def start_job(
        self, job_id: str, script: str, elevated: bool = False, system: bool = False
    ) -> None:
        """Start script as a scheduled task (as the build user, elevated or not, or as
        SYSTEM); a job that was started already is left alone."""
        facts = await self._facts(job_id, 0, 0)
        if not facts.exists:
            stage, final = jobs.stage_dir(job_id), jobs.job_dir(job_id)
            await self._check(jobs.stage_command(job_id), "staging " + job_id)
            for name, text in (
                ("user.ps1", script),
                ("script.ps1", jobs.wrapper(final)),
                ("run.ps1", jobs.runner(final)),
            ):
                await self.upload(jobs.UTF8_BOM + text.encode(), f"{stage}\\{name}")
            await self._check(jobs.publish_command(job_id), "publishing " + job_id)
            facts = jobs.JobFacts(exists=True)
        if facts.needs_launch:
            command = jobs.launch_command(job_id, self._user, elevated, system)
            await self._check(command, "starting " + job_id)
            log.info("job %s started (elevated=%s, system=%s)", job_id, elevated, system)

    async def poll_job(self, job_id: str, log_offset: int = 0) -> JobStatus:
        """State of a job and its log from log_offset (MAX_LOG_CHUNK at most: a job with
        more to read reads as running, its end comes with its last chunk)."""
        facts = await self._facts(job_id, log_offset, jobs.MAX_LOG_CHUNK)
        if not facts.exists:
            raise JobNotFound(f"job {job_id} was never started on this VM")
        more = len(facts.log) >= jobs.MAX_LOG_CHUNK
        running = facts.running or more
        return JobStatus(
            running=running,
            exit_code=None if running else facts.exit_code,
            new_log=facts.log,
            next_offset=log_offset + len(facts.log),
            more=more,
        )

    async def close(self) -> None:
        if self._wsman is not None:
            wsman, self._wsman = self._wsman, None
            await asyncio.to_thread(wsman.close)
