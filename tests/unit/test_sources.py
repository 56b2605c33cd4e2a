"""Fetching scripts and files by URI: file:// and a real local HTTP server, checksums, limits."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from kiln.customizers.sources import FILE_LIMIT_BYTES, FetchError, fetch, redact

SECRET = "sig=TOPSECRET"
BODY = b"#!/bin/sh\necho hello\n"
BODY_SHA = hashlib.sha256(BODY).hexdigest()
WRONG_SHA = "0" * 64


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def http_server(routes: dict[str, tuple[int, bytes] | Handler]) -> AsyncIterator[str]:
    """A real aiohttp server on 127.0.0.1; yields its base URL.

    routes maps a path to (status, body) or to a handler of its own.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        route = routes.get(request.path, (404, b"not found"))
        if callable(route):
            return await route(request)
        status, body = route
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def streamed(chunks: int, size: int, declared: int | None = None) -> Handler:
    """A handler that sends its body in pieces, pausing between them, as a slow server does."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        response.content_length = chunks * size if declared is None else declared
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(b"z" * size)
            await asyncio.sleep(0.02)
        if declared is not None and declared != chunks * size:
            if request.transport is not None:
                request.transport.close()  # the connection drops mid-body
            return response
        await response.write_eof()
        return response

    return handler


def script(tmp_path: Path, data: bytes = BODY) -> Path:
    path = tmp_path / "setup.sh"
    path.write_bytes(data)
    return path


# --- redact ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "https://acct.blob.core.windows.net/c/s.sh?sv=1&sig=abc",
            "https://acct.blob.core.windows.net/c/s.sh",
        ),
        ("https://e.com/s.sh", "https://e.com/s.sh"),
        ("file:///srv/a?b?c", "file:///srv/a"),
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert redact(uri) == expected


# --- file:// --------------------------------------------------------------------------------


async def test_file_fetch(tmp_path: Path) -> None:
    path = script(tmp_path)
    assert await fetch(path.as_uri()) == BODY


async def test_file_fetch_with_matching_checksum(tmp_path: Path) -> None:
    path = script(tmp_path)
    assert await fetch(path.as_uri(), BODY_SHA) == BODY
    assert await fetch(path.as_uri(), BODY_SHA.upper()) == BODY


async def test_file_fetch_with_wrong_checksum_is_redacted(tmp_path: Path) -> None:
    uri = f"{script(tmp_path).as_uri()}?{SECRET}"
    with pytest.raises(FetchError) as error:
        await fetch(uri, WRONG_SHA)
    message = str(error.value)
    assert "does not match sha256Checksum" in message
    assert WRONG_SHA in message
    assert script(tmp_path).as_uri() in message
    assert "TOPSECRET" not in message
    assert "?" not in message


async def test_file_fetch_with_percent_encoded_path(tmp_path: Path) -> None:
    path = tmp_path / "with space.sh"
    path.write_bytes(BODY)
    assert await fetch(path.as_uri()) == BODY


async def test_file_fetch_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="cannot read"):
        await fetch((tmp_path / "missing.sh").as_uri())


async def test_file_fetch_at_the_limit(tmp_path: Path) -> None:
    path = script(tmp_path, b"x" * 100)
    assert await fetch(path.as_uri(), limit=100) == b"x" * 100


async def test_file_fetch_over_the_limit(tmp_path: Path) -> None:
    path = script(tmp_path, b"x" * 101)
    with pytest.raises(FetchError, match="is larger than"):
        await fetch(path.as_uri(), limit=100)


async def test_file_fetch_over_the_default_20_mib_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as handle:
        handle.truncate(FILE_LIMIT_BYTES + 1)  # sparse: cheap to create
    with pytest.raises(FetchError, match="is larger than 20 MiB"):
        await fetch(path.as_uri())


@pytest.mark.parametrize("uri", [f"ftp://e.com/s.sh?{SECRET}", f"s3://bucket/s.sh?{SECRET}"])
async def test_unsupported_scheme(uri: str) -> None:
    with pytest.raises(FetchError) as error:
        await fetch(uri)
    message = str(error.value)
    assert "only https, http and file URIs can be fetched" in message
    assert "TOPSECRET" not in message


async def test_bare_path_is_not_a_uri(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="only https, http and file"):
        await fetch(str(script(tmp_path)))


# --- http:// --------------------------------------------------------------------------------


async def test_http_200() -> None:
    async with http_server({"/setup.sh": (200, BODY)}) as base:
        assert await fetch(f"{base}/setup.sh?{SECRET}", BODY_SHA) == BODY


async def test_http_wrong_checksum_is_redacted() -> None:
    async with http_server({"/setup.sh": (200, BODY)}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/setup.sh?{SECRET}", WRONG_SHA)
    message = str(error.value)
    assert "does not match sha256Checksum" in message
    assert "TOPSECRET" not in message


async def test_http_404_is_an_error() -> None:
    async with http_server({}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/missing.sh?{SECRET}")
    message = str(error.value)
    assert "answered HTTP 404" in message
    assert f"{base}/missing.sh" in message
    assert "TOPSECRET" not in message


async def test_http_500_is_an_error() -> None:
    async with http_server({"/boom": (500, b"oops")}) as base:
        with pytest.raises(FetchError, match="answered HTTP 500"):
            await fetch(f"{base}/boom")


async def test_http_at_the_limit() -> None:
    async with http_server({"/f": (200, b"y" * 1000)}) as base:
        assert await fetch(f"{base}/f", limit=1000) == b"y" * 1000


async def test_http_over_the_limit() -> None:
    async with http_server({"/f": (200, b"y" * 5000)}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/f?{SECRET}", limit=1000)
    message = str(error.value)
    assert "is larger than" in message
    assert "TOPSECRET" not in message


async def test_http_connection_refused_is_redacted() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as error:
        await fetch(f"http://127.0.0.1:{port}/s.sh?{SECRET}")
    message = str(error.value)
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/s.sh")
    assert "TOPSECRET" not in message


async def test_http_large_body_is_read_completely() -> None:
    body = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB, many network reads
    async with http_server({"/big": (200, body)}) as base:
        data = await fetch(f"{base}/big", hashlib.sha256(body).hexdigest())
    assert len(data) == len(body)
    assert data == body


async def test_http_slowly_streamed_body_is_read_completely() -> None:
    async with http_server({"/slow": streamed(chunks=3, size=1000)}) as base:
        assert await fetch(f"{base}/slow") == b"z" * 3000


async def test_http_slowly_streamed_body_over_the_limit() -> None:
    async with http_server({"/slow": streamed(chunks=3, size=1000)}) as base:
        with pytest.raises(FetchError, match="is larger than"):
            await fetch(f"{base}/slow", limit=2500)


async def test_http_body_cut_short_is_an_error() -> None:
    handler = streamed(chunks=1, size=10, declared=100)
    async with http_server({"/cut": handler}) as base:
        with pytest.raises(FetchError):
            await fetch(f"{base}/cut")


async def test_http_redirect_loop_is_redacted() -> None:
    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/loop?{request.query_string}")

    async with http_server({"/loop": loop}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/loop?{SECRET}")
    message = str(error.value)
    assert message.startswith(f"cannot download {base}/loop")
    assert "TOPSECRET" not in message
