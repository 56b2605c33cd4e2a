"""Azure errors, classified once: wait and retry, or stop the run with Azure's message.

Only the codes listed here (and throttling, 5xx and an unreachable endpoint) are retried;
anything else, an unknown 409 included, is fatal: waiting does not fix a request Azure
refused, and retrying it would hide the refusal until the build timed out.
"""

from __future__ import annotations

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from kiln.providers.base import ProviderError

# Conflicts and capacity problems that go away by themselves (Azure's documented
# transient errors: throttling, operations in progress, allocation, eventual consistency).
RETRYABLE_CODES = frozenset(
    {
        "AnotherOperationInProgress",
        "OperationNotAllowedWhileInProgress",
        "RetryableError",
        "TooManyRequests",
        "InternalServerError",
        "InternalExecutionError",
        "ServiceUnavailable",
        "GatewayTimeout",
        "BadGateway",
        "AllocationFailed",
        "ZonalAllocationFailed",
        "OverconstrainedAllocationRequest",
        "ResourceGroupBeingDeleted",
        "StorageAccountIsNotProvisioned",
        "InUseSubnetCannotBeDeleted",
        "NicInUse",
        "PublicIPAddressCannotBeDeleted",
        "InUseNetworkSecurityGroupCannotBeDeleted",
        "CannotDeleteResource",
        # Azure Storage's transient errors (blobs: logs, VHD copies)
        "ServerBusy",
        "OperationTimedOut",
        "InternalError",
    }
)
DEFAULT_RETRY_SECONDS = 15.0
UNREACHABLE = "Unreachable"
CLOUD_ERROR = "cloud"  # the kind kiln_reconcile_errors_total counts retried cloud errors as


def _retry_after(error: HttpResponseError) -> float:
    response = getattr(error, "response", None)
    header = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(1.0, float(header)) if header else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def is_retryable(status: int, code: str) -> bool:
    """Throttling and server errors always; a 4xx only when its code is listed."""
    return code in RETRYABLE_CODES or status == 429 or status >= 500


def _code_and_message(error: HttpResponseError) -> tuple[str, str]:
    """ARM puts its code in an OData error body; Azure Storage in x-ms-error-code (the
    SDK's error_code), with a message whose first line is what it says."""
    storage = getattr(error, "error_code", None)
    if storage:
        text = str(getattr(error, "message", None) or error.reason or error)
        return str(getattr(storage, "value", storage)), text.split("\n", 1)[0].strip()
    code = (error.error.code if error.error else None) or str(error.status_code or "")
    message = (error.error.message if error.error else None) or error.reason or str(error)
    return code, message


def classify(error: Exception) -> ProviderError:
    """A ProviderError that says whether to retry, with Azure's code and message."""
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return ProviderError(
            f"Azure could not be reached: {error}",
            fatal=False,
            code=UNREACHABLE,
            retry_kind=CLOUD_ERROR,
        )
    if not isinstance(error, HttpResponseError):
        return ProviderError(str(error))
    code, message = _code_and_message(error)
    retryable = is_retryable(error.status_code or 0, code)
    return ProviderError(
        f"Azure {code}: {message}",
        fatal=not retryable,
        retry_after=_retry_after(error),
        code=code,
        retry_kind=CLOUD_ERROR if retryable else None,
    )
