"""The few Kubernetes calls Kiln makes outside kopf's handler patches.

The official client is synchronous; every call runs in a worker thread of Kiln's own
pool (API_THREADS, the client's connection pool as large), so that no handler blocks the
event loop, and neither slow API responses nor long host tools (qemu-img in the default
executor) hold the other calls up.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from kiln import GROUP, VERSION

TEMPLATES = "imagetemplates"
RUNS = "imagebuildruns"
Body = dict[str, Any]


def refusal(error: ApiException) -> str:
    """What the API server said, with the fix when it is the operator's permissions."""
    try:
        message = json.loads(error.body or "{}").get("message") or error.reason
    except (ValueError, AttributeError):
        message = error.reason
    if error.status == 403:
        return (
            f"{message}; grant it to the operator's ServiceAccount "
            "(charts/kiln/templates/rbac.yaml lists what Kiln needs)"
        )
    return f"{message} ({error.status})"


API_THREADS = 32  # API calls in flight at once: 1,000 templates applied together need many


def load_client() -> ApiClient:
    """In-cluster service account when there is one, else KUBECONFIG / ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = Configuration.get_default_copy()
    configuration.connection_pool_maxsize = API_THREADS
    return ApiClient(configuration)


REQUEST_TIMEOUT = (10, 60)  # (connect, read) seconds for every API server call


class Kube:
    def __init__(self, client: ApiClient) -> None:
        self.custom = CustomObjectsApi(client)
        self.core = CoreV1Api(client)
        self._pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")

    async def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking client call in the API threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(function, *args, **kwargs))

    async def _custom(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A CustomObjectsApi call for Kiln's group, in a thread, with a timeout."""
        call = getattr(self.custom, method)
        return await self._call(
            call, GROUP, VERSION, *args, _request_timeout=REQUEST_TIMEOUT, **kwargs
        )

    async def get(self, plural: str, namespace: str, name: str) -> Body | None:
        try:
            return await self._custom("get_namespaced_custom_object", namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def list(self, plural: str, namespace: str, label_selector: str = "") -> list[Body]:
        result = await self._custom(
            "list_namespaced_custom_object", namespace, plural, label_selector=label_selector
        )
        return list(result.get("items", []))

    async def list_all(self, plural: str) -> list[Body]:
        """Every object of the kind in every namespace (the orphan sweeper's view)."""
        result = await self._custom("list_cluster_custom_object", plural)
        return list(result.get("items", []))

    async def create(self, plural: str, namespace: str, body: Body) -> Body | None:
        """Create; None when an object of that name exists already (creation is idempotent)."""
        try:
            return await self._custom("create_namespaced_custom_object", namespace, plural, body)
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    async def patch_status(self, plural: str, namespace: str, name: str, status: Body) -> Body:
        return await self._custom(
            "patch_namespaced_custom_object_status", namespace, plural, name, {"status": status}
        )

    async def patch(self, plural: str, namespace: str, name: str, patch: Body) -> Body:
        return await self._custom("patch_namespaced_custom_object", namespace, plural, name, patch)

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        """Delete a Kiln object; one that is gone already is fine."""
        try:
            await self._custom("delete_namespaced_custom_object", namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = await self._call(
                self.core.read_namespaced_secret, name, namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(secret.data or {})

    async def create_secret(self, namespace: str, body: Body) -> None:
        try:
            await self._call(
                self.core.create_namespaced_secret,
                namespace,
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status != 409:
                raise

    async def service_account_annotations(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ServiceAccount's annotations; None when it does not exist."""
        try:
            account = await self._call(self.core.read_namespaced_service_account, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return dict(account.metadata.annotations or {})

    async def service_account_token(
        self, namespace: str, name: str, audience: str, seconds: int
    ) -> tuple[str, float]:
        """A TokenRequest token for a ServiceAccount, and when it expires (epoch seconds)."""
        body = {"spec": {"audiences": [audience], "expirationSeconds": seconds}}
        result = await self._call(
            self.core.create_namespaced_service_account_token, name, namespace, body
        )
        return result.status.token, result.status.expiration_timestamp.timestamp()

    async def list_secrets(self, namespace: str, label_selector: str) -> list[Body]:
        """Metadata of the matching Secrets (their data is never needed, so never kept)."""
        result = await self._call(
            self.core.list_namespaced_secret, namespace, label_selector=label_selector
        )
        return [{"metadata": item.metadata.to_dict()} for item in result.items]

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                self.core.delete_namespaced_secret,
                name,
                namespace,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status != 404:
                raise

    async def read_config_map(self, namespace: str, name: str) -> Body | None:
        try:
            found = await self._call(self.core.read_namespaced_config_map, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return self.core.api_client.sanitize_for_serialization(found)

    async def create_config_map(self, namespace: str, body: Body) -> None:
        await self._call(self.core.create_namespaced_config_map, namespace, body)

    async def patch_config_map(self, namespace: str, name: str, body: Body) -> None:
        await self._call(self.core.patch_namespaced_config_map, name, namespace, body)


async def template_runs(kube: Kube, template: Body) -> list[Body]:
    """The runs in the template's namespace whose templateRef names it."""
    meta = template["metadata"]
    runs = await kube.list(RUNS, meta["namespace"])
    return [
        r for r in runs if (r.get("spec") or {}).get("templateRef", {}).get("name") == meta["name"]
    ]
