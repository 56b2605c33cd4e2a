"""Operator settings from KILN_* environment variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.api.template import Provider
from kiln.settings import OperatorSettings, SettingsError, load_settings

FULL_ENVIRON = {
    "KILN_DEFAULT_PROVIDER": "azure",
    "KILN_NAMESPACES": " images, builds ,,ci ",
    "KILN_CACHE": "/var/cache/kiln",
    "KILN_DATA": "/var/lib/kiln",
    "KILN_GALLERY": "/srv/gallery",
    "KILN_LOCATION": "westeurope",
    "KILN_RESOURCE_GROUP": "images-rg",
    "KILN_SUBSCRIPTION_ID": "0000-1111",
    "KILN_MAX_ACTIVE_RUNS": "4",
    "KILN_VM_MEMORY_MB": "2048",
    "KILN_LIVENESS_PORT": "9090",
}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KILN_* variables from the machine running the tests, and a known HOME."""
    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    return home


def test_every_variable_is_read() -> None:
    settings = load_settings(FULL_ENVIRON)
    assert settings.default_provider == Provider.azure
    assert settings.namespaces == ["images", "builds", "ci"]
    assert settings.cache_root == Path("/var/cache/kiln")
    assert settings.data_root == Path("/var/lib/kiln")
    assert settings.gallery_root == Path("/srv/gallery")
    assert settings.location == "westeurope"
    assert settings.resource_group == "images-rg"
    assert settings.subscription_id == "0000-1111"
    assert settings.max_active_runs == 4
    assert settings.vm_memory_mb == 2048
    assert settings.liveness_port == 9090


def test_paths_and_ints_have_their_types() -> None:
    settings = load_settings(FULL_ENVIRON)
    assert isinstance(settings.cache_root, Path)
    assert isinstance(settings.gallery_root, Path)
    assert isinstance(settings.max_active_runs, int)
    assert isinstance(settings.liveness_port, int)


def test_defaults(clean_environ: Path) -> None:
    settings = load_settings({})
    assert settings.default_provider == Provider.local
    assert settings.namespaces == []
    assert settings.cache_root == clean_environ / ".cache" / "kiln"
    assert settings.data_root == clean_environ / ".local" / "share" / "kiln"
    assert settings.gallery_root is None
    assert settings.location is None
    assert settings.resource_group is None
    assert settings.subscription_id is None
    assert settings.max_active_runs == 2
    assert settings.vm_memory_mb == 1024
    assert settings.liveness_port == 8080


def test_derived_paths(clean_environ: Path) -> None:
    settings = load_settings({"KILN_DATA": "/data"})
    assert settings.staging_root == Path("/data/staging")
    assert settings.gallery == Path("/data/gallery")
    assert load_settings({"KILN_DATA": "/data", "KILN_GALLERY": "/g"}).gallery == Path("/g")


def test_empty_values_mean_unset() -> None:
    settings = load_settings({name: "" for name in FULL_ENVIRON})
    assert settings == load_settings({})


@pytest.mark.parametrize("value", [",", " , ,", ""])
def test_namespaces_without_names_mean_all(value: str) -> None:
    assert load_settings({"KILN_NAMESPACES": value}).namespaces == []


def test_single_namespace() -> None:
    assert load_settings({"KILN_NAMESPACES": "images"}).namespaces == ["images"]


def test_the_given_mapping_wins_over_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_DEFAULT_PROVIDER", "azure")
    monkeypatch.setenv("KILN_LOCATION", "northeurope")
    settings = load_settings({"KILN_LOCATION": "westeurope"})
    assert settings.default_provider == Provider.local
    assert settings.location == "westeurope"


