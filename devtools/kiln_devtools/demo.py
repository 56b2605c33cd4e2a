"""`make demo`: the operator in the background and a real build of examples/ on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kiln import GROUP, VERSION
from kiln.api.run import TERMINAL_RUN_STATES, RunState
from kiln.kube import RUNS, TEMPLATES

DEMO_TEMPLATE = "debian-12-base"
NAMESPACE = "default"
OPERATOR_NAMESPACE = "kiln-system"  # the demo operator's own: per-run key Secrets live there
# The path under which the examples' templates name their files (file:///kiln/examples/...).
EXAMPLES_ROOT = "/kiln/examples"
BUILD_TIMEOUT_SECONDS = 3600
PLURALS = {"ImageTemplate": TEMPLATES, "ImageBuildRun": RUNS}


def _operator_pid(state_dir: Path) -> int | None:
    try:
        pid = int((state_dir / "operator.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"operator" in cmdline and any(b"kiln" in part for part in cmdline) else None


def start_operator(state_dir: Path, examples: Path) -> int:
    """The demo's operator, detached so it keeps running after `make demo` returns; its
    templates may read files from the examples' directory, and from nowhere else."""
    if pid := _operator_pid(state_dir):
        return pid
    env = dict(os.environ, KUBECONFIG=str(state_dir / "kubeconfig"))
    env.setdefault("KILN_DATA", str((state_dir / "data").absolute()))
    env.setdefault("KILN_FILE_SOURCE_ROOTS", f"{EXAMPLES_ROOT}={examples.absolute()}")
    env.setdefault("KILN_OPERATOR_NAMESPACE", OPERATOR_NAMESPACE)
    kiln = Path(sys.executable).with_name("kiln")
    with (state_dir / "operator.log").open("ab") as log:
        process = subprocess.Popen(
            [str(kiln), "operator"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    (state_dir / "operator.pid").write_text(str(process.pid))
    return process.pid


def stop_operator(state_dir: Path) -> None:
    pid = _operator_pid(state_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if _operator_pid(state_dir) is None:
            break
        time.sleep(0.1)
    (state_dir / "operator.pid").unlink(missing_ok=True)


def ensure_namespace(core: CoreV1Api, name: str) -> None:
    try:
        core.create_namespace({"metadata": {"name": name}})
    except ApiException as error:
        if error.status != 409:
            raise


def apply_file(api: CustomObjectsApi, path: Path) -> list[str]:
    """Create or update every Kiln object in a YAML file (like kubectl apply)."""
    applied = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") not in PLURALS:
            continue
        plural, name = PLURALS[doc["kind"]], doc["metadata"]["name"]
        namespace = doc["metadata"].get("namespace", NAMESPACE)
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, doc)
        except ApiException as error:
            if error.status != 409:
                raise
            api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, {"spec": doc["spec"]}
            )
        applied.append(f"{doc['kind']}/{name}")
    return applied


def _wait(api: CustomObjectsApi, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + BUILD_TIMEOUT_SECONDS
    last = ""
    while time.monotonic() < deadline:
        run = api.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, RUNS, name)
        status = run.get("status") or {}
        line = f"{status.get('runState', '-')}/{status.get('runSubState', '-')}: "
        line += status.get("message", "")
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if status.get("runState") in TERMINAL_RUN_STATES:
            return run
        time.sleep(3)
    raise TimeoutError(f"run {name} did not finish in {BUILD_TIMEOUT_SECONDS}s")


def _summary(run: dict[str, Any]) -> None:
    status = run["status"]
    print(f"\nRun {run['metadata']['name']}: {status['runState']} — {status.get('message')}")
    print(f"Source: {status.get('exactSource')}")
    for step in status.get("steps", []):
        print(f"  step {step['name']:<12} {step['state']:<10} {step.get('message', '')}")
    log = (status.get("checkpoint") or {}).get("logPath")
    if log:
        print(f"Log: {log}")
    print("\nImages:")
    for output in status.get("runOutputs") or []:
        print(f"  {output['runOutputName']}: {output.get('artifactId')}")
        print(f"      {output.get('artifactUri')}")


def run_demo(state_dir: Path, examples: Path) -> int:
    client: ApiClient = config.new_client_from_config(str(state_dir / "kubeconfig"))
    api = CustomObjectsApi(client)
    ensure_namespace(CoreV1Api(client), OPERATOR_NAMESPACE)
    pid = start_operator(state_dir, examples)
    print(f"operator running (pid {pid}, log {state_dir}/operator.log)")
    for applied in apply_file(api, examples / f"{DEMO_TEMPLATE}.yaml"):
        print(f"applied {applied}")
    run = api.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        RUNS,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ImageBuildRun",
            "metadata": {"generateName": f"{DEMO_TEMPLATE}-demo-"},
            "spec": {"templateRef": {"name": DEMO_TEMPLATE}},
        },
    )
    name = run["metadata"]["name"]
    print(f"created ImageBuildRun/{name}; building (about 5-10 minutes without KVM)")
    print(f"  follow along: .venv/bin/kiln logs -f {name}")
    finished = _wait(api, name)
    _summary(finished)
    print(
        "\nkubectl get imagetemplates,imagebuildruns  (KUBECONFIG="
        f"{state_dir.absolute()}/kubeconfig); `make cluster-down` stops everything."
    )
    return 0 if finished["status"]["runState"] == RunState.Succeeded else 1
