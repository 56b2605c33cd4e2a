"""`kiln import`: AIB image templates (JSON) as ImageTemplate manifests.

Under spec every AIB imageTemplates property keeps its name, so importing is lifting
the properties out of what AIB users have: the resource as `az image builder show`
prints it, the resource on its own, an ARM template holding it (either language
version, as written or as Bicep emits it, its expressions evaluated), or just the
properties. Older API versions' names are mapped to today's, AIB's outputs dropped,
triggers folded into spec.triggers. What cannot be carried over is said with its
`properties.*` path and the fix, all of it at once; nothing is guessed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from kiln import GROUP, VERSION
from kiln.api.validation import SpecProblem, check_rules, parse_spec
from kiln.commands.armtemplate import TOO_DEEP, ArmError, DeploymentScope, Template, load_jsonc
from kiln.settings import Provider

AIB_TYPE = "microsoft.virtualmachineimages/imagetemplates"
TRIGGER_TYPE = f"{AIB_TYPE}/triggers"
DEPLOYMENT_TYPE = "microsoft.resources/deployments"
# Written by AIB, never by its users.
READ_ONLY = ("provisioningState", "provisioningError", "lastRunStatus", "exactStagingResourceGroup")
TRIGGER_READ_ONLY = ("provisioningState", "status")
# Resource keys that are imported, or that only say how ARM deploys the resource.
DEPLOYMENT_KEYS = {
    "type", "apiversion", "dependson", "comments", "metadata", "condition", "existing",
    "systemdata", "etag", "resourcegroup", "scope", "resources", "id", "name", "location",
    "identity", "tags", "properties",
}  # fmt: skip
# Discriminators as today's API spells them; API 2018-02-01-preview wrote some in lower case.
_TYPES = "PlatformImage ManagedImage SharedImageVersion Shell PowerShell File WindowsRestart"
TYPE_NAMES = {name.lower(): name for name in f"{_TYPES} WindowsUpdate SharedImage VHD".split()}
# Script contents may hold <...> of their own; everything else with one is a placeholder.
SCRIPT_FIELDS = {"inline", "restartCommand", "restartCheckCommand"}
_PLACEHOLDER = re.compile(r"<[A-Za-z][\w .-]{0,62}>")
_RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/", re.I
)
_DNS_LABEL = re.compile(r"[^a-z0-9-]+")
_LABEL = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_OPERATOR_DEFAULTS = ("spec.resourceGroup", "spec.subscriptionId", "spec.location")
# Fields of the manifest's spec that are the AIB resource's own, not under properties.
_RESOURCE_LEVEL = ("location", "identity", "triggers", "resourceGroup", "subscriptionId")
TAGS_ANNOTATION = f"{GROUP}/azure-tags"


class Problem(BaseModel):
    path: str
    message: str


class ImportProblem(Exception):
    """The input is not an AIB template Kiln can take as it is; says where and what to do."""

    def __init__(self, problems: list[Problem], where: str = "") -> None:
        self.problems = problems
        prefix = f"{where}: " if where else ""
        super().__init__(
            "\n".join(
                f"{prefix}{p.path}: {p.message}" if p.path else f"{prefix}{p.message}"
                for p in problems
            )
        )


def refuse(message: str, path: str = "", where: str = "") -> ImportProblem:
    return ImportProblem([Problem(path=path, message=message)], where)


class Imported(BaseModel):
    """One manifest, and what a person should know about it."""

    manifest: dict[str, Any]
    notes: list[str]


@dataclass
class _Found:
    """An imageTemplates resource of the input, where it is, and the template whose
    parameters and variables its expressions use (a nested deployment has its own)."""

    where: str
    resource: dict[str, Any]
    template: Template
    triggers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def read_json(path: Path, stdin: TextIO | None = None) -> Any:
    """A JSON (or JSON with comments) file, or stdin for "-" (`az image builder show |`);
    a bad one is named with line and column."""
    try:
        return load_jsonc(stdin.read() if stdin and str(path) == "-" else path.read_text())
    except (ArmError, OSError, UnicodeDecodeError) as error:
        raise refuse(f"{'stdin' if str(path) == '-' else path}: {error}") from None


def parameter_values(document: Any) -> dict[str, Any]:
    """An ARM parameters file ({"parameters": {"x": {"value": ...}}}) as plain values."""
    declared = document.get("parameters") if isinstance(document, dict) else None
    if not isinstance(declared, dict):
        raise refuse("the parameters file has no 'parameters' object")
    values, problems = {}, []
    for key, entry in declared.items():
        if isinstance(entry, dict) and "value" in entry:
            values[key] = entry["value"]
        elif isinstance(entry, dict) and "reference" in entry:
            problems.append(
                Problem(
                    path=f"parameters.{key}",
                    message="is a Key Vault reference, which only a deployment reads; "
                    "give its value instead",
                )
            )
    if problems:
        raise ImportProblem(problems, "the parameters file")
    return values


def import_document(
    document: Any,
    parameters: dict[str, Any] | None = None,
    name: str | None = None,
    namespace: str | None = None,
    scope: DeploymentScope | None = None,
    defaults: DeploymentScope | None = None,
) -> list[Imported]:
    """Every imageTemplates resource of the document, as manifests. scope holds what the
    command line says of the deployment; defaults (the operator's) only fill expressions."""
    scope = scope or DeploymentScope()
    if not isinstance(document, dict):
        raise refuse("the file is not a JSON object")
    template = Template(
        document if _is_arm(document) else {},
        parameters or {},
        scope.over(defaults or DeploymentScope()),
    )
    found = _templates(document, template)
    if name and len(found) > 1:
        raise refuse(f"--name names one template, but the file holds {len(found)}")
    try:
        imported = [_import_one(one, scope, name, namespace) for one in found]
    except RecursionError:
        raise refuse(TOO_DEEP) from None
    if template.undeclared:
        undeclared = ", ".join(template.undeclared)
        for one in imported:
            one.notes.append(f"the template declares no parameter {undeclared}; not used")
    return imported


def _templates(document: dict[str, Any], template: Template) -> list[_Found]:
    """The imageTemplates resources in a document of any of the accepted shapes."""
    if _is_arm(document):
        found = _in_arm_template(document, template, "")
        if not found:
            raise refuse(
                "the ARM template has no resource of type "
                "Microsoft.VirtualMachineImages/imageTemplates"
            )
        return found
    if isinstance(document.get("properties"), dict):
        return [_Found("", document, template)]
    if "source" in document and "distribute" in document:  # the properties alone
        return [_Found("", {"properties": document}, template)]
    raise refuse(
        "no AIB image template found: expected an ARM template, an imageTemplates resource "
        "(with properties) or its properties (with source and distribute)"
    )


def _is_arm(document: Any) -> bool:
    return isinstance(document, dict) and "resources" in document


def _in_arm_template(document: dict[str, Any], template: Template, at: str) -> list[_Found]:
    """The template's imageTemplates with their triggers, and those of its nested
    deployments (Bicep modules) too."""
    resources = _arm_resources(document, at)
    found = [_Found(w, r, template) for w, r in resources if _type(r) == AIB_TYPE]
    _attach_triggers(resources, found, template)
    for where, resource in resources:
        properties = resource.get("properties")
        inner = properties.get("template") if isinstance(properties, dict) else None
        if _type(resource) == DEPLOYMENT_TYPE and _is_arm(inner):
            nested = _nested_template(properties, template, where)
            found += _in_arm_template(inner, nested, f"{where}.properties.template.")
    return found


def _nested_template(properties: dict[str, Any], outer: Template, where: str) -> Template:
    """What a nested deployment's expressions use: the outer template's parameters and
    variables (ARM's default scope), or with scope inner (as Bicep emits modules) its
    own, given the deployment's parameter values as the outer template evaluates them."""
    options = properties.get("expressionEvaluationOptions") or {}
    if str(options.get("scope", "outer")).lower() != "inner":
        return outer
    given = {}
    for key, entry in (properties.get("parameters") or {}).items():
        if isinstance(entry, dict) and "value" in entry:
            path = f"properties.parameters.{key}.value"
            try:
                given[key] = outer.resolve(entry["value"])
            except ArmError as error:
                raise refuse(f"{entry['value']}: {error}", path, where) from None
    return Template(properties["template"], given, outer.scope)


def _arm_resources(document: dict[str, Any], at: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, resource) for each resource: a list, or (languageVersion 2.0) an object
    keyed by symbolic name; references to existing resources are not the template's."""
    resources = document["resources"]
    if isinstance(resources, dict):
        listed = [(f"{at}resources.{key}", value) for key, value in resources.items()]
    elif isinstance(resources, list):
        listed = [(f"{at}resources[{index}]", value) for index, value in enumerate(resources)]
    else:
        raise refuse("is neither an array nor an object", f"{at}resources")
    return [(w, r) for w, r in listed if isinstance(r, dict) and r.get("existing") is not True]


def _type(resource: dict[str, Any]) -> str:
    return str(resource.get("type", "")).lower()


def _attach_triggers(
    resources: list[tuple[str, dict[str, Any]]], found: list[_Found], template: Template
) -> None:
    """imageTemplates/triggers, nested in their template or beside it (named TEMPLATE/NAME)."""
    for one in found:
        for index, child in enumerate(one.resource.get("resources") or []):
            if isinstance(child, dict) and _type(child) in ("triggers", TRIGGER_TYPE):
                one.triggers.append((f"{one.where}.resources[{index}]", child))
    for where, trigger in [(w, r) for w, r in resources if _type(r) == TRIGGER_TYPE]:
        try:
            parent = str(template.evaluate(str(trigger.get("name", "")))).split("/")[0]
            owners = [one for one in found if _evaluated_name(one) == parent.lower()]
        except ArmError as error:
            raise refuse(f"{trigger.get('name')}: {error}", "name", where) from None
        if not owners:
            raise refuse(
                f"is a trigger of '{parent}', but the file has no imageTemplates resource of "
                "that name; import it with its template",
                "name",
                where,
            )
        owners[0].triggers.append((where, trigger))


def _evaluated_name(one: _Found) -> str:
    try:
        return str(one.template.evaluate(str(one.resource.get("name", "")))).lower()
    except ArmError:
        return ""


def _import_one(
    one: _Found, scope: DeploymentScope, name: str | None, namespace: str | None
) -> Imported:
    template = one.template
    notes: list[str] = []
    problems: list[tuple[str, str]] = []
    raw = one.resource
    if "copy" in raw:
        raise refuse(
            "copy loops are not imported; write one resource per template", "copy", one.where
        )
    condition = template.resolve(raw.get("condition", True), "condition", problems)
    if condition is False:
        notes.append("its condition is false, so ARM would not deploy it; imported all the same")
    for key in raw:
        if key.lower() not in DEPLOYMENT_KEYS:
            notes.append(f"{key} is not an imageTemplates property; dropped")
    resource = {
        key: template.resolve(raw[key], key, problems)
        for key in ("name", "id", "location", "identity", "tags", "properties")
        if key in raw
    }
    triggers = [_trigger(where, trigger, template, problems) for where, trigger in one.triggers]
    properties = resource.get("properties") or {}
    if not isinstance(properties, dict):
        problems.append(("properties", f"is {type(properties).__name__}, not an object"))
        properties = {}
    properties = _current_properties(properties, notes, problems)
    problems += _placeholders(resource)
    if not name and not resource.get("name") and not any(p == "name" for p, _ in problems):
        problems.append(("name", "the template has no name; give one with --name"))
    if problems:
        raise ImportProblem([Problem(path=p, message=m) for p, m in problems], one.where)
    spec: dict[str, Any] = {**properties, "provider": Provider.azure.value}
    spec.update(_placement(resource, scope))
    identity = _identity(resource.get("identity"), notes)
    if identity:
        spec["identity"] = identity
    if triggers:
        spec["triggers"] = triggers
    spec = _checked(spec, notes, one.where)
    metadata: dict[str, Any] = {"name": name or kubernetes_name(str(resource["name"]))}
    if namespace:
        metadata["namespace"] = namespace
    metadata.update(_tag_metadata(resource.get("tags") or {}, notes))
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageTemplate",
        "metadata": metadata,
        "spec": spec,
    }
    return Imported(manifest=manifest, notes=notes)


