"""Disk export (beginGetAccess): the accessSAS URL, and serving it when the backend has disks.

Azure hands out `https://md-XXXX.z22.blob.storage.azure.net/YYYY/abcd?sv=...&sr=b&sig=...`,
a page blob readable with GET (Range / x-ms-range) and HEAD until endGetAccess. When the
VM backend can produce the disk as a fixed VHD (`disk_vhd`), the URL points at the emulator
itself (`{emulator}/md-{token}/{token}/abcd?sv&sr&sp&se&sig`: an IP-style blob URL whose
account is `md-{token}`, so azure-storage-blob's BlobClient.from_blob_url reads it too) and
is served here: the signature
(HMAC over the SAS fields) and the expiry are checked, and a revoked grant answers 404,
as Azure Storage answers once the export container is gone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

from .errors import ArmError
from .models import StoredResource, utcnow

if TYPE_CHECKING:
    from .emulator import ArmEmulator

SAS_VERSION = "2018-03-28"
BLOB_NAME = "abcd"
AZURE_URL = (
    "https://md-{token}.z22.blob.storage.azure.net/{token}/abcd?sv=2018-03-28&sr=b"
    "&si={disk}&sig={sig}"
)
SERVED_URL = "{url}/md-{token}/{token}/abcd?sv={sv}&sr=b&sp={sp}&se={se}&sig={sig}"
CHUNK = 1024 * 1024
_SE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _signature(key: bytes, token: str, sp: str, se: str, sv: str, sr: str) -> str:
    to_sign = "\n".join([sp, se, f"/md-{token}/{token}/{BLOB_NAME}", sv, sr])
    return base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()


def grant(emu: ArmEmulator, disk: StoredResource, access: str, seconds: int) -> str:
    """Record a grant on the disk and return its accessSAS URL."""
    token = secrets.token_hex(6)
    se = (utcnow() + timedelta(seconds=seconds)).strftime(_SE_FORMAT)
    sp = "r" if access == "Read" else "rw"
    sig = _signature(emu.identity.signing_key, token, sp, se, SAS_VERSION, "b")
    disk.meta["sas"] = {"token": token, "sp": sp, "se": se}
    template = emu.disk_access_url or (SERVED_URL if emu.serves_disks else AZURE_URL)
    return template.format(
        url=emu.url,
        token=token,
        disk=disk.name,
        resource_group=disk.resource_group,
        subscription=disk.subscription,
        sv=SAS_VERSION,
        sp=sp,
        se=quote(se, safe=""),
        sig=quote(sig, safe=""),
    )


def revoke(disk: StoredResource) -> None:
    disk.meta.pop("sas", None)


# Azure Storage's documented answers to a read (Blob service error codes): under load,
# and once a SAS expired between two reads of a long copy.
STORAGE_FAULTS: dict[int, tuple[str, str]] = {
    503: ("ServerBusy", "The server is currently unable to receive requests. Please retry."),
    500: ("OperationTimedOut", "The operation could not be completed within the permitted time."),
    403: (
        "AuthenticationFailed",
        "Server failed to authenticate the request. Signed expiry time must be after the "
        "current time.",
    ),
}


@dataclass
class ReadFault:
    """Fail the next `times` reads (GET) of any disk export, after `after` good ones."""

    status: int
    code: str
    message: str
    times: int = 1
    after: int = 0


@dataclass
class DiskReads:
    """What was read from disk exports (method, range) and the faults still to inject."""

    log: list[tuple[str, str | None, int]] = field(default_factory=list)
    faults: list[ReadFault] = field(default_factory=list)

    def fault(self, method: str) -> ReadFault | None:
        if method != "GET":
            return None
        for fault in self.faults:
            if fault.after > 0:
                fault.after -= 1
                return None
            if fault.times > 0:
                fault.times -= 1
                return fault
        return None


class StorageError(Exception):
    """An Azure Storage error answer (XML body, x-ms-error-code header)."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def _error_response(request: web.Request, err: StorageError) -> web.Response:
    request_id = str(uuid.uuid4())
    headers = {"x-ms-error-code": err.code, "x-ms-request-id": request_id, **err.headers}
    if request.method == "HEAD":
        return web.Response(status=err.status, headers=headers)
    now = formatdate(usegmt=True)
    body = (
        '<?xml version="1.0" encoding="utf-8"?><Error>'
        f"<Code>{escape(err.code)}</Code><Message>{escape(err.message)}\n"
        f"RequestId:{request_id}\nTime:{now}</Message></Error>"
    )
    return web.Response(
        status=err.status, text=body, content_type="application/xml", headers=headers
    )


def _auth_failed(detail: str) -> StorageError:
    err = StorageError(
        403,
        "AuthenticationFailed",
        "Server failed to authenticate the request. Make sure the value of Authorization "
        f"header is formed correctly including the signature. {detail}",
    )
    return err


def _find(emu: ArmEmulator, token: str) -> StoredResource | None:
    for disk in emu.resources_of("Microsoft.Compute/disks"):
        sas = disk.meta.get("sas") or {}
        if sas.get("token") == token:
            return disk
    return None


