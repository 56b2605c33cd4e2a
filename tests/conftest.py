"""Shared fixtures. The local control plane starts only for tests that ask for it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from prometheus_client.parser import text_string_to_metric_families

from kiln.providers.local import qemu
from kiln_devtools import localcluster
from kiln_devtools.demo import EXAMPLES_ROOT

pytest_plugins = ["fakes.fixtures"]  # Azurite and the ARM emulator with QEMU VMs

REPO_ROOT = Path(__file__).resolve().parents[1]
CRDS_DIR = REPO_ROOT / "crds"
OPERATOR_NAMESPACE = "kiln-system"  # the test operators' own: per-run key Secrets live there


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (`timeout`, CI cancelling a job) ends the run as Ctrl-C does, so fixtures
    still tear down: operators stop, build VMs are killed, control planes go."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@dataclass(frozen=True)
class ControlPlane:
    """A running etcd + kube-apiserver, reachable through kubeconfig."""

    state_dir: Path
    kubeconfig: Path
    server: str


def server_of(kubeconfig: Path) -> str:
    """The server URL of the kubeconfig's current context."""
    data = yaml.safe_load(kubeconfig.read_text())
    context = next(c for c in data["contexts"] if c["name"] == data["current-context"])
    cluster_name = context["context"]["cluster"]
    return next(c for c in data["clusters"] if c["name"] == cluster_name)["cluster"]["server"]


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane for the whole session, with the repository's CRDs installed and
    the operators' namespace."""
    state_dir = tmp_path_factory.mktemp("control-plane")
    try:
        kubeconfig = localcluster.up(state_dir, crds_dir=CRDS_DIR)
        with config.new_client_from_config(config_file=str(kubeconfig)) as api:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
        yield ControlPlane(state_dir, kubeconfig, server_of(kubeconfig))
    finally:
        localcluster.down(state_dir)


@pytest.fixture
def kube_api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """A Kubernetes API client for the session's control plane, closed after the test."""
    api_client = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    with api_client:
        yield api_client


class OperatorProcess:
    """`kiln operator` as a separate process, as it runs for real; killable at any moment."""

    def __init__(self, kubeconfig: Path, data_dir: Path, log_path: Path, **settings: str) -> None:
        self.kubeconfig = kubeconfig
        self.data_dir = data_dir
        self.log_path = log_path
        self.settings = {"KILN_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE, **settings}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = 0
        self.file_root: Path | None = None  # a directory its templates may read, if any

    def start(self) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        env = dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            KILN_DATA=str(self.data_dir),
            KILN_LIVENESS_PORT=str(self.port),
            KILN_METRICS_PORT=str(self.metrics_port),
            KILN_HTTP_ADDRESS=f"127.0.0.1:{self.metrics_port}",  # where a standby forwards to
            **self.settings,
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kiln.cli", "operator"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("operator liveness endpoint never answered")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, as when a node dies."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_build_vms(self) -> list[str]:
        """SIGKILL the build VMs left under its data directory (they outlive the operator by
        design, so a test that stops before its runs end would leave them running)."""
        handles = [qemu.find(d) for d in sorted((self.data_dir / "vm").glob("*"))]
        found = [handle for handle in handles if handle is not None]
        for handle in found:
            qemu.kill(handle)
        return [handle.name for handle in found]

    def http(self, path: str) -> str:
        """GET path on the operator's HTTP port (metrics, run logs, health)."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample on /metrics, keyed by name and labels."""
        families = text_string_to_metric_families(self.http("/metrics"))
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in families
            for sample in family.samples
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="session")
def kiln_operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session's `default` namespace (other tests run their own
    operators in other namespaces), with its own data directory (staging, VMs, gallery);
    its templates may read files from examples/ as /kiln/examples, as in `make demo`."""
    data = tmp_path_factory.mktemp("kiln-data")
    files = tmp_path_factory.mktemp("template-files")
    operator = OperatorProcess(
        control_plane.kubeconfig,
        data,
        data.parent / "operator.log",
        KILN_NAMESPACES="default",
        KILN_FILE_SOURCE_ROOTS=f"{EXAMPLES_ROOT}={REPO_ROOT / 'examples'},{files}",
    )
    operator.file_root = files
    operator.start()
    yield operator
    operator.stop()
