"""`kiln run TEMPLATE [--wait]`: start a build and follow it to its end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kiln import GROUP, VERSION
from kiln.api.run import TERMINAL_RUN_STATES, RunState
from kiln.kube import RUNS, TEMPLATES
from kiln.reconcile.runs import label_value
from kiln.reconcile.templates import LABEL_TEMPLATE, LABEL_TRIGGER

Body = dict[str, Any]
POLL_SECONDS = 2.0
TRIGGER = "kiln-run"


class RunError(Exception):
    pass


def manifest(template: str, namespace: str) -> Body:
    """A run named after its template (the API server adds a unique suffix)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageBuildRun",
        "metadata": {
            "generateName": f"{template[:200]}-",
            "namespace": namespace,
            "labels": {LABEL_TEMPLATE: label_value(template), LABEL_TRIGGER: TRIGGER},
        },
        "spec": {"templateRef": {"name": template}},
    }


def create(api: CustomObjectsApi, template: str, namespace: str) -> str:
    try:
        api.get_namespaced_custom_object(GROUP, VERSION, namespace, TEMPLATES, template)
    except ApiException as error:
        if error.status == 404:
            message = f"ImageTemplate {template} does not exist in namespace {namespace}"
            raise RunError(message) from None
        raise
    created = api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, RUNS, manifest(template, namespace)
    )
    return str(created["metadata"]["name"])


def progress_lines(previous: Body | None, current: Body) -> list[str]:
    """What changed between two looks at a run's status, one line per change."""
    before = previous or {}
    lines = []
    old_steps = {s["name"]: s for s in before.get("steps") or []}
    for step in current.get("steps") or []:
        old = old_steps.get(step["name"], {})
        if step["state"] != old.get("state") and step["state"] not in ("Pending", "Skipped"):
            detail = f": {step['message']}" if step.get("message") else ""
            lines.append(f"step {step['name']} {step['state']}{detail}")
    state = (current.get("runState"), current.get("runSubState"))
    if state != (before.get("runState"), before.get("runSubState")) or (
        current.get("message") != before.get("message") and not lines
    ):
        where = "/".join(s for s in state if s)
        lines.append(f"{where or 'Pending'}: {current.get('message') or ''}".rstrip(": "))
    return lines


def follow(
    fetch: Callable[[], Body],
    out: TextIO,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Print the run's progress until it ends (its final runState) or timeout passes."""
    deadline = time.monotonic() + timeout
    previous: Body | None = None
    while True:
        status = fetch().get("status") or {}
        for line in progress_lines(previous, status):
            print(line, file=out, flush=True)
        previous = status
        if status.get("runState") in TERMINAL_RUN_STATES:
            return str(status["runState"])
        if time.monotonic() > deadline:
            raise RunError(f"the run has not ended after {timeout / 60:.0f} minutes")
        sleep(POLL_SECONDS)


def run(template: str, namespace: str, wait: bool, timeout_minutes: float) -> int:
    from kiln.kube import load_client

    api = CustomObjectsApi(load_client())
    name = create(api, template, namespace)
    print(f"imagebuildrun.{GROUP}/{name} created", flush=True)
    if not wait:
        return 0

    def fetch() -> Body:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, RUNS, name)

    state = follow(fetch, sys.stdout, timeout_minutes * 60)
    return 0 if state == RunState.Succeeded else 1
