"""A VHD target's copy of the build VM's OS disk: a sparse page-blob copy that resumes.

Kiln reads the disk through its access SAS and writes only the pages that hold data, in
slices of bounded time. Each slice ends with the checkpoint saved (the copy's id and how
far it got); the next slice, a retry after an error or a resumed run goes on from there
when the destination blob is still the one this copy created (its copy id is in the
blob's metadata), and starts over only when it is not. (Azure's server-side Copy Blob
from the disk's SAS would do the same work, but Azurite copies only within its own
account, so it could not be tested here.)

Errors are classified as every cloud error is (errors.classify); an access SAS that no
longer works is retryable, since each slice is given a new one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient

from kiln.api.run import VhdCopy
from kiln.providers.azure.errors import CLOUD_ERROR, classify
from kiln.providers.base import ProviderError

PAGE = 4 * 1024 * 1024
SLICE_SECONDS = 60.0
COPY_ID = "kilncopyid"  # blob metadata names are C# identifiers: no hyphens
# What a read of the disk's export answers once its SAS expired or was revoked.
RENEWED_BY_A_NEW_GRANT = frozenset({"AuthenticationFailed", "ResourceNotFound", "BlobNotFound"})
T = TypeVar("T")


async def copy_slice(source: BlobClient, destination: BlobClient, state: VhdCopy) -> bool:
    """Copy on from state.offset for at most SLICE_SECONDS; True once the disk is in."""
    if state.size is None:
        state.size = (await _read(source.get_blob_properties())).size
    if not await _ours(destination, state):
        metadata = {COPY_ID: state.copy_id}
        await _write(destination.create_page_blob(state.size, metadata=metadata))
        state.offset = 0
    ends, start = time.monotonic() + SLICE_SECONDS, state.offset
    while state.offset < state.size:
        if state.offset > start and time.monotonic() >= ends:
            break  # the slice is over: the checkpoint saves how far it got
        length = min(PAGE, state.size - state.offset)
        download = await _read(source.download_blob(offset=state.offset, length=length))
        chunk = await _read(download.readall())
        if chunk.count(0) != len(chunk):  # page blobs are sparse: zeros are not sent
            await _write(destination.upload_page(chunk, offset=state.offset, length=length))
        state.offset += length
    return state.offset >= state.size


async def _ours(destination: BlobClient, state: VhdCopy) -> bool:
    """The destination is the blob this copy created (so its pages below offset are in)."""
    try:
        properties = await destination.get_blob_properties()
    except ResourceNotFoundError:
        return False
    except AzureError as error:
        raise _destination_error(error) from error
    return (properties.metadata or {}).get(COPY_ID) == state.copy_id and (
        properties.size == state.size
    )


async def _read(action: Awaitable[T]) -> T:
    try:
        return await action
    except AzureError as error:
        problem = classify(error)
        if problem.code in RENEWED_BY_A_NEW_GRANT:
            raise ProviderError(
                f"reading the OS disk's export failed ({problem}); the copy goes on with a "
                "new access SAS",
                fatal=False,
                retry_after=1.0,
                code=problem.code,
                retry_kind=CLOUD_ERROR,
            ) from error
        raise problem from error


async def _write(action: Awaitable[Any]) -> Any:
    try:
        return await action
    except AzureError as error:
        raise _destination_error(error) from error


def _destination_error(error: AzureError) -> ProviderError:
    problem = classify(error)
    if not problem.fatal:
        return problem
    return ProviderError(
        f"writing the VHD blob failed: {problem}; check the target's uri (its container "
        "must exist; a SAS in it must be valid and allow writes, or the operator's identity "
        "needs Storage Blob Data Contributor)",
        code=problem.code,
    )
