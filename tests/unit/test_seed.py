"""The NoCloud seed ISO, read back with pycdlib."""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import pytest
import yaml
from pydantic import ValidationError

from kiln.communicators.ssh import generate_keypair
from kiln.providers.local.seed import SeedConfig, write_seed_iso


@pytest.fixture
def cfg() -> SeedConfig:
    client, host = generate_keypair(), generate_keypair()
    return SeedConfig(
        instance_id="kiln-run-0001",
        hostname="kiln-build",
        user="kiln",
        authorized_key=client.public_key,
        host_private_key=host.private_key,
        host_public_key=host.public_key,
    )


def _read(iso: pycdlib.PyCdlib, **path: str) -> str:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue().decode()


def test_seed_iso_contents(tmp_path: Path, cfg: SeedConfig) -> None:
    path = tmp_path / "seed.iso"
    write_seed_iso(cfg, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        assert iso.pvd.volume_identifier.rstrip() == b"cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        user_data = _read(iso, rr_path="/user-data")
        assert _read(iso, joliet_path="/user-data") == user_data
        meta = yaml.safe_load(_read(iso, rr_path="/meta-data"))
    finally:
        iso.close()

    assert meta == {"instance-id": "kiln-run-0001", "local-hostname": "kiln-build"}
    assert user_data.startswith("#cloud-config\n")
    doc = yaml.safe_load(user_data)
    (user,) = doc["users"]
    assert user["name"] == "kiln"
    assert user["ssh_authorized_keys"] == [cfg.authorized_key]
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert doc["ssh_pwauth"] is False
    assert doc["ssh_deletekeys"] is True
    assert doc["ssh_keys"] == {
        "ed25519_private": cfg.host_private_key.get_secret_value(),
        "ed25519_public": cfg.host_public_key,
    }


def test_private_key_not_in_repr(cfg: SeedConfig) -> None:
    secret = cfg.host_private_key.get_secret_value()
    assert "PRIVATE KEY" in secret
    assert secret not in repr(cfg) and "PRIVATE KEY" not in cfg.model_dump_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hostname", "Bad_Host"),
        ("user", "root;rm"),
        ("instance_id", "../x"),
        ("host_public_key", "x"),
    ],
)
def test_invalid_inputs_rejected(cfg: SeedConfig, field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        SeedConfig(**{**cfg.model_dump(), "host_private_key": "k", field: value})