def test_without_a_mapping_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KILN_DEFAULT_PROVIDER", "azure")
    monkeypatch.setenv("KILN_NAMESPACES", "a,b")
    settings = load_settings()
    assert settings.default_provider == Provider.azure
    assert settings.namespaces == ["a", "b"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KILN_DEFAULT_PROVIDER", "gcp"),
        ("KILN_MAX_ACTIVE_RUNS", "0"),
        ("KILN_MAX_ACTIVE_RUNS", "many"),
        ("KILN_VM_MEMORY_MB", "128"),
        ("KILN_LIVENESS_PORT", "http"),
        ("KILN_DOWNLOAD_BLOCKED_RANGES", "metadata"),
        ("KILN_FILE_SOURCE_ROOTS", "relative/dir"),
        ("KILN_AZURE_OPERATOR_IDENTITY", "maybe"),
    ],
)
def test_invalid_values_are_rejected(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{name}: "):
        load_settings({name: value})


def test_settings_model_defaults_match_load_settings() -> None:
    assert OperatorSettings() == load_settings({})


def test_tenancy_settings_are_read() -> None:
    settings = load_settings(
        {
            "KILN_FILE_SOURCE_ROOTS": "/srv/files, /kiln/examples=/home/me/kiln/examples",
            "KILN_OUTPUT_ROOTS": "/srv/images",
            "KILN_DOWNLOAD_BLOCKED_RANGES": "169.254.0.0/16,fd00::/8",
            "KILN_AZURE_COMMUNICATOR_SOURCE": "203.0.113.7/32",
            "KILN_AZURE_OPERATOR_IDENTITY": "false",
            "KILN_AZURE_TENANT_ID": "tenant-1",
            "KILN_OPERATOR_NAMESPACE": "kiln-system",
            "KILN_GALLERY": "/srv/gallery",
        }
    )
    [files, examples] = settings.file_source_roots
    assert (str(files.path), files.directory) == ("/srv/files", Path("/srv/files"))
    assert (str(examples.path), examples.directory) == (
        "/kiln/examples",
        Path("/home/me/kiln/examples"),
    )
    assert [str(n) for n in settings.download_blocked_ranges] == ["169.254.0.0/16", "fd00::/8"]
    assert settings.azure_operator_identity is False
    assert settings.azure_tenant_id == "tenant-1"
    assert settings.secrets_namespace == "kiln-system"
    policy = settings.tenancy_policy
    assert policy.output_roots == [Path("/srv/images"), Path("/srv/gallery")]
    assert policy.communicator_source == "203.0.113.7/32"


def test_tenancy_defaults_are_closed() -> None:
    settings = load_settings({})
    assert settings.file_source_roots == []
    assert settings.azure_communicator_source is None
    assert settings.azure_operator_identity is True
    assert {str(n) for n in settings.download_blocked_ranges} >= {
        "127.0.0.0/8",
        "169.254.0.0/16",
        "168.63.129.16/32",
        "::1/128",
        "fe80::/10",
    }
    assert settings.secrets_namespace == "kiln-system"  # not in a Pod: no namespace file


def test_none_blocks_no_range() -> None:
    assert load_settings({"KILN_DOWNLOAD_BLOCKED_RANGES": "none"}).download_blocked_ranges == []


@pytest.mark.parametrize("value", ["*", "Internet", "0.0.0.0/0", "::/0", "any"])
def test_a_communicator_source_of_everywhere_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="KILN_AZURE_COMMUNICATOR_SOURCE"):
        load_settings({"KILN_AZURE_COMMUNICATOR_SOURCE": value})


def test_a_malformed_variable_is_named_without_its_value() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings({"KILN_MAX_ACTIVE_RUNS": "two", "KILN_LIVENESS_PORT": "s3cr3t-ish"})
    message = str(raised.value)
    assert "KILN_MAX_ACTIVE_RUNS: Input should be a valid integer" in message
    assert "KILN_LIVENESS_PORT" in message
    assert "two" not in message and "s3cr3t-ish" not in message


def test_the_cli_says_which_variable_is_wrong_instead_of_crashing(tmp_path: Path) -> None:
    document = tmp_path / "aib.json"
    document.write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "import", str(document)],
        env={**os.environ, "KILN_MAX_ACTIVE_RUNS": "two"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "kiln import: KILN_MAX_ACTIVE_RUNS: Input should be a valid integer, "
        "unable to parse string as an integer"
    )
