"""What an operator lets template authors reach: file roots, output roots, network ranges.

Template authors are untrusted. These limits come from the operator's settings (never
from a spec) and are checked twice: when a template is validated (so `kubectl describe`
names the field and the fix) and again when a run reads or writes (files and DNS change
after validation).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, Field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Loopback, "this host", link-local (Azure's instance metadata service 169.254.169.254 is
# in it), Azure's wireserver and their IPv6 counterparts.
DEFAULT_BLOCKED_RANGES = (
    "127.0.0.0/8",
    "0.0.0.0/8",
    "169.254.0.0/16",
    "168.63.129.16/32",
    "::1/128",
    "::/128",
    "fe80::/10",
)
FILE_ROOTS_SETTING = "KILN_FILE_SOURCE_ROOTS (chart: settings.fileSourceRoots)"
OUTPUT_ROOTS_SETTING = "KILN_OUTPUT_ROOTS (chart: settings.outputRoots)"
BLOCKED_RANGES_SETTING = "KILN_DOWNLOAD_BLOCKED_RANGES (chart: settings.downloadBlockedRanges)"


class Refused(Exception):
    """A path a template named lies outside every root the operator allows."""


class FileRoot(BaseModel):
    """A directory templates may read with file:// URIs.

    `path` is what URIs name; `directory` is where it lives on the operator's disk (the
    same unless the setting maps one onto the other, as a volume mount does: `make demo`
    maps /kiln/examples onto the repository's examples/).
    """

    path: PurePosixPath
    directory: Path

    @classmethod
    def parse(cls, text: str) -> FileRoot:
        """'/srv/files' or '/kiln/examples=/home/me/kiln/examples'."""
        named, _, directory = text.partition("=")
        path = PurePosixPath(named.strip())
        target = Path(directory.strip() or named.strip())
        if not path.is_absolute() or not target.is_absolute():
            raise ValueError(f"file source root {text!r} must be an absolute path")
        return cls(path=PurePosixPath(posixpath.normpath(path)), directory=target)


def normalized(path: str) -> PurePosixPath | None:
    """The absolute, normalized path, or None when it is relative or climbs with '..'."""
    if not path.startswith("/") or ".." in PurePosixPath(path).parts or "\0" in path:
        return None
    return PurePosixPath(posixpath.normpath(path))


def _inside(path: PurePosixPath | Path, root: PurePosixPath | Path) -> bool:
    return path == root or root in path.parents


def file_uri_path(uri: str) -> str:
    """The path of a file:// URI (file:///a/b or file://localhost/a/b), percent-decoded."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise Refused(f"names the host {parsed.netloc!r}; file:// URIs name local files only")
    return unquote(parsed.path)


class TenancyPolicy(BaseModel):
    file_source_roots: list[FileRoot] = Field(default_factory=list)
    output_roots: list[Path] = Field(
        default_factory=list, description="Where local VHD targets may write (and the gallery)."
    )
    protected_roots: list[Path] = Field(
        default_factory=list,
        description="Inside the output roots, where no VHD may go: the gallery's images and "
        "versions, whose files a VHD would overwrite.",
    )
    blocked_ranges: list[IPNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(r) for r in DEFAULT_BLOCKED_RANGES]
    )
    communicator_source: str | None = None
    operator_identity: bool = Field(
        default=True, description="Templates without serviceAccountName may use the operator's."
    )

    # --- file:// sources -----------------------------------------------------------------

    def _root_of(self, path: PurePosixPath) -> FileRoot | None:
        return next((r for r in self.file_source_roots if _inside(path, r.path)), None)

    def check_file_uri(self, uri: str) -> None:
        """Refuse a file:// URI outside the roots, by its text alone (validation time)."""
        path = normalized(file_uri_path(uri))
        if path is None:
            raise Refused("must be an absolute path without '..'")
        if self._root_of(path) is None:
            raise Refused(self._outside_roots())

    def _outside_roots(self) -> str:
        if not self.file_source_roots:
            return (
                "file:// sources are off in this operator; serve the file over https or ask "
                f"the operator's admin to set {FILE_ROOTS_SETTING}"
            )
        roots = ", ".join(str(r.path) for r in self.file_source_roots)
        return f"is not under a directory templates may read ({roots}); move the file there"

    def open_file_uri(self, uri: str) -> Path:
        """The real file behind a file:// URI, with symlinks resolved and still inside its
        root (read time): a link out of the root is refused like a path out of it."""
        path, root = self._rooted(uri)
        real = Path(os.path.realpath(root.directory / path.relative_to(root.path)))
        self.confirm_opened(uri, real)
        return real

    def confirm_opened(self, uri: str, real: Path) -> None:
        """Refuse a real (symlink-free) path that is not inside the URI's root."""
        path, root = self._rooted(uri)
        if not _inside(real, Path(os.path.realpath(root.directory))):
            raise Refused(
                f"{path} leads out of {root.path} through a symbolic link; copy the file "
                "into the directory instead of linking it"
            )

    def _rooted(self, uri: str) -> tuple[PurePosixPath, FileRoot]:
        self.check_file_uri(uri)
        path = normalized(file_uri_path(uri))
        root = self._root_of(path) if path else None
        assert path is not None and root is not None
        return path, root

    # --- local outputs -------------------------------------------------------------------

    def check_output_path(self, path: str) -> Path:
        """A local VHD target's path, if it is inside an output root (with symlinks resolved
        as far as the path exists)."""
        clean = normalized(path)
        if clean is None:
            raise Refused("must be an absolute path without '..'")
        real = Path(os.path.realpath(clean))
        for protected in self.protected_roots:
            if _inside(real, Path(os.path.realpath(protected))):
                raise Refused(
                    f"is inside {protected}, where the local gallery keeps its images and "
                    "versions (a VHD there would overwrite their files); write it elsewhere, "
                    "e.g. in the gallery's vhds/ directory"
                )
        for root in self.output_roots:
            if _inside(real, Path(os.path.realpath(root))):
                return real
        roots = ", ".join(str(r) for r in self.output_roots)
        raise Refused(
            f"is outside the directories Kiln may write ({roots}); leave uri unset (the run's "
            f"staging directory) or ask the operator's admin to add a root to "
            f"{OUTPUT_ROOTS_SETTING}"
        )

    # --- network -------------------------------------------------------------------------

    def blocked_range(self, address: str) -> IPNetwork | None:
        """The blocked range holding an address (IPv4-mapped IPv6 counts as IPv4)."""
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return next((net for net in self.blocked_ranges if ip in net), None)

    def check_literal_host(self, uri: str) -> None:
        """Refuse a URI whose host is an address in a blocked range (validation time)."""
        host = urlparse(uri).hostname or ""
        try:
            blocked = self.blocked_range(host)
        except ValueError:
            return  # a name: checked on the address it resolves to, when it is downloaded
        if blocked is not None:
            raise Refused(blocked_message(host, blocked))


def blocked_message(address: str, network: IPNetwork) -> str:
    return (
        f"{address} is in {network}, which Kiln never downloads from (loopback, link-local, "
        "instance metadata and Azure's wireserver by default); serve the file from another "
        f"address, or ask the operator's admin to change {BLOCKED_RANGES_SETTING}"
    )
