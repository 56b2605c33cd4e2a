"""Image version numbers: ordering, and AIB's rules for the next gallery version."""

from __future__ import annotations

import re
from collections.abc import Iterable

from kiln.api.template import LatestVersioning, SourceVersioning, Versioning

TRIPLE = re.compile(r"^\d+\.\d+\.\d+$")


class VersioningError(ValueError):
    """No version number can be chosen as asked."""


def version_key(version: str) -> tuple[int, ...]:
    """Numeric order (1.10.0 after 1.9.0); parts that are not numbers sort first."""
    return tuple(int(part) if part.isdigit() else -1 for part in version.split("."))


def next_version(existing: Iterable[str], versioning: Versioning | None, source: str) -> str:
    """AIB's schemes: Source takes the source image's version; Latest (the default) is one
    patch above the newest version, within `major` when it is set."""
    if isinstance(versioning, SourceVersioning):
        if not TRIPLE.match(source):
            raise VersioningError(
                f"source version {source!r} is not MAJOR.MINOR.PATCH, so Source versioning "
                "cannot use it; use versioning scheme Latest"
            )
        return source
    major = versioning.major if isinstance(versioning, LatestVersioning) else None
    keys = [version_key(v) for v in existing if TRIPLE.match(v)]
    if major is not None and major >= 0:
        keys = [k for k in keys if k[0] == major]
        if not keys:
            return f"{major}.0.0"
    if not keys:
        return "0.0.1"
    newest = max(keys)
    return f"{newest[0]}.{newest[1]}.{newest[2] + 1}"
