"""What can be checked of the operator images without a Docker engine: the Dockerfile's
shape, and that the runtime dependencies alone install into a clean venv from which
`kiln operator --help` runs and every handler imports."""

from __future__ import annotations

import re
import subprocess
import venv
from pathlib import Path

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def stages() -> dict[str, str]:
    """Stage name -> its instructions."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    return {part.split()[2] if " AS " in part.splitlines()[0] else "": part for part in parts}


def test_the_dockerfile_builds_in_stages_from_a_base_pinned_by_digest() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_BASE=(\S+)$", text, flags=re.MULTILINE)
    assert base is not None and re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base.group(1))
    assert list(stages()) == ["build", "azure", "local"]
    assert all(
        line.startswith("FROM ${PYTHON_BASE}") or line.startswith("FROM azure")
        for line in re.findall(r"^FROM .*$", text, flags=re.MULTILINE)
    )


def test_the_images_run_as_non_root_and_only_the_local_one_has_qemu() -> None:
    found = stages()
    for name in ("azure", "local"):
        users = re.findall(r"^USER (\S+)$", found[name], flags=re.MULTILINE)
        assert users and users[-1] == "65532:65532", name
    assert "qemu" not in found["azure"] and "apt-get install" not in found["azure"]
    assert "qemu-system-x86" in found["local"]
    assert "COPY --from=build /opt/kiln /opt/kiln" in found["azure"]


def test_the_runtime_dependencies_install_into_a_clean_venv(tmp_path: Path) -> None:
    """As the build stage does it: `pip install .` (no test extras), then the operator's
    entry point and every handler module import from that venv alone."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "pip"), "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "install", str(REPO_ROOT)],
        check=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    helped = subprocess.run(
        [str(env_dir / "bin" / "kiln"), "operator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
    assert "usage: kiln operator" in helped.stdout
    imported = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import kiln.controller, kiln.commands.serve, kiln.metrics; print(kiln.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert imported.returncode == 0, imported.stderr
    assert str(env_dir) in imported.stdout, "imported from the clean venv, not the repository"
    installed = subprocess.run(
        [*pip, "list", "--format=freeze"], capture_output=True, text=True, timeout=60
    ).stdout.lower()
    for test_only in ("pytest", "helm-python-sdk", "lupa", "ruff"):
        assert f"{test_only}==" not in installed, test_only
