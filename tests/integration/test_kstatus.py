"""What Flux, `kubectl wait` and Argo CD show for Kiln's objects, as the README promises.

The README's status table is the specification: for each row an object is brought into
that state on the real API server (by the operator where the state is quick to reach,
otherwise by writing the status Kiln's own status functions compute into an object of a
namespace no operator watches), read back, and given to the real kstatus library
(tests/kstatus) and to the Argo CD health script.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import config
from kubernetes.client import CoreV1Api, V1Namespace, V1ObjectMeta

from kiln import distribution, reasons
from kiln.api.run import RunState
from kiln.api.status import RunOutput
from kiln.api.template import ImageTemplateSpec
from kiln.reconcile.conditions import now_rfc3339
from kiln.reconcile.runs import run_conditions
from kiln.reconcile.templates import auto_run_name, template_status
from kiln.settings import OperatorSettings
from kubehelpers import (
    Body,
    Kiln,
    argocd_health,
    condition_status,
    kstatus,
    run,
    template,
    valid_spec,
)

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
UNWATCHED = "kstatus-states"  # no operator watches it: statuses stay as written
ROW = re.compile(r"^\| (ImageTemplate|ImageBuildRun) \| ([^|]+) \| (\w+) \| (\w+) \|$")


def readme_rows() -> list[tuple[str, str, str, str]]:
    rows = [m.groups() for m in map(ROW.match, README.read_text().splitlines()) if m]
    return [(kind, state.strip(), flux, argo) for kind, state, flux, argo in rows]


@pytest.fixture(scope="module")
def unwatched(control_plane: Any) -> Iterator[Kiln]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        core = CoreV1Api(api)
        core.create_namespace(V1Namespace(metadata=V1ObjectMeta(name=UNWATCHED)))
        yield Kiln(api, UNWATCHED)
        core.delete_namespace(UNWATCHED)


@pytest.fixture
def kiln(kube_api: Any, kiln_operator: Any) -> Kiln:
    return Kiln(kube_api)


def _write_status(kiln: Kiln, plural: str, name: str, status: Body) -> Body:
    """Status through the status subresource, as the operator writes it; read back."""
    kiln.api.patch_namespaced_custom_object_status(
        "kiln.dev", "v1alpha1", kiln.namespace, plural, name, {"status": status}
    )
    found = kiln.get(plural, name)
    assert found is not None
    return found


def _settings() -> OperatorSettings:
    return OperatorSettings(data_root=Path("/nonexistent"))


def valid_template(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
    kiln.create("imagetemplates", template(name))
    return kiln.wait_for(
        "imagetemplates", name, lambda b: condition_status(b, "Ready") == "True", 30, "Ready"
    )


def invalid_template(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
    # Minute 61 has cron's shape, so the API server takes it; the operator refuses it.
    kiln.create(
        "imagetemplates", template(name, triggers=[{"kind": "Schedule", "schedule": "61 * * * *"}])
    )
    return kiln.wait_for(
        "imagetemplates", name, lambda b: condition_status(b, "Stalled") == "True", 30, "Stalled"
    )


def building_template(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
    body = unwatched.create("imagetemplates", template(name, autoRun={"state": "Enabled"}))
    own_run = {
        "metadata": {"name": auto_run_name(body), "creationTimestamp": now_rfc3339()},
        "status": {"runState": "Running", "runSubState": "Building"},
    }
    status = template_status(body, [own_run], _settings(), None, now_rfc3339())
    return _write_status(unwatched, "imagetemplates", name, status)


def unseen_change(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
    body = unwatched.create("imagetemplates", template(name))
    _write_status(
        unwatched,
        "imagetemplates",
        name,
        template_status(body, [], _settings(), None, now_rfc3339()),
    )
    unwatched.patch("imagetemplates", name, {"spec": {"buildTimeoutInMinutes": 30}})
    changed = unwatched.get("imagetemplates", name) or {}
    assert changed["metadata"]["generation"] == 2
    return changed


def queued_run(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
    kiln.create("imagebuildruns", run(name, "no-such-template"))
    return kiln.wait_for(
        "imagebuildruns",
        name,
        lambda b: ((b or {}).get("status") or {}).get("runSubState") == "Queued",
        30,
        "Queued",
    )


def run_in_state(
    state: RunState, reason: str, sub_state: str | None = None, **extra: Any
) -> Callable:
    def produce(kiln: Kiln, unwatched: Kiln, name: str) -> Body:
        body = run(name, "some-template")
        status = {
            "runState": state,
            "runSubState": sub_state,
            "message": f"the run is {state}",
            "observedGeneration": 1,
            "conditions": run_conditions(None, state, reason, f"{state}.", 1, now_rfc3339()),
            **extra,
        }
        unwatched.create("imagebuildruns", body)
        stored = _write_status(unwatched, "imagebuildruns", name, status)
        for key, value in extra.items():  # the CRD keeps what Kiln writes
            assert stored["status"][key] == value
        return stored

    return produce


def partly_distributed() -> Body:
    """The status a run ends with when one of two targets failed, as the driver makes it."""
    spec = ImageTemplateSpec.model_validate(
        {
            **valid_spec(),
            "distribute": [
                {"type": "VHD", "runOutputName": "vhd"},
                {"type": "VHD", "runOutputName": "team", "uri": "/srv/out/team.vhd"},
            ],
        }
    )
    plan = distribution.plan(spec, "")
    done = RunOutput(run_output_name="vhd", artifact_id="/x/vhd.vhd", artifact_uri="file:///x")
    distribution.record_success(plan.targets[0], done)
    distribution.record_failure(plan.targets[1], "spec.distribute[1]: Permission denied")
    return {
        "runOutputs": [o.wire() for o in distribution.run_outputs(plan)],
        "distribution": [t.wire() for t in distribution.statuses(plan)],
    }


PRODUCERS: dict[tuple[str, str], Callable[[Kiln, Kiln, str], Body]] = {
    ("ImageTemplate", "valid"): valid_template,
    ("ImageTemplate", "invalid"): invalid_template,
    ("ImageTemplate", "building its autoRun"): building_template,
    ("ImageTemplate", "changed, not yet seen by Kiln"): unseen_change,
    ("ImageBuildRun", "Running (Queued)"): queued_run,
    ("ImageBuildRun", "Running (Building)"): run_in_state(
        RunState.Running, reasons.RUNNING, "Building"
    ),
    ("ImageBuildRun", "Succeeded"): run_in_state(RunState.Succeeded, reasons.SUCCEEDED),
    ("ImageBuildRun", "PartiallySucceeded"): run_in_state(
        RunState.PartiallySucceeded, reasons.PARTIALLY_SUCCEEDED, **partly_distributed()
    ),
    ("ImageBuildRun", "Failed"): run_in_state(RunState.Failed, reasons.CUSTOMIZER_FAILED),
    ("ImageBuildRun", "Canceled"): run_in_state(RunState.Canceled, reasons.CANCELED),
}


def test_the_readme_table_covers_every_state() -> None:
    assert {(kind, state) for kind, state, _, _ in readme_rows()} == set(PRODUCERS)


@pytest.mark.parametrize(
    ("kind", "state", "flux", "argo"), readme_rows(), ids=lambda v: str(v).replace(" ", "-")
)
def test_tools_show_what_the_readme_promises(
    kiln: Kiln, unwatched: Kiln, kind: str, state: str, flux: str, argo: str
) -> None:
    name = "ks-" + re.sub(r"[^a-z0-9]+", "-", f"{kind}-{state}".lower()).strip("-")
    body = PRODUCERS[(kind, state)](kiln, unwatched, name)
    try:
        (computed,) = kstatus(body)
        assert computed["status"] == flux, computed
        assert argocd_health(body)["status"] == argo
    finally:
        plural = "imagetemplates" if kind == "ImageTemplate" else "imagebuildruns"
        kiln.delete(plural, name)
        unwatched.delete(plural, name)
