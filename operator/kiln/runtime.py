"""What the operator's handlers share: settings, the API client, providers and locks."""

from __future__ import annotations

import asyncio
import copy
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from kiln.api.template import Provider
from kiln.kube import TEMPLATES, Kube, template_runs
from kiln.providers.azure.provider import AzureProvider
from kiln.providers.base import BuildProvider, ProviderError
from kiln.providers.local.provider import LocalProvider
from kiln.settings import OperatorSettings


class Runtime:
    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.providers: dict[str, BuildProvider] = {
            Provider.local.value: LocalProvider(settings),
            Provider.azure.value: AzureProvider(settings, kube),
        }
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
        for provider in self.providers.values():
            await provider.close()
        self.template_locks.clear()
