"""Writes a template's status from its spec, its runs and the world (level-based)."""

from __future__ import annotations

from typing import Any

from kiln.api.template import ImageTemplateSpec
from kiln.kube import TEMPLATES, template_runs
from kiln.providers.base import ProviderError, TemplateIdentity
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


async def refresh_template(runtime: Runtime, namespace: str, name: str) -> None:
    body = await runtime.kube.get(TEMPLATES, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    runs = await template_runs(runtime.kube, body)
    status = decide.template_status(
        body, runs, runtime.settings, staging_of(runtime, body), now_rfc3339()
    )
    await runtime.kube.patch_status(TEMPLATES, namespace, name, status)
