"""Hunting for secrets where none may be: status, events and the operator's log.

A run uses secrets it never shows: its key Secret (SSH keys, host key, WinRM password and
certificate), the access tokens Entra issued, SAS URLs. The recorder keeps every value of
every key Secret the operator makes while a test runs (they are deleted at cleanup); the
scan looks for each of them, also inside base64 (continuation tokens are base64 JSON
holding base64 bodies) and line by line for multi-line keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi

PUBLIC_KEYS = ("publickey", "certificate")  # key Secret entries that are not secret
MIN_SECRET_LENGTH = 12  # shorter values (usernames, "pfx") would match by chance
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")


def fragments(value: str) -> set[str]:
    """The value and each long line of it (a PEM key leaks line by line too)."""
    lines = {line.strip() for line in value.splitlines()}
    lines = {line for line in lines if len(line) >= MIN_SECRET_LENGTH and "-----" not in line}
    return ({value} if len(value) >= MIN_SECRET_LENGTH else set()) | lines


def expanded(text: str, depth: int = 3) -> str:
    """The text with every base64 run in it decoded and appended, `depth` levels deep."""
    found = [text]
    for run in _BASE64_RUN.findall(text):
        standard = run.replace("-", "+").replace("_", "/")
        try:
            decoded = base64.b64decode(standard + "=" * (-len(standard) % 4)).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        found.append(expanded(decoded, depth - 1) if depth > 1 else decoded)
    return "\n".join(found)


def leaks(secrets: set[str], **places: str) -> list[str]:
    """'PLACE holds SECRET...' for each secret fragment found in a place."""
    found = []
    for place, text in places.items():
        haystack = expanded(text)
        for secret in sorted(secrets):
            for fragment in fragments(secret):
                if fragment in haystack:
                    found.append(f"{place} holds {fragment[:12]}...")
                    break
    return found


def as_text(obj: Any) -> str:
    return json.dumps(obj, default=str)


class RunRecorder:
    """While tests run: every value of the run key Secrets in the operator's namespace, and
    every status the runs of one namespace showed (runs may be deleted before the scan)."""

    def __init__(
        self, api: ApiClient, namespace: str, operator_namespace: str, interval: float = 0.5
    ) -> None:
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)
        self.namespace = namespace
        self.operator_namespace = operator_namespace
        self.interval = interval
        self.values: set[str] = set()
        self.statuses: dict[tuple[str, str], Any] = {}  # (uid, resourceVersion): status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            runs = self.custom.list_namespaced_custom_object(
                "kiln.dev", "v1alpha1", self.namespace, "imagebuildruns", _request_timeout=10
            )
            for item in runs["items"]:
                meta = item["metadata"]
                self.statuses[(meta["uid"], meta["resourceVersion"])] = item.get("status")
            secrets = self.core.list_namespaced_secret(
                self.operator_namespace, label_selector="kiln.dev/run-uid", _request_timeout=10
            )
            for secret in secrets.items:
                for key, value in (secret.data or {}).items():
                    if not key.endswith(PUBLIC_KEYS):
                        self.values.add(base64.b64decode(value).decode(errors="replace"))

    def __enter__(self) -> RunRecorder:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def assert_nothing_leaked(self, operator_log: str, *others: str) -> None:
        """No key, password, token or SAS of these runs in their status, events or the log;
        `others` are more secrets the runs used (tokens, SAS query strings)."""
        secrets = self.values | {o for o in others if o}
        assert any("PRIVATE KEY" in v for v in self.values), "no key Secret was recorded"
        assert self.statuses, "no run status was recorded"
        events = self.core.list_namespaced_event(self.namespace).items
        found = leaks(
            secrets,
            status=as_text(list(self.statuses.values())),
            events=as_text([(e.reason, e.message) for e in events]),
            log=operator_log,
        )
        assert found == [], found
