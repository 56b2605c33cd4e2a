"""Leader election with a coordination.k8s.io Lease, as controller-runtime does it.

One replica holds the Lease and works; the others stand by, retrying every few
seconds, and take it over once its holder has not renewed it for LEASE_SECONDS (the
holder died) or released it (a clean shutdown). Writes carry the Lease's
resourceVersion, so two standbys never both win. The holder also writes where its HTTP
port is, so a standby can forward requests for run logs to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from kubernetes.client import ApiClient, CoordinationV1Api, V1Lease
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

LEASE_SECONDS = 15
RENEW_SECONDS = 5.0
RETRY_SECONDS = 2.0
REQUEST_TIMEOUT = 5.0
ADDRESS_ANNOTATION = "kiln.dev/http-address"
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now() -> datetime:
    return datetime.now(UTC)


def _micro(moment: datetime) -> str:
    return moment.strftime(MICRO_TIME)


def expired(lease: V1Lease, now: datetime) -> bool:
    """Free to take: no holder, or the holder's last renewal is older than its duration."""
    spec = lease.spec
    if spec is None or not spec.holder_identity:
        return True
    renewed = spec.renew_time or spec.acquire_time
    if renewed is None:
        return True
    if renewed.tzinfo is None:
        renewed = renewed.replace(tzinfo=UTC)
    return now > renewed + timedelta(seconds=spec.lease_duration_seconds or LEASE_SECONDS)


class LeaderElection:
    def __init__(
        self,
        client: ApiClient,
        namespace: str,
        name: str,
        identity: str,
        address: str | None = None,
    ) -> None:
        self.api = CoordinationV1Api(client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.address = address

    def _body(self, acquired: str, renewed: str, transitions: int, version: str | None) -> dict:
        metadata: dict = {"name": self.name, "namespace": self.namespace}
        if version:
            metadata["resourceVersion"] = version
        if self.address:
            metadata["annotations"] = {ADDRESS_ANNOTATION: self.address}
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": LEASE_SECONDS,
                "acquireTime": acquired,
                "renewTime": renewed,
                "leaseTransitions": transitions,
            },
        }

    def read(self) -> V1Lease | None:
        try:
            return self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def try_acquire_or_renew(self) -> bool:
        """One attempt (blocking, bounded): True when this replica holds the Lease."""
        now = _now()
        lease = self.read()
        if lease is None:
            body = self._body(_micro(now), _micro(now), 0, None)
            try:
                self.api.create_namespaced_lease(
                    self.namespace, body, _request_timeout=REQUEST_TIMEOUT
                )
            except ApiException as error:
                if error.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        ours = spec is not None and spec.holder_identity == self.identity
        if not ours and not expired(lease, now):
            return False
        transitions = (spec.lease_transitions or 0) if spec else 0
        acquired = _micro(spec.acquire_time) if ours and spec and spec.acquire_time else _micro(now)
        body = self._body(
            acquired,
            _micro(now),
            transitions if ours else transitions + 1,
            lease.metadata.resource_version,
        )
        try:
            self.api.replace_namespaced_lease(
                self.name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status == 409:  # someone else wrote it first
                return False
            raise
        return True

    def holder_address(self) -> str | None:
        """Where the current holder's HTTP port is, when the Lease is held."""
        lease = self.read()
        if lease is None or expired(lease, _now()):
            return None
        return (lease.metadata.annotations or {}).get(ADDRESS_ANNOTATION)

    def release(self) -> None:
        """Give the Lease up on a clean shutdown, so a standby takes over at once."""
        lease = self.read()
        if lease is None or lease.spec is None or lease.spec.holder_identity != self.identity:
            return
        lease.spec.holder_identity = None
        lease.spec.renew_time = None
        lease.spec.acquire_time = None
        try:
            self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, error)

    async def _attempt(self) -> bool:
        try:
            return await asyncio.to_thread(self.try_acquire_or_renew)
        except Exception as error:  # the API server away for a moment: try again
            log.warning("Lease %s/%s: %s", self.namespace, self.name, error)
            return False

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Stand by until this replica holds the Lease (True) or stop is set (False)."""
        announced = False
        while not stop.is_set():
            if await self._attempt():
                log.info("holding Lease %s/%s as %s", self.namespace, self.name, self.identity)
                return True
            if not announced:
                log.info("standing by: Lease %s/%s is held", self.namespace, self.name)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
        return False

    async def keep(self, lost: asyncio.Event) -> None:
        """Renew until a renewal fails for longer than the Lease lasts; then set lost."""
        last = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            if await self._attempt():
                last = asyncio.get_running_loop().time()
                continue
            taken = await self._held_by_another()
            if taken or asyncio.get_running_loop().time() - last > LEASE_SECONDS - RENEW_SECONDS:
                log.error("lost Lease %s/%s; stopping", self.namespace, self.name)
                lost.set()
                return

    async def _held_by_another(self) -> bool:
        try:
            lease = await asyncio.to_thread(self.read)
        except Exception:
            return False
        holder = lease.spec.holder_identity if lease and lease.spec else None
        return bool(holder) and holder != self.identity
