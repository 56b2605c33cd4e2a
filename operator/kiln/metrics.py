"""Prometheus metrics: the names platform teams alert on, and one small hook per event.

Everything else calls these hooks (a run started or ended, a step ended, a cloud
request answered); nothing else touches prometheus_client, so the metric names and
labels are defined once, here, and documented in docs/troubleshooting.md.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # *_created series only double what scrapers store anyway

STEP_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
QUEUE_BUCKETS = (0.5, 1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
UNKNOWN = "unknown"  # a run canceled before it had a provider

BUILD_RUNS = Counter(
    "kiln_build_runs_total",
    "Runs that ended, by provider and result (the run's final runState).",
    ["provider", "result"],
)
RUNS_IN_FLIGHT = Gauge(
    "kiln_build_runs_in_flight",
    "Runs this operator is building now (holding a build slot).",
    ["provider"],
)
STEP_DURATION = Histogram(
    "kiln_build_step_duration_seconds",
    "How long each pipeline step took, from its start to its end (succeeded or failed).",
    ["provider", "step"],
    buckets=STEP_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "kiln_build_queue_wait_seconds",
    "From a run's creation to the moment it started building.",
    buckets=QUEUE_BUCKETS,
)
CLOUD_REQUESTS = Counter(
    "kiln_cloud_api_requests_total",
    "Cloud API requests by operation (method and resource type) and HTTP status code.",
    ["operation", "code"],
)
CLOUD_THROTTLED = Counter(
    "kiln_cloud_api_throttled_total",
    "Cloud API requests the cloud answered with 429 Too Many Requests.",
)
RECONCILE_ERRORS = Counter(
    "kiln_reconcile_errors_total",
    "Errors met while reconciling, by kind: cloud (retryable provider errors), "
    "connection (build VM), kubernetes (API refusals), unexpected.",
    ["kind"],
)


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return max(0.0, (parse_time(end) - parse_time(start)).total_seconds())


def run_started(created: str | None, started: str) -> None:
    wait = seconds_between(created, started)
    if wait is not None:
        QUEUE_WAIT.observe(wait)


def run_ended(provider: str | None, result: str) -> None:
    BUILD_RUNS.labels(provider=provider or UNKNOWN, result=result).inc()


def step_ended(provider: str | None, step: str, start: str | None, end: str | None) -> None:
    duration = seconds_between(start, end)
    if duration is not None:
        STEP_DURATION.labels(provider=provider or UNKNOWN, step=step).observe(duration)


def reconcile_error(kind: str) -> None:
    RECONCILE_ERRORS.labels(kind=kind).inc()


def cloud_request(operation: str, code: str) -> None:
    CLOUD_REQUESTS.labels(operation=operation, code=code).inc()
    if code == "429":
        CLOUD_THROTTLED.inc()


def in_flight(provider: str | None) -> Gauge:
    """The gauge for `with metrics.in_flight(provider).track_inprogress():`."""
    return RUNS_IN_FLIGHT.labels(provider=provider or UNKNOWN)


def arm_operation(method: str, path: str) -> str:
    """'PUT Microsoft.Compute/virtualMachines' from an ARM request path: the method and
    the resource type, never names or IDs (they would make a label per resource)."""
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    lowered = [s.lower() for s in segments]
    if "providers" in lowered:
        rest = segments[lowered.index("providers") + 1 :]
        kind = "/".join([rest[0], *rest[1::2]]) if rest else "providers"
    elif "resourcegroups" in lowered:
        kind = "resourceGroups"
    elif "subscriptions" in lowered:
        kind = "subscriptions"
    else:
        kind = segments[0] if segments else "/"
    return f"{method.upper()} {kind}"
