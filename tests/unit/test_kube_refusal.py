"""How a refusal from the API server reads in a run's message."""

from __future__ import annotations

import json

from kubernetes.client.exceptions import ApiException

from kiln.kube import refusal


def _error(status: int, reason: str, message: str | None) -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "message": message}) if message else "not json"
    return error


def test_a_forbidden_call_names_the_permission_and_the_fix() -> None:
    text = refusal(
        _error(403, "Forbidden", 'secrets is forbidden: cannot create resource "secrets"')
    )
    assert text.startswith('secrets is forbidden: cannot create resource "secrets"; grant it')
    assert "rbac.yaml" in text


def test_other_refusals_keep_the_servers_message_and_status() -> None:
    assert refusal(_error(422, "Unprocessable", "spec.x: Invalid value")) == (
        "spec.x: Invalid value (422)"
    )
    assert refusal(_error(500, "Internal Server Error", None)) == "Internal Server Error (500)"
