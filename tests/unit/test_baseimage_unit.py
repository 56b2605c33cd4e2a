"""Resolving platform image references against a cache directory; Debian's sources."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from kiln.providers.local import baseimage
from kiln.providers.local.baseimage import BaseImage, ImageNotFound


def _image(cache: Path, version: str, publisher: str = "Debian", offer: str = "debian-12") -> None:
    directory = cache / baseimage.IMAGES_DIR / publisher / offer / version
    directory.mkdir(parents=True)
    image = BaseImage(
        publisher=publisher,
        offer=offer,
        skus=["12", "12-gen2"],
        version=version,
        root_uuid="d20ea56d-45a8-418e-891f-9cba6d6adedd",
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
    (tmp_path / f"{baseimage.IMAGES_DIR}/Debian/debian-12/.build-abc").mkdir()  # a killed build
    (
        tmp_path / f"{baseimage.IMAGES_DIR}/Debian/debian-12/0.20990101.1"
    ).mkdir()  # no manifest: incomplete
    return tmp_path


def test_list_is_oldest_first_and_skips_incomplete(cache: Path) -> None:
    images = baseimage.list_images(cache, "Debian", "debian-12", "12")
    assert [i.version for i in images] == ["0.20231201.3", "0.20240101.9", "0.20240101.10"]
    assert images[0].directory == cache / f"{baseimage.IMAGES_DIR}/Debian/debian-12/0.20231201.3"
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
    offer_dir = cache / f"{baseimage.IMAGES_DIR}/Debian/debian-12"
    day = datetime(2024, 1, 1, tzinfo=UTC)
    assert baseimage._next_version(offer_dir, day) == "0.20240101.11"
    assert baseimage._next_version(offer_dir, datetime(2030, 5, 6, tzinfo=UTC)) == "0.20300506.1"


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    assert baseimage.default_cache_root() == tmp_path
    monkeypatch.delenv("KILN_CACHE")
    assert baseimage.default_cache_root() == Path.home() / ".cache" / "kiln"


def test_the_old_image_format_is_not_found(tmp_path: Path) -> None:
    """Whole-disk ext4 images under images/ need a kernel beside them: never used now."""
    old = tmp_path / "images/Debian/debian-12/0.20240101.1"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text('{"publisher": "Debian"}')
    assert baseimage.list_images(tmp_path, "Debian", "debian-12", "12") == []


@pytest.mark.parametrize(
    ("publisher", "offer", "sku", "release"),
    [
        ("Debian", "debian-11", "11", "11"),
        ("debian", "Debian-12", "12-GEN2", "12"),
        ("Debian", "debian-13", "13-gen2", "13"),
        ("Debian", "debian-13", "12", None),
        ("Debian", "debian-10", "10", None),
        ("Canonical", "debian-12", "12", None),
    ],
)
def test_release_of_a_marketplace_reference(
    publisher: str, offer: str, sku: str, release: str | None
) -> None:
    assert baseimage.release_of(publisher, offer, sku) == release


@pytest.mark.parametrize(
    ("sku", "generation"), [("12", "V1"), ("12-gen2", "V2"), ("11-GEN2", "V2")]
)
def test_gen2_skus_boot_by_uefi(sku: str, generation: str) -> None:
    assert baseimage.generation(sku) == generation


HOST_SOURCES = """\
Types: deb
# a comment naming bookworm stays
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


@pytest.mark.parametrize("codename", ["bullseye", "bookworm", "trixie"])
def test_other_releases_come_from_the_hosts_mirror(codename: str) -> None:
    sources = baseimage.debian_sources(HOST_SOURCES, "bookworm", codename)
    suites = [line for line in sources.splitlines() if line.startswith("Suites:")]
    assert suites == [
        f"Suites: {codename} {codename}-updates",
        f"Suites: {codename}-security",
    ]
    assert sources.count("URIs: http://mirror.example/debian") == 2
    assert "# a comment naming bookworm stays" in sources


def test_unknown_release_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="not one of 11, 12, 13"):
        baseimage.build_image("10", tmp_path)


def test_waagent_leaves_provisioning_to_cloud_init(tmp_path: Path) -> None:
    conf = tmp_path / "waagent.conf"
    conf.write_text("# comment\nProvisioning.Agent=auto\nResourceDisk.Format=y\nLogs.Verbose=n\n")
    baseimage._configure_waagent(conf)
    lines = conf.read_text().splitlines()
    assert lines[:2] == ["# comment", "Logs.Verbose=n"]
    assert sorted(lines[2:]) == [
        "Provisioning.Agent=cloud-init",
        "ResourceDisk.EnableSwap=n",
        "ResourceDisk.Format=n",
    ]


SHOW_METAPACKAGE = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (5.10.262+1)
Version: 5.10.262-1
Depends: linux-image-5.10.0-46-cloud-amd64 (= 5.10.262-1)
Description: Linux for x86-64 cloud (meta-package)
"""


def test_the_versioned_kernel_is_what_the_metapackage_depends_on() -> None:
    assert baseimage.kernel_dependency(SHOW_METAPACKAGE) == "linux-image-5.10.0-46-cloud-amd64"
    assert baseimage.kernel_dependency("Package: linux-image-cloud-amd64\n") is None


def test_only_images_of_todays_recipe_are_reused(cache: Path) -> None:
    """An image built by another recipe (or before images recorded theirs) is never
    what ensure_image hands out; resolving its version still finds it."""
    images = baseimage.list_images(cache, "Debian", "debian-12", "12")
    assert baseimage.current_images(images, "12") == []
    today = images[1].model_copy(update={"recipe": baseimage.recipe_digest("12")})
    assert baseimage.current_images([images[0], today], "12") == [today]
    assert baseimage.recipe_digest("12") != baseimage.recipe_digest("13")
