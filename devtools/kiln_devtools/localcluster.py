"""A local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager; no
nodes) for demos and tests.

There is no Docker here, so kind/minikube cannot run; the control plane of one current
Kubernetes release, built from the upstream Go modules (scripts/build-control-plane.sh,
versions in scripts/kubernetes.env), is enough for an operator: CRDs with CEL validation,
status, watches, finalizers, RBAC, TokenRequest, and through the controller manager
namespace deletion and ownerReference garbage collection.

Everything a cluster needs lives in one state directory: secrets, certificates, etcd
data, logs, pid files and the kubeconfig. Ports are chosen at start time, so several
clusters with different state directories can run side by side.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.client
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

if TYPE_CHECKING:
    from kubernetes.client import ApiextensionsV1Api

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-control-plane.sh"
VERSIONS_FILE = REPO_ROOT / "scripts" / "kubernetes.env"
ETCD = "etcd"
APISERVER = "kube-apiserver"
CONTROLLER_MANAGER = "kube-controller-manager"
KUBECTL = "kubectl"
PROCESSES = (ETCD, APISERVER, CONTROLLER_MANAGER)
# What the tests and an operator need without nodes: namespaces that finish deleting,
# owner references that collect, and the default ServiceAccount of each namespace.
CONTROLLERS = ("namespace", "garbagecollector", "serviceaccount", "serviceaccount-token")
CONTEXT = "kiln-local"
ETCD_READY_TIMEOUT = 30.0
APISERVER_READY_TIMEOUT = 120.0
CONTROLLER_MANAGER_READY_TIMEOUT = 60.0
BUILD_TIMEOUT = 3600.0
CRD_ESTABLISHED_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """The local control plane could not be started or reached."""


class Ports(BaseModel):
    """The ports of one run; recorded so a restart can keep the same server URL."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int


