"""`kiln logs RUN`: the run's customization log, followed while the run is active."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from kiln import GROUP, VERSION
from kiln.api.run import TERMINAL_RUN_STATES
from kiln.kube import RUNS, load_client

FOLLOW_POLL_SECONDS = 2.0
PROXY_TIMEOUT_SECONDS = 30.0
RUN_STATE_HEADER = "X-Kiln-Run-State"


class LogsError(Exception):
    pass


def log_path(run: dict[str, Any]) -> Path:
    """Where the operator writes the run's log (for azure runs, a copy goes to the staging
    storage account's packerlogs container)."""
    status = run.get("status") or {}
    path = (status.get("checkpoint") or {}).get("logPath")
    if not path or not _started(run):
        raise LogsError(
            f"run {run['metadata']['name']} has no log yet (state: "
            f"{status.get('runState') or 'not started'}, {status.get('message') or ''})"
        )
    log = Path(path)
    if not log.parent.exists():  # the staging step made it, on the operator's machine
        raise LogsError(not_here(run, log))
    return log


def not_here(run: dict[str, Any], log: Path) -> str:
    """Where to read a log that the operator wrote on another machine."""
    uri = ((run.get("status") or {}).get("checkpoint") or {}).get("logUri")
    where = (
        f"a copy is at {uri} (the staging storage account)"
        if uri
        else "run kiln logs where the operator runs, e.g. kubectl exec -n <namespace> "
        f"deploy/kiln -- kiln logs {run['metadata']['name']} -n {run['metadata']['namespace']}"
    )
    return f"the log is on the operator's machine ({log}), not this one; {where}"


def _started(run: dict[str, Any]) -> bool:
    """Past the staging step, which makes the run's directory (and its log)."""
    return "staging" in ((run.get("status") or {}).get("checkpoint") or {})


def show(
    name: str, namespace: str, follow: bool, operator: OperatorService, remote: bool = False
) -> None:
    """Read the log where it is written when this is the operator's machine, else through
    the API server's proxy to the operator's Service."""
    client = load_client()
    api = CustomObjectsApi(client)

    def fetch() -> dict[str, Any]:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)

    run = fetch()
    while follow and not _started(run):
        if (run.get("status") or {}).get("runState") in TERMINAL_RUN_STATES:
            break
        time.sleep(FOLLOW_POLL_SECONDS)
        run = fetch()
    try:
        path = log_path(run)
    except LogsError:
        if not _started(run):
            raise
        remote = True
    if remote:
        _show_remote(client, operator, namespace, name, follow, run)
        return
    offset = 0
    while True:
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            offset += len(chunk)
        if not follow or (fetch().get("status") or {}).get("runState") in TERMINAL_RUN_STATES:
            if follow and path.exists() and path.stat().st_size > offset:
                continue
            return
        time.sleep(FOLLOW_POLL_SECONDS)


class OperatorService(BaseModel):
    """The operator's Service, whose HTTP port serves run logs."""

    namespace: str
    name: str
    port: str = "http"


def proxy_path(operator: OperatorService, namespace: str, name: str) -> str:
    return (
        f"/api/v1/namespaces/{operator.namespace}/services/{operator.name}:{operator.port}"
        f"/proxy/logs/{namespace}/{name}"
    )


def read_through_proxy(
    client: ApiClient, operator: OperatorService, namespace: str, name: str, offset: int
) -> tuple[bytes, str]:
    """One chunk of the log from offset, and the run's state, as the operator sees them.
    The API server decides by RBAC (get services/proxy) whether the caller may ask."""
    request = client.param_serialize(
        "GET",
        proxy_path(operator, namespace, name),
        query_params=[("offset", str(offset))],
        auth_settings=["BearerToken"],
    )
    try:
        response = client.call_api(*request, _request_timeout=PROXY_TIMEOUT_SECONDS)
        status, body, state = (
            response.status,
            response.read() or b"",
            response.headers.get(RUN_STATE_HEADER) or "",
        )
    except ApiException as error:
        status, body, state = error.status, (error.body or "").encode(), ""
    if status != 200:
        text = body.decode(errors="replace").strip()
        raise LogsError(
            f"the operator's Service {operator.namespace}/{operator.name} answered "
            f"{status}: {text} (set --operator-namespace/--operator-service to where "
            "Kiln is installed)"
        )
    return body, state


def _show_remote(
    client: ApiClient,
    operator: OperatorService,
    namespace: str,
    name: str,
    follow: bool,
    run: dict[str, Any],
) -> None:
    offset = 0
    try:
        while True:
            chunk, state = read_through_proxy(client, operator, namespace, name, offset)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            offset += len(chunk)
            if chunk:
                continue
            if not follow or state in TERMINAL_RUN_STATES:
                return
            time.sleep(FOLLOW_POLL_SECONDS)
    except LogsError as error:
        if offset:
            raise
        raise LogsError(f"{error}; {not_here(run, Path(log_path_of(run)))}") from None


def log_path_of(run: dict[str, Any]) -> str:
    return str(((run.get("status") or {}).get("checkpoint") or {}).get("logPath") or "")