def _check_sas(emu: ArmEmulator, request: web.Request, token: str) -> None:
    q = request.query
    missing = [k for k in ("sv", "sr", "sp", "se", "sig") if not q.get(k)]
    if missing:
        raise _auth_failed(f"Missing SAS parameters: {', '.join(missing)}.")
    expected = _signature(emu.identity.signing_key, token, q["sp"], q["se"], q["sv"], q["sr"])
    if not hmac.compare_digest(expected, q["sig"]):
        raise _auth_failed("Signature did not match.")
    try:
        expiry = datetime.strptime(q["se"], _SE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise _auth_failed(f"Invalid signed expiry '{q['se']}'.") from None
    if expiry <= utcnow():
        raise _auth_failed(f"Signed expiry time [{q['se']}] must be after the current time.")
    if "r" not in q["sp"]:
        raise StorageError(
            403,
            "AuthorizationPermissionMismatch",
            "This request is not authorized to perform this operation using this permission.",
        )


def parse_range(value: str, size: int) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-`, `bytes=-n` -> inclusive (start, end); StorageError 416."""
    invalid = StorageError(
        416,
        "InvalidRange",
        "The range specified is invalid for the current size of the resource.",
        **{"Content-Range": f"bytes */{size}"},
    )
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise invalid
    first, sep, last = spec.strip().partition("-")
    if not sep:
        raise invalid
    try:
        if first == "":
            count = int(last)
            if count <= 0:
                raise invalid
            return max(0, size - count), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        raise invalid from None
    if start < 0 or start >= size or end < start:
        raise invalid
    return start, min(end, size - 1)


async def serve(emu: ArmEmulator, request: web.Request) -> web.StreamResponse:
    """GET/HEAD of a served accessSAS URL."""
    try:
        token = request.match_info["token"]
        disk = _find(emu, token)
        path_ok = request.match_info["container"] == token and (
            request.match_info["blob"] == BLOB_NAME
        )
        if disk is None or not path_ok:
            raise StorageError(404, "ResourceNotFound", "The specified resource does not exist.")
        _check_sas(emu, request, token)
        if request.method not in ("GET", "HEAD"):
            raise StorageError(
                405, "UnsupportedHttpVerb", "The resource doesn't support specified Http Verb."
            )
        fault = emu.disk_reads.fault(request.method)
        if fault is not None:
            raise StorageError(fault.status, fault.code, fault.message)
        disk_vhd = getattr(emu.backend, "disk_vhd", None)
        if disk_vhd is None:
            raise StorageError(404, "BlobNotFound", "The specified blob does not exist.")
        comp = request.query.get("comp")
        if comp not in (None, "pagelist"):
            raise StorageError(
                400,
                "InvalidQueryParameterValue",
                f"Value for one of the query parameters specified in the request URI is "
                f"invalid: comp={comp} is not supported here.",
            )
        try:
            path: Path = await disk_vhd(disk.id)
        except ArmError as err:
            raise StorageError(err.status, err.code, err.message) from None
        if comp == "pagelist":
            return _page_list(request, path)
        response = await _send(request, path)
        _log(emu, request, response.status)
        return response
    except StorageError as err:
        _log(emu, request, err.status)
        return _error_response(request, err)


def _log(emu: ArmEmulator, request: web.Request, status: int) -> None:
    wanted = request.headers.get("x-ms-range") or request.headers.get("Range")
    emu.disk_reads.log.append((request.method, wanted, status))


def data_ranges(path: Path, start: int, end: int, limit: int = 10000) -> list[tuple[int, int]]:
    """Inclusive byte ranges holding data (the file's holes are pages never written)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos <= end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data > end:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            if len(out) == limit - 1:  # too fragmented: the rest as one range
                out.append((data, end))
                break
            out.append((data, min(hole, end + 1) - 1))
            pos = hole
    finally:
        os.close(fd)
    return out


def _page_list(request: web.Request, path: Path) -> web.Response:
    """Get Page Ranges: the written (non-hole) parts of the blob, or of the asked range."""
    stat = path.stat()
    start, end = 0, stat.st_size - 1
    wanted = request.headers.get("x-ms-range") or request.headers.get("Range")
    if wanted:
        start, end = parse_range(wanted, stat.st_size)
    ranges = "".join(
        f"<PageRange><Start>{a}</Start><End>{b}</End></PageRange>"
        for a, b in data_ranges(path, start, end)
    )
    body = f'<?xml version="1.0" encoding="utf-8"?><PageList>{ranges}</PageList>'
    headers = _blob_headers(stat)
    headers["x-ms-blob-content-length"] = str(stat.st_size)
    headers.pop("Accept-Ranges")
    headers.pop("Content-Type")
    return web.Response(status=200, text=body, content_type="application/xml", headers=headers)


def _blob_headers(stat: os.stat_result) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": f'"0x{stat.st_mtime_ns:X}"',
        "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        "x-ms-blob-type": "PageBlob",
        "x-ms-version": SAS_VERSION,
        "x-ms-request-id": str(uuid.uuid4()),
        "x-ms-server-encrypted": "true",
        "x-ms-lease-status": "unlocked",
        "x-ms-lease-state": "available",
    }


async def _send(request: web.Request, path: Path) -> web.StreamResponse:
    stat = path.stat()
    size = stat.st_size
    headers = _blob_headers(stat)
    wanted = request.headers.get("x-ms-range") or request.headers.get("Range")
    start, end, status = 0, size - 1, 200
    if wanted:
        start, end = parse_range(wanted, size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    length = end - start + 1 if size else 0
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    if request.method == "HEAD" or not length:
        await response.write_eof()
        return response
    loop = asyncio.get_running_loop()
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            chunk = await loop.run_in_executor(None, fh.read, min(CHUNK, remaining))
            if not chunk:
                break
            await response.write(chunk)
            remaining -= len(chunk)
    await response.write_eof()
    return response
