"""`kiln import`: AIB image templates (JSON) as ImageTemplate manifests.

Under spec every AIB imageTemplates property keeps its name, so importing is lifting
the properties out of what AIB users have: the resource as `az image builder show`
prints it, the resource on its own, an ARM template holding it (parameters and
variables resolved), or just the properties. What cannot be carried over is said, with
the field and the fix; nothing is guessed.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from kiln import GROUP, VERSION
from kiln.api.validation import SpecProblem, validate_template
from kiln.settings import Provider

AIB_TYPE = "microsoft.virtualmachineimages/imagetemplates"
# Written by AIB, never by its users.
READ_ONLY = ("provisioningState", "provisioningError", "lastRunStatus", "exactStagingResourceGroup")
USED = ("name", "id", "location", "identity", "tags", "properties")
_REFERENCE = re.compile(r"^\[\s*(parameters|variables)\(\s*'([^']+)'\s*\)\s*\]$", re.I)
_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/", re.I
)
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_OPERATOR_DEFAULTS = ("spec.resourceGroup", "spec.subscriptionId", "spec.location")


class ImportProblem(Exception):
    """The input is not an AIB template Kiln can take as it is; says where and what to do."""


class Imported(BaseModel):
    """One manifest, and what a person should know about it."""

    manifest: dict[str, Any]
    notes: list[str]


def aib_resources(document: Any) -> list[dict[str, Any]]:
    """The imageTemplates resources in a document of any of the accepted shapes."""
    if not isinstance(document, dict):
        raise ImportProblem("the file is not a JSON object")
    if isinstance(document.get("resources"), list):  # an ARM template
        found = [
            r
            for r in document["resources"]
            if isinstance(r, dict) and str(r.get("type", "")).lower() == AIB_TYPE
        ]
        if not found:
            raise ImportProblem(
                "the ARM template has no resource of type "
                "Microsoft.VirtualMachineImages/imageTemplates"
            )
        return found
    if isinstance(document.get("properties"), dict):
        return [document]
    if "source" in document and "distribute" in document:  # the properties alone
        return [{"properties": document}]
    raise ImportProblem(
        "no AIB image template found: expected an ARM template, an imageTemplates resource "
        "(with properties) or its properties (with source and distribute)"
    )


def arm_values(document: dict[str, Any], given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Parameter values (given ones over defaultValue) and variables of an ARM template."""
    parameters = {
        name: declared["defaultValue"]
        for name, declared in (document.get("parameters") or {}).items()
        if isinstance(declared, dict) and "defaultValue" in declared
    }
    parameters |= given
    return {"parameters": parameters, "variables": dict(document.get("variables") or {})}


def resolve(value: Any, path: str, values: dict[str, dict[str, Any]]) -> Any:
    """Whole-string ARM references to parameters and variables replaced by their values."""
    if isinstance(value, dict):
        return {key: resolve(item, f"{path}.{key}", values) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item, f"{path}[{index}]", values) for index, item in enumerate(value)]
    if not isinstance(value, str) or not value.startswith("["):
        return value
    if value.startswith("[["):  # ARM's escape for a literal leading bracket
        return value[1:]
    reference = _REFERENCE.match(value)
    if reference is None:
        raise ImportProblem(
            f"{path}: {value} is an ARM expression kiln import cannot evaluate; put its "
            "value in its place (only [parameters('x')] and [variables('x')] are resolved)"
        )
    kind, name = reference.group(1).lower(), reference.group(2)
    if name not in values[kind]:
        flag = " (give it with --parameters FILE)" if kind == "parameters" else ""
        raise ImportProblem(f"{path}: {kind} '{name}' has no value{flag}")
    return resolve(values[kind][name], path, values)


def kubernetes_name(name: str) -> str:
    """An AIB template name as a Kubernetes object name (DNS label)."""
    label = _DNS_LABEL.sub("-", name.lower()).strip("-")[:63].strip("-")
    if not label:
        raise ImportProblem(f"the template name {name!r} has no usable characters; use --name")
    return label


def to_manifest(
    resource: dict[str, Any], name: str | None = None, namespace: str | None = None
) -> Imported:
    """The ImageTemplate for one (resolved) imageTemplates resource."""
    properties = dict(resource.get("properties") or {})
    notes = [f"properties.{key} is AIB's output, dropped" for key in READ_ONLY if key in properties]
    spec: dict[str, Any] = {k: v for k, v in properties.items() if k not in READ_ONLY}
    spec["provider"] = Provider.azure.value
    if resource.get("location"):
        spec["location"] = resource["location"]
    identity = resource.get("identity")
    if isinstance(identity, dict) and identity.get("type") not in (None, "None"):
        identities = identity.get("userAssignedIdentities") or {}
        # ARM's output adds principalId and clientId to each; a template names them only.
        spec["identity"] = {
            "type": identity["type"],
            "userAssignedIdentities": {key: {} for key in identities},
        }
    placed = _RESOURCE_ID.match(str(resource.get("id", "")))
    if placed:
        spec.setdefault("subscriptionId", placed["sub"])
        spec.setdefault("resourceGroup", placed["rg"])
    if resource.get("tags"):
        notes.append("tags of the AIB resource are not carried over (an ImageTemplate has none)")
    problems = validate_template(spec, Provider.azure)
    for problem in [p for p in problems if p.path in _OPERATOR_DEFAULTS]:
        notes.append(f"{problem.path} is not set: the operator's default applies")
        problems.remove(problem)
    if problems:
        raise ImportProblem(_describe(problems))
    metadata: dict[str, Any] = {"name": name or kubernetes_name(str(resource.get("name") or ""))}
    if namespace:
        metadata["namespace"] = namespace
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageTemplate",
        "metadata": metadata,
        "spec": spec,
    }
    return Imported(manifest=manifest, notes=notes)


def import_document(
    document: Any,
    parameters: dict[str, Any] | None = None,
    name: str | None = None,
    namespace: str | None = None,
) -> list[Imported]:
    """Every imageTemplates resource of the document, as manifests."""
    resources = aib_resources(document)
    if name and len(resources) > 1:
        raise ImportProblem(f"--name names one template, but the file holds {len(resources)}")
    values = arm_values(document, parameters or {})
    imported = []
    for index, resource in enumerate(resources):
        where = f"resources[{index}]" if "resources" in document else "template"
        resolved = {
            key: resolve(value, f"{where}.{key}", values)
            for key, value in resource.items()
            if key in USED  # apiVersion, dependsOn and the like do not matter here
        }
        if not name and not resolved.get("name"):
            raise ImportProblem(f"{where} has no name; give one with --name")
        imported.append(to_manifest(resolved, name, namespace))
    return imported


def parameter_values(document: Any) -> dict[str, Any]:
    """An ARM parameters file ({"parameters": {"x": {"value": ...}}}) as plain values."""
    declared = document.get("parameters") if isinstance(document, dict) else None
    if not isinstance(declared, dict):
        raise ImportProblem("the parameters file has no 'parameters' object")
    return {
        key: entry["value"]
        for key, entry in declared.items()
        if isinstance(entry, dict) and "value" in entry
    }


def _describe(problems: list[SpecProblem]) -> str:
    """In the input's terms: spec.x of the manifest is properties.x of the AIB template."""
    listed = "; ".join(
        f"{problem.path.replace('spec.', 'properties.', 1)}: {problem.message}"
        for problem in problems
    )
    return f"the template is not valid for Kiln: {listed}"