def _checked(spec: dict[str, Any], notes: list[str], where: str) -> dict[str, Any]:
    """The spec as Kiln reads it (so as the CRD schema takes it: "60" is 60), or what
    Kiln would refuse, in AIB's terms; an account setting left out is the operator's."""
    parsed, problems = parse_spec(spec)
    if parsed:
        problems = check_rules(parsed, Provider.azure)
    for problem in [p for p in problems if p.path in _OPERATOR_DEFAULTS]:
        notes.append(f"{problem.path} is not set: the operator's default applies")
        problems.remove(problem)
    if problems or parsed is None:
        raise ImportProblem([_in_aib_terms(problem) for problem in problems], where)
    return _in_order(parsed.wire(), spec)


def _in_order(value: Any, written: Any) -> Any:
    """value with its keys in the order the author wrote them (type first, say)."""
    if isinstance(value, dict) and isinstance(written, dict):
        keys = [k for k in written if k in value] + [k for k in value if k not in written]
        return {key: _in_order(value[key], written.get(key)) for key in keys}
    if isinstance(value, list) and isinstance(written, list) and len(value) == len(written):
        return [_in_order(item, original) for item, original in zip(value, written, strict=True)]
    return value


def _current_properties(
    properties: dict[str, Any], notes: list[str], problems: list[tuple[str, str]]
) -> dict[str, Any]:
    """Properties in today's API (2024-02-01 and 2025-10-01): outputs dropped, older
    versions' names mapped (as the REST specs of 2018-02-01-preview to today have them)."""
    for key in READ_ONLY:
        if properties.pop(key, None) is not None:
            notes.append(f"properties.{key} is AIB's output, dropped")
    source = properties.get("source")
    if isinstance(source, dict):
        if source.pop("exactVersion", None) is not None:
            notes.append("properties.source.exactVersion is AIB's output, dropped")
        _current_type(source, "properties.source", notes)
        if source.get("type") == "ISO":
            problems.append(
                (
                    "properties.source.type",
                    "ISO sources were removed from AIB in API 2020-02-14 and Kiln has none; "
                    "start from a PlatformImage of the same OS instead",
                )
            )
    step_lists = (
        ("customize", properties),
        ("distribute", properties),
        ("validate.inVMValidations", properties.get("validate")),
    )
    for steps, parent in step_lists:
        for index, step in enumerate(_list(parent, steps.split(".")[-1])):
            path = f"properties.{steps}[{index}]"
            _current_type(step, path, notes)
            if steps == "customize" and "script" in step and "scriptUri" not in step:
                step["scriptUri"] = step.pop("script")  # renamed in API 2019-05-01-preview
                notes.append(f"{path}.script (API 2019-02-01-preview and before) is now scriptUri")
    return properties


