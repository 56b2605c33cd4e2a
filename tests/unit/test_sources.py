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

from kiln.api.tenancy import FileRoot, TenancyPolicy
from kiln.customizers.sources import FILE_LIMIT_BYTES, FetchError, fetch, redact

SECRET = "sig=TOPSECRET"
BODY = b"#!/bin/sh\necho hello\n"
BODY_SHA = hashlib.sha256(BODY).hexdigest()
WRONG_SHA = "0" * 64
NOTHING_OPEN = TenancyPolicy()
# The test servers listen on loopback, which the operator's default policy refuses.
LOOPBACK_OPEN = TenancyPolicy(blocked_ranges=[])


def roots(*directories: Path) -> TenancyPolicy:
    """A policy whose file roots are these directories, under their own paths."""
    return TenancyPolicy(file_source_roots=[FileRoot.parse(str(d)) for d in directories])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def http_server(
    routes: dict[str, tuple[int, bytes] | Handler], host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """A real aiohttp server on a loopback address; yields its base URL.

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
    site = web.TCPSite(runner, host, 0)
    await site.start()
    try:
        address, port = runner.addresses[0][:2]
        yield f"http://{address}:{port}"
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
    assert await fetch(path.as_uri(), roots(tmp_path)) == BODY


async def test_file_fetch_with_matching_checksum(tmp_path: Path) -> None:
    path = script(tmp_path)
    assert await fetch(path.as_uri(), roots(tmp_path), BODY_SHA) == BODY
    assert await fetch(path.as_uri(), roots(tmp_path), BODY_SHA.upper()) == BODY


async def test_file_fetch_with_wrong_checksum_is_redacted(tmp_path: Path) -> None:
    uri = f"{script(tmp_path).as_uri()}?{SECRET}"
    with pytest.raises(FetchError) as error:
        await fetch(uri, roots(tmp_path), WRONG_SHA)
    message = str(error.value)
    assert "does not match sha256Checksum" in message
    assert WRONG_SHA in message
    assert script(tmp_path).as_uri() in message
    assert "TOPSECRET" not in message
    assert "?" not in message


async def test_file_fetch_with_percent_encoded_path(tmp_path: Path) -> None:
    path = tmp_path / "with space.sh"
    path.write_bytes(BODY)
    assert await fetch(path.as_uri(), roots(tmp_path)) == BODY


async def test_file_fetch_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="cannot read"):
        await fetch((tmp_path / "missing.sh").as_uri(), roots(tmp_path))


async def test_file_fetch_at_the_limit(tmp_path: Path) -> None:
    path = script(tmp_path, b"x" * 100)
    assert await fetch(path.as_uri(), roots(tmp_path), limit=100) == b"x" * 100


async def test_file_fetch_over_the_limit(tmp_path: Path) -> None:
    path = script(tmp_path, b"x" * 101)
    with pytest.raises(FetchError, match="is larger than"):
        await fetch(path.as_uri(), roots(tmp_path), limit=100)


async def test_file_fetch_over_the_default_20_mib_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as handle:
        handle.truncate(FILE_LIMIT_BYTES + 1)  # sparse: cheap to create
    with pytest.raises(FetchError, match="is larger than 20 MiB"):
        await fetch(path.as_uri(), roots(tmp_path))


@pytest.mark.parametrize("uri", [f"ftp://e.com/s.sh?{SECRET}", f"s3://bucket/s.sh?{SECRET}"])
async def test_unsupported_scheme(uri: str) -> None:
    with pytest.raises(FetchError) as error:
        await fetch(uri, NOTHING_OPEN)
    message = str(error.value)
    assert "only https, http and file URIs can be fetched" in message
    assert "TOPSECRET" not in message


async def test_bare_path_is_not_a_uri(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="only https, http and file"):
        await fetch(str(script(tmp_path)), roots(tmp_path))


# --- http:// --------------------------------------------------------------------------------


async def test_http_200() -> None:
    async with http_server({"/setup.sh": (200, BODY)}) as base:
        assert await fetch(f"{base}/setup.sh?{SECRET}", LOOPBACK_OPEN, BODY_SHA) == BODY


async def test_http_wrong_checksum_is_redacted() -> None:
    async with http_server({"/setup.sh": (200, BODY)}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/setup.sh?{SECRET}", LOOPBACK_OPEN, WRONG_SHA)
    message = str(error.value)
    assert "does not match sha256Checksum" in message
    assert "TOPSECRET" not in message


async def test_http_404_is_an_error() -> None:
    async with http_server({}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/missing.sh?{SECRET}", LOOPBACK_OPEN)
    message = str(error.value)
    assert "answered HTTP 404" in message
    assert f"{base}/missing.sh" in message
    assert "TOPSECRET" not in message


async def test_http_500_is_an_error() -> None:
    async with http_server({"/boom": (500, b"oops")}) as base:
        with pytest.raises(FetchError, match="answered HTTP 500"):
            await fetch(f"{base}/boom", LOOPBACK_OPEN)


async def test_http_at_the_limit() -> None:
    async with http_server({"/f": (200, b"y" * 1000)}) as base:
        assert await fetch(f"{base}/f", LOOPBACK_OPEN, limit=1000) == b"y" * 1000


async def test_http_over_the_limit() -> None:
    async with http_server({"/f": (200, b"y" * 5000)}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/f?{SECRET}", LOOPBACK_OPEN, limit=1000)
    message = str(error.value)
    assert "is larger than" in message
    assert "TOPSECRET" not in message


async def test_http_connection_refused_is_redacted() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as error:
        await fetch(f"http://127.0.0.1:{port}/s.sh?{SECRET}", LOOPBACK_OPEN)
    message = str(error.value)
    assert message.startswith(f"cannot download http://127.0.0.1:{port}/s.sh")
    assert "TOPSECRET" not in message


async def test_http_large_body_is_read_completely() -> None:
    body = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB, many network reads
    async with http_server({"/big": (200, body)}) as base:
        data = await fetch(f"{base}/big", LOOPBACK_OPEN, hashlib.sha256(body).hexdigest())
    assert len(data) == len(body)
    assert data == body


async def test_http_slowly_streamed_body_is_read_completely() -> None:
    async with http_server({"/slow": streamed(chunks=3, size=1000)}) as base:
        assert await fetch(f"{base}/slow", LOOPBACK_OPEN) == b"z" * 3000


async def test_http_slowly_streamed_body_over_the_limit() -> None:
    async with http_server({"/slow": streamed(chunks=3, size=1000)}) as base:
        with pytest.raises(FetchError, match="is larger than"):
            await fetch(f"{base}/slow", LOOPBACK_OPEN, limit=2500)


async def test_http_body_cut_short_is_an_error() -> None:
    handler = streamed(chunks=1, size=10, declared=100)
    async with http_server({"/cut": handler}) as base:
        with pytest.raises(FetchError):
            await fetch(f"{base}/cut", LOOPBACK_OPEN)


async def test_http_redirect_loop_is_redacted() -> None:
    async def loop(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/loop?{request.query_string}")

    async with http_server({"/loop": loop}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/loop?{SECRET}", LOOPBACK_OPEN)
    message = str(error.value)
    assert message.startswith(f"cannot download {base}/loop")
    assert "TOPSECRET" not in message


# --- what the operator lets a template reach -----------------------------------------------


async def test_file_outside_the_roots_is_refused(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    (other / "token").write_text("service account token")
    with pytest.raises(FetchError) as error:
        await fetch((other / "token").as_uri(), roots(root))
    assert "is not under a directory templates may read" in str(error.value)
    assert str(root) in str(error.value)


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("file:///etc/shadow", "KILN_FILE_SOURCE_ROOTS"),
        ("file:///var/run/secrets/kubernetes.io/serviceaccount/token", "KILN_FILE_SOURCE_ROOTS"),
        ("file:///usr/share/../../etc/shadow", "without '..'"),
        ("file:///usr/share/%2e%2e/%2e%2e/etc/shadow", "without '..'"),
    ],
)
async def test_without_roots_no_file_is_read(uri: str, fragment: str) -> None:
    with pytest.raises(FetchError) as error:
        await fetch(uri, NOTHING_OPEN)
    assert fragment in str(error.value)


async def test_dot_dot_out_of_a_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("x")
    with pytest.raises(FetchError, match=r"without '\.\.'"):
        await fetch(f"file://{root}/../secret", roots(root))


async def test_a_symlink_out_of_a_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").write_text("x")
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(FetchError, match="through a symbolic link"):
        await fetch((root / "link").as_uri(), roots(root))


async def test_a_symlink_inside_a_root_is_followed(tmp_path: Path) -> None:
    script(tmp_path)
    (tmp_path / "current.sh").symlink_to(tmp_path / "setup.sh")
    assert await fetch((tmp_path / "current.sh").as_uri(), roots(tmp_path)) == BODY


async def test_a_mapped_root_reads_from_its_directory(tmp_path: Path) -> None:
    script(tmp_path)
    policy = TenancyPolicy(file_source_roots=[FileRoot.parse(f"/kiln/files={tmp_path}")])
    assert await fetch("file:///kiln/files/setup.sh", policy) == BODY
    with pytest.raises(FetchError, match="not under"):
        await fetch(f"file://{tmp_path}/setup.sh", policy)


async def test_a_file_uri_naming_another_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="file:// URIs name local files only"):
        await fetch(f"file://fileserver{script(tmp_path)}", roots(tmp_path))


def counting(body: bytes) -> tuple[Handler, list[str]]:
    """A handler that records every request it gets."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        return web.Response(body=body)

    return handler, seen


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_loopback_is_never_contacted_by_default(host: str) -> None:
    handler, seen = counting(BODY)
    async with http_server({"/s.sh": handler}) as base:
        port = base.rsplit(":", 1)[1]
        with pytest.raises(FetchError) as error:
            await fetch(f"http://{host}:{port}/s.sh?{SECRET}", NOTHING_OPEN)
    message = str(error.value)
    assert "127.0.0.0/8" in message
    assert "KILN_DOWNLOAD_BLOCKED_RANGES" in message
    assert "TOPSECRET" not in message
    assert seen == []


async def test_a_redirect_to_a_blocked_address_is_refused() -> None:
    """The first server is allowed; its redirect leads to a blocked one, never contacted."""
    handler, seen = counting(b"metadata")
    policy = TenancyPolicy(blocked_ranges=["127.0.0.2/32"])
    async with http_server({"/token": handler}, host="127.0.0.2") as blocked:

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(f"{blocked}/token")

        async with http_server({"/s.sh": redirect}) as allowed:
            with pytest.raises(FetchError) as error:
                await fetch(f"{allowed}/s.sh", policy)
            assert await fetch(f"{blocked}/token", LOOPBACK_OPEN) == b"metadata"
    assert "127.0.0.2 is in 127.0.0.2/32" in str(error.value)
    assert seen == ["/token"]  # only the direct, allowed fetch


async def test_a_setting_with_fewer_ranges_allows_a_private_server() -> None:
    policy = TenancyPolicy(blocked_ranges=["169.254.0.0/16"])
    async with http_server({"/s.sh": (200, BODY)}) as base:
        assert await fetch(f"{base}/s.sh", policy) == BODY


# --- private blobs: the template's token, to storage hosts only -------------------------------


def refusing(seen: list[str | None]) -> Handler:
    """Answers as Azure Storage does to a read it does not allow, recording the header."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return web.Response(status=403, headers={"x-ms-error-code": "AuthorizationFailure"})

    return handler


def counting_token(calls: list[int]) -> Callable[[], Awaitable[str | None]]:
    async def token() -> str | None:
        calls.append(1)
        return "TOKEN-OF-THE-TEMPLATE"

    return token


async def test_a_host_that_is_not_azure_storage_never_gets_the_token() -> None:
    seen: list[str | None] = []
    calls: list[int] = []
    async with http_server({"/s.sh": refusing(seen)}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/s.sh", LOOPBACK_OPEN, token=counting_token(calls))
    assert "answered HTTP 403" in str(error.value)
    assert calls == [] and seen == [None]


async def test_the_token_is_never_sent_along_a_redirect() -> None:
    seen: list[str | None] = []
    calls: list[int] = []
    storage = TenancyPolicy(blocked_ranges=[], storage_hosts=["127.0.0.1"])

    async with http_server({"/elsewhere": refusing(seen)}) as other:

        async def redirect(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization"):
                raise web.HTTPFound(f"{other}/elsewhere")
            return web.Response(status=404, headers={"x-ms-error-code": "ResourceNotFound"})

        async with http_server({"/c/s.sh": redirect}) as base:
            with pytest.raises(FetchError) as error:
                await fetch(f"{base}/c/s.sh", storage, token=counting_token(calls))
    assert "answered HTTP 302" in str(error.value)
    assert calls == [1] and seen == []  # the redirect's target was never asked


async def test_without_a_token_a_private_blob_says_what_to_do() -> None:
    storage = TenancyPolicy(blocked_ranges=[], storage_hosts=["127.0.0.1"])
    async with http_server({"/c/s.sh": refusing([])}) as base:
        with pytest.raises(FetchError) as error:
            await fetch(f"{base}/c/s.sh?{SECRET}", storage)
    message = str(error.value)
    assert "HTTP 403 (AuthorizationFailure)" in message and "not public" in message
    assert "TOPSECRET" not in message


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("acct.blob.core.windows.net", True),
        ("ACCT.blob.core.windows.net.", True),
        ("blob.core.windows.net.evil.example", False),
        ("evilblob.core.windows.net", False),
        ("example.com", False),
    ],
)
def test_storage_hosts_are_matched_by_domain(host: str, expected: bool) -> None:
    assert TenancyPolicy().is_storage_host(host) is expected
