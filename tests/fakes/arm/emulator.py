"""ArmEmulator: an HTTPS ARM + Entra ID endpoint that the real azure-mgmt clients talk to.

Start it in the test's event loop (`async with ArmEmulator() as arm:`) for the aio
clients, or in a background thread (`with ArmEmulator() as arm:`) for the sync clients;
then build clients with `arm.client(ComputeManagementClient)` or by hand with
`base_url=arm.url, credential_scopes=[arm.url + "/.default"], connection_verify=arm.ca_path`
and `ClientSecretCredential(arm.tenant_id, arm.client_id, arm.client_secret,
authority=arm.url, disable_instance_discovery=True, connection_verify=arm.ca_path)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import apiversions, diskaccess, ids, tls
from .backend import NoopVmBackend, VmBackend
from .errors import ArmError
from .faults import FailNext, Faults, Stage, retry_headers
from .identity import Identity, TokenError
from .models import (
    DEFAULT_LOCATIONS,
    DEFAULT_MARKETPLACE,
    DEFAULT_VM_SIZES,
    ArmState,
    CreationRecord,
    InventoryItem,
    MarketplaceImage,
    Operation,
    OperationKind,
    RequestRecord,
    StoredResource,
    VmInfo,
    utcnow,
)
from .providers.base import Ctx, Reply, ResourceType, require_group
from .providers.compute import (
    Disks,
    Galleries,
    GalleryImages,
    GalleryImageVersions,
    Images,
    VirtualMachines,
    marketplace_route,
    skus_route,
    vm_sizes_route,
)
from .providers.keyvault import (
    Secrets,
    Vaults,
    deleted_vault_route,
    find_secret,
    list_deleted_vaults,
    sweep_purged,
)
from .providers.msi import UserAssignedIdentities
from .providers.network import (
    NetworkInterfaces,
    NetworkSecurityGroups,
    PublicIPAddresses,
    SecurityRules,
    Subnets,
    VirtualNetworks,
)
from .providers.resources import (
    ResourceGroups,
    being_deleted,
    list_resource_groups,
    list_resources,
)
from .providers.storage import StorageAccounts, check_name_availability
from .validation import check_location

log = logging.getLogger("fakes.arm")

T = TypeVar("T")

DEFAULT_SUBSCRIPTION = "00000000-0000-4000-8000-00000000c0de"
DEFAULT_TENANT = "00000000-0000-4000-8000-0000000a11ce"
DEFAULT_CLIENT_ID = "00000000-0000-4000-8000-00000000b0b0"

_OPERATION_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/providers/(?P<ns>[^/]+)/locations/(?P<loc>[^/]+)/"
    r"(?P<kind>operations|operationresults|asyncoperations)/(?P<id>[^/]+)/?$",
    re.I,
)
_RG_OPERATION_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/operationresults/(?P<id>[^/]+)/?$", re.I
)


def _handlers() -> dict[str, ResourceType]:
    types: list[ResourceType] = [
        ResourceGroups(),
        StorageAccounts(),
        VirtualNetworks(),
        Subnets(),
        NetworkSecurityGroups(),
        SecurityRules(),
        PublicIPAddresses(),
        NetworkInterfaces(),
        VirtualMachines(),
        Disks(),
        Images(),
        Galleries(),
        GalleryImages(),
        GalleryImageVersions(),
        Vaults(),
        Secrets(),
        UserAssignedIdentities(),
    ]
    return {t.key: t for t in types}


# Every emulator of this process: their VMs share the loopback ranges, so an address one
# of them holds is not free for another (backends bind them).
_LIVE: weakref.WeakSet[ArmEmulator] = weakref.WeakSet()


class _AddressLeases:
    """Machine-wide leases on loopback addresses: an flock'd file per address.

    The lock lives as long as this process holds the file open, so a crashed test run
    frees its addresses by itself.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.held: dict[str, int] = {}

    def take(self, address: str) -> bool:
        if address in self.held:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / address, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        if _port_taken(address, 22):
            os.close(fd)
            return False
        self.held[address] = fd
        return True

    def release_unused(self, in_use: set[str]) -> None:
        for address in [a for a in self.held if a not in in_use]:
            os.close(self.held.pop(address))


def _port_taken(address: str, port: int) -> bool:
    """A VM left running by a test run that died still listens there, lease or not."""
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except PermissionError:
            return False
        except OSError:
            return True
    return False


_LEASES = _AddressLeases(Path(tempfile.gettempdir()) / "kiln-arm-addresses")


