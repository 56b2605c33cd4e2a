"""Every SSH call ends: a command that hangs, and a peer that freezes (SIGSTOP, as a frozen
build VM), both end in CommunicatorError within their bounds; a cancel ends a call at once.

The peer is a real SSH server (asyncssh's) in its own process, so it can be frozen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from kiln.communicators import ssh
from kiln.communicators.ssh import CommunicatorError, SshCommunicator, generate_keypair

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import asyncssh

    async def handle(process):
        command = process.command or ""
        if command == "hang":
            await asyncio.sleep(3600)
        process.stdout.write("ok\\n")
        process.exit(0)

    async def main():
        host_key, client_key, port_file = sys.argv[1:4]
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0,
            server_host_keys=[host_key], authorized_client_keys=client_key,
            process_factory=handle,
        )
        port = server.sockets[0].getsockname()[1]
        open(port_file, "w").write(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class Peer:
    def __init__(self, process: subprocess.Popen[bytes], port: int, client_key: str, host: str):
        self.process, self.port, self.client_key, self.host_public_key = (
            process,
            port,
            client_key,
            host,
        )


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    host, client = generate_keypair("host"), generate_keypair("client")
    (tmp_path / "host").write_text(host.private_key.get_secret_value())
    (tmp_path / "authorized").write_text(client.public_key + "\n")
    (tmp_path / "server.py").write_text(SERVER)
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "server.py"),
            str(tmp_path / "host"),
            str(tmp_path / "authorized"),
            str(port_file),
        ]
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists() or not port_file.read_text():
            assert time.monotonic() < deadline and process.poll() is None, "no SSH server"
            time.sleep(0.1)
        yield Peer(
            process,
            int(port_file.read_text()),
            client.private_key.get_secret_value(),
            host.public_key,
        )
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait(timeout=10)


async def _connected(peer: Peer) -> SshCommunicator:
    communicator = SshCommunicator()
    await communicator.connect(
        "127.0.0.1", peer.port, "packer", peer.client_key, peer.host_public_key, timeout=20
    )
    return communicator


async def test_a_command_that_hangs_ends_at_its_timeout(peer: Peer) -> None:
    communicator = await _connected(peer)
    try:
        assert (await communicator.run("echo")).stdout == "ok\n"
        began = time.monotonic()
        with pytest.raises(CommunicatorError, match="no answer in 1s"):
            await communicator.run("hang", timeout=1)
        assert time.monotonic() - began < 5
    finally:
        await communicator.close()


async def test_a_frozen_peer_is_noticed_by_keepalive(
    peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh, "KEEPALIVE_SECONDS", 1.0)
    monkeypatch.setattr(ssh, "KEEPALIVE_COUNT", 2)
    communicator = await _connected(peer)
    os.kill(peer.process.pid, signal.SIGSTOP)
    began = time.monotonic()
    # the command's own timeout is far away: keepalive ends the connection first
    with pytest.raises(asyncssh.Error):  # ConnectionLost: what the driver retries on
        await communicator.run("echo", timeout=60)
    elapsed = time.monotonic() - began
    assert elapsed < 15, f"a frozen peer held the call for {elapsed:.0f}s"
    began = time.monotonic()
    await communicator.close()  # closing does not wait on the frozen peer for long
    assert time.monotonic() - began < ssh._CLOSE_TIMEOUT + 2


async def test_a_cancel_ends_a_call_in_flight(peer: Peer) -> None:
    communicator = await _connected(peer)
    try:
        call = asyncio.ensure_future(communicator.run("hang", timeout=3600))
        await asyncio.sleep(0.5)
        call.cancel()
        began = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert time.monotonic() - began < 2
    finally:
        await communicator.close()
