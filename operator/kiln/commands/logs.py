"""`kiln logs RUN`: the run's customization log, followed while the run is active."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kubernetes.client import CustomObjectsApi

from kiln import GROUP, VERSION
from kiln.api.run import TERMINAL_RUN_STATES
from kiln.kube import RUNS, load_client

FOLLOW_POLL_SECONDS = 2.0


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


def show(name: str, namespace: str, follow: bool) -> None:
    api = CustomObjectsApi(load_client())

    def fetch() -> dict[str, Any]:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)

    run = fetch()
    while follow and not _started(run):
        if (run.get("status") or {}).get("runState") in TERMINAL_RUN_STATES:
            break
        time.sleep(FOLLOW_POLL_SECONDS)
        run = fetch()
    path = log_path(run)
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
