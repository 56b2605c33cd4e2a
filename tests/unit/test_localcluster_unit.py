"""The pure and process-safety parts of the local control plane, without etcd or kube-apiserver."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import config

from kiln_devtools import localcluster
from kiln_devtools.localcluster import StateDir


def test_kubeconfig_with_ca_is_loadable_by_the_client(tmp_path: Path) -> None:
    ca = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    data = localcluster.kubeconfig_dict("https://127.0.0.1:1234", "s3cret", ca)
    cluster = data["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:1234"
    assert base64.b64decode(cluster["certificate-authority-data"]) == ca
    assert "insecure-skip-tls-verify" not in cluster
    assert data["users"][0]["user"] == {"token": "s3cret"}

    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(data))
    loader = config.kube_config.KubeConfigLoader(config_dict=yaml.safe_load(path.read_text()))
    assert loader.current_context["name"] == localcluster.CONTEXT


def test_kubeconfig_without_ca_skips_verification() -> None:
    cluster = localcluster.kubeconfig_dict("https://127.0.0.1:1", "t", None)["clusters"][0]
    assert cluster["cluster"]["insecure-skip-tls-verify"] is True


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = localcluster.free_ports(3)
    assert len(set(ports)) == 3
    assert all(localcluster.port_is_free(p) for p in ports)


def test_taken_port_is_not_free_and_not_reused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        assert not localcluster.port_is_free(taken)
        previous = localcluster.Ports(
            etcd_client=taken,
            etcd_peer=taken + 1,
            apiserver=taken + 2,
            controller_manager=taken + 3,
        )
        chosen = localcluster._choose_ports(previous)
        assert taken not in chosen.model_dump().values()


def test_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    state = StateDir.of(tmp_path)
    localcluster._ensure_secrets(state)
    token_line = state.tokens.read_text()
    key = state.sa_key.read_text()
    assert token_line.endswith(",admin,admin,system:masters\n")
    assert "PRIVATE KEY" in key and "PUBLIC KEY" in state.sa_pub.read_text()
    for path in (state.tokens, state.sa_key):
        assert path.stat().st_mode & 0o077 == 0

    localcluster._ensure_secrets(state)
    assert state.tokens.read_text() == token_line and state.sa_key.read_text() == key


def test_load_crds_keeps_only_crd_documents(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "kind: CustomResourceDefinition\nmetadata: {name: a.x.io}\n---\n"
        "kind: ConfigMap\nmetadata: {name: c}\n---\n"
    )
    (tmp_path / "b.yml").write_text("kind: CustomResourceDefinition\nmetadata: {name: b}\n")
    assert [c["metadata"]["name"] for c in localcluster.load_crds(tmp_path)] == ["a.x.io"]
    assert localcluster.load_crds(tmp_path / "empty-or-missing") == []


def test_crd_established() -> None:
    established = {"status": {"conditions": [{"type": "Established", "status": "True"}]}}
    assert localcluster.crd_established(established)
    assert not localcluster.crd_established({"status": {"conditions": None}})
    assert not localcluster.crd_established({})


def test_status_and_down_on_an_empty_state_dir(tmp_path: Path) -> None:
    assert "not running" in localcluster.status(tmp_path / "nothing")
    localcluster.down(tmp_path / "nothing")
    localcluster.down(tmp_path / "nothing")


@pytest.fixture
def fake_etcd(tmp_path: Path) -> Iterator[tuple[StateDir, subprocess.Popen[bytes]]]:
    """A process whose command line looks like our etcd for a state dir (a sleeping python)."""
    state = StateDir.of(tmp_path / "state")
    state.root.mkdir()
    etcd = tmp_path / "bin" / "etcd"
    etcd.parent.mkdir()
    etcd.symlink_to(sys.executable)
    marker = state.marker(localcluster.ETCD)
    proc = subprocess.Popen([str(etcd), "-c", "import time; time.sleep(60)", marker])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 10
    while marker.encode() not in cmdline.read_bytes():  # until exec has replaced the fork
        assert time.monotonic() < deadline, "the fake etcd never started"
        time.sleep(0.01)
    yield state, proc
    proc.kill()
    proc.wait()


def test_cmdline_check_recognises_only_our_process(fake_etcd, tmp_path: Path) -> None:
    state, proc = fake_etcd
    assert localcluster.is_our_process(proc.pid, localcluster.ETCD, state)
    other = StateDir.of(tmp_path / "other")
    assert not localcluster.is_our_process(proc.pid, localcluster.ETCD, other)
    assert not localcluster.is_our_process(proc.pid, localcluster.APISERVER, state)
    assert not localcluster.is_our_process(os.getpid(), localcluster.ETCD, state)


def test_down_stops_our_process_and_spares_others(fake_etcd, tmp_path: Path) -> None:
    state, proc = fake_etcd
    state.pid_file(localcluster.ETCD).write_text(f"{proc.pid}\n")
    state.pid_file(localcluster.APISERVER).write_text(f"{os.getpid()}\n")  # stale, reused pid

    localcluster.down(state.root)

    assert proc.wait(timeout=5) is not None
    assert not list(state.root.glob("*.pid"))  # the stale one is dropped without a signal


def test_stale_pid_file_for_someone_else_is_not_signalled(fake_etcd, tmp_path: Path) -> None:
    _, proc = fake_etcd
    other = StateDir.of(tmp_path / "other")
    other.root.mkdir()
    other.pid_file(localcluster.ETCD).write_text(f"{proc.pid}\n")

    localcluster.down(other.root)

    assert proc.poll() is None
    assert localcluster.read_pids(other.root) == {}


def test_control_plane_binaries_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_CONTROL_PLANE_BIN", str(tmp_path))
    for name in ("etcd", "kube-apiserver", "kube-controller-manager"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    with pytest.raises(localcluster.ClusterError, match="lacks kubectl"):
        localcluster.binaries_dir()
    (tmp_path / "kubectl").write_text("#!/bin/sh\n")
    (tmp_path / "kubectl").chmod(0o755)
    assert localcluster.binary("kubectl") == tmp_path / "kubectl"


def test_the_release_is_named_in_one_place() -> None:
    version = localcluster.kubernetes_version()
    major, minor, _patch = (int(part) for part in version.split("."))
    assert (major, minor) >= (1, 34)
