"""One capability table feeds the CRD's CEL rules, the operator's checks and the pipeline:
changing an entry changes all three."""

from __future__ import annotations

import pytest

from kiln.api import capabilities as table
from kiln.api import template as template_module
from kiln.api.capabilities import CAPABILITIES, Provider, capabilities
from kiln.api.template import ImageTemplateSpec
from kiln.api.validation import validate_template
from kiln.providers.azure.provider import check_steps_fit
from kiln.providers.base import ProviderError
from kubehelpers import valid_spec

WINDOWS_STEP = {"type": "PowerShell", "inline": ["Write-Output hi"]}
FILE_SCRIPT = {"type": "Shell", "scriptUri": "file:///srv/build.sh"}


def test_every_provider_has_an_entry() -> None:
    assert set(CAPABILITIES) == set(Provider)


def test_cel_rules_follow_the_table() -> None:
    messages = [r.message for r in template_module._capability_rules()]
    for provider, can in CAPABILITIES.items():
        windows = f"which the {provider} provider cannot run"
        assert any(windows in m for m in messages) == (not can.windows_build_vms)
        files = f"https:// or http:// for the {provider} provider"
        assert any(files in m for m in messages) == (not can.file_uris)


def test_the_operators_checks_follow_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = valid_spec() | {"customize": [FILE_SCRIPT]}
    assert validate_template(spec, Provider.local) == []
    monkeypatch.setitem(
        CAPABILITIES,
        Provider.local,
        capabilities(Provider.local).model_copy(update={"file_uris": False}),
    )
    problems = validate_template(spec, Provider.local)
    assert [p.path for p in problems] == ["spec.customize[0].scriptUri"]
    assert "for the local provider" in problems[0].message


def test_windows_steps_need_a_provider_with_windows_vms(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = valid_spec() | {"customize": [WINDOWS_STEP]}
    (problem,) = validate_template(spec, Provider.local)
    assert f"set spec.provider: {table.windows_provider()}" in problem.message
    monkeypatch.setitem(
        CAPABILITIES,
        Provider.local,
        capabilities(Provider.local).model_copy(update={"windows_build_vms": True}),
    )
    assert validate_template(spec, Provider.local) == []


def test_the_pipeline_refuses_windows_customizers_per_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ImageTemplateSpec.model_validate(valid_spec() | {"customize": [WINDOWS_STEP]})
    check_steps_fit(spec, "Windows")  # azure runs them
    monkeypatch.setitem(
        CAPABILITIES,
        Provider.azure,
        capabilities(Provider.azure).model_copy(update={"windows_customizers": False}),
    )
    with pytest.raises(ProviderError, match="does not run customizers on Windows"):
        check_steps_fit(spec, "Windows")
