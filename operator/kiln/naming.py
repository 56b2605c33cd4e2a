"""Names Kiln gives to things, within the limits of the places they live in."""

from __future__ import annotations

import re

ARM_GROUP_NAME_MAX = 90
_NOT_ARM = re.compile(r"[^A-Za-z0-9_().-]")


def staging_group_name(resource_group: str, template: str, template_uid: str) -> str:
    """AIB's IT_<resourceGroup>_<template>_<guid>, shortened to ARM's 90 characters.

    The guid is the template's uid, so the name is the same on every pass and after a
    restart; the group and template parts give way first, the guid never does.
    """
    guid = template_uid.lower()
    room = ARM_GROUP_NAME_MAX - len("IT___") - len(guid)
    group_part = _NOT_ARM.sub("-", resource_group)[: room // 2]
    template_part = _NOT_ARM.sub("-", template)[: room - len(group_part)]
    return f"IT_{group_part}_{template_part}_{guid}"


BUILD_COMPUTER_NAME = "kiln-build"


def run_secret_name(run_uid: str) -> str:
    """The run's key Secret, in the operator's namespace: unique across namespaces."""
    return f"kiln-run-{run_uid.lower()}"
