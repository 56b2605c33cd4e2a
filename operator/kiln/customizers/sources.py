"""Fetching scripts and files named by URI, with AIB's checksum and size rules."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp

FILE_LIMIT_BYTES = 20 * 1024 * 1024  # AIB: the File customizer is for files up to 20 MB
FETCH_TIMEOUT_SECONDS = 120


class FetchError(Exception):
    """A URI could not be read, was too big, or did not match its checksum."""


def redact(uri: str) -> str:
    """The URI without its query string: SAS tokens must never reach status or logs."""
    return uri.split("?", 1)[0]


def _megabytes(limit: int) -> str:
    return f"{limit / (1024 * 1024):g} MiB"


async def fetch(uri: str, sha256: str | None = None, limit: int = FILE_LIMIT_BYTES) -> bytes:
    try:
        parsed = urlparse(uri)
    except ValueError as error:
        raise FetchError(f"{redact(uri)} is not a valid URI: {error}") from error
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        try:
            if path.stat().st_size > limit:
                raise FetchError(f"{path} is larger than {_megabytes(limit)}")
            data = path.read_bytes()
        except OSError as error:
            raise FetchError(f"cannot read {path}: {error.strerror}") from error
    elif parsed.scheme in ("http", "https"):
        data = await _download(uri, limit)
    else:
        raise FetchError(f"{redact(uri)}: only https, http and file URIs can be fetched")
    if sha256 and hashlib.sha256(data).hexdigest().lower() != sha256.lower():
        raise FetchError(
            f"{redact(uri)} does not match sha256Checksum {sha256}; update the checksum or the file"
        )
    return data


async def _download(uri: str, limit: int) -> bytes:
    """The whole body, or an error: a body cut short or over the limit is never used."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
    chunks: list[bytes] = []
    size = 0
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(uri) as response:
            if response.status != 200:
                raise FetchError(f"{redact(uri)} answered HTTP {response.status}")
            async for chunk in response.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise FetchError(f"{redact(uri)} is larger than {_megabytes(limit)}")
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        # aiohttp's messages repeat the URL with its query string (a SAS token): never show them
        raise FetchError(f"cannot download {redact(uri)}: {type(error).__name__}") from error
    return b"".join(chunks)
