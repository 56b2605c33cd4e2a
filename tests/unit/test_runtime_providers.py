"""Providers are made when first used: a local-only operator never loads the Azure SDKs."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from kubernetes.client import ApiClient
from kiln.kube import Kube
from kiln.runtime import Runtime
from kiln.settings import load_settings
import kiln.cli, kiln.commands.serve, kiln.controller.runs, kiln.controller.templates

runtime = Runtime(load_settings(), Kube(ApiClient()))
print(sorted(runtime.providers.made()), "kiln.providers.azure.provider" in sys.modules)
print(type(runtime.providers["azure"]).__name__, sorted(runtime.providers.made()))
print(runtime.providers.get("gcp"), sorted(runtime.providers))
"""


def _probe(**env: str) -> list[str]:
    clean = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env}
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()


def test_a_local_operator_loads_the_azure_provider_only_when_a_template_needs_it() -> None:
    made, used, unknown = _probe(KILN_DEFAULT_PROVIDER="local")
    assert made == "['local'] False"
    assert used == "AzureProvider ['azure', 'local']"
    assert unknown == "None ['azure', 'local']"


def test_an_operator_configured_for_azure_makes_it_at_start() -> None:
    assert _probe(KILN_DEFAULT_PROVIDER="local", KILN_SUBSCRIPTION_ID="0000")[0] == (
        "['azure', 'local'] True"
    )
