"""The local gallery: managed images and gallery image versions as directories.

It mirrors Azure's resource IDs, so the same template distributes to Azure or here:
  images/<subscription>/<group>/<name>/                          a managed image
  galleries/<subscription>/<group>/<gallery>/<definition>/<version>/
      image.json, disk.qcow2 (boots by firmware alone)             the version
      datadisk-<lun>.qcow2, datadisk-<lun>.vhd                    its data disks, if any
      replicas/<region>/<n>/                                      its replicas
IDs are case-insensitive in Azure, so paths use lower case. Every artifact is written
under a temporary name and renamed, so a crash never leaves a half image that looks done.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from kiln.api.run import CapturedDataDisk
from kiln.providers.local.disks import copy_sparse
from kiln.settings import GALLERY_TREES
from kiln.versions import version_key

IMAGES, GALLERIES = GALLERY_TREES
IMAGE_FILES = ("disk.qcow2",)
MANIFEST = "image.json"

_MANAGED = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Compute/images/(?P<name>[^/]+)$",
    re.I,
)
_GALLERY = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/"
    r"Microsoft\.Compute/galleries/(?P<gallery>[^/]+)/images/(?P<definition>[^/]+)"
    r"(/versions/(?P<version>[^/]+))?$",
    re.I,
)


class GalleryError(LookupError):
    """An image or version is missing, or a version cannot be published."""


class VersionExists(GalleryError):
    """Another run published this version already; it is never published over."""


class ImageManifest(BaseModel):
    """image.json: what an artifact is and where it came from."""

    id: str
    location: str
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str = Field(description="The exact source the build started from.")
    run: str = Field(description="namespace/name of the run that made it.")
    disk_sha256: str
    hyper_v_generation: Literal["V1", "V2"] = Field(
        default="V2", description="The firmware the disk was built with: V1 BIOS, V2 UEFI."
    )
    tags: dict[str, str] = Field(default_factory=dict)
    exclude_from_latest: bool = False
    regions: dict[str, int] = Field(default_factory=dict, description="region -> replicas")
    data_disks: list[CapturedDataDisk] = Field(default_factory=list)

    def files(self) -> tuple[str, ...]:
        """The artifact's disk files: the OS disk, then each data disk's qcow2 and VHD."""
        return IMAGE_FILES + tuple(n for d in self.data_disks for n in (d.qcow2, d.vhd))


class LocalGallery:
    def __init__(self, root: Path) -> None:
        self.root = root

    def managed_image_dir(self, image_id: str) -> Path:
        match = _MANAGED.match(image_id)
        if not match:
            raise GalleryError(f"{image_id!r} is not a managed image ID")
        return (
            self.root
            / IMAGES
            / match["sub"].lower()
            / match["rg"].lower()
            / (match["name"].lower())
        )

    def definition_dir(self, gallery_image_id: str) -> Path:
        match = _GALLERY.match(gallery_image_id)
        if not match:
            raise GalleryError(f"{gallery_image_id!r} is not a gallery image ID")
        parts = (match["sub"], match["rg"], match["gallery"], match["definition"])
        return self.root.joinpath(GALLERIES, *(p.lower() for p in parts))

    @staticmethod
    def explicit_version(gallery_image_id: str) -> str | None:
        match = _GALLERY.match(gallery_image_id)
        return match["version"] if match else None

    def versions(self, gallery_image_id: str) -> list[ImageManifest]:
        """Complete versions of a definition, oldest first."""
        definition = self.definition_dir(gallery_image_id)
        if not definition.is_dir():
            return []
        found = [
            ImageManifest.model_validate_json((d / MANIFEST).read_text())
            for d in definition.iterdir()
            if not d.name.startswith(".") and (d / MANIFEST).is_file()
        ]
        return sorted(found, key=lambda m: version_key(m.id.rsplit("/", 1)[-1]))

    def resolve_version(self, image_version_id: str) -> tuple[str, Path]:
        """(exact version ID, directory) for a version ID; 'latest' picks the newest."""
        version = self.explicit_version(image_version_id) or "latest"
        definition_id = image_version_id.rsplit("/versions/", 1)[0]
        if version.lower() == "latest":
            candidates = [m for m in self.versions(definition_id) if not m.exclude_from_latest]
            if not candidates:
                raise GalleryError(
                    f"{definition_id} has no version to use as latest in the local gallery "
                    f"({self.root}); build one first"
                )
            exact = candidates[-1].id
        else:
            exact = image_version_id
        directory = self.definition_dir(definition_id) / exact.rsplit("/", 1)[-1]
        if not (directory / MANIFEST).is_file():
            raise GalleryError(f"{exact} is not in the local gallery ({self.root})")
        return exact, directory

    def resolve_managed_image(self, image_id: str) -> Path:
        directory = self.managed_image_dir(image_id)
        if not (directory / MANIFEST).is_file():
            raise GalleryError(
                f"managed image {image_id} is not in the local gallery ({self.root})"
            )
        return directory

    @staticmethod
    def manifest(directory: Path) -> ImageManifest:
        return ImageManifest.model_validate_json((directory / MANIFEST).read_text())

    def version_names(self, gallery_image_id: str) -> list[str]:
        return [m.id.rsplit("/", 1)[-1] for m in self.versions(gallery_image_id)]

    def published_by(self, directory: Path, run: str) -> bool:
        """True when directory holds an artifact this run published (a resumed step)."""
        manifest = directory / MANIFEST
        return manifest.is_file() and (
            ImageManifest.model_validate_json(manifest.read_text()).run == run
        )

    def publish(
        self, directory: Path, image_dir: Path, manifest: ImageManifest, *, replace: bool
    ) -> None:
        """Copy a captured image into directory atomically; replicas are hard links."""
        if self.published_by(directory, manifest.run):
            return
        if (directory / MANIFEST).is_file() and not replace:
            raise VersionExists(f"{manifest.id} exists already; choose another version")
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in manifest.files():
            if name.endswith(".vhd"):  # a fixed VHD is mostly holes: keep them
                copy_sparse(image_dir / name, tmp / name)
            else:
                shutil.copy2(image_dir / name, tmp / name)
        for region, count in manifest.regions.items():
            for replica in range(count):
                target = tmp / "replicas" / region / str(replica)
                target.mkdir(parents=True)
                for name in manifest.files():
                    _link_or_copy(tmp / name, target / name)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
