"""A whole azure build with a team's own identity, by an operator that lends none of its own.

The team's ServiceAccount is federated with an app of the emulator's Entra ID; the
operator exchanges the real API server's tokens for it. Windows builds are the quickest
whole builds (a WinRM guest, no QEMU boot).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from kubernetes import client, config

from azurehelpers import (
    WINDOWS_SERVER_2022,
    create_gallery,
    managed_image_target,
    operator_settings,
)
from conftest import ControlPlane, OperatorProcess
from fakes.arm import ArmEmulator
from fakes.arm.identity import IssuerEndpoint
from kiln.providers.azure.clients import CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION
from kubehelpers import (
    Kiln,
    cluster_ca_file,
    condition,
    publish_issuer,
    template,
    wait_ended,
)
from kubehelpers import run as run_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.azure]

TEAM = "team-builds"
BUILDER = "image-builder"
LOCATION = "westeurope"
TEAM_APP = str(uuid.uuid5(uuid.NAMESPACE_DNS, "team-builds.kiln.test"))


@pytest.fixture(scope="module")
def kiln(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kiln]:
    data = tmp_path_factory.mktemp("team-operator")
    ca = cluster_ca_file(control_plane.kubeconfig, data)
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": TEAM}})
        annotations = {CLIENT_ID_ANNOTATION: TEAM_APP, TENANT_ID_ANNOTATION: arm_qemu.tenant_id}
        core.create_namespaced_service_account(
            TEAM, {"metadata": {"name": BUILDER, "annotations": annotations}}
        )
        issuer = publish_issuer(api, control_plane.server, ca)
        arm_qemu.identity.register_federated_app(
            TEAM_APP,
            issuer,
            f"system:serviceaccount:{TEAM}:{BUILDER}",
            IssuerEndpoint(control_plane.server, ca),
        )
        operator = OperatorProcess(
            control_plane.kubeconfig,
            data,
            data / "operator.log",
            **operator_settings(arm_qemu, TEAM, LOCATION),
            KILN_AZURE_OPERATOR_IDENTITY="false",
        )
        operator.start()
        try:
            yield Kiln(api, TEAM)
        finally:
            operator.stop()


def windows_template(arm: ArmEmulator, name: str, **spec: Any) -> dict[str, Any]:
    ids = create_gallery(arm, "teamout", "kilnteam", name, LOCATION, os_type="Windows")
    manifest = template(
        name,
        source=WINDOWS_SERVER_2022,
        customize=[],
        distribute=[managed_image_target(ids["image"], LOCATION)],
        **spec,
    )
    manifest["spec"]["provider"] = "azure"
    return manifest


def appids(tokens: list[str]) -> set[str]:
    return {jwt.decode(t, options={"verify_signature": False})["appid"] for t in tokens}


def test_without_a_service_account_the_template_is_refused(
    kiln: Kiln, arm_qemu: ArmEmulator
) -> None:
    kiln.create("imagetemplates", windows_template(arm_qemu, "anonymous"))
    body = kiln.wait_for(
        "imagetemplates",
        "anonymous",
        lambda b: (condition(b, "Stalled") or {}).get("status") == "True",
        60,
        "Stalled",
    )
    stalled = condition(body, "Stalled")
    assert stalled["reason"] == "InvalidSpec"
    assert "spec.serviceAccountName" in stalled["message"]
    assert "KILN_AZURE_OPERATOR_IDENTITY" in stalled["message"]


def test_the_teams_identity_builds_the_image(kiln: Kiln, arm_qemu: ArmEmulator) -> None:
    manifest = windows_template(arm_qemu, "team", serviceAccountName=BUILDER)
    before = len(arm_qemu.identity.issued_tokens)  # from here on only the operator signs in
    kiln.create("imagetemplates", manifest)
    kiln.create("imagebuildruns", run_manifest("team-1", "team"))
    body = wait_ended(kiln, "team-1", timeout=600)
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]
    issued = arm_qemu.identity.issued_tokens[before:]
    assert TEAM_APP in appids(issued)
    assert arm_qemu.client_id not in appids(issued)  # the operator's own app signed nothing
