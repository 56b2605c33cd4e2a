"""A fake Windows guest: the WinRM (WS-Management over HTTPS) endpoint of a Windows VM.

No Windows runs here, so a Windows VM's guest is a real WinRM listener that speaks the
real protocols, enough for pypsrp's WSMan + WinRS + Process (and Client.execute_cmd):

- `https://<vm.address>:5986/wsman` (public IP, else private), TLS with the certificate
  and key of the VM's Https WinRM listener, i.e. the PFX the VM got from Key Vault.
- Authentication as on an Azure Windows VM: Basic is refused (401); Negotiate (SPNEGO) or
  raw NTLM in `Authorization: Negotiate <token>`, connection-based (keep-alive), checked
  by pyspnego's acceptor against the VM's adminUsername/adminPassword; the NTLM response
  must carry channel binding `tls-server-end-point:<hash of the server certificate>`
  (RFC 5929), else 401. Over HTTPS messages are plain SOAP (no wrapping).
- WinRS (MS-WSMV): Create shell, Command, Receive (a long poll up to OperationTimeout,
  then the `w:TimedOut` fault 2150858793 that clients answer by receiving again), Signal
  (terminate, ctrl_c), Delete. Other actions answer `w:ActionNotSupported`.

Commands: `powershell.exe [-NoProfile] [-NonInteractive] [-ExecutionPolicy X]
-EncodedCommand <base64 UTF-16-LE>` (or `-Command ...`), `cmd.exe /c <command>` and plain
commands. The script goes to the VM's FakeWindowsGuest (`backend.guest(vm_id)`,
fakes/arm/windows_os.py: its file system, scheduled tasks, restarts and Windows Update
agent), which records it in `guest.scripts` and interprets it statement by statement.
`guest.handler = fn(script) -> (stdout, stderr, exit_code) | None` takes over a script
(None: interpret it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import shlex
import ssl
import struct
import tempfile
import threading
import time
import uuid
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from .backend import VmBackend
from .errors import ArmError
from .models import VmInfo
from .windows_os import IMAGE_STATE_COMPLETE as IMAGE_STATE_COMPLETE
from .windows_os import IMAGE_STATE_GENERALIZED as IMAGE_STATE_GENERALIZED
from .windows_os import FakeWindowsGuest, Output

if TYPE_CHECKING:
    from .emulator import ArmEmulator

log = logging.getLogger("fakes.arm.winrm")

WINRM_HTTPS_PORT = 5986
CTRL_C_EXIT = -1073741510  # STATUS_CONTROL_C_EXIT
TIMED_OUT = 2150858793  # ERROR_WSMAN_OPERATION_TIMEDOUT
SHELL_NOT_FOUND = 2150858843
SOAP_CONTENT_TYPE = "application/soap+xml;charset=UTF-8"

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsa": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "wsman": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "wst": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
    "f": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
    "xml": "http://www.w3.org/XML/1998/namespace",
}
SHELL_URI = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
ACTION = {
    "create": "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create",
    "delete": "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete",
    "command": f"{SHELL_URI}/Command",
    "receive": f"{SHELL_URI}/Receive",
    "signal": f"{SHELL_URI}/Signal",
    "send": f"{SHELL_URI}/Send",
}
RESPONSE = {
    "create": "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
    "delete": "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
    "command": f"{SHELL_URI}/CommandResponse",
    "receive": f"{SHELL_URI}/ReceiveResponse",
    "signal": f"{SHELL_URI}/SignalResponse",
    "send": f"{SHELL_URI}/SendResponse",
}
STATE_DONE = f"{SHELL_URI}/CommandState/Done"
STATE_RUNNING = f"{SHELL_URI}/CommandState/Running"
ANONYMOUS = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"

for _prefix, _uri in NS.items():
    if _prefix != "xml":
        ET.register_namespace(_prefix, _uri)


_PS_VALUE_FLAGS = {
    "-executionpolicy",
    "-ep",
    "-inputformat",
    "-outputformat",
    "-windowstyle",
    "-configurationname",
    "-workingdirectory",
}


def script_of(command_line: str) -> str:
    """The script a WinRS command line runs: powershell's -EncodedCommand/-Command, cmd /c."""
    try:
        tokens = shlex.split(command_line, posix=False)
    except ValueError:
        tokens = command_line.split()
    if not tokens:
        return ""
    exe = Path(tokens[0].strip('"').replace("\\", "/")).name.lower().removesuffix(".exe")
    rest = tokens[1:]
    if exe == "cmd":
        for i, tok in enumerate(rest):
            if tok.lower() in ("/c", "/k"):
                return script_of(" ".join(rest[i + 1 :]))
        return ""
    if exe not in ("powershell", "pwsh"):
        return command_line.strip()
    i = 0
    while i < len(rest):
        tok = rest[i].lower()
        if tok in ("-encodedcommand", "-enc", "-e", "-ec"):
            if i + 1 < len(rest):
                return base64.b64decode(rest[i + 1].strip('"')).decode("utf-16-le")
            return ""
        if tok in ("-command", "-c"):
            text = " ".join(rest[i + 1 :]).strip()
            if len(text) >= 2 and text[0] == text[-1] == '"':
                text = text[1:-1]
            return text
        if tok in _PS_VALUE_FLAGS:
            i += 2
            continue
        if tok.startswith("-"):
            i += 1
            continue
        return " ".join(rest[i:])  # powershell "script text" (implicit -Command)
    return ""


