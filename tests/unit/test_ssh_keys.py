"""Key generation and the pure parts of the SSH communicator's job protocol."""

from __future__ import annotations

import asyncssh
import pytest

from kiln.communicators import ssh


def test_generate_keypair_roundtrip() -> None:
    pair = ssh.generate_keypair()
    private = pair.private_key.get_secret_value()
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pair.public_key.startswith("ssh-ed25519 ")
    key = asyncssh.import_private_key(private)
    assert key.export_public_key("openssh").decode().strip() == pair.public_key
    assert asyncssh.import_public_key(pair.public_key).algorithm == b"ssh-ed25519"
    assert ssh.generate_keypair().public_key != pair.public_key


def test_private_key_never_in_repr_or_json() -> None:
    pair = ssh.generate_keypair()
    assert "PRIVATE" not in repr(pair)
    assert "PRIVATE" not in pair.model_dump_json()


@pytest.mark.parametrize("job_id", ["", "../etc", "a b", "x;rm -rf /", ".hidden", "a/b"])
def test_bad_job_ids_rejected(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        ssh._job_dir("/j", job_id)


@pytest.mark.parametrize(
    ("output", "offset", "running", "exit_code", "log", "next_offset"),
    [
        (b"KILN running\n", 0, True, None, b"", 0),
        (b"KILN running\nhello\n", 10, True, None, b"hello\n", 16),
        (b"KILN exit 0\nlast", 4, False, 0, b"last", 8),
        (b"KILN exit 137\n", 7, False, 137, b"", 7),
        (b"KILN lost\n\x00\xff", 0, False, None, b"\x00\xff", 2),
    ],
)
def test_parse_poll(
    output: bytes,
    offset: int,
    running: bool,
    exit_code: int | None,
    log: bytes,
    next_offset: int,
) -> None:
    status = ssh._parse_poll(output, offset)
    assert (status.running, status.exit_code) == (running, exit_code)
    assert (status.new_log, status.next_offset) == (log, next_offset)


def test_parse_poll_missing_and_garbage() -> None:
    with pytest.raises(ssh.JobNotFound):
        ssh._parse_poll(b"KILN missing\n", 0)
    with pytest.raises(ssh.CommunicatorError, match="unexpected"):
        ssh._parse_poll(b"bash: oops\n", 0)
