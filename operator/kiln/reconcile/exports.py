"""A template's latest run outputs as a ConfigMap (spec.exportOutputs), decided purely."""

from __future__ import annotations

import json
import re
from typing import Any

from kiln.reconcile.templates import LABEL_TEMPLATE_UID

Body = dict[str, Any]
VERSION_SEGMENT = "/versions/"


def output_version(artifact_id: str | None) -> str | None:
    """The gallery image version in an artifact ID (…/images/app/versions/1.2.3)."""
    if not artifact_id or VERSION_SEGMENT not in artifact_id.lower():
        return None
    return artifact_id[artifact_id.lower().rindex(VERSION_SEGMENT) + len(VERSION_SEGMENT) :]


def config_map_data(outputs: list[Body], run_name: str | None) -> dict[str, str]:
    """Flat keys for tools that pick one value (valuesFrom, data sources), and the whole
    list as JSON for those that read structure."""
    data: dict[str, str] = {"outputs.json": json.dumps(outputs, sort_keys=True)}
    if run_name:
        data["run"] = run_name
    for output in outputs:
        name = variable_name(output["runOutputName"])
        for key in ("artifactId", "artifactUri"):
            if output.get(key):
                data[f"{name}_{key}"] = output[key]
        if version := output_version(output.get("artifactId")):
            data[f"{name}_version"] = version
    return data


def variable_name(run_output_name: str) -> str:
    """A key that is also a variable name (Flux postBuild substitution, envFrom)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", run_output_name)
    return f"_{name}" if name[:1].isdigit() else name


def config_map(template: Body, name: str, data: dict[str, str]) -> Body:
    meta = template["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {LABEL_TEMPLATE_UID: meta["uid"]},
            "ownerReferences": [
                {
                    "apiVersion": template["apiVersion"],
                    "kind": "ImageTemplate",
                    "name": meta["name"],
                    "uid": meta["uid"],
                }
            ],
        },
        "data": data,
    }


def is_ours(existing: Body, template: Body) -> bool:
    """Kiln only ever changes a ConfigMap it created for this very template."""
    labels = (existing.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_TEMPLATE_UID) == template["metadata"]["uid"]
