"""Generates the CRD YAML from the pydantic models, so the models stay the single source of truth.

Kubernetes wants structural schemas: no $ref, a type on every node, and no type-bearing
oneOf/anyOf. Discriminated unions therefore become one object holding every variant's
properties, with the discriminator as an enum; each variant's CEL rules
(x-kubernetes-validations) are kept, guarded by the discriminator, so the API server
checks them for that variant only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kiln import GROUP, VERSION
from kiln.api.run import ImageBuildRunSpec, ImageBuildRunStatus
from kiln.api.template import ImageTemplateSpec, ImageTemplateStatus

JsonSchema = dict[str, Any]

_KEPT_KEYWORDS = (
    "description",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minItems",
    "minLength",
    "maxLength",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
)


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Inline a $ref, letting the referring node's own keywords (its description) win."""
    if "$ref" not in node:
        return node
    target = defs[node["$ref"].rsplit("/", 1)[-1]]
    merged = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
    return merged


def _merge_variants(variants: list[JsonSchema], discriminator: str | None) -> JsonSchema:
    """One object schema that admits every variant of a union."""
    properties: dict[str, JsonSchema] = {}
    required_sets: list[set[str]] = []
    tags: list[str] = []
    rule_tags: dict[str, tuple[JsonSchema, list[str]]] = {}
    for variant in variants:
        variant_tags = []
        for name, prop in variant.get("properties", {}).items():
            if name == discriminator:
                variant_tags = prop.get("enum", [])
                tags.extend(variant_tags)
                properties.setdefault(name, {k: v for k, v in prop.items() if k != "enum"})
            else:
                properties.setdefault(name, prop)
        required_sets.append(set(variant.get("required", [])))
        for rule in variant.get("x-kubernetes-validations", []):
            key = repr(sorted(rule.items()))
            rule_tags.setdefault(key, (rule, []))[1].extend(variant_tags)
    merged: JsonSchema = {"type": "object", "properties": properties}
    if discriminator:
        properties[discriminator] = {**properties[discriminator], "enum": tags}
    common = set.intersection(*required_sets) if required_sets else set()
    if common:
        merged["required"] = sorted(common)
    rules = [
        _guarded(rule, discriminator, rule_tags_, tags) for rule, rule_tags_ in rule_tags.values()
    ]
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged


def _guarded(
    rule: JsonSchema, discriminator: str | None, variant_tags: list[str], all_tags: list[str]
) -> JsonSchema:
    """A variant's rule, applied only to objects of the variants that declare it."""
    if discriminator is None or set(variant_tags) == set(all_tags):
        return rule
    names = ", ".join(f"'{tag}'" for tag in variant_tags)
    return {**rule, "rule": f"!(self.{discriminator} in [{names}]) || ({rule['rule']})"}


def _ordered(node: JsonSchema) -> JsonSchema:
    """type and description first, so the YAML reads well."""
    head = {k: node[k] for k in ("type", "description") if k in node}
    return {**head, **node}


def structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """Translate one pydantic JSON-schema node into a Kubernetes structural schema node."""
    node = _resolve(node, defs)
    outer = {k: node[k] for k in _KEPT_KEYWORDS if k in node and node[k] is not None}

    for union_key in ("oneOf", "anyOf"):
        if union_key in node:
            options = [o for o in node[union_key] if o.get("type") != "null"]
            if len(options) == 1:
                inner = structural(options[0], defs)
            else:
                discriminator = node.get("discriminator", {}).get("propertyName")
                inner = _merge_variants([structural(o, defs) for o in options], discriminator)
            return _ordered({**inner, **outer})

    if "const" in node:
        return {"type": "string", "enum": [node["const"]], **outer}

    kind = node.get("type")
    if kind == "object" or "properties" in node:
        result: JsonSchema = {"type": "object", **outer}
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return result
        if "properties" in node:
            result["properties"] = {
                name: structural(prop, defs) for name, prop in node["properties"].items()
            }
            if node.get("required"):
                result["required"] = list(node["required"])
        elif isinstance(node.get("additionalProperties"), dict):
            result["additionalProperties"] = structural(node["additionalProperties"], defs)
        else:
            result["x-kubernetes-preserve-unknown-fields"] = True
        return result
    if kind == "array":
        return {"type": "array", "items": structural(node["items"], defs), **outer}
    if kind in ("string", "integer", "boolean", "number"):
        return {"type": kind, **outer}
    raise ValueError(f"no structural form for schema node {node!r}")


def model_schema(model: type[BaseModel]) -> JsonSchema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _condition_column(name: str, condition: str, field: str) -> dict[str, str]:
    return {
        "name": name,
        "type": "string",
        "jsonPath": f'.status.conditions[?(@.type=="{condition}")].{field}',
    }


AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _crd(
    kind: str,
    plural: str,
    short_name: str,
    spec: type[BaseModel],
    status: type[BaseModel],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    root = {
        "type": "object",
        "description": spec.__doc__.strip().splitlines()[0] if spec.__doc__ else kind,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": model_schema(spec),
            "status": model_schema(status),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["kiln"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def image_template_crd() -> dict[str, Any]:
    return _crd(
        "ImageTemplate",
        "imagetemplates",
        "it",
        ImageTemplateSpec,
        ImageTemplateStatus,
        [
            _condition_column("Ready", "Ready", "status"),
            _condition_column("Reason", "Ready", "reason"),
            {"name": "Provider", "type": "string", "jsonPath": ".status.provider"},
            {"name": "Last Run", "type": "string", "jsonPath": ".status.lastRun.runState"},
            {
                "name": "Run",
                "type": "string",
                "jsonPath": ".status.lastRun.name",
                "priority": 1,
            },
            AGE_COLUMN,
        ],
    )


def image_build_run_crd() -> dict[str, Any]:
    return _crd(
        "ImageBuildRun",
        "imagebuildruns",
        "ibr",
        ImageBuildRunSpec,
        ImageBuildRunStatus,
        [
            {"name": "Template", "type": "string", "jsonPath": ".spec.templateRef.name"},
            {"name": "State", "type": "string", "jsonPath": ".status.runState"},
            {"name": "Sub State", "type": "string", "jsonPath": ".status.runSubState"},
            {
                "name": "Message",
                "type": "string",
                "jsonPath": ".status.message",
                "priority": 1,
            },
            AGE_COLUMN,
        ],
    )


def render_crds() -> dict[str, str]:
    """File name -> YAML text for every CRD Kiln defines."""
    crds = [image_template_crd(), image_build_run_crd()]
    return {
        f"{crd['metadata']['name']}.yaml": yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in crds
    }


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_crds().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
