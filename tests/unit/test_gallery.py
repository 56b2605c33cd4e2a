"""The local gallery: Azure-shaped IDs mapped to directories, versions, publishing, latest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kiln.api.run import CapturedDataDisk
from kiln.api.template import LatestVersioning, SourceVersioning
from kiln.providers.local.gallery import (
    IMAGE_FILES,
    MANIFEST,
    GalleryError,
    ImageManifest,
    LocalGallery,
    VersionExists,
)
from kiln.versions import VersioningError, next_version

SUB = "/subscriptions/Sub-1/resourceGroups/Images-RG/providers/Microsoft.Compute"
DEFINITION = f"{SUB}/galleries/MyGallery/images/Debian12"
MANAGED = f"{SUB}/images/Golden"


@pytest.fixture
def gallery(tmp_path: Path) -> LocalGallery:
    return LocalGallery(tmp_path / "gallery")


def captured(tmp_path: Path, content: bytes = b"disk-v1") -> Path:
    """A captured image as the pipeline leaves it: its disk."""
    directory = tmp_path / f"captured-{content.decode()}"
    directory.mkdir(exist_ok=True)
    for name in IMAGE_FILES:
        (directory / name).write_bytes(content + b":" + name.encode())
    return directory


def manifest(version: str, run: str = "ns/run-1", **fields: object) -> ImageManifest:
    return ImageManifest(
        id=f"{DEFINITION}/versions/{version}",
        location="local",
        source="Debian:debian-12:12-gen2:12.1.0",
        run=run,
        disk_sha256="0" * 64,
        **fields,  # type: ignore[arg-type]
    )


def publish(
    gallery: LocalGallery,
    tmp_path: Path,
    version: str,
    *,
    run: str = "ns/run-1",
    content: bytes = b"disk-v1",
    replace: bool = False,
    **fields: object,
) -> Path:
    directory = gallery.definition_dir(DEFINITION) / version
    gallery.publish(
        directory, captured(tmp_path, content), manifest(version, run, **fields), replace=replace
    )
    return directory


# --- IDs to directories ---------------------------------------------------------------------


def test_managed_image_dir_is_lower_case(gallery: LocalGallery) -> None:
    assert gallery.managed_image_dir(MANAGED) == gallery.root / "images/sub-1/images-rg/golden"


def test_managed_image_dir_ignores_case_of_the_whole_id(gallery: LocalGallery) -> None:
    assert gallery.managed_image_dir(MANAGED.upper()) == gallery.managed_image_dir(MANAGED)
    assert gallery.managed_image_dir(MANAGED.lower()) == gallery.managed_image_dir(MANAGED)


def test_definition_dir_is_lower_case(gallery: LocalGallery) -> None:
    expected = gallery.root / "galleries/sub-1/images-rg/mygallery/debian12"
    assert gallery.definition_dir(DEFINITION) == expected
    assert gallery.definition_dir(DEFINITION.upper()) == expected
    assert gallery.definition_dir(f"{DEFINITION}/versions/1.0.0") == expected


def test_explicit_version(gallery: LocalGallery) -> None:
    assert gallery.explicit_version(f"{DEFINITION}/versions/1.2.3") == "1.2.3"
    assert gallery.explicit_version(DEFINITION) is None
    assert gallery.explicit_version("nonsense") is None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Golden",
        f"{SUB}/images/",
        f"{SUB}/images/a/b",
        f"{SUB}/disks/Golden",
        "/subscriptions/s/providers/Microsoft.Compute/images/x",
        DEFINITION,
    ],
)
def test_bad_managed_image_ids(gallery: LocalGallery, bad: str) -> None:
    with pytest.raises(GalleryError, match="not a managed image ID"):
        gallery.managed_image_dir(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Debian12",
        f"{SUB}/galleries/MyGallery",
        f"{SUB}/galleries/MyGallery/images",
        f"{DEFINITION}/versions",
        f"{DEFINITION}/versions/1.0.0/extra",
        MANAGED,
    ],
)
def test_bad_gallery_ids(gallery: LocalGallery, bad: str) -> None:
    with pytest.raises(GalleryError, match="not a gallery image ID"):
        gallery.definition_dir(bad)


def test_gallery_error_is_a_lookup_error() -> None:
    assert issubclass(GalleryError, LookupError)


# --- next_version ---------------------------------------------------------------------------


def latest(major: int | None) -> LatestVersioning:
    return LatestVersioning(scheme="Latest", major=major)


def test_next_version_of_an_empty_definition(gallery: LocalGallery) -> None:
    existing = gallery.version_names(DEFINITION)
    assert next_version(existing, None, "") == "0.0.1"
    assert next_version(existing, latest(-1), "") == "0.0.1"
    assert next_version(existing, latest(3), "") == "3.0.0"


def test_source_versioning_takes_the_source_version() -> None:
    source = SourceVersioning(scheme="Source")
    assert next_version(["9.9.9"], source, "0.20241111.1927") == "0.20241111.1927"
    with pytest.raises(VersioningError, match=r"not MAJOR\.MINOR\.PATCH"):
        next_version([], source, "latest")


@pytest.mark.parametrize(
    ("major", "expected"),
    [
        (None, "1.10.1"),
        (-1, "1.10.1"),
        (1, "1.10.1"),
        (0, "0.9.10"),
        (2, "2.0.0"),
    ],
)
def test_next_version_bumps_the_newest_patch(
    gallery: LocalGallery, tmp_path: Path, major: int | None, expected: str
) -> None:
    for version in ("0.9.9", "1.9.0", "1.10.0", "1.2.3"):
        publish(gallery, tmp_path, version, run=f"ns/{version}")
    assert next_version(gallery.version_names(DEFINITION), latest(major), "") == expected


def test_versions_are_sorted_numerically_and_skip_incomplete(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    for version in ("1.10.0", "1.2.0", "1.9.0"):
        publish(gallery, tmp_path, version, run=f"ns/{version}")
    (gallery.definition_dir(DEFINITION) / "2.0.0").mkdir()  # no image.json: not complete
    ids = [m.id.rsplit("/", 1)[-1] for m in gallery.versions(DEFINITION)]
    assert ids == ["1.2.0", "1.9.0", "1.10.0"]


def test_versions_of_a_missing_definition(gallery: LocalGallery) -> None:
    assert gallery.versions(DEFINITION) == []


# --- publish --------------------------------------------------------------------------------


def test_publish_creates_the_version(gallery: LocalGallery, tmp_path: Path) -> None:
    directory = publish(gallery, tmp_path, "1.0.0", regions={"local": 2, "westeurope": 1})
    assert directory == gallery.definition_dir(DEFINITION) / "1.0.0"
    for name in IMAGE_FILES:
        assert (directory / name).read_bytes() == b"disk-v1:" + name.encode()
    stored = ImageManifest.model_validate_json((directory / MANIFEST).read_text())
    assert stored == manifest("1.0.0", regions={"local": 2, "westeurope": 1}).model_copy(
        update={"created": stored.created}
    )
    assert stored.run == "ns/run-1"
    # No temporary or old directories are left next to it.
    assert sorted(p.name for p in directory.parent.iterdir()) == ["1.0.0"]


@pytest.mark.parametrize("generation", ["V1", "V2"])
def test_a_version_keeps_the_firmware_generation(
    gallery: LocalGallery, tmp_path: Path, generation: str
) -> None:
    directory = publish(gallery, tmp_path, "1.0.0", hyper_v_generation=generation)
    assert sorted(p.name for p in directory.iterdir()) == ["disk.qcow2", "image.json"]
    assert gallery.manifest(directory).hyper_v_generation == generation


def test_publish_makes_replicas_as_hard_links(gallery: LocalGallery, tmp_path: Path) -> None:
    directory = publish(gallery, tmp_path, "1.0.0", regions={"local": 2, "westeurope": 3})
    replicas = directory / "replicas"
    assert sorted(p.name for p in replicas.iterdir()) == ["local", "westeurope"]
    assert sorted(p.name for p in (replicas / "local").iterdir()) == ["0", "1"]
    assert sorted(p.name for p in (replicas / "westeurope").iterdir()) == ["0", "1", "2"]
    for region, count in (("local", 2), ("westeurope", 3)):
        for replica in range(count):
            for name in IMAGE_FILES:
                copy = replicas / region / str(replica) / name
                assert copy.read_bytes() == (directory / name).read_bytes()
                assert copy.stat().st_ino == (directory / name).stat().st_ino
    assert (directory / "disk.qcow2").stat().st_nlink == 1 + 2 + 3


def test_publish_without_regions_has_no_replicas(gallery: LocalGallery, tmp_path: Path) -> None:
    directory = publish(gallery, tmp_path, "1.0.0")
    assert not (directory / "replicas").exists()


def test_publishing_again_by_the_same_run_is_a_no_op(gallery: LocalGallery, tmp_path: Path) -> None:
    directory = publish(gallery, tmp_path, "1.0.0")
    before = (directory / MANIFEST).read_text()
    publish(gallery, tmp_path, "1.0.0", content=b"disk-v2", tags={"changed": "yes"})
    assert (directory / MANIFEST).read_text() == before
    assert (directory / "disk.qcow2").read_bytes() == b"disk-v1:disk.qcow2"


def test_publishing_by_another_run_without_replace_fails(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    directory = publish(gallery, tmp_path, "1.0.0")
    # VersionExists: the provider turns it into GalleryImageVersionExists with the fix
    with pytest.raises(VersionExists, match="exists already"):
        publish(gallery, tmp_path, "1.0.0", run="ns/run-2", content=b"disk-v2")
    assert (directory / "disk.qcow2").read_bytes() == b"disk-v1:disk.qcow2"


def test_publishing_by_another_run_with_replace_replaces(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    publish(gallery, tmp_path, "1.0.0", regions={"old": 1})
    directory = publish(
        gallery, tmp_path, "1.0.0", run="ns/run-2", content=b"disk-v2", replace=True
    )
    assert (directory / "disk.qcow2").read_bytes() == b"disk-v2:disk.qcow2"
    assert ImageManifest.model_validate_json((directory / MANIFEST).read_text()).run == "ns/run-2"
    assert not (directory / "replicas").exists()
    assert sorted(p.name for p in directory.parent.iterdir()) == ["1.0.0"]


def test_publish_recovers_from_a_stale_temporary_directory(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    definition = gallery.definition_dir(DEFINITION)
    stale = definition / ".1.0.0.tmp"
    stale.mkdir(parents=True)
    (stale / "disk.qcow2").write_bytes(b"half")
    directory = publish(gallery, tmp_path, "1.0.0")
    assert (directory / "disk.qcow2").read_bytes() == b"disk-v1:disk.qcow2"
    assert sorted(p.name for p in definition.iterdir()) == ["1.0.0"]


def _crash_leftover(directory: Path) -> None:
    """What a crash between the final rename and removing .<version>.old leaves behind."""
    shutil.copytree(directory, directory.with_name(f".{directory.name}.old"))


def test_versions_ignore_a_leftover_old_directory(gallery: LocalGallery, tmp_path: Path) -> None:
    _crash_leftover(publish(gallery, tmp_path, "1.0.0"))
    assert [m.run for m in gallery.versions(DEFINITION)] == ["ns/run-1"]


def test_publish_with_replace_after_a_crash_that_left_the_old_version(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    directory = publish(gallery, tmp_path, "1.0.0")
    _crash_leftover(directory)
    publish(gallery, tmp_path, "1.0.0", run="ns/run-2", content=b"disk-v2", replace=True)
    assert (directory / "disk.qcow2").read_bytes() == b"disk-v2:disk.qcow2"
    stored = ImageManifest.model_validate_json((directory / MANIFEST).read_text())
    assert stored.run == "ns/run-2"


def test_published_by(gallery: LocalGallery, tmp_path: Path) -> None:
    directory = publish(gallery, tmp_path, "1.0.0")
    assert gallery.published_by(directory, "ns/run-1")
    assert not gallery.published_by(directory, "ns/run-2")
    assert not gallery.published_by(directory.with_name("9.9.9"), "ns/run-1")


# --- resolve --------------------------------------------------------------------------------


def test_resolve_latest_skips_excluded_versions(gallery: LocalGallery, tmp_path: Path) -> None:
    publish(gallery, tmp_path, "1.0.0", run="ns/a")
    publish(gallery, tmp_path, "1.1.0", run="ns/b")
    publish(gallery, tmp_path, "1.2.0", run="ns/c", exclude_from_latest=True)
    exact, directory = gallery.resolve_version(f"{DEFINITION}/versions/latest")
    assert exact == f"{DEFINITION}/versions/1.1.0"
    assert directory == gallery.definition_dir(DEFINITION) / "1.1.0"


def test_resolve_latest_is_case_insensitive(gallery: LocalGallery, tmp_path: Path) -> None:
    publish(gallery, tmp_path, "1.0.0")
    exact, _ = gallery.resolve_version(f"{DEFINITION}/versions/LATEST")
    assert exact.endswith("/versions/1.0.0")


def test_resolve_latest_without_a_usable_version(gallery: LocalGallery, tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="no version to use as latest"):
        gallery.resolve_version(f"{DEFINITION}/versions/latest")
    publish(gallery, tmp_path, "1.0.0", exclude_from_latest=True)
    with pytest.raises(GalleryError, match="no version to use as latest") as error:
        gallery.resolve_version(f"{DEFINITION}/versions/latest")
    assert str(gallery.root) in str(error.value)


def test_resolve_explicit_version(gallery: LocalGallery, tmp_path: Path) -> None:
    publish(gallery, tmp_path, "1.0.0", exclude_from_latest=True)
    exact, directory = gallery.resolve_version(f"{DEFINITION}/versions/1.0.0")
    assert exact == f"{DEFINITION}/versions/1.0.0"
    assert (directory / MANIFEST).is_file()
    with pytest.raises(GalleryError, match="is not in the local gallery"):
        gallery.resolve_version(f"{DEFINITION}/versions/2.0.0")


def test_resolve_managed_image(gallery: LocalGallery, tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="is not in the local gallery"):
        gallery.resolve_managed_image(MANAGED)
    directory = gallery.managed_image_dir(MANAGED)
    gallery.publish(directory, captured(tmp_path), manifest("0"), replace=False)
    assert gallery.resolve_managed_image(MANAGED.lower()) == directory


def test_a_version_holds_its_data_disks_beside_the_os_disk(
    gallery: LocalGallery, tmp_path: Path
) -> None:
    image_dir = captured(tmp_path)
    for name in ("datadisk-0.qcow2", "datadisk-0.vhd"):
        (image_dir / name).write_bytes(name.encode())
    disk = CapturedDataDisk(
        lun=0,
        qcow2="datadisk-0.qcow2",
        qcow2_sha256="1" * 64,
        vhd="datadisk-0.vhd",
        vhd_sha256="2" * 64,
    )
    directory = gallery.definition_dir(DEFINITION) / "1.0.0"
    gallery.publish(
        directory,
        image_dir,
        manifest("1.0.0", data_disks=[disk], regions={"east": 1}),
        replace=False,
    )
    for place in (directory, directory / "replicas/east/0"):
        assert (place / "datadisk-0.qcow2").read_bytes() == b"datadisk-0.qcow2"
        assert (place / "datadisk-0.vhd").read_bytes() == b"datadisk-0.vhd"
    assert gallery.manifest(directory).data_disks == [disk]
