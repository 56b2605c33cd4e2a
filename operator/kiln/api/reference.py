"""docs/api-reference.md, generated from the CRD schemas (`make crds` writes it; a test
keeps it current), so the reference says exactly what the API server enforces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.api.crd import image_build_run_crd, image_template_crd

Node = dict[str, Any]
HEADER = """# API reference

Generated from the CRD schemas by `make crds` (`kiln crds`); do not edit by hand.
Group `kiln.dev`, version `v1alpha1`. Field names under `spec` are AIB's (API
2024-02-01); `kubectl explain imagetemplate.spec.<field>` prints the same text.
"""


def _type(node: Node) -> str:
    kind = node.get("type", "object")
    if kind == "array":
        return f"[]{_type(node.get('items') or {})}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type(node['additionalProperties'])}"
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    return str(kind)


def _constraints(node: Node) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{value}`" for value in node["enum"]))
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minItems", "items ≥"),
        ("maxItems", "items ≤"),
    ):
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if "default" in node:
        parts.append(f"default `{node['default']}`")
    for rule in node.get("x-kubernetes-validations") or []:
        parts.append(f"rule: {rule.get('message') or rule['rule']}")
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(node: Node, path: str) -> list[str]:
    rows = []
    required = set(node.get("required") or [])
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        description = _cell(child.get("description", ""))
        constraints = _cell(_constraints(child))
        rows.append(
            f"| `{child_path}` | {_type(child)} | {'yes' if name in required else ''} | "
            f"{description}{' (' + constraints + ')' if constraints else ''} |"
        )
        rows += _rows(child, child_path)
        items = child.get("items")
        if isinstance(items, dict):
            rows += _rows(items, f"{child_path}[]")
        extra = child.get("additionalProperties")
        if isinstance(extra, dict):
            rows += _rows(extra, f"{child_path}{{}}")
    return rows


def _kind(crd: Node) -> str:
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    lines = [
        f"## {names['kind']}",
        "",
        f"{root.get('description', '')}",
        "",
        f"Plural `{names['plural']}`, short name `{names['shortNames'][0]}`, "
        f"category `{names['categories'][0]}`. Printer columns: "
        + ", ".join(f"{c['name']} (`{c['jsonPath']}`)" for c in version["additionalPrinterColumns"])
        + ".",
        "",
    ]
    for part in ("spec", "status"):
        lines += [
            f"### {names['kind']}.{part}",
            "",
            "| field | type | required | description |",
            "|---|---|---|---|",
            *_rows(root["properties"][part], part),
            "",
        ]
    return "\n".join(lines)


def render_reference() -> str:
    return "\n".join([HEADER, _kind(image_template_crd()), _kind(image_build_run_crd())])


def write_reference(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_reference())
    return path
