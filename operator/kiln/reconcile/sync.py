"""Writes a template's status from its spec, its runs and the world (level-based)."""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kiln import reasons
from kiln.api.template import ImageTemplateSpec
from kiln.kube import TEMPLATES, refusal, template_runs
from kiln.providers.base import ProviderError, TemplateIdentity
from kiln.reconcile import exports
from kiln.reconcile import templates as decide
from kiln.reconcile.conditions import now_rfc3339
from kiln.runtime import Runtime


def template_identity(body: dict[str, Any]) -> TemplateIdentity:
    meta = body["metadata"]
    return TemplateIdentity(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])


def staging_of(runtime: Runtime, body: dict[str, Any]) -> str | None:
    """The staging group (or directory) of a valid template; None when it is invalid."""
    spec = decide.effective_spec(body.get("spec") or {}, runtime.settings)
    provider = runtime.providers.get(spec.get("provider", ""))
    if provider is None or decide.problems_of(spec, runtime.settings):
        return None
    parsed = ImageTemplateSpec.model_validate(spec)
    try:
        return provider.staging_id(template_identity(body), parsed)
    except ProviderError:
        return None


async def refresh_template(
    runtime: Runtime, namespace: str, name: str, body: dict[str, Any] | None = None
) -> None:
    """Write the template's status. From a template handler (body given: the template as
    kopf just handed it) the runs come from the index; after a run changed (body None)
    the template and its runs are read, since the index may not show that change yet."""
    if body is None:
        body = await runtime.kube.get(TEMPLATES, namespace, name)
        if body is not None:
            runs = await template_runs(runtime.kube, body)
    else:
        runs = await runtime.runs_of(namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    status = decide.template_status(
        body, runs, runtime.settings, staging_of(runtime, body), now_rfc3339()
    )
    await runtime.kube.patch_status(TEMPLATES, namespace, name, status)
    try:
        await export_outputs(runtime, body, runs)
    except ApiException as error:  # an export must never change how a run ends
        message = f"could not write the outputs ConfigMap: {refusal(error)}"
        kopf.warn(body, reason=reasons.EVENT_EXPORT_FAILED, message=message)


async def export_outputs(runtime: Runtime, template: dict[str, Any], runs: list[Any]) -> None:
    """spec.exportOutputs: the latest outputs in a ConfigMap, written only when they change,
    and never over a ConfigMap Kiln did not create."""
    target = ((template.get("spec") or {}).get("exportOutputs") or {}).get("configMapName")
    latest = decide.latest_successful_run(runs)
    outputs = ((latest or {}).get("status") or {}).get("runOutputs")
    if not target or not latest or not outputs:
        return
    namespace = template["metadata"]["namespace"]
    data = exports.config_map_data(outputs, latest["metadata"]["name"])
    existing = await runtime.kube.read_config_map(namespace, target)
    if existing is not None and not exports.is_ours(existing, template):
        message = (
            f"ConfigMap {target} exists and Kiln did not create it; delete it or choose "
            "another spec.exportOutputs.configMapName"
        )
        kopf.warn(template, reason=reasons.EVENT_EXPORT_FAILED, message=message)
        return
    if existing is not None and existing.get("data") == data:
        return
    manifest = exports.config_map(template, target, data)
    if existing is None:
        await runtime.kube.create_config_map(namespace, manifest)
    else:
        await runtime.kube.patch_config_map(namespace, target, manifest)
    message = f"ConfigMap {target} holds the outputs of run {latest['metadata']['name']}"
    kopf.info(template, reason=reasons.EVENT_OUTPUTS_EXPORTED, message=message)
