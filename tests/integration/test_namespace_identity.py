"""Azure credentials per namespace: a template's ServiceAccount, exchanged with Entra ID.

The real kube-apiserver issues the ServiceAccount tokens (TokenRequest) and publishes its
issuer's keys; the ARM emulator's Entra endpoint checks each client assertion against
them as Entra checks an AKS cluster's (OpenID discovery, JWKS, federated credential), and
limits each team's app to its own resource group, as a role assignment would.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import jwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.storage.blob import BlobServiceClient
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client, config

from conftest import ControlPlane
from fakes.arm import ArmEmulator
from fakes.arm.identity import JWT_BEARER, IssuerEndpoint
from fakes.azurite import Azurite
from kiln.api.run import Checkpoint, TemplateIdentity
from kiln.api.template import ImageTemplateSpec, ShellStep
from kiln.customizers.linux import shell_script
from kiln.customizers.sources import FetchError, fetch
from kiln.kube import Kube
from kiln.pipeline.base import StepEnv
from kiln.providers.azure.clients import (
    CLIENT_ID_ANNOTATION,
    TENANT_ID_ANNOTATION,
    TOKEN_EXCHANGE_AUDIENCE,
    AzureClients,
    IdentityRef,
    make_clients,
    namespace_credential,
)
from kiln.providers.azure.provider import AzureProvider
from kiln.providers.base import ProviderError, RunContext
from kiln.settings import OperatorSettings
from kubehelpers import cluster_ca_file, publish_issuer, valid_spec

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
    defaults = {
        "azure_arm_endpoint": arm.url,
        "azure_authority": arm.url,
        "azure_ca_bundle": arm.ca_path,
        "subscription_id": arm.subscription_id,
    }
    return OperatorSettings.model_validate(defaults | changes)


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


# --- private scripts: read with the template's identity ---------------------------------------

PRIVATE_SCRIPT = b"#!/bin/sh\necho from a private container\n"


@pytest.fixture(scope="module")
def private_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Azurite, str]]:
    """Azurite with bearer tokens on, and a script in a container without public access."""
    with Azurite(tmp_path_factory.mktemp("azurite-oauth"), oauth=True) as azurite:
        service = BlobServiceClient.from_connection_string(
            azurite.connection_string, **azurite.client_kwargs()
        )
        service.create_container("scripts").upload_blob("setup.sh", PRIVATE_SCRIPT)
        yield azurite, f"{azurite.blob_endpoint}scripts/setup.sh"


def private_run(tmp_path: Path, team: str, url: str) -> RunContext:
    spec = {
        **valid_spec(),
        "provider": "azure",
        "serviceAccountName": BUILDER,
        "customize": [{"type": "Shell", "scriptUri": url}],
    }
    template = TemplateIdentity(namespace=team, name="private", uid=str(uuid.uuid4()))
    return RunContext(
        namespace=team,
        run_name="private-1",
        run_uid=str(uuid.uuid4()),
        template=template,
        spec=ImageTemplateSpec.model_validate(spec),
        checkpoint=Checkpoint(template=template),
        run_dir=tmp_path,
        key_namespace="kiln-system",
    )


async def test_a_private_script_is_read_with_the_templates_identity(
    arm: ArmEmulator,
    kube: Kube,
    teams: dict[str, str],
    private_blob: tuple[Azurite, str],
    tmp_path: Path,
) -> None:
    """Anonymous reads are refused by the storage service; the operator then reads the
    blob with a token of the template's federated identity (its ServiceAccount's app)."""
    azurite, url = private_blob
    assert azurite.ca_path is not None
    bundle = tmp_path / "ca.pem"  # the ARM emulator's and Azurite's CAs
    bundle.write_text(arm.ca_path.read_text() + azurite.ca_path.read_text())
    settings = settings_for(
        arm,
        azure_ca_bundle=bundle,
        azure_storage_hosts=["127.0.0.1"],
        download_blocked_ranges=[],  # Azurite listens on loopback
        data_root=tmp_path,
    )
    policy = settings.tenancy_policy
    with pytest.raises(FetchError) as anonymous:
        await fetch(url, policy)
    assert "HTTP 403 (AuthorizationFailure)" in str(anonymous.value)

    provider = AzureProvider(settings, kube)
    try:
        ctx = private_run(tmp_path, "team-a", url)
        env = StepEnv(provider=provider, kube=kube, policy=policy)
        issued = len(arm.identity.issued_tokens)
        checksum = hashlib.sha256(PRIVATE_SCRIPT).hexdigest()
        step = ctx.spec.customize[0]
        assert isinstance(step, ShellStep)
        script = await shell_script(step, policy, env.storage_token(ctx))
        assert script.encode() == PRIVATE_SCRIPT
        assert await fetch(url, policy, checksum, token=env.storage_token(ctx)) == PRIVATE_SCRIPT
    finally:
        await provider.close()
    storage = [
        jwt.decode(t, options={"verify_signature": False})
        for t in arm.identity.issued_tokens[issued:]
    ]
    assert {(c["aud"], c["appid"]) for c in storage} == {
        ("https://storage.azure.com", teams["team-a"])
    }


async def test_a_template_without_a_usable_identity_is_told_why(
    arm: ArmEmulator, kube: Kube, private_blob: tuple[Azurite, str], tmp_path: Path
) -> None:
    azurite, url = private_blob
    assert azurite.ca_path is not None
    settings = settings_for(
        arm,
        azure_ca_bundle=azurite.ca_path,
        azure_storage_hosts=["127.0.0.1"],
        download_blocked_ranges=[],
        data_root=tmp_path,
    )
    provider = AzureProvider(settings, kube)
    try:
        ctx = private_run(tmp_path, "team-a", url)
        ctx = ctx.model_copy(
            update={"spec": ctx.spec.model_copy(update={"service_account_name": "nobody"})}
        )
        env = StepEnv(provider=provider, kube=kube, policy=settings.tenancy_policy)
        with pytest.raises(FetchError) as refused:
            await fetch(url, settings.tenancy_policy, token=env.storage_token(ctx))
    finally:
        await provider.close()
    message = str(refused.value)
    assert "no Azure Storage token of the template's identity" in message
    assert "ServiceAccount team-a/nobody does not exist" in message
