"""Fetching scripts and files named by URI, with AIB's checksum and size rules, inside
what the operator allows: file:// only under its file roots, downloads never from a
blocked address (checked on the address each connection, redirects included, goes to).

A blob that Azure Storage refuses to read anonymously is read again with a token of the
template's Azure identity (AIB reads private scripts with the template's identity too),
sent only to the operator's Azure Storage hosts and never along a redirect.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
from aiohappyeyeballs import AddrInfoType

from kiln.api.tenancy import IPNetwork, Refused, TenancyPolicy, blocked_message

FILE_LIMIT_BYTES = 20 * 1024 * 1024  # AIB: the File customizer is for files up to 20 MB
FETCH_TIMEOUT_SECONDS = 120
STORAGE_API_VERSION = "2023-11-03"  # OAuth needs x-ms-version 2017-11-09 or later
# What Azure Storage answers an anonymous read of a private blob (or account).
_REFUSED_ANONYMOUS = (401, 403, 404, 409)
# A token for Azure Storage of the template's identity; None: the provider has none.
TokenSource = Callable[[], Awaitable[str | None]]


class FetchError(Exception):
    """A URI could not be read, was too big, or did not match its checksum."""


def redact(uri: str) -> str:
    """The URI without its query string: SAS tokens must never reach status or logs."""
    return uri.split("?", 1)[0]


def _megabytes(limit: int) -> str:
    return f"{limit / (1024 * 1024):g} MiB"


async def fetch(
    uri: str,
    policy: TenancyPolicy,
    sha256: str | None = None,
    limit: int = FILE_LIMIT_BYTES,
    token: TokenSource | None = None,
) -> bytes:
    try:
        parsed = urlparse(uri)
    except ValueError as error:
        raise FetchError(f"{redact(uri)} is not a valid URI: {error}") from error
    if parsed.scheme == "file":
        data = _read_file(uri, policy, limit)
    elif parsed.scheme in ("http", "https"):
        data = await _download(uri, limit, policy, token)
    else:
        raise FetchError(f"{redact(uri)}: only https, http and file URIs can be fetched")
    if sha256 and hashlib.sha256(data).hexdigest().lower() != sha256.lower():
        raise FetchError(
            f"{redact(uri)} does not match sha256Checksum {sha256}; update the checksum or the file"
        )
    return data


def _read_file(uri: str, policy: TenancyPolicy, limit: int) -> bytes:
    """The file, if the file actually opened (links swapped meanwhile or not) is inside
    its root: the check is repeated on the open descriptor."""
    try:
        path = policy.open_file_uri(uri)
        with path.open("rb") as handle:
            policy.confirm_opened(uri, Path(os.readlink(f"/proc/self/fd/{handle.fileno()}")))
            if os.fstat(handle.fileno()).st_size > limit:
                raise FetchError(f"{path} is larger than {_megabytes(limit)}")
            return handle.read(limit + 1)
    except Refused as refusal:
        raise FetchError(f"{redact(uri)} {refusal}") from None
    except OSError as error:
        raise FetchError(f"cannot read {redact(uri)}: {error.strerror}") from error


class _GuardedSockets:
    """aiohttp's socket factory: refuses to open a socket to a blocked address, so the
    check holds for the address DNS gave and for every redirect's, literal or not."""

    def __init__(self, policy: TenancyPolicy) -> None:
        self.policy = policy
        self.refused: tuple[str, IPNetwork] | None = None

    def __call__(self, addr_info: AddrInfoType) -> socket.socket:
        family, type_, proto, _, address = addr_info
        blocked = self.policy.blocked_range(str(address[0]))
        if blocked is not None:
            self.refused = (str(ipaddress.ip_address(str(address[0]).split("%")[0])), blocked)
            raise OSError(f"{address[0]} is in a blocked range")
        return socket.socket(family=family, type=type_, proto=proto)


def _ssl_context(policy: TenancyPolicy) -> ssl.SSLContext | bool:
    """The system's CAs, plus the operator's bundle for private endpoints."""
    if policy.ca_bundle is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=str(policy.ca_bundle))
    return context


class _Refused(Exception):
    """Azure Storage refused an anonymous read: its status and error code."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} ({code})")
        self.status, self.code = status, code


async def _download(
    uri: str, limit: int, policy: TenancyPolicy, token: TokenSource | None
) -> bytes:
    """The whole body, or an error: a body cut short or over the limit is never used."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    sockets = _GuardedSockets(policy)
    connector = aiohttp.TCPConnector(socket_factory=sockets, ssl=_ssl_context(policy))
    storage = policy.is_storage_host(urlparse(uri).hostname or "")
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                return await _get(session, uri, limit, storage, {})
            except _Refused as refused:  # only from a storage host
                bearer = await token() if token is not None else None
                if bearer is None:
                    raise FetchError(
                        f"{redact(uri)} answered {refused}: the blob is not public, and only "
                        "the azure provider reads private blobs (with the template's identity, "
                        "spec.serviceAccountName); make it public or use a SAS URL"
                    ) from None
            headers = {"Authorization": f"Bearer {bearer}", "x-ms-version": STORAGE_API_VERSION}
            try:  # no redirect: the token goes to this Azure Storage host alone
                return await _get(session, uri, limit, storage, headers, redirects=False)
            except _Refused as refused:
                raise FetchError(
                    f"{redact(uri)} answered {refused} to the template's Azure identity too; "
                    "grant that identity Storage Blob Data Reader on the storage account"
                ) from None
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        if sockets.refused is not None:
            address, network = sockets.refused
            message = blocked_message(address, network)
            raise FetchError(f"cannot download {redact(uri)}: {message}") from None
        # aiohttp's messages repeat the URL with its query string (a SAS token): never show them
        raise FetchError(f"cannot download {redact(uri)}: {type(error).__name__}") from error


async def _get(
    session: aiohttp.ClientSession,
    uri: str,
    limit: int,
    storage: bool,
    headers: dict[str, str],
    redirects: bool = True,
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with session.get(uri, headers=headers, allow_redirects=redirects) as response:
        code = response.headers.get("x-ms-error-code")
        if storage and code and response.status in _REFUSED_ANONYMOUS:
            raise _Refused(response.status, code)
        if response.status != 200:
            raise FetchError(f"{redact(uri)} answered HTTP {response.status}")
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise FetchError(f"{redact(uri)} is larger than {_megabytes(limit)}")
            chunks.append(chunk)
    return b"".join(chunks)
