"""NoCloud seed ISO: how a local build VM learns its user, client key and SSH host key.

The host key is chosen by Kiln and injected (cloud-init `ssh_keys`), so the
communicator verifies the VM's identity instead of trusting whatever key answers.
"""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib
import yaml
from pydantic import BaseModel, Field, SecretStr

from kiln.providers.local.disks import atomic_output

VOLUME_ID = "cidata"
# ISO 9660 level-1 names; Rock Ridge and Joliet carry the names cloud-init looks for.
_FILES = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1"}


class SeedConfig(BaseModel):
    """What one build VM is told at first boot."""

    instance_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    hostname: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
    user: str = Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    authorized_key: str = Field(pattern=r"^(ssh-|ecdsa-)\S+ \S+")
    host_private_key: SecretStr
    host_public_key: str = Field(pattern=r"^ssh-ed25519 \S+")


def user_data(cfg: SeedConfig) -> str:
    """#cloud-config: one sudo user with key-only login, and the host key Kiln expects."""
    doc = {
        "hostname": cfg.hostname,
        "manage_etc_hosts": True,  # sudo must resolve the hostname without DNS
        "users": [
            {
                "name": cfg.user,
                "gecos": "Kiln build user",
                "shell": "/bin/bash",
                "lock_passwd": True,
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "ssh_authorized_keys": [cfg.authorized_key.strip()],
            }
        ],
        "disable_root": True,
        "ssh_pwauth": False,
        "ssh_deletekeys": True,
        "ssh_keys": {
            "ed25519_private": cfg.host_private_key.get_secret_value(),
            "ed25519_public": cfg.host_public_key.strip(),
        },
        # Kiln knows both keys already; printing their fingerprints to the console only
        # delays cloud-init's end, which the connect step waits for.
        "ssh": {"emit_keys_to_console": False},
        "no_ssh_fingerprints": True,
    }
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def meta_data(cfg: SeedConfig) -> str:
    """NoCloud meta-data: a new instance-id makes cloud-init run its per-instance steps."""
    return yaml.safe_dump({"instance-id": cfg.instance_id, "local-hostname": cfg.hostname})


def write_seed_iso(cfg: SeedConfig, path: Path) -> None:
    write_cidata(user_data(cfg), meta_data(cfg), path)


def write_cidata(user_data_text: str, meta_data_text: str, path: Path) -> None:
    """Write the `cidata` ISO (Joliet + Rock Ridge); mode 0600, it holds a private key."""
    iso = pycdlib.PyCdlib()
    iso.new(joliet=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    contents = {"user-data": user_data_text, "meta-data": meta_data_text}
    for name, iso_path in _FILES.items():
        data = contents[name].encode()
        iso.add_fp(io.BytesIO(data), len(data), iso_path, rr_name=name, joliet_path=f"/{name}")
    with atomic_output(path) as tmp:
        tmp.touch(mode=0o600)
        iso.write(str(tmp))
        iso.close()
