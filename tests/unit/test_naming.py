"""Names Kiln gives to staging resource groups and secrets."""

from __future__ import annotations

import re

import pytest

from kiln.naming import ARM_GROUP_NAME_MAX, run_secret_name, staging_group_name

UID = "0F8FAD5B-D9CB-469F-A165-70867728950E"
ARM_NAME = re.compile(r"^[A-Za-z0-9_().-]+$")


def test_short_names_are_not_shortened() -> None:
    name = staging_group_name("images-rg", "debian", UID)
    assert name == f"IT_images-rg_debian_{UID.lower()}"


def test_format_has_four_parts() -> None:
    name = staging_group_name("rg", "tpl", UID)
    prefix, group, template, guid = name.split("_")
    assert (prefix, group, template, guid) == ("IT", "rg", "tpl", UID.lower())


@pytest.mark.parametrize(
    ("group", "template"),
    [
        ("g" * 90, "t" * 253),
        ("g" * 300, "t"),
        ("g", "t" * 300),
        ("g" * 24, "t" * 25),
        ("g" * 40, "t" * 40),
    ],
)
def test_long_inputs_fit_arm_and_keep_the_uid(group: str, template: str) -> None:
    name = staging_group_name(group, template, UID)
    assert len(name) <= ARM_GROUP_NAME_MAX == 90
    assert name.startswith("IT_")
    assert name.endswith("_" + UID.lower())
    _, group_part, template_part, _ = name.split("_")
    assert group.startswith(group_part)
    assert template.startswith(template_part)
    assert group_part and template_part


def test_long_inputs_use_all_the_room() -> None:
    name = staging_group_name("g" * 300, "t" * 300, UID)
    assert len(name) == 90


def test_short_group_leaves_room_for_the_template() -> None:
    name = staging_group_name("rg", "t" * 300, UID)
    assert len(name) == 90
    assert name.split("_")[2] == "t" * (90 - len("IT___") - len(UID) - len("rg"))


@pytest.mark.parametrize(
    ("group", "template"),
    [
        ("my rg", "debian/12"),
        ("rg:ü", "tpl#1"),
        ("rg", "a@b$c%d*e+f=g"),
        ("(rg).x", "t.e-s_t"),
    ],
)
def test_only_arm_allowed_characters(group: str, template: str) -> None:
    name = staging_group_name(group, template, UID)
    assert ARM_NAME.match(name), name
    assert name.endswith("_" + UID.lower())


def test_disallowed_characters_become_dashes() -> None:
    assert staging_group_name("my rg", "a/b", UID) == f"IT_my-rg_a-b_{UID.lower()}"


def test_deterministic() -> None:
    assert staging_group_name("g" * 100, "t" * 100, UID) == staging_group_name(
        "g" * 100, "t" * 100, UID
    )
    assert staging_group_name("rg", "a", UID) != staging_group_name("rg", "b", UID)
    other = "11111111-2222-3333-4444-555555555555"
    assert staging_group_name("rg", "a", UID) != staging_group_name("rg", "a", other)


def test_run_secret_name_is_the_runs_uid() -> None:
    """Key Secrets of all namespaces share the operator's: the uid keeps them apart."""
    assert run_secret_name(UID) == f"kiln-run-{UID.lower()}"
    assert len(run_secret_name(UID)) <= 63
