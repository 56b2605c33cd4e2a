"""Credentials and SDK clients, from the operator's settings (never from a template)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.identity.aio import ClientSecretCredential, DefaultAzureCredential
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.keyvault.aio import KeyVaultManagementClient
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.resource.resources.aio import ResourceManagementClient
from azure.mgmt.storage.aio import StorageManagementClient

from kiln import metrics
from kiln.kube import Kube
from kiln.providers.base import ProviderError
from kiln.settings import OperatorSettings


def transport_options(settings: OperatorSettings) -> dict[str, Any]:
    return {"connection_verify": str(settings.azure_ca_bundle)} if settings.azure_ca_bundle else {}


def _authority_options(settings: OperatorSettings) -> dict[str, Any]:
    if not settings.azure_authority:
        return {}
    # An explicitly configured authority is trusted as it is (sovereign cloud, emulator).
    return {"authority": settings.azure_authority, "disable_instance_discovery": True}


async def make_credential(settings: OperatorSettings, kube: Kube) -> AsyncTokenCredential:
    """A service principal from the configured Secret, else DefaultAzureCredential."""
    options = _authority_options(settings) | transport_options(settings)
    if not settings.azure_credentials_secret:
        return DefaultAzureCredential(**options)
    namespace, _, name = settings.azure_credentials_secret.partition("/")
    data = await kube.read_secret(namespace, name)
    if data is None:
        raise ProviderError(
            f"Secret {settings.azure_credentials_secret} (KILN_AZURE_CREDENTIALS_SECRET) "
            "does not exist; create it with clientId, clientSecret and tenantId"
        )
    try:
        fields = {
            key: base64.b64decode(data[key]).decode()
            for key in ("tenantId", "clientId", "clientSecret")
        }
    except KeyError as missing:
        raise ProviderError(
            f"Secret {settings.azure_credentials_secret} has no {missing} key"
        ) from None
    return ClientSecretCredential(
        fields["tenantId"], fields["clientId"], fields["clientSecret"], **options
    )


class CloudRequestMetrics(SansIOHTTPPolicy[Any, Any]):
    """Counts every ARM request (each retry too) by operation and status code."""

    def on_response(
        self, request: PipelineRequest[Any], response: PipelineResponse[Any, Any]
    ) -> None:
        http = request.http_request
        operation = metrics.arm_operation(http.method, urlparse(http.url).path)
        metrics.cloud_request(operation, str(response.http_response.status_code))

    def on_exception(self, request: PipelineRequest[Any]) -> None:
        http = request.http_request
        metrics.cloud_request(metrics.arm_operation(http.method, urlparse(http.url).path), "error")


@dataclass
class AzureClients:
    credential: AsyncTokenCredential
    resource: ResourceManagementClient
    network: NetworkManagementClient
    compute: ComputeManagementClient
    storage: StorageManagementClient
    keyvault: KeyVaultManagementClient

    async def close(self) -> None:
        for client in (self.resource, self.network, self.compute, self.storage, self.keyvault):
            await client.close()
        await self.credential.close()


def make_clients(
    settings: OperatorSettings, credential: AsyncTokenCredential, subscription_id: str
) -> AzureClients:
    endpoint = settings.azure_arm_endpoint.rstrip("/")
    options = {
        "base_url": endpoint,
        "credential_scopes": [f"{endpoint}/.default"],
        "per_retry_policies": [CloudRequestMetrics()],
        **transport_options(settings),
    }
    return AzureClients(
        credential=credential,
        resource=ResourceManagementClient(credential, subscription_id, **options),
        network=NetworkManagementClient(credential, subscription_id, **options),
        compute=ComputeManagementClient(credential, subscription_id, **options),
        storage=StorageManagementClient(credential, subscription_id, **options),
        keyvault=KeyVaultManagementClient(credential, subscription_id, **options),
    )


async def tenant_of(credential: AsyncTokenCredential, arm_endpoint: str) -> str:
    """The Entra tenant the operator signs in to (Key Vaults name it), from the token's
    tid claim: every credential type has one, whatever configured it."""
    endpoint = arm_endpoint.rstrip("/")
    token = (await credential.get_token(f"{endpoint}/.default")).token
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims["tid"])
    except (IndexError, KeyError, ValueError) as error:
        raise ProviderError(
            "the Azure access token names no tenant (tid claim); Kiln needs it for the "
            "Key Vault of a Windows build"
        ) from error
