"""The operator's limits on what templates reach, checked on real paths and addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.api.tenancy import FileRoot, Refused, TenancyPolicy


def test_an_output_path_through_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "images", tmp_path / "etc"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    policy = TenancyPolicy(output_roots=[root])
    assert policy.check_output_path(f"{root}/team-a/os.vhd") == root / "team-a" / "os.vhd"
    with pytest.raises(Refused, match="outside the directories Kiln may write"):
        policy.check_output_path(f"{root}/escape/cron.vhd")


@pytest.mark.parametrize(
    ("relative", "refused"),
    [
        ("vhds/app.vhd", False),
        ("app.vhd", False),
        ("galleries/sub/rg/g/def/1.0.0/disk.qcow2", True),  # a version's own file
        ("galleries/sub/rg/g/def/9.9.9.vhd", True),
        ("images/sub/rg/base/disk.qcow2", True),
        ("link/1.0.0/disk.qcow2", True),  # a symlink into the versions
    ],
)
def test_a_vhd_never_goes_where_the_gallery_keeps_images(
    tmp_path: Path, relative: str, refused: bool
) -> None:
    gallery = tmp_path / "gallery"
    (gallery / "galleries" / "sub").mkdir(parents=True)
    (gallery / "link").symlink_to(gallery / "galleries" / "sub")
    policy = TenancyPolicy(
        output_roots=[gallery], protected_roots=[gallery / "images", gallery / "galleries"]
    )
    if refused:
        with pytest.raises(Refused, match="would overwrite their files"):
            policy.check_output_path(f"{gallery}/{relative}")
    else:
        assert policy.check_output_path(f"{gallery}/{relative}") == gallery / relative


@pytest.mark.parametrize("text", ["relative", "/a=relative", "=/x"])
def test_a_file_root_must_be_absolute(text: str) -> None:
    with pytest.raises(ValueError, match="must be an absolute path"):
        FileRoot.parse(text)


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("::ffff:169.254.169.254", "169.254.0.0/16"),
        ("168.63.129.16", "168.63.129.16/32"),
        ("fe80::1%eth0", "fe80::/10"),
        ("0.0.0.0", "0.0.0.0/8"),
    ],
)
def test_default_blocked_ranges(address: str, network: str) -> None:
    assert str(TenancyPolicy().blocked_range(address)) == network


def test_public_and_private_addresses_are_allowed_by_default() -> None:
    for address in ("20.50.1.2", "10.1.2.3", "192.168.1.10", "2001:db8::1"):
        assert TenancyPolicy().blocked_range(address) is None


def test_a_root_prefix_is_not_a_root() -> None:
    policy = TenancyPolicy(file_source_roots=[FileRoot.parse("/srv/files")])
    policy.check_file_uri("file:///srv/files/a/b.sh")
    with pytest.raises(Refused, match="not under"):
        policy.check_file_uri("file:///srv/files-other/b.sh")
