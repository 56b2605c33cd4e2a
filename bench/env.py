"""What the figures run against: the real local control plane, `kiln operator` as its own
process, a watch that timestamps events, the API server's request counter, the VM lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes import config, watch
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kiln import GROUP, VERSION
from kiln.providers.local import qemu
from kiln_devtools import demo, localcluster

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NAMESPACE = "kiln-bench"
Body = dict[str, Any]
_REQUESTS = re.compile(r"^apiserver_request_total\{[^}]*\} (\S+)$", re.MULTILINE)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _lock_timed_out(_signum: int, _frame: object) -> None:
    raise TimeoutError("the VM lock stayed taken for an hour")


@contextlib.contextmanager
def vm_lock(path: Path | None, timeout: int = 3600) -> Iterator[None]:
    """Hold the machine's VM lock (flock, queued like `flock -w`) while VMs boot, if one
    is configured; an alarm bounds the wait."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        previous = signal.signal(signal.SIGALRM, _lock_timed_out)
        signal.alarm(timeout)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Operator:
    """`kiln operator` started the way `make demo` starts it, in the bench's state dir."""

    def __init__(self, state_dir: Path, **settings: str) -> None:
        self.state_dir = state_dir
        self.settings = {"KILN_NAMESPACES": NAMESPACE, **settings}
        self.port = qemu.free_port()
        self.metrics_port = qemu.free_port()  # not the default: other operators may hold it
        self.pid = 0

    def start(self, timeout: float = 90) -> None:
        saved = dict(os.environ)
        os.environ.update(
            self.settings,
            KILN_LIVENESS_PORT=str(self.port),
            KILN_METRICS_PORT=str(self.metrics_port),
        )
        try:
            self.pid = demo.start_operator(self.state_dir, EXAMPLES)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        log = (self.state_dir / "operator.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the operator never became healthy: {log}")

    def stop(self) -> None:
        demo.stop_operator(self.state_dir)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"operator pid {self.pid} has no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


class Cluster:
    """The local control plane in state_dir, with Kiln's CRDs and the bench's namespace
    (its operators watch only that one)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.kubeconfig = localcluster.up(state_dir, crds_dir=REPO / "crds")
        self.client: ApiClient = config.new_client_from_config(str(self.kubeconfig))
        self.api = CustomObjectsApi(self.client)
        for namespace in (NAMESPACE, demo.OPERATOR_NAMESPACE):
            demo.ensure_namespace(CoreV1Api(self.client), namespace)

    def close(self) -> None:
        self.client.close()
        localcluster.down(self.state_dir)

    def requests_total(self) -> float:
        """Sum of apiserver_request_total over every label set (all clients)."""
        method, url, headers, body, _ = self.client.param_serialize(
            "GET", "/metrics", auth_settings=["BearerToken"]
        )
        response = self.client.call_api(method, url, headers, body, _request_timeout=30)
        response.read()
        text = response.data.decode()
        return sum(float(value) for value in _REQUESTS.findall(text))

    def create(self, plural: str, body: Body) -> Body:
        return self.api.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, body)

    def get(self, plural: str, name: str) -> Body:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name)

    def patch(self, plural: str, name: str, patch: Body) -> Body:
        return self.api.patch_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, plural, name, patch
        )

    def delete(self, plural: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.api.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural, name)

    def names(self, plural: str) -> list[str]:
        items = self.api.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, plural)
        return [item["metadata"]["name"] for item in items["items"]]


class Watcher:
    """A background watch of one plural: on_event(type, object, monotonic time) per event."""

    def __init__(self, cluster: Cluster, plural: str, on_event: Callable[[str, Body, float], None]):
        self.cluster = cluster
        self.plural = plural
        self.on_event = on_event
        self._stop = threading.Event()
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"watch-{plural}")
        self.error: BaseException | None = None

    def __enter__(self) -> Watcher:
        listed = self.cluster.api.list_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, self.plural
        )
        self._version = listed["metadata"]["resourceVersion"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watch.stop()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                stream = self._watch.stream(
                    self.cluster.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    self.plural,
                    resource_version=self._version,
                    timeout_seconds=30,
                    _request_timeout=60,
                )
                for event in stream:
                    now = time.monotonic()
                    body = event["object"]
                    if event["type"] == "ERROR":
                        raise RuntimeError(f"watch of {self.plural} ended: {body}")
                    self._version = body["metadata"]["resourceVersion"]
                    self.on_event(event["type"], body, now)
                    if self._stop.is_set():
                        return
        except BaseException as error:  # reported by wait_until, not lost in a thread
            if not self._stop.is_set():
                self.error = error


def wait_until(
    done: Callable[[], bool], timeout: float, what: str, watcher: Watcher | None = None
) -> None:
    """Bounded wait for a condition the watch thread (or a poll) makes true."""
    deadline = time.monotonic() + timeout
    while not done():
        if watcher is not None and watcher.error is not None:
            raise RuntimeError(f"the watch failed while waiting for {what}") from watcher.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(0.1)
