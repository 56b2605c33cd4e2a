"""Azure credentials per namespace: a template's ServiceAccount, exchanged with Entra ID.

The real kube-apiserver issues the ServiceAccount tokens (TokenRequest) and publishes its
issuer's keys; the ARM emulator's Entra endpoint checks each client assertion against
them as Entra checks an AKS cluster's (OpenID discovery, JWKS, federated credential), and
limits each team's app to its own resource group, as a role assignment would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client, config

from conftest import ControlPlane
from fakes.arm import ArmEmulator
from fakes.arm.identity import JWT_BEARER, IssuerEndpoint
from kiln.kube import Kube
from kiln.providers.azure.clients import (
    CLIENT_ID_ANNOTATION,
    TENANT_ID_ANNOTATION,
    TOKEN_EXCHANGE_AUDIENCE,
    AzureClients,
    IdentityRef,
    make_clients,
    namespace_credential,
)
from kiln.providers.base import ProviderError
from kiln.settings import OperatorSettings
from kubehelpers import cluster_ca_file, publish_issuer

pytestmark = [pytest.mark.integration, pytest.mark.azure]

TEAMS = ("team-a", "team-b")
BUILDER = "builder"
LOCATION = "westeurope"


def app_id(team: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{team}.kiln.test"))


def group_of(team: str) -> str:
    return f"{team}-images"


@pytest.fixture(scope="module")
def arm() -> Iterator[ArmEmulator]:
    with ArmEmulator(lro_duration=0.1, retry_after=0.05) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        yield api


@pytest.fixture(scope="module")
def cluster_ca(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cluster_ca_file(control_plane.kubeconfig, tmp_path_factory.mktemp("cluster-ca"))


@pytest.fixture(scope="module")
def issuer(control_plane: ControlPlane, admin: client.ApiClient, cluster_ca: Path) -> str:
    return publish_issuer(admin, control_plane.server, cluster_ca)


@pytest.fixture(scope="module")
def teams(
    arm: ArmEmulator,
    admin: client.ApiClient,
    control_plane: ControlPlane,
    cluster_ca: Path,
    issuer: str,
) -> dict[str, str]:
    """Two team namespaces, each with a builder ServiceAccount federated with its own app,
    which has a role on its own resource group only. {team: client id}."""
    core = client.CoreV1Api(admin)
    endpoint = IssuerEndpoint(control_plane.server, cluster_ca)
    subscription = f"/subscriptions/{arm.subscription_id}/resourceGroups"
    for team in TEAMS:
        core.create_namespace({"metadata": {"name": team}})
        annotations = {CLIENT_ID_ANNOTATION: app_id(team), TENANT_ID_ANNOTATION: arm.tenant_id}
        core.create_namespaced_service_account(
            team, {"metadata": {"name": BUILDER, "annotations": annotations}}
        )
        arm.identity.register_federated_app(
            app_id(team),
            issuer,
            f"system:serviceaccount:{team}:{BUILDER}",
            endpoint,
            scopes=[f"{subscription}/{group_of(team)}"],
        )
    return {team: app_id(team) for team in TEAMS}


def settings_for(arm: ArmEmulator, **changes: object) -> OperatorSettings:
    return OperatorSettings(
        azure_arm_endpoint=arm.url,
        azure_authority=arm.url,
        azure_ca_bundle=arm.ca_path,
        subscription_id=arm.subscription_id,
        **changes,
    )


@pytest.fixture
async def kube(admin: client.ApiClient) -> AsyncIterator[Kube]:
    yield Kube(admin)


async def signed_in(arm: ArmEmulator, kube: Kube, ref: IdentityRef) -> AzureClients:
    credential = await namespace_credential(settings_for(arm), kube, ref)
    return make_clients(settings_for(arm), credential, arm.subscription_id)


async def create_group(clients: AzureClients, name: str) -> None:
    await clients.resource.resource_groups.create_or_update(name, {"location": LOCATION})


async def test_each_team_builds_with_its_own_identity_in_its_own_group(
    arm: ArmEmulator, kube: Kube, teams: dict[str, str]
) -> None:
    a = await signed_in(arm, kube, IdentityRef("team-a", BUILDER))
    try:
        await create_group(a, group_of("team-a"))
        token = await a.credential.get_token(f"{arm.url}/.default")
        claims = jwt.decode(token.token, options={"verify_signature": False})
        assert claims["appid"] == teams["team-a"]
        with pytest.raises(HttpResponseError) as refused:
            await create_group(a, group_of("team-b"))
        assert refused.value.status_code == 403
        assert refused.value.error.code == "AuthorizationFailed"
    finally:
        await a.close()
    b = await signed_in(arm, kube, IdentityRef("team-b", BUILDER))
    try:
        await create_group(b, group_of("team-b"))
    finally:
        await b.close()


async def test_another_teams_client_id_is_refused_by_entra(
    arm: ArmEmulator, kube: Kube, admin: client.ApiClient, teams: dict[str, str]
) -> None:
    """A team that annotates its ServiceAccount with another team's client ID gets no
    token: the assertion's subject is its own ServiceAccount, which that app does not trust."""
    core = client.CoreV1Api(admin)
    annotations = {CLIENT_ID_ANNOTATION: teams["team-a"], TENANT_ID_ANNOTATION: arm.tenant_id}
    core.create_namespaced_service_account(
        "team-b", {"metadata": {"name": "borrower", "annotations": annotations}}
    )
    clients = await signed_in(arm, kube, IdentityRef("team-b", "borrower"))
    try:
        with pytest.raises(ClientAuthenticationError) as refused:
            await create_group(clients, group_of("team-a"))
        message = str(refused.value)
        assert "AADSTS70021" in message
        assert "system:serviceaccount:team-b:borrower" in message
    finally:
        await clients.close()


def test_a_forged_assertion_fails_signature_validation(
    arm: ArmEmulator, issuer: str, teams: dict[str, str]
) -> None:
    """Right issuer, subject and audience, but signed by a key the cluster never published."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    forged = jwt.encode(
        {
            "iss": issuer,
            "sub": f"system:serviceaccount:team-a:{BUILDER}",
            "aud": [TOKEN_EXCHANGE_AUDIENCE],
            "iat": now,
            "exp": now + 600,
        },
        key,
        algorithm="RS256",
        headers={"kid": "forged"},
    )
    answer = requests.post(
        arm.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": teams["team-a"],
            "client_assertion_type": JWT_BEARER,
            "client_assertion": forged,
            "scope": f"{arm.url}/.default",
        },
        verify=arm.ca_path,
        timeout=10,
    )
    assert answer.status_code == 401
    assert "AADSTS700027" in answer.json()["error_description"]


async def test_a_missing_service_account_is_named(
    arm: ArmEmulator, kube: Kube, teams: dict
) -> None:
    with pytest.raises(ProviderError, match="ServiceAccount team-a/nobody does not exist"):
        await namespace_credential(settings_for(arm), kube, IdentityRef("team-a", "nobody"))


async def test_the_operators_identity_can_be_switched_off(arm: ArmEmulator, kube: Kube) -> None:
    settings = settings_for(arm, azure_operator_identity=False)
    with pytest.raises(ProviderError, match="KILN_AZURE_OPERATOR_IDENTITY is false"):
        await namespace_credential(settings, kube, IdentityRef("team-a", None))
