"""`kiln operator`: its HTTP port, leader election and kopf, in one event loop.

The HTTP port (KILN_METRICS_PORT) serves /metrics, /healthz and the run logs that
`kiln logs` reads through the API server's service proxy (so Kubernetes RBAC on the
Service decides who reads them). With KILN_LEADER_ELECTION a replica first stands by
until it holds the Lease; a standby answers /healthz and forwards log requests to the
active replica, whose address the Lease records.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kiln.commands import logs
from kiln.commands.logs import RUN_STATE_HEADER
from kiln.kube import RUNS, Kube, load_client
from kiln.leader import LeaderElection
from kiln.settings import OperatorSettings

log = logging.getLogger(__name__)
LOG_CHUNK_BYTES = 1 << 20
FORWARD_TIMEOUT = 30.0


class KopfInfoToDebug(logging.Filter):
    """kopf's per-handler lines ("Handler ... succeeded.") are INFO; Kiln's own events say
    what happened, so these go to DEBUG (shown with --verbose only) and, being below the
    posting level, are never posted as events."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.verbose


def configure_logging(settings: OperatorSettings, verbose: bool) -> None:
    log_format = kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=verbose, log_format=log_format)
    demote = KopfInfoToDebug(verbose)
    activities = ("startup", "cleanup", "authentication", "probe")  # kopf's Activity names
    loggers = ("kopf.objects", "kopf._core.engines.activities")
    for name in (*loggers, *(f"kopf.activities.{activity}" for activity in activities)):
        logging.getLogger(name).addFilter(demote)
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("azure").setLevel(logging.INFO if verbose else logging.WARNING)


@dataclass
class Replica:
    settings: OperatorSettings
    kube: Kube
    election: LeaderElection | None
    active: bool = False


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


async def run_log(request: web.Request) -> web.StreamResponse:
    """Bytes of a run's log from ?offset=N; the run's state in a header, so a client
    following the log knows when it has everything."""
    replica: Replica = request.app["replica"]
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    if not replica.active:
        return await _forward(replica, request)
    watched = replica.settings.namespaces
    if watched and namespace not in watched:
        raise web.HTTPNotFound(text=f"this operator does not watch namespace {namespace}\n")
    run = await replica.kube.get(RUNS, namespace, name)
    if run is None:
        raise web.HTTPNotFound(text=f"ImageBuildRun {namespace}/{name} does not exist\n")
    try:
        path = logs.log_path(run)
    except logs.LogsError as error:
        raise web.HTTPConflict(text=f"{error}\n") from None
    if not _inside(path, replica.settings.data_root):  # status is not trusted with paths
        raise web.HTTPForbidden(text="the run's log is not in the operator's data directory\n")
    try:
        offset = max(0, int(request.query.get("offset", "0")))
    except ValueError:
        raise web.HTTPBadRequest(text="offset must be a number of bytes\n") from None
    chunk = await asyncio.to_thread(_read_from, path, offset)
    state = (run.get("status") or {}).get("runState") or ""
    if chunk is None:
        chunk = b""
    return web.Response(body=chunk, headers={RUN_STATE_HEADER: state})


def _read_from(path: Path, offset: int) -> bytes | None:
    if not path.exists():
        return None
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(LOG_CHUNK_BYTES)


async def _forward(replica: Replica, request: web.Request) -> web.Response:
    """A standby has no logs: the active replica, named in the Lease, has them."""
    address = await asyncio.to_thread(replica.election.holder_address) if replica.election else None
    if not address:
        raise web.HTTPServiceUnavailable(text="no active Kiln replica right now; try again\n")
    timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://{address}{request.rel_url}") as answer,
    ):
        body = await answer.read()
        headers = {key: value for key, value in answer.headers.items() if key == RUN_STATE_HEADER}
        return web.Response(
            status=answer.status, body=body, headers=headers, content_type=answer.content_type
        )


async def metrics(_: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def healthz(request: web.Request) -> web.Response:
    replica: Replica = request.app["replica"]
    return web.Response(text="active\n" if replica.active else "standby\n")


async def start_http(replica: Replica) -> web.AppRunner:
    app = web.Application()
    app["replica"] = replica
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/logs/{namespace}/{name}", run_log)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = {replica.settings.metrics_port, replica.settings.liveness_port}
    for port in sorted(ports):
        await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def serve(settings: OperatorSettings) -> int:
    """Stand by for the Lease (with leader election), then run kopf until stopped; 1 when
    the Lease was lost, so Kubernetes restarts the replica as a standby."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    client = load_client()
    election = (
        LeaderElection(
            client,
            settings.leader_election_namespace or settings.secrets_namespace,
            settings.leader_election_name,
            settings.identity,
            settings.http_address,
        )
        if settings.leader_election
        else None
    )
    replica = Replica(settings=settings, kube=Kube(client), election=election)
    runner = await start_http(replica)
    lost = asyncio.Event()
    helpers: list[asyncio.Task[None]] = []
    try:
        if election is not None:
            if not await election.acquire(stop):
                return 0
            helpers += [
                asyncio.create_task(election.keep(lost)),
                asyncio.create_task(_stop_when(lost, stop)),
            ]
        replica.active = True
        await kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=True,
            stop_flag=stop,
        )
        return 1 if lost.is_set() else 0
    finally:
        replica.active = False
        for task in helpers:
            task.cancel()
        if election is not None and not lost.is_set():
            await asyncio.to_thread(election.release)
        await runner.cleanup()


async def _stop_when(lost: asyncio.Event, stop: asyncio.Event) -> None:
    await lost.wait()
    stop.set()
