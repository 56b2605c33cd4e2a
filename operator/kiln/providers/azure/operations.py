"""Long-running ARM operations that never block a worker and survive a restart.

An operation is started once; its continuation token goes into the run's checkpoint, and
every later pass (in this process or after a restart) resumes the poller from the token
and waits a little. A crash between starting and saving the token repeats the PUT, which
ARM treats as the same request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.core.polling import AsyncLROPoller

from kiln.providers.azure.errors import classify
from kiln.providers.base import ProviderError

DONE = "done"
WAIT_SECONDS = 20.0
Begin = Callable[..., Awaitable[AsyncLROPoller[Any]]]


class Pending(ProviderError):
    """An operation is still running: come back later."""

    def __init__(self, what: str, retry_after: float = 5.0) -> None:
        super().__init__(f"waiting for Azure: {what}", fatal=False, retry_after=retry_after)


async def track(operations: dict[str, Any], key: str, begin: Begin) -> bool:
    """True once the operation finished well; False while it runs; raises when it failed."""
    state = operations.get(key)
    if state == DONE:
        return True
    try:
        poller = await (begin(continuation_token=state) if state else begin())
        operations[key] = poller.continuation_token()
        await asyncio.wait_for(poller.result(), WAIT_SECONDS)
    except TimeoutError:
        return False
    except AzureError as error:
        operations[key] = ""  # a failed operation is started anew if it is retried
        raise classify(error) from error
    operations[key] = DONE
    return True


async def ensure_all(operations: dict[str, Any], work: dict[str, Begin], what: str) -> None:
    """Run independent operations concurrently; Pending until every one is done."""
    results = await asyncio.gather(*(track(operations, key, begin) for key, begin in work.items()))
    if not all(results):
        raise Pending(what)


async def call(action: Awaitable[Any]) -> Any:
    """A plain ARM call, its errors classified."""
    try:
        return await action
    except AzureError as error:
        raise classify(error) from error


async def find(lookup: Awaitable[Any]) -> Any | None:
    """A GET whose 404 means 'not there' (None); other errors classified."""
    try:
        return await call(lookup)
    except ProviderError as error:
        if isinstance(error.__cause__, ResourceNotFoundError):
            return None
        raise