def _list(parent: Any, key: str) -> list[dict[str, Any]]:
    items = parent.get(key) if isinstance(parent, dict) else None
    return [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []


def _current_type(item: dict[str, Any], path: str, notes: list[str]) -> None:
    written = item.get("type")
    current = TYPE_NAMES.get(str(written).lower())
    if current and written != current:
        item["type"] = current
        notes.append(f"{path}.type {written!r} is {current!r} in today's API")


def _trigger(
    where: str, trigger: dict[str, Any], template: Template, problems: list[tuple[str, str]]
) -> dict[str, Any]:
    """A trigger resource's properties (kind SourceImage) as a spec.triggers entry."""
    properties = template.resolve(trigger.get("properties") or {}, f"{where}.properties", problems)
    return {key: value for key, value in properties.items() if key not in TRIGGER_READ_ONLY}


def _placeholders(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Sample templates' <runOutputName>, <subscriptionID> and the like, left unfilled."""
    if isinstance(value, str):
        found = _PLACEHOLDER.findall(value)
        if found:
            return [(path, f"{value!r}: fill in {', '.join(found)}")]
        return []
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _placeholders(item, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [
            problem
            for key, item in value.items()
            if key not in SCRIPT_FIELDS
            for problem in _placeholders(key, path)
            + _placeholders(item, f"{path}.{key}".lstrip("."))
        ]
    return []


def _placement(resource: dict[str, Any], scope: DeploymentScope) -> dict[str, str]:
    """Where the template lives: its own location and ID, else the command line's scope."""
    placed: dict[str, str] = {}
    if resource.get("location") or scope.location:
        placed["location"] = str(resource.get("location") or scope.location)
    match = _RESOURCE_ID.match(str(resource.get("id", "")))
    subscription = (match and match["sub"]) or scope.subscription_id
    group = (match and match["rg"]) or scope.resource_group
    if subscription:
        placed["subscriptionId"] = subscription
    if group:
        placed["resourceGroup"] = group
    return placed


def _identity(identity: Any, notes: list[str]) -> dict[str, Any] | None:
    """The template's identity as a request writes it: ARM's principalId and clientId
    (its output) dropped; no identity, or type None without any, is none."""
    if not isinstance(identity, dict):
        return None
    identities = identity.get("userAssignedIdentities") or {}
    kind = identity.get("type") or ("UserAssigned" if identities else "None")
    if str(kind).lower() in ("none", "userassigned"):
        kind = "None" if str(kind).lower() == "none" else "UserAssigned"
    if kind == "None" and not identities:
        return None
    if any(isinstance(value, dict) and value for value in identities.values()):
        notes.append(
            "identity.userAssignedIdentities: principalId and clientId are ARM's output, dropped"
        )
    return {"type": kind, "userAssignedIdentities": {key: {} for key in identities}}


def _tag_metadata(tags: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The resource's tags: labels where Kubernetes takes them as labels, the rest (as
    JSON) in one annotation, so that none is lost."""
    texts = {str(key): str(value) for key, value in tags.items()}
    labels = {k: v for k, v in texts.items() if k and _LABEL.match(k) and _LABEL.match(v)}
    rest = {k: v for k, v in texts.items() if k not in labels}
    metadata: dict[str, Any] = {"labels": labels} if labels else {}
    if rest:
        metadata["annotations"] = {TAGS_ANNOTATION: json.dumps(rest, sort_keys=True)}
        notes.append(
            f"tags {', '.join(sorted(rest))} are no Kubernetes labels; kept in the "
            f"{TAGS_ANNOTATION} annotation"
        )
    return metadata


def kubernetes_name(name: str) -> str:
    """An AIB template name as a Kubernetes object name (DNS label)."""
    label = _DNS_LABEL.sub("-", name.lower()).strip("-")[:63].strip("-")
    if not label:
        raise refuse(f"the template name {name!r} has no usable characters; use --name")
    return label


def _in_aib_terms(problem: SpecProblem) -> Problem:
    """spec.x of the manifest is properties.x of the AIB template (or x of the resource)."""
    field = problem.path.removeprefix("spec.")
    top = re.split(r"[.\[]", field, maxsplit=1)[0]
    return Problem(
        path=field if top in _RESOURCE_LEVEL else f"properties.{field}", message=problem.message
    )
