"""Fault injection: random throttling and server errors, and named failures for one operation.

Kiln must survive what Azure does under load (429 with Retry-After, 5xx, 409
AnotherOperationInProgress) and must surface a fatal error with the cloud's message; these
rules let a test produce either on demand.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from typing import Literal

from .errors import ArmError

Stage = Literal["request", "response", "operation"]

_CANNED: dict[int, tuple[str, str]] = {
    429: (
        "TooManyRequests",
        "The request is being throttled as the limit has been reached for operation type - "
        "Read_ObservationWindow_00:03:00. For more information, see - https://aka.ms/"
        "throttling-errors",
    ),
    500: ("InternalServerError", "Encountered internal server error. Please try again."),
    502: ("BadGateway", "The gateway did not receive a response within the specified time."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Please try again."),
    409: (
        "AnotherOperationInProgress",
        "Another operation on this or dependent resource is in progress. Retry later.",
    ),
}

MUTATING = frozenset({"PUT", "PATCH", "POST", "DELETE"})
ALL_METHODS = frozenset({"GET", "HEAD", "PUT", "PATCH", "POST", "DELETE"})


@dataclass
class FailNext:
    """A failure for the next `times` requests matching method and path regex.

    stage "request": answer the error instead of doing the request;
    stage "response": do the request, then answer the error (a lost response);
    stage "operation": accept the request, then end its long-running operation Failed.
    """

    method: str
    path_regex: re.Pattern[str]
    status: int
    code: str
    message: str
    times: int = 1
    stage: Stage = "request"
    retry_after: float | None = None
    target: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0 and self.method in (method, "*") and bool(self.path_regex.search(path))
        )

    def error(self) -> ArmError:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = format_seconds(self.retry_after)
        return ArmError(self.status, self.code, self.message, target=self.target, headers=headers)


@dataclass
class FailureRate:
    """Fail a fraction of matching requests with one of `statuses` (ARM's canned bodies)."""

    rate: float
    methods: frozenset[str] = ALL_METHODS
    statuses: tuple[int, ...] = (429, 500, 503)
    path_regex: re.Pattern[str] | None = None
    retry_after: float = 1.0
    retry_after_statuses: frozenset[int] = frozenset({429, 503, 409})


def format_seconds(seconds: float) -> str:
    """Retry-After value: an integer when whole (as Azure sends), else a short decimal."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:.3f}".rstrip("0")


def retry_headers(seconds: float, *, integer_only: bool = False) -> dict[str, str]:
    """Retry-After, as Azure sends it (whole seconds); sub-second for fast tests.

    The SDKs parse Retry-After of an LRO's first response as an int, so a sub-second delay
    goes out there as `retry-after-ms` (honoured by azure-core's pollers); on error and
    status-monitor responses azure-core parses a decimal Retry-After fine.
    """
    if float(seconds).is_integer() or not integer_only:
        return {"Retry-After": format_seconds(seconds)}
    return {"retry-after-ms": str(max(1, round(seconds * 1000)))}


@dataclass
class Faults:
    """The fault rules of one emulator; safe to change from the test's thread."""

    seed: int | None = None
    rate: FailureRate | None = None
    rules: list[FailNext] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    def set_failure_rate(
        self,
        rate: float,
        *,
        methods: set[str] | frozenset[str] | None = None,
        statuses: tuple[int, ...] = (429, 500, 503),
        path_regex: str | None = None,
        retry_after: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if not 0 <= rate <= 1:
            raise ValueError("rate must be within [0, 1]")
        with self._lock:
            if seed is not None:
                self._random = random.Random(seed)
            self.rate = FailureRate(
                rate=rate,
                methods=frozenset(m.upper() for m in (methods or ALL_METHODS)),
                statuses=statuses,
                path_regex=re.compile(path_regex, re.I) if path_regex else None,
                retry_after=retry_after,
            )

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
        canned = _CANNED.get(status, ("Conflict" if status == 409 else "BadRequest", "Injected."))
        rule = FailNext(
            method=method.upper(),
            path_regex=re.compile(path_regex, re.I),
            status=status,
            code=code or canned[0],
            message=message or canned[1],
            times=times,
            stage=stage,
            retry_after=retry_after,
            target=target,
        )
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rate = None
            self.rules.clear()

    def take(self, method: str, path: str, stage: Stage) -> ArmError | None:
        """The error to inject for this request at this stage, consuming one use of a rule."""
        with self._lock:
            for rule in self.rules:
                if rule.stage == stage and rule.matches(method, path):
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                    return rule.error()
            r = self.rate
            if stage != "request" or r is None or method not in r.methods:
                return None
            if r.path_regex is not None and not r.path_regex.search(path):
                return None
            if self._random.random() >= r.rate:
                return None
            statuses = [s for s in r.statuses if s != 409 or method in MUTATING] or [500]
            status = self._random.choice(statuses)
        code, message = _CANNED.get(status, ("InternalServerError", "Injected failure."))
        headers = {}
        if status in r.retry_after_statuses:
            headers["Retry-After"] = format_seconds(r.retry_after)
        return ArmError(status, code, message, headers=headers)