# --- WinRS shells and commands ------------------------------------------------------------


@dataclass(eq=False)
class Command:
    id: str
    command_line: str
    output: Output
    task: asyncio.Task[None] | None = None
    exit_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(eq=False)
class Shell:
    id: str
    resource_uri: str
    owner: str
    commands: dict[str, Command] = field(default_factory=dict)


class WsmanFault(Exception):
    """A WS-Management SOAP fault."""

    def __init__(self, subcode: str, code: int, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.subcode = subcode
        self.code = code
        self.message = message
        self.status = status


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    prefix, name = tag.split(":")
    child = ET.SubElement(parent, f"{{{NS[prefix]}}}{name}", attrib)
    if text is not None:
        child.text = text
    return child


def _q(tag: str) -> str:
    prefix, name = tag.split(":")
    return f"{{{NS[prefix]}}}{name}"


def _timeout_seconds(value: str | None, default: float = 60.0) -> float:
    m = re.match(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?$", (value or "").strip())
    if not m or not any(m.groups()):
        return default
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


# --- authentication -----------------------------------------------------------------------

_ENV_LOCK = threading.Lock()


def certificate_hash(cert_der: bytes) -> bytes:
    """RFC 5929 tls-server-end-point: the certificate's signature hash (SHA-256 for MD5/SHA-1)."""
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # an unsupported algorithm: SHA-256, as the RFC says for MD5/SHA-1
        algorithm = None
    if algorithm is None or algorithm.name in ("md5", "sha1"):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def write_ntlm_store(path: Path, username: str, password: str, computer_name: str) -> None:
    """An smbpasswd-style NTLM_USER_FILE for one VM (NT hash, so any password character works)."""
    from spnego._ntlm_raw.crypto import ntowfv1

    nt = ntowfv1(password).hex().upper()
    lm = "0" * 32
    names = [username, f".\\{username}", f"{computer_name}\\{username}"]
    lines = [f"{n}:1000:{lm}:{nt}:[U]:LCT-00000000" for n in names]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def ntlm_message(token: bytes) -> bytes | None:
    """The NTLM message in a raw NTLM or SPNEGO token."""
    if token.startswith(b"NTLMSSP\x00"):
        return token
    try:
        from spnego._spnego import NegTokenInit, NegTokenResp, unpack_token

        parsed = unpack_token(token)
    except Exception:
        return None
    if isinstance(parsed, NegTokenInit):
        return parsed.mech_token
    if isinstance(parsed, NegTokenResp):
        return parsed.response_token
    return None


def channel_bindings_match(token: bytes, expected: bytes) -> bool:
    """Strict CBT: the NTLMv2 response must carry the MD5 of this TLS channel's bindings.

    pyspnego's acceptor lets an all-zero (absent) binding through; Kiln's client always
    sends one, so the guest insists, like a Windows host with CbtHardeningLevel Strict.
    """
    from spnego._ntlm_raw.messages import (
        Authenticate,
        AvId,
        MessageType,
        NTClientChallengeV2,
    )

    msg = ntlm_message(token)
    if msg is None or len(msg) < 12:
        return False
    if struct.unpack("<I", msg[8:12])[0] != MessageType.authenticate:
        return True  # not the Authenticate message: nothing bound yet
    try:
        auth = Authenticate.unpack(msg)
        response = auth.nt_challenge_response or b""
        if len(response) <= 24:
            return False  # NTLMv1 carries no channel binding
        av_pairs = NTClientChallengeV2.unpack(response[16:]).av_pairs
    except Exception:
        return False
    from spnego.channel_bindings import GssChannelBindings

    packed = GssChannelBindings(application_data=expected).pack()
    return av_pairs.get(AvId.channel_bindings) == hashlib.md5(packed).digest()


@dataclass(eq=False)
class _Conn:
    """Authentication state of one TLS connection (NTLM is connection-based)."""

    context: Any = None
    scheme: str = "Negotiate"
    user: str | None = None


# --- the WinRM server ---------------------------------------------------------------------


class WinRmServer:
    """One Windows VM's WinRM HTTPS listener."""

    def __init__(
        self,
        guest: FakeWindowsGuest,
        address: str,
        cert_pem: str,
        key_pem: str,
        work_dir: Path,
        *,
        port: int = WINRM_HTTPS_PORT,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self.guest = guest
        self.address = address
        self.port = port
        self.work_dir = work_dir
        self.on_shutdown = on_shutdown
        self.shells: dict[str, Shell] = {}
        self._conns: weakref.WeakKeyDictionary[Any, _Conn] = weakref.WeakKeyDictionary()
        self._runner: web.AppRunner | None = None
        work_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = work_dir / "winrm-cert.pem"
        self.key_path = work_dir / "winrm-key.pem"
        self.cert_path.write_text(cert_pem)
        self.key_path.write_text(key_pem)
        self.key_path.chmod(0o600)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.bindings = b"tls-server-end-point:" + certificate_hash(cert_der)
        self.ntlm_store = work_dir / "ntlm-users"
        vm = guest.vm
        write_ntlm_store(
            self.ntlm_store, vm.admin_username, vm.admin_password or "", vm.computer_name
        )

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}/wsman"

    async def start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/wsman", self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address, self.port, ssl_context=ctx)
        await site.start()
        log.info("WinRM guest %s listening on %s", self.guest.computer_name, self.url)

    async def stop(self) -> None:
        for shell in list(self.shells.values()):
            self._close_shell(shell)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    # auth ---------------------------------------------------------------------------------

    def _accept(self, conn: _Conn, token: bytes) -> bytes | None:
        """One step of the acceptor, with this VM's credential store (env var, under a lock)."""
        import spnego

        with _ENV_LOCK:
            old = os.environ.get("NTLM_USER_FILE")
            os.environ["NTLM_USER_FILE"] = str(self.ntlm_store)
            try:
                if conn.context is None:
                    protocol = "ntlm" if token.startswith(b"NTLMSSP\x00") else "negotiate"
                    conn.context = spnego.server(
                        hostname=self.guest.computer_name,
                        service="WSMAN",
                        channel_bindings=spnego.channel_bindings.GssChannelBindings(
                            application_data=self.bindings
                        ),
                        protocol=protocol,
                    )
                return conn.context.step(token)
            finally:
                if old is None:
                    os.environ.pop("NTLM_USER_FILE", None)
                else:
                    os.environ["NTLM_USER_FILE"] = old

    def _challenge(self, token: bytes | None = None, scheme: str = "Negotiate") -> web.Response:
        value = scheme if token is None else f"{scheme} {base64.b64encode(token).decode()}"
        return web.Response(status=401, headers={"WWW-Authenticate": value})

    async def _authenticate(
        self, request: web.Request
    ) -> tuple[_Conn, web.Response | None, bytes | None]:
        """(connection state, a 401 to send instead of an answer, the final auth token)."""
        transport = request.transport
        conn = self._conns.get(transport) if transport is not None else None
        if conn is None:
            conn = _Conn()
            if transport is not None:
                self._conns[transport] = conn
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if conn.user is not None and not header:
            return conn, None, None
        if scheme.lower() not in ("negotiate", "ntlm") or not value.strip():
            conn.context, conn.user = None, None
            return conn, self._challenge(), None
        conn.scheme = "Negotiate" if scheme.lower() == "negotiate" else "NTLM"
        try:
            token = base64.b64decode(value.strip())
        except ValueError:
            conn.context = None
            return conn, self._challenge(), None
        msg = ntlm_message(token)
        if msg is not None and msg.startswith(b"NTLMSSP\x00") and msg[8:9] == b"\x01":
            conn.context, conn.user = None, None  # a new handshake on this connection
        if not channel_bindings_match(token, self.bindings):
            log.info("WinRM %s: channel binding missing or wrong", self.guest.computer_name)
            conn.context, conn.user = None, None
            return conn, self._challenge(scheme=conn.scheme), None
        try:
            out = self._accept(conn, token)
        except Exception as exc:  # spnego errors: wrong password, bad token, bindings
            log.info("WinRM %s: authentication failed: %s", self.guest.computer_name, exc)
            conn.context, conn.user = None, None
            return conn, self._challenge(scheme=conn.scheme), None
        if not conn.context.complete:
            return conn, self._challenge(out, conn.scheme), None
        conn.user = conn.context.client_principal or self.guest.vm.admin_username
        conn.context = None
        return conn, None, out

    # SOAP ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        conn, refusal, final_token = await self._authenticate(request)
        if refusal is not None:
            return refusal
        extra: dict[str, str] = {}
        if final_token:  # SPNEGO's last word (accept-completed, mechListMIC)
            extra["WWW-Authenticate"] = f"{conn.scheme} {base64.b64encode(final_token).decode()}"
        if request.method != "POST":
            return web.Response(status=405, headers=extra)
        if not body:
            return web.Response(status=200, headers=extra)  # an auth-only request
        try:
            envelope = ET.fromstring(body)
        except ET.ParseError:
            return web.Response(status=400, headers=extra)
        header = envelope.find("s:Header", NS)
        action = (header.findtext("wsa:Action", "", NS) if header is not None else "").strip()
        message_id = (
            header.findtext("wsa:MessageID", "", NS) if header is not None else ""
        ).strip()
        try:
            kind = next((k for k, v in ACTION.items() if v == action), None)
            if kind is None:
                raise WsmanFault(
                    "w:ActionNotSupported",
                    2150858776,
                    f"The action {action} is not supported by the service.",
                )
            payload = await getattr(self, f"_{kind}")(envelope, header, conn)
            reply = self._envelope(RESPONSE[kind], message_id, payload)
            status = 200
        except WsmanFault as fault:
            reply = self._fault(message_id, fault)
            status = fault.status
        return web.Response(
            status=status,
            body=ET.tostring(reply, encoding="utf-8", xml_declaration=False),
            headers={"Content-Type": SOAP_CONTENT_TYPE, **extra},
        )

    def _envelope(self, action: str, relates_to: str, body: list[ET.Element]) -> ET.Element:
        env = ET.Element(_q("s:Envelope"))
        header = _el(env, "s:Header")
        _el(header, "wsa:Action", action)
        _el(header, "wsa:MessageID", f"uuid:{str(uuid.uuid4()).upper()}")
        _el(header, "wsa:To", ANONYMOUS)
        _el(header, "wsa:RelatesTo", relates_to)
        soap_body = _el(env, "s:Body")
        for child in body:
            soap_body.append(child)
        return env

    def _fault(self, relates_to: str, fault: WsmanFault) -> ET.Element:
        detail_el = ET.Element(_q("s:Fault"))
        code = _el(detail_el, "s:Code")
        _el(code, "s:Value", "s:Receiver" if fault.status >= 500 else "s:Sender")
        _el(_el(code, "s:Subcode"), "s:Value", fault.subcode)
        reason = _el(detail_el, "s:Reason")
        _el(reason, "s:Text", fault.message, **{_q("xml:lang"): "en-US"})
        detail = _el(detail_el, "s:Detail")
        wsman_fault = _el(
            detail, "f:WSManFault", Code=str(fault.code), Machine=self.guest.computer_name
        )
        _el(wsman_fault, "f:Message", fault.message)
        env = self._envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, [])
        env.find("s:Body", NS).append(detail_el)  # type: ignore[union-attr]
        return env

    def _shell(self, header: ET.Element) -> Shell:
        shell_id = ""
        for selector in header.findall("wsman:SelectorSet/wsman:Selector", NS):
            if selector.get("Name") == "ShellId":
                shell_id = (selector.text or "").strip()
        shell = self.shells.get(shell_id.upper())
        if shell is None:
            raise WsmanFault(
                "w:InvalidSelectors",
                SHELL_NOT_FOUND,
                f"The request for the Windows Remote Shell with ShellId {shell_id} failed "
                "because the shell was not found on the server. Possible causes are: the "
                "specified ShellId is incorrect or the shell no longer exists on the server.",
                status=400,
            )
        return shell

    async def _create(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        shell_el = env.find("s:Body/rsp:Shell", NS)
        if shell_el is None:
            raise WsmanFault("w:SchemaValidationError", 2150858817, "The Shell body is missing.")
        shell_id = (shell_el.get("ShellId") or str(uuid.uuid4())).upper()
        resource_uri = (header.findtext("wsman:ResourceURI", "", NS) or "").strip()
        shell = Shell(shell_id, resource_uri, conn.user or "")
        self.shells[shell_id] = shell
        created = ET.Element(_q("wst:ResourceCreated"))
        _el(created, "wsa:Address", self.url)
        params = _el(created, "wsa:ReferenceParameters")
        _el(params, "wsman:ResourceURI", resource_uri)
        _el(_el(params, "wsman:SelectorSet"), "wsman:Selector", shell_id, Name="ShellId")
        info = ET.Element(_q("rsp:Shell"))
        for tag, value in (
            ("ShellId", shell_id),
            ("ResourceUri", resource_uri),
            ("Owner", shell.owner),
            ("ClientIP", "127.0.0.1"),
            ("IdleTimeOut", "PT7200.000S"),
            ("InputStreams", shell_el.findtext("rsp:InputStreams", "stdin", NS)),
            ("OutputStreams", shell_el.findtext("rsp:OutputStreams", "stdout stderr", NS)),
            ("ShellRunTime", "P0DT0H0M0S"),
            ("ShellInactivity", "P0DT0H0M0S"),
        ):
            _el(info, f"rsp:{tag}", value)
        return [created, info]

    async def _delete(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        shell = self._shell(header)
        self._close_shell(shell)
        return []

    def _close_shell(self, shell: Shell) -> None:
        for command in shell.commands.values():
            if command.task is not None and not command.task.done():
                command.task.cancel()
        self.shells.pop(shell.id, None)

    async def _command(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        shell = self._shell(header)
        line = env.find("s:Body/rsp:CommandLine", NS)
        if line is None:
            raise WsmanFault("w:SchemaValidationError", 2150858817, "CommandLine is missing.")
        parts = [(line.findtext("rsp:Command", "", NS) or "").strip()]
        parts += [(a.text or "") for a in line.findall("rsp:Arguments", NS)]
        command_line = " ".join(p for p in parts if p)
        command = Command(
            id=(line.get("CommandId") or str(uuid.uuid4())).upper(),
            command_line=command_line,
            output=Output(),
        )
        shell.commands[command.id] = command
        command.task = asyncio.get_running_loop().create_task(self._run(command))
        response = ET.Element(_q("rsp:CommandResponse"))
        _el(response, "rsp:CommandId", command.id)
        return [response]

    async def _run(self, command: Command) -> None:
        try:
            script = script_of(command.command_line)
            command.exit_code = await self.guest.run(script, command.output)
        except asyncio.CancelledError:
            if command.exit_code is None:
                command.exit_code = CTRL_C_EXIT
        except Exception as exc:  # a broken script or handler: the process fails
            log.exception("WinRM guest command failed")
            command.output.line(str(exc), "stderr")
            command.exit_code = 1
        finally:
            command.done.set()
            command.output.changed.set()
            if self.guest.shutdown_requested and self.on_shutdown is not None:
                self.on_shutdown()

    async def _receive(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        shell = self._shell(header)
        desired = env.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
        command_id = ((desired.get("CommandId") if desired is not None else None) or "").upper()
        command = shell.commands.get(command_id)
        if command is None:
            raise WsmanFault(
                "w:InvalidParameter", 2150858770, f"The command {command_id} was not found."
            )
        timeout = _timeout_seconds(header.findtext("wsman:OperationTimeout", None, NS))
        if not command.output.chunks and not command.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(command.output.changed.wait(), timeout)
        chunks = command.output.take()
        finished = command.done.is_set()
        if not chunks and not finished:
            raise WsmanFault(
                "w:TimedOut",
                TIMED_OUT,
                "The WS-Management service cannot complete the operation within the time "
                "specified in OperationTimeout.",
            )
        response = ET.Element(_q("rsp:ReceiveResponse"))
        for stream, data in chunks:
            _el(
                response,
                "rsp:Stream",
                base64.b64encode(data).decode(),
                Name=stream,
                CommandId=command.id,
            )
        if finished:
            for stream in ("stdout", "stderr"):
                _el(response, "rsp:Stream", None, Name=stream, CommandId=command.id, End="true")
            state = _el(response, "rsp:CommandState", None, CommandId=command.id, State=STATE_DONE)
            _el(state, "rsp:ExitCode", str(command.exit_code or 0))
        else:
            _el(response, "rsp:CommandState", None, CommandId=command.id, State=STATE_RUNNING)
        return [response]

    async def _signal(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        shell = self._shell(header)
        signal = env.find("s:Body/rsp:Signal", NS)
        command_id = ((signal.get("CommandId") if signal is not None else None) or "").upper()
        code = (signal.findtext("rsp:Code", "", NS) if signal is not None else "").lower()
        command = shell.commands.get(command_id)
        if command is not None:
            if command.task is not None and not command.task.done():
                command.task.cancel()
            if code.endswith("terminate"):
                shell.commands.pop(command_id, None)
        return [ET.Element(_q("rsp:SignalResponse"))]

    async def _send(self, env: ET.Element, header: ET.Element, conn: _Conn) -> list[ET.Element]:
        self._shell(header)
        return [ET.Element(_q("rsp:SendResponse"))]  # stdin is not read by the fake guest


# --- the backend --------------------------------------------------------------------------


def fixed_vhd(path: Path, size: int = 8 * 1024 * 1024) -> Path:
    """A sparse fixed VHD of `size` bytes of zeros plus its 512-byte footer."""
    sectors = size // 512
    if sectors > 65535 * 16 * 255:
        sectors = 65535 * 16 * 255
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = sectors // spt
    else:
        spt = 17
        cyl_heads = sectors // spt
        heads = max((cyl_heads + 1023) // 1024, 4)
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = sectors // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = sectors // spt
    cylinders = cyl_heads // heads
    timestamp = int(time.time()) - 946684800
    footer = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB",
            b"conectix",
            2,
            0x00010000,
            0xFFFFFFFFFFFFFFFF,
            timestamp,
            b"kiln",
            0x00010000,
            b"Wi2k",
            size,
            size,
            cylinders,
            heads,
            spt,
            2,
            0,
            uuid.uuid4().bytes,
            0,
        )
    )
    footer += bytes(512 - len(footer))
    checksum = ~sum(footer) & 0xFFFFFFFF
    struct.pack_into(">I", footer, 64, checksum)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.truncate(size)
        fh.seek(size)
        fh.write(footer)
    tmp.replace(path)
    return path


def _key(resource_id: str) -> str:
    return resource_id.rstrip("/").lower()


class WindowsGuestBackend:
    """A VmBackend whose Windows VMs are WinRM guests; everything else goes to `inner`.

    Windows VMs: create/start serve WinRM on `vm.address`:5986 with the VM's Https listener
    certificate, power_off/deallocate/delete stop it, generalize is accepted. Disk hooks
    for Windows disks and images only record (`disk_calls`), and `disk_vhd` hands out a
    small fixed VHD so a VHD export of a Windows build can be copied. Linux VMs and their
    disks are the inner backend's.
    """

    def __init__(
        self,
        inner: VmBackend,
        work_dir: Path | None = None,
        *,
        down_seconds: float = 0.5,
        boot_seconds: float = 2.0,
    ) -> None:
        self.inner = inner
        self.down_seconds = down_seconds  # a restart: how long the old boot still answers
        self.boot_seconds = boot_seconds  # then how long until WinRM answers again
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="winrm-guests-"))
        self.guests: dict[str, FakeWindowsGuest] = {}
        self.servers: dict[str, WinRmServer] = {}
        self.windows_ids: set[str] = set()  # VMs, OS disks, images and versions of Windows
        self.disk_calls: list[tuple[str, ...]] = []
        self.emulator: ArmEmulator | None = None
        self._shutdowns: set[asyncio.Task[None]] = set()  # keeps the tasks referenced
        self._powered_off: set[str] = set()  # stopped through ARM: a restart ends down

    def attach(self, emulator: ArmEmulator) -> None:
        """Called by the emulator at start: guest shutdowns are reported back to it."""
        self.emulator = emulator
        attach = getattr(self.inner, "attach", None)
        if callable(attach):
            attach(emulator)

    async def detach(self) -> None:
        """Called by the emulator when it stops: the listeners live in its event loop."""
        await self.shutdown_all()
        detach = getattr(self.inner, "detach", None)
        if callable(detach):
            await detach()

    def guest(self, vm_id: str) -> FakeWindowsGuest:
        """The guest OS of a Windows VM (KeyError if none was created)."""
        return self.guests[_key(vm_id)]

    def server(self, vm_id: str) -> WinRmServer | None:
        """The running WinRM listener of a Windows VM, if any."""
        return self.servers.get(_key(vm_id))

    # VmBackend ----------------------------------------------------------------------------

    async def create(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.create(vm)
            return
        self._powered_off.discard(_key(vm.id))
        self.windows_ids.add(_key(vm.id))
        if vm.os_disk_id:
            self.windows_ids.add(_key(vm.os_disk_id))
        self.guests[_key(vm.id)] = self._new_guest(vm)
        await self._serve(vm)

    async def start(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.start(vm)
            return
        self._powered_off.discard(_key(vm.id))
        guest = self.guests.get(_key(vm.id)) or self._new_guest(vm)
        self.guests[_key(vm.id)] = guest
        guest.vm = vm
        guest.shutdown_requested = False
        await self._serve(vm)

    async def power_off(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.power_off(vm)
            return
        self._powered_off.add(_key(vm.id))
        await self._stop(vm.id)

    async def deallocate(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.deallocate(vm)
            return
        self._powered_off.add(_key(vm.id))
        await self._stop(vm.id)

    async def generalize(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.generalize(vm)

    async def delete(self, vm: VmInfo) -> None:
        if vm.os_type != "Windows":
            await self.inner.delete(vm)
            return
        self._powered_off.add(_key(vm.id))
        await self._stop(vm.id)

    async def _serve(self, vm: VmInfo) -> None:
        await self._stop(vm.id)
        listener = next(
            (x for x in vm.winrm_listeners if x.protocol == "Https" and x.certificate_pem), None
        )
        if listener is None or not vm.address:
            log.info("Windows VM %s has no Https WinRM listener: no WinRM served", vm.name)
            return
        if not vm.admin_password:
            raise ArmError(400, "InvalidParameter", "A Windows VM needs an admin password.")
        key = _key(vm.id)
        server = WinRmServer(
            self.guests[key],
            vm.address,
            listener.certificate_pem or "",
            listener.private_key_pem or "",
            self.work_dir / hashlib.sha256(key.encode()).hexdigest()[:16],
            on_shutdown=lambda: self._guest_shutdown(vm.id),
        )
        try:
            await server.start()
        except OSError as exc:
            raise ArmError(
                500,
                "InternalExecutionError",
                f"The host could not serve WinRM on {vm.address}:{WINRM_HTTPS_PORT}: {exc}",
            ) from None
        self.servers[key] = server

    async def _stop(self, vm_id: str) -> None:
        server = self.servers.pop(_key(vm_id), None)
        if server is not None:
            await server.stop()

    def _new_guest(self, vm: VmInfo) -> FakeWindowsGuest:
        guest = FakeWindowsGuest(vm)
        guest.on_restart = lambda: self._later(self._restart(vm.id))
        return guest

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdowns.discard)

    async def _restart(self, vm_id: str) -> None:
        """shutdown /r: the endpoint drops, tasks die, and WinRM answers again later."""
        await asyncio.sleep(self.down_seconds)
        guest = self.guest(vm_id)
        await self._stop(vm_id)
        guest.went_down()
        await asyncio.sleep(self.boot_seconds)
        guest.booted()
        if _key(vm_id) not in self._powered_off:
            await self._serve(guest.vm)

    def _guest_shutdown(self, vm_id: str) -> None:
        """Sysprep /shutdown: the listener goes away shortly after the command ends."""

        async def later() -> None:
            await asyncio.sleep(0.5)  # let the client read the command's last output
            await self._stop(vm_id)
            if self.emulator is not None:
                self.emulator.guest_powered_off(vm_id)

        self._later(later())

    async def shutdown_all(self) -> None:
        """Stop every WinRM listener (test teardown)."""
        for vm_id in list(self.servers):
            await self._stop(vm_id)

    # disk hooks ---------------------------------------------------------------------------

    def _windows(self, resource_id: str) -> bool:
        return _key(resource_id) in self.windows_ids

    async def capture(self, source_id: str, target_id: str) -> None:
        if self._windows(source_id):
            self.windows_ids.add(_key(target_id))
            self.disk_calls.append(("capture", source_id, target_id))
            return
        hook = getattr(self.inner, "capture", None)
        if hook is not None:
            await hook(source_id, target_id)

    async def discard(self, target_id: str) -> None:
        if self._windows(target_id):
            self.disk_calls.append(("discard", target_id))
            return
        hook = getattr(self.inner, "discard", None)
        if hook is not None:
            await hook(target_id)

    async def delete_disk(self, disk_id: str) -> None:
        if self._windows(disk_id):
            self.disk_calls.append(("delete_disk", disk_id))
            self._vhd_path(disk_id).unlink(missing_ok=True)
            return
        hook = getattr(self.inner, "delete_disk", None)
        if hook is not None:
            await hook(disk_id)

    def _vhd_path(self, disk_id: str) -> Path:
        return (
            self.work_dir
            / "disks"
            / f"{hashlib.sha256(_key(disk_id).encode()).hexdigest()[:16]}.vhd"
        )

    async def disk_vhd(self, disk_id: str) -> Path:
        if self._windows(disk_id):
            path = self._vhd_path(disk_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                await asyncio.to_thread(fixed_vhd, path)
            return path
        hook = getattr(self.inner, "disk_vhd", None)
        if hook is None:
            raise ArmError(404, "BlobNotFound", "The specified blob does not exist.")
        return await hook(disk_id)
