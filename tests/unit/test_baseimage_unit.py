"""Resolving platform image references against a cache directory."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiln.providers.local import baseimage
from kiln.providers.local.baseimage import BaseImage, ImageNotFound


def _image(cache: Path, version: str, publisher: str = "Debian", offer: str = "debian-12") -> None:
    directory = cache / "images" / publisher / offer / version
    directory.mkdir(parents=True)
    image = BaseImage(
        publisher=publisher,
        offer=offer,
        skus=["12", "12-gen2"],
        version=version,
        disk_sha256="0" * 64,
        disk_virtual_size=4 << 30,
        created=datetime.now(UTC),
        directory=Path("/elsewhere"),
    )
    (directory / "manifest.json").write_text(image.model_dump_json())


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    for version in ["0.20240101.9", "0.20240101.10", "0.20231201.3"]:
        _image(tmp_path, version)
    _image(tmp_path, "0.20250101.1", offer="debian-11")
    (tmp_path / "images/Debian/debian-12/.build-abc").mkdir()  # a killed build
    (tmp_path / "images/Debian/debian-12/0.20990101.1").mkdir()  # no manifest: incomplete
    return tmp_path


def test_list_is_oldest_first_and_skips_incomplete(cache: Path) -> None:
    images = baseimage.list_images(cache, "Debian", "debian-12", "12")
    assert [i.version for i in images] == ["0.20231201.3", "0.20240101.9", "0.20240101.10"]
    assert images[0].directory == cache / "images/Debian/debian-12/0.20231201.3"
    assert images[0].disk_path == images[0].directory / "disk.qcow2"
    assert "directory" not in images[0].model_dump_json()


@pytest.mark.parametrize("sku", ["12", "12-gen2", "12-GEN2"])
def test_resolve_latest(cache: Path, sku: str) -> None:
    assert baseimage.resolve(cache, "debian", "Debian-12", sku, "latest").version == "0.20240101.10"


def test_resolve_exact(cache: Path) -> None:
    assert baseimage.resolve(cache, "Debian", "debian-12", "12", "0.20240101.9").version == (
        "0.20240101.9"
    )


@pytest.mark.parametrize(
    ("offer", "sku", "version"),
    [("debian-12", "12", "0.1.1"), ("debian-12", "11", "latest"), ("ubuntu", "12", "latest")],
)
def test_resolve_miss_names_what_is_available(
    cache: Path, offer: str, sku: str, version: str
) -> None:
    with pytest.raises(ImageNotFound, match="available versions") as err:
        baseimage.resolve(cache, "Debian", offer, sku, version)
    if offer == "debian-12" and sku == "12":
        assert "0.20240101.10" in str(err.value)


def test_next_version_counts_per_day(cache: Path) -> None:
    offer_dir = cache / "images/Debian/debian-12"
    day = datetime(2024, 1, 1, tzinfo=UTC)
    assert baseimage._next_version(offer_dir, day) == "0.20240101.11"
    assert baseimage._next_version(offer_dir, datetime(2030, 5, 6, tzinfo=UTC)) == "0.20300506.1"


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    assert baseimage.default_cache_root() == tmp_path
    monkeypatch.delenv("KILN_CACHE")
    assert baseimage.default_cache_root() == Path.home() / ".cache" / "kiln"