class ArmEmulator:
    """A local Azure Resource Manager for tests; see the module docstring for the wiring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: str | Path | None = None,
        persist: bool | None = None,
        subscription_id: str = DEFAULT_SUBSCRIPTION,
        tenant_id: str = DEFAULT_TENANT,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str | None = None,
        locations: Iterable[str] = DEFAULT_LOCATIONS,
        vm_sizes: Mapping[str, Iterable[str]] | Iterable[str] | None = None,
        marketplace: Iterable[MarketplaceImage] = DEFAULT_MARKETPLACE,
        blob_endpoint: str = "https://{account}.blob.core.windows.net/",
        storage_account_key: str | None = None,
        disk_access_url: str | None = None,
        backend: VmBackend | None = None,
        lro_duration: float = 0.5,
        lro_durations: Mapping[str, float] | None = None,
        request_latency: float = 0.0,
        retry_after: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.persist = (state_dir is not None) if persist is None else persist
        self.subscription_id = subscription_id
        self.identity = Identity(tenant_id, client_id, client_secret or secrets.token_urlsafe(24))
        self._explicit_secret = client_secret is not None
        self.locations = {loc.replace(" ", "").lower() for loc in locations}
        if vm_sizes is None:
            self._vm_sizes = {loc: set(DEFAULT_VM_SIZES) for loc in self.locations}
        elif isinstance(vm_sizes, Mapping):
            self._vm_sizes = {k.replace(" ", "").lower(): set(v) for k, v in vm_sizes.items()}
        else:
            sizes = set(vm_sizes)
            self._vm_sizes = {loc: set(sizes) for loc in self.locations}
        self.marketplace = list(marketplace)
        self.blob_endpoint = blob_endpoint
        self.storage_account_key = storage_account_key
        self.disk_access_url = disk_access_url
        self.backend: VmBackend = backend or NoopVmBackend()
        self.lro_duration = lro_duration
        self.lro_durations = {k.lower(): v for k, v in (lro_durations or {}).items()}
        self.request_latency = request_latency
        self.retry_after = retry_after
        self.faults = Faults(seed=seed)
        self.handlers = _handlers()
        self.state = ArmState()
        self._requests: list[RequestRecord] = []
        self.granted_sas: list[str] = []  # disk accessSAS URLs handed out (tests hunt leaks)
        self.disk_reads = diskaccess.DiskReads()  # reads of served disk exports, read faults
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dirty = False
        self.url = ""
        self.ca_path = Path()
        _LIVE.add(self)

    # ------------------------------------------------------------------ identity settings

    @property
    def tenant_id(self) -> str:
        return self.identity.tenant_id

    @property
    def client_id(self) -> str:
        return self.identity.client_id

    @property
    def client_secret(self) -> str:
        return self.identity.client_secret

    @property
    def authority(self) -> str:
        """What azure-identity takes as `authority` (the emulator is its own Entra ID)."""
        return self.url

    @property
    def token_url(self) -> str:
        return f"{self.url}/{self.tenant_id}/oauth2/v2.0/token"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that point an azure-mgmt client at the emulator."""
        return {
            "base_url": self.url,
            "credential_scopes": [f"{self.url}/.default"],
            "connection_verify": str(self.ca_path),
        }

    def _credential_arguments(self, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
        """What both ClientSecretCredential flavours are given to get tokens here."""
        options = {
            "authority": self.url,
            "disable_instance_discovery": True,
            "connection_verify": str(self.ca_path),
            **kwargs,
        }
        return (self.tenant_id, self.client_id, self.client_secret), options

    def credential(self, **kwargs: Any) -> Any:
        """A real azure.identity.ClientSecretCredential that gets its tokens here."""
        from azure.identity import ClientSecretCredential

        args, options = self._credential_arguments(**kwargs)
        return ClientSecretCredential(*args, **options)

    def async_credential(self, **kwargs: Any) -> Any:
        """azure.identity.aio.ClientSecretCredential, for the aio clients."""
        from azure.identity.aio import ClientSecretCredential

        args, options = self._credential_arguments(**kwargs)
        return ClientSecretCredential(*args, **options)

    def client(self, client_class: Callable[..., T], credential: Any = None, **kwargs: Any) -> T:
        """`arm.client(ComputeManagementClient)`: a real SDK client wired to the emulator."""
        options = self.client_kwargs() | kwargs
        return client_class(credential or self.credential(), self.subscription_id, **options)

    def environment(self) -> dict[str, str]:
        """Variables for EnvironmentCredential/DefaultAzureCredential in a child process."""
        return {
            "AZURE_TENANT_ID": self.tenant_id,
            "AZURE_CLIENT_ID": self.client_id,
            "AZURE_CLIENT_SECRET": self.client_secret,
            "AZURE_AUTHORITY_HOST": self.url,
            "AZURE_SUBSCRIPTION_ID": self.subscription_id,
            "REQUESTS_CA_BUNDLE": str(self.ca_path),
            "SSL_CERT_FILE": str(self.ca_path),
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> ArmEmulator:
        """Bind the HTTPS server in the running loop and resume persisted operations."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="arm-emulator-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        files = tls.load_or_generate(self.state_dir / "tls", self.host)
        self._load_identity()
        self.ca_path = files.ca_path
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(files.cert_path, files.key_path)
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_routes(self.identity.routes())
        app.router.add_route("*", "/md-{token}/{container}/{blob}", self._disk_blob)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ssl_ctx)
        await site.start()
        bound = self._runner.addresses[0]
        self.port = bound[1]
        self.url = f"https://{self.host}:{self.port}"
        self._load()
        attach = getattr(self.backend, "attach", None)
        if callable(attach):  # a backend that reports guest events (shutdown) back to ARM
            attach(self)
        log.info("ARM emulator listening on %s (state in %s)", self.url, self.state_dir)
        return self

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._save(force=True)
        detach = getattr(self.backend, "detach", None)
        if callable(detach):  # the backend's servers (WinRM guests) run in this loop
            await detach()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._own_state_dir and self.state_dir is not None and not self.persist:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    async def __aenter__(self) -> ArmEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> ArmEmulator:
        """Run the emulator in its own event loop on a daemon thread (for sync clients)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="arm-emulator", daemon=True)
        self._thread.start()
        ready.wait(60)
        if failure:
            raise failure[0]
        return self

    def stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._thread = None

    def __enter__(self) -> ArmEmulator:
        return self.start_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the emulator's loop (state is only touched there)."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.get_ident() == self._loop_thread:
            return fn()

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), loop).result(60)

    # ------------------------------------------------------------------ test API

    @property
    def requests(self) -> list[RequestRecord]:
        """Every ARM request so far (method, path, api-version, status...)."""
        return list(self._requests)

    def clear_requests(self) -> None:
        self._requests.clear()

    def inventory(self, resource_group: str | None = None) -> list[InventoryItem]:
        """Every resource (groups, resources, gallery children, disks), sorted by id."""

        def collect() -> list[InventoryItem]:
            out = []
            for r in sorted(self.state.resources.values(), key=lambda r: r.id.lower()):
                if resource_group and (r.resource_group or "").lower() != resource_group.lower():
                    continue
                out.append(
                    InventoryItem(
                        id=r.id,
                        type=r.type,
                        name=r.name,
                        resource_group=r.resource_group,
                        location=r.location,
                        tags=dict(r.tags),
                        provisioning_state=r.provisioning_state,
                    )
                )
            return out

        return self._call(collect)

    def resource(self, resource_id: str) -> dict[str, Any] | None:
        """The document a GET of `resource_id` returns, or None."""

        def get() -> dict[str, Any] | None:
            res = self.lookup(resource_id)
            return None if res is None else self.handler_for(res.type).render(self, res)

        return self._call(get)

    def vm_info(self, vm_id: str) -> VmInfo:
        """What the VM backend sees: addresses, admin user, keys, customData."""

        def get() -> VmInfo:
            res = self.lookup(vm_id)
            if res is None or res.type != VirtualMachines.type_name:
                raise KeyError(vm_id)
            handler = self.handlers[res.type.lower()]
            assert isinstance(handler, VirtualMachines)
            return handler.info(self, res)

        return self._call(get)

    def deleted_vaults(self) -> list[str]:
        """Names of key vaults still soft-deleted (not purged): they hold their names."""

        def names() -> list[str]:
            sweep_purged(self)
            return sorted(r.name for r in self.state.deleted_vaults.values())

        return self._call(names)

    def vault_secret(self, secret_url: str) -> str | None:
        """The value a Key Vault secret URL names (latest version if none), or None."""

        def get() -> str | None:
            found = find_secret(self, secret_url)
            return None if found is None else found[2]

        return self._call(get)

    def guest_powered_off(self, vm_id: str) -> None:
        """The guest shut itself down (Sysprep /shutdown): the VM's power state is stopped.

        Backends call it from the emulator's loop; the VM keeps its allocation, as in Azure.
        """

        def apply() -> None:
            res = self.lookup(vm_id)
            if res is not None and res.type == VirtualMachines.type_name:
                res.meta["power"] = "stopped"
                self.touch()

        self._call(apply)

    def creation_count(self, resource_id: str) -> int:
        """How many times the resource went from absent to present."""
        rec = self._call(lambda: self.state.creations.get(ids.key(resource_id)))
        return rec.count if rec else 0

    def creations(self, type_name: str | None = None) -> dict[str, int]:
        """{resource id: times created}, optionally for one type."""
        records = self._call(lambda: list(self.state.creations.values()))
        return {
            r.id: r.count
            for r in records
            if type_name is None or r.type.lower() == type_name.lower()
        }

    def fail_next(
        self,
        method: str,
        path_regex: str,
        status: int = 500,
        code: str | None = None,
        message: str | None = None,
        *,
        times: int = 1,
        stage: Stage = "request",
        retry_after: float | None = None,
        target: str | None = None,
    ) -> FailNext:
        """Fail the next `times` requests matching method (or "*") and a path regex."""
        return self.faults.fail_next(
            method,
            path_regex,
            status,
            code,
            message,
            times=times,
            stage=stage,
            retry_after=retry_after,
            target=target,
        )

    def set_failure_rate(
        self,
        rate: float,
        *,
        methods: set[str] | None = None,
        statuses: tuple[int, ...] = (429, 500, 503),
        path_regex: str | None = None,
        retry_after: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Fail `rate` of matching ARM requests with 429 (Retry-After) / 5xx / 409."""
        self.faults.set_failure_rate(
            rate,
            methods=methods,
            statuses=statuses,
            path_regex=path_regex,
            retry_after=self.retry_after if retry_after is None else retry_after,
            seed=seed,
        )

    def clear_faults(self) -> None:
        self.faults.clear()
        self.disk_reads.faults.clear()

    def fail_disk_reads(
        self, status: int = 503, *, times: int = 1, after: int = 0, code: str | None = None
    ) -> None:
        """Fail the next `times` GETs of served disk exports (after `after` good ones) as
        Azure Storage does: 503 ServerBusy, 500 OperationTimedOut under load, 403
        AuthenticationFailed when the SAS expired mid-copy (or `code`)."""
        canned = diskaccess.STORAGE_FAULTS.get(status, ("InternalError", "Server error."))
        fault = diskaccess.ReadFault(status, code or canned[0], canned[1], times, after)
        self.disk_reads.faults.append(fault)

    def set_lro_duration(
        self, seconds: float, type_name: str | None = None, kind: str | None = None
    ) -> None:
        """Default LRO duration, or one type's (`kind`: create/update/delete/action name)."""
        if type_name is None:
            self.lro_duration = seconds
        else:
            self.lro_durations[f"{type_name}:{kind}".lower() if kind else type_name.lower()] = (
                seconds
            )

    # ------------------------------------------------------------------ state used by handlers

    def handler_for(self, type_name: str) -> ResourceType:
        return self.handlers[type_name.lower()]

    def lookup(self, resource_id: str | None) -> StoredResource | None:
        return self.state.resources.get(ids.key(resource_id)) if resource_id else None

    def all_resources(self) -> list[StoredResource]:
        return list(self.state.resources.values())

    def resources_of(self, type_name: str, scope_id: str | None = None) -> list[StoredResource]:
        prefix = ids.key(scope_id) + "/" if scope_id else ""
        return [
            r
            for r in self.state.resources.values()
            if r.type.lower() == type_name.lower() and r.id.lower().startswith(prefix)
        ]

    def resources_in_group(
        self, subscription: str, group: str, *, top_level_only: bool = False
    ) -> list[StoredResource]:
        return [
            r
            for r in self.state.resources.values()
            if r.type != ResourceGroups.type_name
            and r.subscription.lower() == subscription.lower()
            and (r.resource_group or "").lower() == group.lower()
            and (not top_level_only or r.type.count("/") == 1)
        ]

    def store(self, res: StoredResource, *, new: bool) -> None:
        res.changed_at = utcnow()
        self.state.resources[ids.key(res.id)] = res
        if new:
            self.count_creation(res.id, res.type)
        self.touch()

    def count_creation(self, resource_id: str, type_name: str) -> None:
        rec = self.state.creations.setdefault(
            ids.key(resource_id), CreationRecord(id=resource_id, type=type_name)
        )
        rec.count += 1
        self.touch()

    def touch(self) -> None:
        self._dirty = True

    async def delete_resource(
        self, res: StoredResource, *, by_op: str | None = None, skip_check: bool = True
    ) -> None:
        """Remove a resource now: cancel its other operations, run its on_deleted effects."""
        handler = self.handler_for(res.type)
        if not skip_check:
            handler.check_delete(self, res)
        op = self.active_operation(res)
        if op is not None and op.id != by_op:
            self.cancel_operation(op)
        await handler.on_deleted(self, res)
        prefix = ids.key(res.id) + "/"
        for k in [k for k in self.state.resources if k.startswith(prefix)]:
            del self.state.resources[k]
        self.state.resources.pop(ids.key(res.id), None)
        self.touch()

    def check_location(self, location: Any, type_name: str) -> str:
        loc = check_location(location, self.locations, type_name)
        assert loc is not None
        return loc

    def vm_sizes_in(self, location: str) -> set[str]:
        return self._vm_sizes.get(location.lower(), set())

    def known_vm_sizes(self) -> set[str]:
        return set(DEFAULT_VM_SIZES).union(*self._vm_sizes.values())

    async def backend_hook(self, name: str, *args: Any) -> Any:
        """Call an optional VmBackend hook (capture, discard, delete_disk) if it has it."""
        hook = getattr(self.backend, name, None)
        return None if hook is None else await hook(*args)

    @property
    def serves_disks(self) -> bool:
        """True when the backend exports disks: accessSAS URLs then point here."""
        return callable(getattr(self.backend, "disk_vhd", None))

    async def _disk_blob(self, request: web.Request) -> web.StreamResponse:
        """GET/HEAD of a disk's accessSAS URL (no ARM token: the SAS is the credential)."""
        return await diskaccess.serve(self, request)

    def blob_endpoint_for(self, account: str) -> str:
        url = self.blob_endpoint.format(account=account)
        return url if url.endswith("/") else url + "/"

    def _used_ips(self, prefix: str) -> set[str]:
        """Held by a resource of this emulator or of any other one alive in this process."""
        used = set()
        resources = [r for emulator in list(_LIVE) for r in list(emulator.state.resources.values())]
        for r in resources:
            if r.meta.get("ipAddress", "").startswith(prefix):
                used.add(r.meta["ipAddress"])
            for cfg in r.body.get("properties", {}).get("ipConfigurations", []) or []:
                ip = (cfg.get("properties") or {}).get("privateIPAddress") or ""
                if ip.startswith(prefix):
                    used.add(ip)
        return used

    def allocate_ip(self, kind: str) -> str:
        """Next free loopback address: public 127.0.2.x, private 127.0.3.x (never .0/.255).

        Free means held by no emulator of this process and leased by no other process on
        the machine (see _AddressLeases), so two test runs side by side never hand out one
        address twice (a second VM would find port 22 taken, or SSH would reach the wrong VM).
        """
        prefix = "127.0.2." if kind == "public" else "127.0.3."
        attr = "next_public_ip" if kind == "public" else "next_private_ip"
        used = self._used_ips(prefix)
        _LEASES.release_unused(self._used_ips("127.0."))
        start = getattr(self.state, attr)
        for i in range(254):
            n = (start - 1 + i) % 254 + 1
            address = f"{prefix}{n}"
            if address not in used and _LEASES.take(address):
                setattr(self.state, attr, n % 254 + 1)
                return address
        raise ArmError(
            400,
            "PublicIPCountLimitReached" if kind == "public" else "SubnetIsFull",
            f"No free address left in {prefix}0/24.",
        )

    def release_ip(self, address: str | None) -> None:
        """Addresses are free once no resource holds them; leases go at the next allocation."""

    # ------------------------------------------------------------------ operations

    def duration_for(self, type_name: str, kind: str, action: str | None) -> float:
        t = type_name.lower()
        for k in (f"{t}:{(action or kind).lower()}", f"{t}:{kind}", t):
            if k in self.lro_durations:
                return self.lro_durations[k]
        return self.lro_duration

    def active_operation(self, res: StoredResource) -> Operation | None:
        if not res.operation_id:
            return None
        op = self.state.operations.get(res.operation_id)
        return op if op is not None and op.status == "InProgress" else None

    def start_operation(
        self,
        ctx: Ctx,
        res: StoredResource,
        kind: OperationKind,
        *,
        action: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Operation:
        op = Operation(
            id=str(uuid.uuid4()),
            kind=kind,
            action=action,
            resource_id=res.id,
            resource_type=res.type,
            namespace=res.type.split("/")[0],
            location=res.location or "global",
            api_version=ctx.api_version or "",
            duration=self.duration_for(res.type, kind, action),
            params=params or {},
        )
        injected = self.faults.take(ctx.method, ctx.request.path, "operation")
        if injected is not None:
            op.inject_error = {
                "status": injected.status,
                "code": injected.code,
                "message": injected.message,
            }
        self.state.operations[op.id] = op
        res.operation_id = op.id
        self.touch()
        self._spawn(op)
        return op

    def _spawn(self, op: Operation) -> None:
        loop = self._loop
        assert loop is not None
        self._tasks[op.id] = loop.create_task(self._run_operation(op))

    def cancel_operation(self, op: Operation) -> None:
        """Preempt an operation, as Azure does when a delete supersedes a create."""
        op.status = "Canceled"
        op.end_time = utcnow()
        op.error = {
            "code": "OperationPreempted",
            "message": "Operation execution has been preempted by a more recent operation.",
        }
        task = self._tasks.pop(op.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.touch()

    async def _run_operation(self, op: Operation) -> None:
        res: StoredResource | None = None
        try:
            elapsed = (utcnow() - op.start_time).total_seconds()
            await asyncio.sleep(max(0.0, op.duration - elapsed))
            res = self.lookup(op.resource_id)
            if op.inject_error:
                err = op.inject_error
                raise ArmError(err["status"], err["code"], err["message"])
            output: dict[str, Any] | None = None
            if res is None:
                if op.kind != "delete":
                    raise ArmError(
                        404, "ResourceNotFound", f"The resource {op.resource_id} no longer exists."
                    )
            else:
                handler = self.handler_for(res.type)
                if op.kind in ("create", "update"):
                    await handler.on_created(self, op, res)
                    res.provisioning_state = "Succeeded"
                    res.changed_at = utcnow()
                elif op.kind == "delete":
                    await self.delete_resource(res, by_op=op.id)
                else:
                    done = handler.action_done.get((op.action or "").lower())
                    if done is not None:
                        output = await done(self, op, res)
            if op.status == "InProgress":
                op.status = "Succeeded"
                op.output = output
        except asyncio.CancelledError:
            if self._stopping:
                raise
            if op.status == "InProgress":
                op.status = "Canceled"
        except ArmError as err:
            op.status = "Failed"
            op.error = err.error()
            op.params["error_status"] = err.status
            if res is not None and self.lookup(res.id) is res:
                self.handler_for(res.type).on_failed(self, op, res)
        except Exception as exc:  # a bug or a backend failure: the operation fails, loudly
            log.exception("operation %s failed", op.id)
            op.status = "Failed"
            op.error = {
                "code": "InternalExecutionError",
                "message": f"An internal execution error occurred: {exc}",
            }
            op.params["error_status"] = 500
            if res is not None and self.lookup(res.id) is res:
                self.handler_for(res.type).on_failed(self, op, res)
        finally:
            if not self._stopping:
                op.end_time = op.end_time or utcnow()
                if res is not None and res.operation_id == op.id:
                    res.operation_id = None
                self._tasks.pop(op.id, None)
                self.touch()
                self._save()

    def operation_url(self, op: Operation, *, monitor: bool) -> str:
        sub = ids.split(op.resource_id)[1]
        ns = op.namespace.lower()
        q = {"api-version": op.api_version}
        base = self.url
        if ns == "microsoft.resources":
            return (
                f"{base}/subscriptions/{sub}/operationresults/{op.id}?api-version={op.api_version}"
            )
        loc = op.location
        if ns == "microsoft.storage":
            return (
                f"{base}/subscriptions/{sub}/providers/Microsoft.Storage/locations/{loc}/"
                f"asyncoperations/{op.id}?monitor=true&api-version={q['api-version']}"
            )
        if ns == "microsoft.network":
            kind = "operationResults" if monitor else "operations"
            return (
                f"{base}/subscriptions/{sub}/providers/Microsoft.Network/locations/{loc}/{kind}/"
                f"{op.id}?api-version={op.api_version}"
            )
        extra = "monitor=true&" if monitor else ""
        return (
            f"{base}/subscriptions/{sub}/providers/{op.namespace}/locations/{loc}/operations/"
            f"{op.id}?{extra}api-version={op.api_version}"
        )

    def lro_reply(self, ctx: Ctx, op: Operation, status: int, body: Any, style: str) -> Reply:
        headers = retry_headers(self.retry_after, integer_only=True)
        if style in ("async", "async+location"):
            headers["Azure-AsyncOperation"] = self.operation_url(op, monitor=False)
        if style in ("location", "async+location"):
            headers["Location"] = self.operation_url(op, monitor=True)
        return Reply(status, body, headers)

    def _poll(self, ctx: Ctx, op_id: str, monitor: bool, namespace: str) -> Reply:
        type_key = (
            "microsoft.resources/operationresults"
            if namespace.lower() == "microsoft.resources"
            else f"{namespace.lower()}/locations"
        )
        apiversions.check(ctx.api_version, type_key, f"{namespace}/operations")
        op = self.state.operations.get(op_id)
        if op is None:
            raise ArmError(404, "OperationNotFound", f"The operation '{op_id}' could not be found.")
        retry = retry_headers(self.retry_after)
        if op.status == "InProgress":
            if monitor:
                return Reply(202, None, {"Location": self.operation_url(op, monitor=True), **retry})
            return Reply(200, op.status_body(), retry)
        if not monitor:
            return Reply(200, op.status_body())
        if op.status in ("Failed", "Canceled"):
            status = int(op.params.get("error_status", 409 if op.status == "Canceled" else 500))
            return Reply(status, {"error": op.error or {"code": op.status, "message": op.status}})
        if op.output is not None:
            return Reply(200, op.output)
        if op.kind in ("create", "update"):
            res = self.lookup(op.resource_id)
            if res is not None:
                return Reply(200, self.handler_for(res.type).render(self, res, ctx))
        return Reply(200 if op.namespace.lower() == "microsoft.resources" else 204)

    def _resume_operations(self) -> None:
        for op in self.state.operations.values():
            if op.status == "InProgress":
                self._spawn(op)

    # ------------------------------------------------------------------ persistence

    def _save(self, *, force: bool = False) -> None:
        if not self.persist or self.state_dir is None or not (self._dirty or force):
            return
        self._dirty = False
        path = self.state_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.state.model_dump_json())
        tmp.replace(path)

    def _load_identity(self) -> None:
        """Keep the client secret and token-signing key across restarts of a persisted state."""
        assert self.state_dir is not None
        if not self.persist:
            return
        path = self.state_dir / "identity.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if (
                saved.get("client_id") == self.client_id
                and saved.get("tenant_id") == self.tenant_id
            ):
                if not self._explicit_secret:
                    self.identity.client_secret = saved["client_secret"]
                self.identity.signing_key = bytes.fromhex(saved["signing_key"])
        path.write_text(
            json.dumps(
                {
                    "tenant_id": self.tenant_id,
                    "client_id": self.client_id,
                    "client_secret": self.client_secret,
                    "signing_key": self.identity.signing_key.hex(),
                }
            )
        )
        path.chmod(0o600)

    def _load(self) -> None:
        assert self.state_dir is not None
        path = self.state_dir / "state.json"
        if self.persist and path.exists():
            self.state = ArmState.model_validate_json(path.read_text())
            self._resume_operations()

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        path = request.path
        api_version = request.query.get("api-version")
        injected = False
        try:
            if self.request_latency:
                await asyncio.sleep(self.request_latency)
            self._authenticate(request)
            err = self.faults.take(request.method, path, "request")
            if err is not None:
                injected = True
                raise err
            ctx = Ctx(
                emu=self,
                request=request,
                method=request.method,
                path=ids.parse_path(path),
                query=request.query,
                raw_body=raw,
                api_version=api_version,
            )
            reply = await self._route(ctx)
            err = self.faults.take(request.method, path, "response")
            if err is not None:
                injected = True
                raise err
        except ArmError as err:
            reply = Reply(err.status, err.body(), dict(err.headers))
        except Exception:
            log.exception("ARM emulator failed on %s %s", request.method, path)
            reply = Reply(
                500,
                {
                    "error": {
                        "code": "InternalServerError",
                        "message": "The emulator failed; see its log.",
                    }
                },
            )
        self._save()
        code = None
        if isinstance(reply.body, dict) and isinstance(reply.body.get("error"), dict):
            code = reply.body["error"].get("code")
        self._requests.append(
            RequestRecord(
                method=request.method,
                path=path,
                api_version=api_version,
                status=reply.status,
                query={k: v for k, v in request.query.items() if k != "api-version"},
                error_code=code,
                injected=injected,
            )
        )
        headers = {
            "x-ms-request-id": str(uuid.uuid4()),
            "x-ms-correlation-request-id": request.headers.get(
                "x-ms-client-request-id", str(uuid.uuid4())
            ),
            **reply.headers,
        }
        if reply.body is None or request.method == "HEAD":
            return web.Response(status=reply.status, headers=headers)
        return web.Response(
            status=reply.status,
            body=json.dumps(reply.body).encode(),
            content_type="application/json",
            charset="utf-8",
            headers=headers,
        )

    def _authenticate(self, request: web.Request) -> None:
        audiences = {
            self.url,
            "https://management.azure.com",
            "https://management.core.windows.net",
        }
        try:
            claims = self.identity.verify(request.headers.get("Authorization"), audiences)
        except TokenError as err:
            raise ArmError(
                401,
                err.code,
                err.message,
                headers={
                    "WWW-Authenticate": (
                        f'Bearer authorization_uri="{self.url}/{self.tenant_id}", '
                        f'error="invalid_token", error_description="{err.message}"'
                    )
                },
            ) from None
        try:
            self.identity.authorize(claims, request.path)
        except TokenError as err:
            raise ArmError(403, err.code, err.message) from None

    async def _route(self, ctx: Ctx) -> Reply:
        path = ctx.request.path
        m = _OPERATION_PATH.match(path)
        if m and ctx.method == "GET":
            self._subscription(m["sub"])
            monitor = m["kind"].lower() != "operations" or ctx.query.get("monitor") == "true"
            return self._poll(ctx, m["id"], monitor, m["ns"])
        m = _RG_OPERATION_PATH.match(path)
        if m and ctx.method == "GET":
            self._subscription(m["sub"])
            return self._poll(ctx, m["id"], True, "Microsoft.Resources")
        p = ctx.path
        if p is None:
            raise ArmError(404, "NotFound", f"No ARM route for '{path}'.")
        self._subscription(p.subscription)
        tail = tuple(t.lower() for t in p.tail)
        if p.namespace is None:
            apiversions.check(
                ctx.api_version,
                "microsoft.resources/resourcegroups",
                "Microsoft.Resources/resourceGroups",
            )
            if p.resource_group is None:
                if tail == () and ctx.method == "GET":
                    return Reply(200, self._subscription_doc(p.subscription))
                if tail == ("resourcegroups",) and ctx.method == "GET":
                    return list_resource_groups(ctx, p.subscription)
                if tail == ("resources",) and ctx.method == "GET":
                    return list_resources(ctx, p.subscription, None)
                if tail == ("locations",) and ctx.method == "GET":
                    return Reply(
                        200,
                        {
                            "value": [
                                self._location_doc(p.subscription, loc)
                                for loc in sorted(self.locations)
                            ]
                        },
                    )
                raise ArmError(404, "NotFound", f"No ARM route for '{path}'.")
            if tail == ():
                return await self._dispatch(
                    self.handlers["microsoft.resources/resourcegroups"], ctx
                )
            if tail == ("resources",) and ctx.method == "GET":
                require_group(ctx)
                return list_resources(ctx, p.subscription, p.resource_group)
            raise ArmError(404, "NotFound", f"No ARM route for '{path}'.")
        ns = p.namespace.lower()
        if not any(k.startswith(ns + "/") for k in self.handlers):
            raise ArmError(
                400,
                "InvalidResourceNamespace",
                f"The resource namespace '{p.namespace}' is invalid.",
            )
        if p.resource_group is None:
            if p.types and p.types[0].lower() == "locations":
                return self._location_scoped(ctx, p)
            if not p.types and len(tail) == 1:
                if ns == "microsoft.compute" and tail[0] == "skus" and ctx.method == "GET":
                    apiversions.check(
                        ctx.api_version, "microsoft.compute/skus", "Microsoft.Compute/skus"
                    )
                    return skus_route(ctx)
                if (
                    ns == "microsoft.storage"
                    and tail[0] == "checknameavailability"
                    and ctx.method == "POST"
                ):
                    apiversions.check(
                        ctx.api_version,
                        "microsoft.storage/checknameavailability",
                        "Microsoft.Storage/checkNameAvailability",
                    )
                    return check_name_availability(ctx)
                if (ns, tail[0], ctx.method) == ("microsoft.keyvault", "deletedvaults", "GET"):
                    apiversions.check(
                        ctx.api_version,
                        "microsoft.keyvault/deletedvaults",
                        "Microsoft.KeyVault/deletedVaults",
                    )
                    return list_deleted_vaults(ctx)
                handler = self.handlers.get(f"{ns}/{tail[0]}")
                if handler is not None and ctx.method == "GET":
                    apiversions.check(ctx.api_version, handler.key, handler.type_name)
                    return handler.list(ctx, f"/subscriptions/{p.subscription}")
            raise self._invalid_type(ctx, p.namespace, "/".join(p.types + p.tail))
        if not p.types:
            if len(tail) == 1 and ctx.method == "GET":
                handler = self.handlers.get(f"{ns}/{tail[0]}")
                if handler is not None:
                    apiversions.check(ctx.api_version, handler.key, handler.type_name)
                    require_group(ctx)
                    return handler.list(ctx, ids.format_id(p.subscription, p.resource_group))
            raise self._invalid_type(ctx, p.namespace, "/".join(p.tail))
        handler = self.handlers.get(p.type_key)
        if handler is None:
            raise self._invalid_type(ctx, p.namespace, "/".join(p.types))
        apiversions.check(ctx.api_version, handler.key, handler.type_name)
        rg = require_group(ctx)
        if rg.provisioning_state == "Deleting" and ctx.method in ("PUT", "PATCH", "POST"):
            raise being_deleted(rg.name)
        if not p.tail:
            return await self._dispatch(handler, ctx)
        if len(p.tail) == 1:
            child = self.handlers.get(f"{p.type_key}/{tail[0]}")
            if child is not None and ctx.method == "GET":
                parent_id = p.resource_id()
                if self.lookup(parent_id) is None:
                    raise handler.not_found(ctx)
                return child.list(ctx, parent_id)
            return await handler.action(ctx, p.tail[0])
        raise ArmError(404, "NotFound", f"No ARM route for '{path}'.")

    async def _dispatch(self, handler: ResourceType, ctx: Ctx) -> Reply:
        verbs = {
            "GET": handler.get,
            "HEAD": handler.head,
            "PUT": handler.put,
            "PATCH": handler.patch,
            "DELETE": handler.delete,
        }
        verb = verbs.get(ctx.method)
        if verb is None:
            raise ArmError(
                405,
                "HttpMethodNotAllowed",
                f"The HTTP method '{ctx.method}' is not supported here.",
            )
        return await verb(ctx)

    def _location_scoped(self, ctx: Ctx, p: ids.ArmPath) -> Reply:
        location = p.names[0]
        segs = [x for pair in zip(p.types[1:], p.names[1:], strict=False) for x in pair] + list(
            p.tail
        )
        ns = (p.namespace or "").lower()
        if ns == "microsoft.compute" and ctx.method == "GET":
            if segs and segs[0].lower() == "publishers":
                apiversions.check(
                    ctx.api_version,
                    "microsoft.compute/locations/publishers",
                    "Microsoft.Compute/locations/publishers",
                )
                return marketplace_route(ctx, location, segs)
            if [s.lower() for s in segs] == ["vmsizes"]:
                apiversions.check(
                    ctx.api_version,
                    "microsoft.compute/virtualmachines",
                    "Microsoft.Compute/locations/vmSizes",
                )
                return vm_sizes_route(ctx, location)
        if ns == "microsoft.keyvault" and segs and segs[0].lower() == "deletedvaults":
            apiversions.check(
                ctx.api_version, "microsoft.keyvault/locations", "Microsoft.KeyVault/deletedVaults"
            )
            return deleted_vault_route(ctx, location, segs)
        raise self._invalid_type(ctx, p.namespace or "", "locations/" + "/".join(segs))

    def _invalid_type(self, ctx: Ctx, namespace: str, type_path: str) -> ArmError:
        return ArmError(
            400,
            "InvalidResourceType",
            f"The resource type '{type_path}' could not be found in the namespace '{namespace}' "
            f"for api version '{ctx.api_version}'.",
        )

    def _subscription(self, subscription: str) -> None:
        if subscription.lower() != self.subscription_id.lower():
            raise ArmError(
                404,
                "SubscriptionNotFound",
                f"The subscription '{subscription}' could not be found.",
            )

    def _subscription_doc(self, sub: str) -> dict[str, Any]:
        return {
            "id": f"/subscriptions/{sub}",
            "subscriptionId": sub,
            "tenantId": self.tenant_id,
            "displayName": "Kiln ARM emulator",
            "state": "Enabled",
            "subscriptionPolicies": {
                "locationPlacementId": "Public_2014-09-01",
                "quotaId": "PayAsYouGo_2014-09-01",
                "spendingLimit": "Off",
            },
            "authorizationSource": "RoleBased",
        }

    def _location_doc(self, sub: str, loc: str) -> dict[str, Any]:
        return {
            "id": f"/subscriptions/{sub}/locations/{loc}",
            "name": loc,
            "displayName": loc,
            "type": "Region",
        }
