"""What the operator's handlers share: settings, the API client, providers and locks."""

from __future__ import annotations

import asyncio
import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from kiln.api.template import Provider
from kiln.kube import TEMPLATES, Kube, template_runs
from kiln.providers.base import BuildProvider, ProviderError
from kiln.providers.local.provider import LocalProvider
from kiln.settings import OperatorSettings


def _azure(settings: OperatorSettings, kube: Kube) -> BuildProvider:
    from kiln.providers.azure.provider import AzureProvider  # the Azure SDKs: ~100 MiB

    return AzureProvider(settings, kube)


class Providers(Mapping[str, BuildProvider]):
    """The providers by name, each made when first used: an operator that builds only
    locally never loads the Azure SDKs (about 100 MiB of its memory)."""

    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self._make: dict[str, Callable[[], BuildProvider]] = {
            Provider.local.value: lambda: LocalProvider(settings),
            Provider.azure.value: lambda: _azure(settings, kube),
        }
        # What the operator is configured to build with is made at start (and swept).
        configured = {settings.default_provider.value}
        if settings.subscription_id:
            configured.add(Provider.azure.value)
        self._made: dict[str, BuildProvider] = {name: self._make[name]() for name in configured}

    def __getitem__(self, name: str) -> BuildProvider:
        if name not in self._made:
            self._made[name] = self._make[name]()
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._make)

    def __len__(self) -> int:
        return len(self._make)

    def made(self) -> dict[str, BuildProvider]:
        """The providers in use so far: what the orphan sweeper sweeps and close() closes
        (one never made has created nothing in this process or, configured, is made)."""
        return dict(self._made)


class Runtime:
    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.providers = Providers(settings, kube)
        self.template_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.build_slots = asyncio.Semaphore(settings.max_active_runs)
        # The step pass in flight of each run (by uid), and runs being deleted: deleting a
        # run stops its step first, and no new step starts after that.
        self.steps_in_flight: dict[str, asyncio.Future[object]] = {}
        self.deleting_runs: set[str] = set()
        # kopf's runs_by_template index, (namespace, template) -> slim run views; set by the
        # run daemon (kopf hands indices to handlers), None until then.
        self.runs_index: Mapping[tuple[str, str], Iterable[dict[str, Any]]] | None = None
        # kopf's templates_by_name index, (namespace, name) -> the template's metadata and
        # spec: queued runs decide from it (and runs_index) without asking the API server.
        self.templates_index: Mapping[tuple[str, str], Iterable[dict[str, Any]]] | None = None

    def provider(self, name: str) -> BuildProvider:
        try:
            return self.providers[name]
        except KeyError:
            raise ProviderError(
                f"the {name} provider is not available in this operator; "
                f"available: {', '.join(sorted(self.providers))}"
            ) from None

    async def runs_of(self, namespace: str, template: str) -> list[dict[str, Any]]:
        """The runs of a template: from the index (no API call), else one LIST."""
        if self.runs_index is not None:
            return [dict(run) for run in self.runs_index.get((namespace, template), [])]
        return await template_runs(
            self.kube, {"metadata": {"namespace": namespace, "name": template}}
        )

    async def template_of(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A template as the watch last saw it: from the index (no API call), else a GET."""
        if self.templates_index is None:
            return await self.kube.get(TEMPLATES, namespace, name)
        found = list(self.templates_index.get((namespace, name), []))
        return copy.deepcopy(found[0]) if found else None

    async def close(self) -> None:
        for provider in self.providers.made().values():
            await provider.close()
        self.template_locks.clear()
