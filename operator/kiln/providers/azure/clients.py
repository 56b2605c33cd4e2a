"""Credentials and SDK clients. A template never carries credentials: it names at most a
ServiceAccount of its own namespace, whose federated identity it builds with; otherwise
the operator's own identity from its settings, when the admin allows that."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import SansIOHTTPPolicy
from azure.identity.aio import (
    ClientAssertionCredential,
    ClientSecretCredential,
    DefaultAzureCredential,
)
from azure.mgmt.compute.aio import ComputeManagementClient
from azure.mgmt.keyvault.aio import KeyVaultManagementClient
from azure.mgmt.network.aio import NetworkManagementClient
from azure.mgmt.resource.resources.aio import ResourceManagementClient
from azure.mgmt.storage.aio import StorageManagementClient

from kiln import metrics
from kiln.kube import Kube
from kiln.providers.base import ProviderError
from kiln.settings import OperatorSettings

# Every call is bounded: connecting, reading, and the SDK's own retries (a few, quickly;
# a fault that persists surfaces to the run as a visible, budgeted retry).
TIMEOUTS = {"connection_timeout": 20, "read_timeout": 120, "retry_total": 2, "timeout": 300}


def transport_options(settings: OperatorSettings) -> dict[str, Any]:
    verify = (
        {"connection_verify": str(settings.azure_ca_bundle)} if settings.azure_ca_bundle else {}
    )
    return {**TIMEOUTS, **verify}


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
    namespace, _, name = settings.azure_credentials_secret.rpartition("/")
    namespace = namespace or settings.secrets_namespace
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


# --- per-namespace identities ---------------------------------------------------------------

CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"
TOKEN_EXCHANGE_AUDIENCE = "api://AzureADTokenExchange"  # what Entra's federation expects
ASSERTION_SECONDS = 3600
ASSERTION_MARGIN_SECONDS = 600


@dataclass(frozen=True)
class IdentityRef:
    """Whose Azure identity a template builds with: a ServiceAccount of its own
    namespace, or (service_account None) the operator's."""

    namespace: str
    service_account: str | None

    def describe(self) -> str:
        if self.service_account is None:
            return "the operator's Azure identity"
        return f"ServiceAccount {self.namespace}/{self.service_account}"


class ServiceAccountAssertion:
    """Short-lived TokenRequest tokens of one ServiceAccount, for Entra's client assertion
    flow; refreshed before they expire, outside azure-identity's synchronous callback."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self.kube, self.namespace, self.name = kube, namespace, name
        self._token, self._expires = "", 0.0

    async def refresh(self) -> None:
        if time.time() < self._expires - ASSERTION_MARGIN_SECONDS:
            return
        self._token, self._expires = await self.kube.service_account_token(
            self.namespace, self.name, TOKEN_EXCHANGE_AUDIENCE, ASSERTION_SECONDS
        )

    def __call__(self) -> str:
        return self._token


class FederatedCredential(AsyncTokenCredential):
    """ClientAssertionCredential fed with a ServiceAccount's tokens (workload identity
    federation): Entra checks them against the cluster's issuer and the app's federated
    credential for system:serviceaccount:NAMESPACE:NAME."""

    def __init__(self, assertion: ServiceAccountAssertion, inner: ClientAssertionCredential):
        self.assertion, self.inner = assertion, inner

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        await self.assertion.refresh()
        return await self.inner.get_token(*scopes, **kwargs)

    async def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        await self.assertion.refresh()
        return await self.inner.get_token_info(*scopes, options=options)

    async def close(self) -> None:
        await self.inner.close()


async def namespace_credential(
    settings: OperatorSettings, kube: Kube, ref: IdentityRef
) -> AsyncTokenCredential:
    """The credential of a template's identity; never another namespace's."""
    if ref.service_account is None:
        if not settings.azure_operator_identity:
            raise ProviderError(
                "spec.serviceAccountName is required: this operator lends its own Azure "
                "identity to no template (KILN_AZURE_OPERATOR_IDENTITY is false); name a "
                f"ServiceAccount of namespace {ref.namespace} with the {CLIENT_ID_ANNOTATION} "
                "annotation"
            )
        return await make_credential(settings, kube)
    annotations = await kube.service_account_annotations(ref.namespace, ref.service_account)
    if annotations is None:
        raise ProviderError(
            f"spec.serviceAccountName: ServiceAccount {ref.namespace}/{ref.service_account} "
            "does not exist; create it with the azure.workload.identity/client-id annotation"
        )
    client_id = annotations.get(CLIENT_ID_ANNOTATION)
    tenant_id = annotations.get(TENANT_ID_ANNOTATION) or settings.azure_tenant_id
    if not client_id or not tenant_id:
        missing = CLIENT_ID_ANNOTATION if not client_id else TENANT_ID_ANNOTATION
        raise ProviderError(
            f"spec.serviceAccountName: ServiceAccount {ref.namespace}/{ref.service_account} "
            f"has no {missing} annotation"
            + ("" if client_id else "; add the client ID of its federated Azure identity")
            + ("" if not client_id or tenant_id else " (nor is KILN_AZURE_TENANT_ID set)")
        )
    assertion = ServiceAccountAssertion(kube, ref.namespace, ref.service_account)
    options = _authority_options(settings) | transport_options(settings)
    return FederatedCredential(
        assertion, ClientAssertionCredential(tenant_id, client_id, assertion, **options)
    )


STORAGE_SCOPE = "https://storage.azure.com/.default"


async def storage_token(credential: AsyncTokenCredential) -> str:
    """An access token for Azure Storage's data plane (private scripts and files)."""
    try:
        return (await credential.get_token(STORAGE_SCOPE)).token
    except ClientAuthenticationError as error:
        raise ProviderError(
            f"Entra ID refused a token for Azure Storage: {error.message}"
        ) from None