@dataclass(frozen=True)
class StateDir:
    """The layout of a state directory; one place for every file name."""

    root: Path

    @classmethod
    def of(cls, state_dir: Path) -> StateDir:
        # Absolute, so the paths in process command lines identify this directory.
        return cls(Path(state_dir).expanduser().resolve())

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.csv"

    @property
    def sa_key(self) -> Path:
        return self.root / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "sa.pub"

    @property
    def cert_dir(self) -> Path:
        return self.root / "certs"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def controller_manager_kubeconfig(self) -> Path:
        return self.root / "controller-manager.kubeconfig"

    @property
    def controller_manager_certs(self) -> Path:
        return self.root / "controller-manager-certs"

    @property
    def ports_file(self) -> Path:
        return self.root / "ports.json"

    @property
    def version_file(self) -> Path:
        return self.root / "kubernetes-version"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def pid_file(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def marker(self, name: str) -> str:
        """The command-line argument that ties a process to this state directory."""
        if name == ETCD:
            return f"--data-dir={self.etcd_data}"
        if name == CONTROLLER_MANAGER:
            return f"--cert-dir={self.controller_manager_certs}"
        return f"--cert-dir={self.cert_dir}"


# --- public API -----------------------------------------------------------------------


def up(state_dir: Path, crds_dir: Path | None = None) -> Path:
    """Start (or reuse) the control plane in state_dir, apply CRDs, return the kubeconfig."""
    state = StateDir.of(state_dir)
    state.root.mkdir(parents=True, exist_ok=True)
    with _locked(state):
        _ensure_secrets(state)
        ports = read_ports(state.root)
        token = _read_token(state)
        if ports is None or not _reusable(state, ports, token):
            ports = _start(state, token)
        _write_kubeconfig(state, ports, token)
    if crds_dir is not None:
        apply_crds(state.kubeconfig, crds_dir)
    return state.kubeconfig


def down(state_dir: Path) -> None:
    """Stop the processes this state directory started; anything else is left alone."""
    state = StateDir.of(state_dir)
    for name in reversed(PROCESSES):
        _stop(state, name)


def status(state_dir: Path) -> str:
    """A short human-readable account of the control plane in state_dir."""
    state = StateDir.of(state_dir)
    pids = read_pids(state.root)
    ports = read_ports(state.root)
    if not pids or ports is None:
        return f"control plane not running (state dir {state.root})"
    server = server_url(ports)
    pid_text = ", ".join(f"{name} pid {pid}" for name, pid in pids.items())
    if len(pids) < len(PROCESSES):
        return f"control plane partly running ({pid_text}); run up again or down"
    ready = _apiserver_ready(ports.apiserver, _read_token(state))
    return (
        f"control plane {'ready' if ready else 'running, not ready'}: {server} ({pid_text})\n"
        f"KUBECONFIG={state.kubeconfig}"
    )


def read_pids(state_dir: Path) -> dict[str, int]:
    """The live control plane pids that really belong to state_dir."""
    state = StateDir.of(state_dir)
    pids: dict[str, int] = {}
    for name in PROCESSES:
        pid = _read_pid(state.pid_file(name))
        if pid is not None and is_our_process(pid, name, state):
            pids[name] = pid
    return pids


def read_ports(state_dir: Path) -> Ports | None:
    """The ports recorded by the last start in state_dir, if any."""
    try:
        return Ports.model_validate_json(StateDir.of(state_dir).ports_file.read_text())
    except (OSError, ValueError):
        return None


def server_url(ports: Ports) -> str:
    return f"https://127.0.0.1:{ports.apiserver}"


# --- binaries -------------------------------------------------------------------------


def kubernetes_version() -> str:
    """The one Kubernetes release the control plane runs (scripts/kubernetes.env)."""
    return _versions()["KUBERNETES_VERSION"]


def _versions() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in VERSIONS_FILE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def binaries_dir() -> Path:
    """KILN_CONTROL_PLANE_BIN, else the cached build of this release, else build it now
    (minutes, once per version; the script is idempotent and locked)."""
    override = os.environ.get("KILN_CONTROL_PLANE_BIN")
    if override:
        directory = Path(override)
        missing = [n for n in (*PROCESSES, KUBECTL) if not os.access(directory / n, os.X_OK)]
        if missing:
            raise ClusterError(f"KILN_CONTROL_PLANE_BIN={override} lacks {', '.join(missing)}")
        return directory
    versions = _versions()
    cached = (
        _cache_root()
        / "kubernetes"
        / f"v{versions['KUBERNETES_VERSION']}-etcd-v{versions['ETCD_VERSION']}"
    )
    if all(os.access(cached / n, os.X_OK) for n in (*PROCESSES, KUBECTL)):
        return cached
    return _run_build_script()


def binary(name: str) -> Path:
    """One of etcd, kube-apiserver, kube-controller-manager, kubectl of this release."""
    return binaries_dir() / name


def _cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def _run_build_script() -> Path:
    log.info("building the control plane with %s (minutes the first time)", BUILD_SCRIPT)
    try:
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        raise ClusterError(f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT:.0f}s") from error
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise ClusterError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")
    return Path(lines[-1])


# --- secrets and kubeconfig -----------------------------------------------------------


def _ensure_secrets(state: StateDir) -> None:
    """Generate the admin token and service-account key pair once per state dir."""
    if not state.tokens.exists():
        token = secrets.token_urlsafe(32)
        _write_private(state.tokens, f"{token},admin,admin,system:masters\n")
    if not (state.sa_key.exists() and state.sa_pub.exists()):
        key_pem, pub_pem = _rsa_key_pair()
        _write_private(state.sa_key, key_pem)
        _write_private(state.sa_pub, pub_pem)
    state.cert_dir.mkdir(mode=0o700, exist_ok=True)


def _rsa_key_pair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key_pem.decode(), pub_pem.decode()


def _read_token(state: StateDir) -> str:
    return state.tokens.read_text().split(",", 1)[0].strip()


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: these files hold credentials."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def kubeconfig_dict(server: str, token: str, ca_pem: bytes | None) -> dict[str, Any]:
    """A one-context kubeconfig; verifies TLS with the CA when it is known."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    else:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": cluster}],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": CONTEXT,
                "context": {"cluster": CONTEXT, "user": "admin", "namespace": "default"},
            }
        ],
        "current-context": CONTEXT,
        "preferences": {},
    }


def _serving_ca(state: StateDir) -> bytes | None:
    """The self-signed chain kube-apiserver wrote into its cert dir, if it is there."""
    candidates = sorted(state.cert_dir.glob("apiserver*.crt"))
    if not candidates:
        return None
    data = candidates[0].read_bytes()
    return data if b"BEGIN CERTIFICATE" in data else None


def _write_kubeconfig(state: StateDir, ports: Ports, token: str) -> None:
    config = kubeconfig_dict(server_url(ports), token, _serving_ca(state))
    _write_private(state.kubeconfig, yaml.safe_dump(config, sort_keys=False))


# --- ports ----------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (SO_REUSEADDR, as Go listeners use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """count distinct ports the kernel considers free right now."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def _choose_ports(previous: Ports | None) -> Ports:
    """Reuse the last ports when all are free (a stable URL), else take new ones."""
    if previous and all(port_is_free(p) for p in previous.model_dump().values()):
        return previous
    client, peer, apiserver, controller_manager = free_ports(4)
    return Ports(
        etcd_client=client,
        etcd_peer=peer,
        apiserver=apiserver,
        controller_manager=controller_manager,
    )


# --- processes ------------------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def is_our_process(pid: int, name: str, state: StateDir) -> bool:
    """Whether pid is the `name` binary started for this very state directory."""
    if not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    return bool(args) and Path(args[0]).name == name and state.marker(name) in args[1:]


def _running(state: StateDir) -> bool:
    return len(read_pids(state.root)) == len(PROCESSES)


def _reusable(state: StateDir, ports: Ports, token: str, grace: float = 10.0) -> bool:
    """Both recorded processes live and the server answers (give it a moment to)."""
    deadline = time.monotonic() + grace
    while _running(state):
        if _apiserver_ready(ports.apiserver, token):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return False


# Children started by this Python process, kept referenced so that they are reaped by
# us (no zombies, no "still running" ResourceWarning when the Popen is collected).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    proc = _CHILDREN.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _stop(state: StateDir, name: str) -> None:
    pid_file = state.pid_file(name)
    pid = _read_pid(pid_file)
    if pid is not None:
        _reap(pid)
    if pid is not None and is_our_process(pid, name, state):
        log.info("stopping %s (pid %d)", name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, STOP_TIMEOUT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, STOP_TIMEOUT)
    pid_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Child:
    """A process just started, and where its output begins in its (appended) log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    log_offset: int


def _spawn(state: StateDir, name: str, argv: list[str]) -> _Child:
    """Start detached (own session, output to a log) so it outlives the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    with state.log_file(name).open("ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        offset = out.tell()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state.root,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    state.pid_file(name).write_text(f"{proc.pid}\n")
    return _Child(name, proc, state.log_file(name), offset)


def etcd_argv(binary: Path, state: StateDir, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(binary),
        state.marker(ETCD),
        "--name=kiln",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kiln={peer}",
        "--logger=zap",
        "--log-level=warn",
    ]


def apiserver_argv(binary: Path, state: StateDir, ports: Ports) -> list[str]:
    return [
        str(binary),
        state.marker(APISERVER),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--secure-port={ports.apiserver}",
        "--bind-address=127.0.0.1",
        f"--token-auth-file={state.tokens}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={state.sa_pub}",
        f"--service-account-signing-key-file={state.sa_key}",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_argv(binary: Path, state: StateDir, ports: Ports) -> list[str]:
    return [
        str(binary),
        state.marker(CONTROLLER_MANAGER),
        f"--kubeconfig={state.controller_manager_kubeconfig}",
        f"--secure-port={ports.controller_manager}",
        "--bind-address=127.0.0.1",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={state.sa_key}",
        "--use-service-account-credentials=false",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def _start(state: StateDir, token: str) -> Ports:
    """Start etcd, kube-apiserver, then kube-controller-manager on fresh ports; retry
    if a port was snatched."""
    binaries = binaries_dir()
    _forget_other_release(state)
    previous = read_ports(state.root)
    for attempt in range(1, START_ATTEMPTS + 1):
        down(state.root)  # leftovers of a half-started or half-dead run
        ports = _choose_ports(previous if attempt == 1 else None)
        state.ports_file.write_text(ports.model_dump_json() + "\n")
        try:
            _start_once(state, token, ports, binaries)
            return ports
        except _PortTaken as err:
            log.warning("port taken (%s), retrying with other ports", err)
    down(state.root)
    raise ClusterError(f"could not find free ports after {START_ATTEMPTS} attempts")


def _forget_other_release(state: StateDir) -> None:
    """A state directory last run by another release starts with empty etcd data: the
    local cluster is disposable, and etcd cannot always read an older release's data."""
    version = kubernetes_version()
    try:
        previous = state.version_file.read_text().strip()
    except OSError:
        previous = None
    if previous != version:
        down(state.root)
        if state.etcd_data.exists():
            log.info("state dir was used by Kubernetes %s; starting with empty etcd data", previous)
            shutil.rmtree(state.etcd_data)
        state.version_file.write_text(version + "\n")


class _PortTaken(Exception):
    """A process exited because its port was taken between choosing and binding it."""


def _start_once(state: StateDir, token: str, ports: Ports, binaries: Path) -> None:
    log.info("starting etcd on 127.0.0.1:%d", ports.etcd_client)
    child = _spawn(state, ETCD, etcd_argv(binaries / ETCD, state, ports))
    _wait_until(lambda: _etcd_healthy(ports.etcd_client), child, state, ETCD_READY_TIMEOUT)
    log.info("starting kube-apiserver on %s", server_url(ports))
    child = _spawn(state, APISERVER, apiserver_argv(binaries / APISERVER, state, ports))
    _wait_until(
        lambda: _apiserver_ready(ports.apiserver, token), child, state, APISERVER_READY_TIMEOUT
    )
    # Its own kubeconfig (the admin token, and the server's CA now that it exists).
    config = kubeconfig_dict(server_url(ports), token, _serving_ca(state))
    _write_private(state.controller_manager_kubeconfig, yaml.safe_dump(config, sort_keys=False))
    log.info("starting kube-controller-manager (%s)", ", ".join(CONTROLLERS))
    argv = controller_manager_argv(binaries / CONTROLLER_MANAGER, state, ports)
    child = _spawn(state, CONTROLLER_MANAGER, argv)
    _wait_until(
        lambda: _https_ok(ports.controller_manager, "/healthz"),
        child,
        state,
        CONTROLLER_MANAGER_READY_TIMEOUT,
    )


def _wait_until(ready: Callable[[], bool], child: _Child, state: StateDir, timeout: float) -> None:
    """Poll ready() while the process lives; explain failures with the log's path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if child.proc.poll() is not None:
            tail = _log_tail(child)
            if "address already in use" in tail:
                raise _PortTaken(child.name)
            down(state.root)
            raise ClusterError(
                f"{child.name} exited with code {child.proc.returncode}; see {child.log}\n{tail}"
            )
        time.sleep(0.25)
    down(state.root)
    raise ClusterError(f"{child.name} not ready after {timeout:.0f}s; see {child.log}")


def _log_tail(child: _Child, lines: int = 15) -> str:
    """The last lines this run wrote (earlier runs' output is in the same file)."""
    try:
        with child.log.open("rb") as f:
            f.seek(child.log_offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _etcd_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return json.load(resp).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False


def _apiserver_ready(port: int, token: str) -> bool:
    return _https_ok(port, "/readyz", token)


def _https_ok(port: int, path: str, token: str | None = None) -> bool:
    """GET path answers 200 "ok"; TLS is not verified here because each server made its
    own self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3, context=context) as resp:
            return resp.status == 200 and resp.read().strip() == b"ok"
    except (OSError, http.client.HTTPException):
        return False


@contextlib.contextmanager
def _locked(state: StateDir) -> Iterator[None]:
    """Serialise concurrent `up` calls on one state directory."""
    with state.lock.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- CRDs -----------------------------------------------------------------------------


def load_crds(crds_dir: Path) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition document in crds_dir/*.yaml, in file order."""
    crds: list[dict[str, Any]] = []
    for path in sorted(Path(crds_dir).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
            elif doc:
                log.warning("%s: skipping a %s document", path, doc.get("kind", "non-CRD"))
    return crds


def apply_crds(kubeconfig: Path, crds_dir: Path) -> list[str]:
    """Create or replace every CRD in crds_dir and wait until each is Established."""
    if not Path(crds_dir).is_dir():
        log.warning("CRD directory %s does not exist; no CRDs installed", crds_dir)
        return []
    crds = load_crds(crds_dir)
    if not crds:
        return []
    from kubernetes import client, config

    with config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
        api = client.ApiextensionsV1Api(api_client)
        names = [_apply_crd(api, crd) for crd in crds]
        for name in names:
            _wait_established(api, name)
    return names


def _apply_crd(api: ApiextensionsV1Api, crd: dict[str, Any]) -> str:
    from kubernetes.client.exceptions import ApiException

    name: str = crd["metadata"]["name"]
    try:
        api.create_custom_resource_definition(body=crd, _preload_content=False)
        log.info("created CRD %s", name)
    except ApiException as err:
        if err.status != 409:
            raise
        current = read_crd(api, name)
        body = {**crd, "metadata": {**crd["metadata"]}}
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        api.replace_custom_resource_definition(name, body=body, _preload_content=False)
        log.info("replaced CRD %s", name)
    return name


def read_crd(api: ApiextensionsV1Api, name: str) -> dict[str, Any]:
    # Raw JSON: the client's models may be older or newer than the server.
    resp = api.read_custom_resource_definition(name, _preload_content=False)
    return json.loads(resp.data)


def crd_established(crd: dict[str, Any]) -> bool:
    conditions = crd.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def _wait_established(api: ApiextensionsV1Api, name: str) -> None:
    deadline = time.monotonic() + CRD_ESTABLISHED_TIMEOUT
    while time.monotonic() < deadline:
        if crd_established(read_crd(api, name)):
            return
        time.sleep(0.2)
    raise ClusterError(f"CRD {name} not Established after {CRD_ESTABLISHED_TIMEOUT:.0f}s")
