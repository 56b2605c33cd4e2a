"""What an ImageTemplate's status should be, decided from its spec, its runs and the settings."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from kiln import reasons
from kiln.api.run import TERMINAL_RUN_STATES, RunState
from kiln.api.template import Provider
from kiln.api.validation import SpecProblem, validate_template
from kiln.reconcile.conditions import kstatus, set_condition
from kiln.settings import OperatorSettings

Body = dict[str, Any]

LABEL_TEMPLATE = "kiln.dev/template"
LABEL_TEMPLATE_UID = "kiln.dev/template-uid"
LABEL_TRIGGER = "kiln.dev/trigger"
LABEL_GENERATION = "kiln.dev/template-generation"


def effective_spec(raw_spec: Body, settings: OperatorSettings) -> Body:
    """The spec with the operator's defaults filled in: what a run snapshots and builds."""
    spec = dict(raw_spec)
    spec.setdefault("provider", settings.default_provider.value)
    defaults = {
        "location": settings.location or ("local" if spec["provider"] == "local" else None),
        "resourceGroup": settings.resource_group
        or ("local" if spec["provider"] == "local" else None),
        "subscriptionId": settings.subscription_id,
    }
    for field, value in defaults.items():
        if value and not spec.get(field):
            spec[field] = value
    return spec


def spec_hash(spec: Body) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def problems_of(spec: Body, settings: OperatorSettings) -> list[SpecProblem]:
    """The spec's problems, including what this operator does not let templates reach."""
    try:
        provider = Provider(spec.get("provider"))
    except ValueError:
        return [SpecProblem(path="spec.provider", message="must be azure or local")]
    return validate_template(spec, provider, settings.tenancy_policy)


def describe_problems(problems: list[SpecProblem]) -> str:
    listed = "; ".join(str(p) for p in problems)
    return f"{listed}. Fix the spec and apply it again; no build starts until then."


def index_entry(template: Body) -> Body:
    """What queue admission needs of a template (the kopf index keeps this)."""
    meta = template["metadata"]
    kept = ("name", "namespace", "uid", "generation", "deletionTimestamp")
    return {
        "metadata": {key: meta.get(key) for key in kept},
        "spec": copy.deepcopy(dict(template.get("spec") or {})),
    }


def _created(run: Body) -> tuple[str, str]:
    return (run["metadata"].get("creationTimestamp", ""), run["metadata"]["name"])


def _run_state(run: Body) -> str | None:
    return (run.get("status") or {}).get("runState")


def auto_run_enabled(spec: Body) -> bool:
    return ((spec.get("autoRun") or {}).get("state")) == "Enabled"


def has_ended(run: Body) -> bool:
    return _run_state(run) in TERMINAL_RUN_STATES


def is_building(run: Body) -> bool:
    """Started (it has its snapshot) and not ended: it still needs the staging."""
    started = bool((run.get("status") or {}).get("templateSnapshot"))
    return started and _run_state(run) not in TERMINAL_RUN_STATES


def auto_run_name(template: Body) -> str:
    """One name per template generation, so creating the autoRun run is idempotent."""
    meta = template["metadata"]
    return f"{meta['name'][:200]}-g{meta['generation']}-{meta['uid'][:5]}"


def _build_conditions(
    template: Body, runs: list[Body], previous: list[Body] | None, now: str
) -> list[Body]:
    """kstatus for a valid template: with autoRun, Ready follows this generation's run."""
    generation = template["metadata"].get("generation")

    def conditions(
        ready: bool, reconciling: bool, stalled: bool, reason: str, message: str
    ) -> list[Body]:
        return kstatus(
            previous,
            ready=ready,
            reconciling=reconciling,
            stalled=stalled,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )

    if not auto_run_enabled(template.get("spec") or {}):
        message = "The template is valid; create an ImageBuildRun to build it."
        return conditions(True, False, False, reasons.SPEC_VALID, message)
    own = next((r for r in runs if r["metadata"]["name"] == auto_run_name(template)), None)
    state = _run_state(own) if own else None
    if own is None or state not in TERMINAL_RUN_STATES:
        where = f"run {own['metadata']['name']}" if own else "a run"
        sub_state = ((own or {}).get("status") or {}).get("runSubState") or "Queued"
        message = f"autoRun: {where} is building this generation ({sub_state})."
        return conditions(False, True, False, reasons.BUILDING, message)
    name = own["metadata"]["name"]
    if state == RunState.Succeeded:
        message = f"autoRun: run {name} built this generation."
        return conditions(True, False, False, reasons.IMAGE_BUILT, message)
    detail = (own.get("status") or {}).get("message") or ""
    message = (
        f"autoRun: run {name} ended {state}: {detail} Fix the template and apply it "
        "(a new run starts), or create an ImageBuildRun to retry."
    )
    return conditions(False, False, True, reasons.BUILD_FAILED, message)


def template_status(
    template: Body, runs: list[Body], settings: OperatorSettings, staging: str | None, now: str
) -> Body:
    """The full status of a template; written as is, so repeated passes converge."""
    meta = template["metadata"]
    generation = meta.get("generation")
    previous = (template.get("status") or {}).get("conditions")
    spec = effective_spec(template.get("spec") or {}, settings)
    problems = problems_of(spec, settings)
    if problems:
        message = describe_problems(problems)
        conditions = set_condition(
            previous, reasons.ACCEPTED, "False", reasons.INVALID_SPEC, message, generation, now
        )
        conditions = kstatus(
            conditions,
            ready=False,
            reconciling=False,
            stalled=True,
            reason=reasons.INVALID_SPEC,
            message=message,
            generation=generation,
            now=now,
        )
    else:
        conditions = set_condition(
            previous,
            reasons.ACCEPTED,
            "True",
            reasons.SPEC_VALID,
            "The spec is valid.",
            generation,
            now,
        )
        conditions = _build_conditions(template, runs, conditions, now)
    recorded = template.get("status") or {}
    provider = spec.get("provider")
    if problems and recorded.get("exactStagingResourceGroup"):
        # An invalid edit names no staging, but one made by an earlier generation may still
        # exist: keep it (and its provider) on record, so deleting the template removes it.
        provider, staging = recorded.get("provider"), recorded["exactStagingResourceGroup"]
    status: Body = {
        "observedGeneration": generation,
        "conditions": conditions,
        "provider": provider,
        "exactStagingResourceGroup": staging,
        "lastRun": None,
        "latestOutputs": None,
    }
    ordered = sorted(runs, key=_created)
    if ordered:
        last = ordered[-1]
        status["lastRun"] = {"name": last["metadata"]["name"], "runState": _run_state(last)}
    latest = latest_successful_run(runs)
    if latest is not None:
        status["latestOutputs"] = (latest.get("status") or {}).get("runOutputs")
    return status


def latest_successful_run(runs: list[Body]) -> Body | None:
    """The newest run that distributed something: its outputs are the template's latest."""
    succeeded = [
        r
        for r in sorted(runs, key=_created)
        if _run_state(r) in (RunState.Succeeded, RunState.PartiallySucceeded)
    ]
    return succeeded[-1] if succeeded else None
