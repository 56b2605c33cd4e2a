"""Azure errors, classified once: wait and retry, or stop the run with Azure's message."""

from __future__ import annotations

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

from kiln.providers.base import ProviderError

# Conflicts and capacity problems that go away by themselves.
RETRYABLE_CODES = frozenset(
    {
        "AnotherOperationInProgress",
        "OperationNotAllowedWhileInProgress",
        "RetryableError",
        "TooManyRequests",
        "InternalServerError",
        "ServiceUnavailable",
        "GatewayTimeout",
        "AllocationFailed",
        "ZonalAllocationFailed",
        "OverconstrainedAllocationRequest",
        "ResourceGroupBeingDeleted",
        "InUseSubnetCannotBeDeleted",
        "NicInUse",
        "PublicIPAddressCannotBeDeleted",
        "InUseNetworkSecurityGroupCannotBeDeleted",
    }
)
# 409s that no amount of waiting fixes.
FATAL_CONFLICTS = frozenset({"SkuNotAvailable", "OperationNotAllowed", "QuotaExceeded"})
DEFAULT_RETRY_SECONDS = 15.0
CLOUD_ERROR = "cloud"  # the kind kiln_reconcile_errors_total counts retried cloud errors as


def _retry_after(error: HttpResponseError) -> float:
    response = getattr(error, "response", None)
    header = response.headers.get("Retry-After") if response is not None else None
    try:
        return max(1.0, float(header)) if header else DEFAULT_RETRY_SECONDS
    except ValueError:
        return DEFAULT_RETRY_SECONDS


def classify(error: Exception) -> ProviderError:
    """A ProviderError that says whether to retry, with Azure's code and message."""
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return ProviderError(
            f"Azure could not be reached: {error}", fatal=False, retry_kind=CLOUD_ERROR
        )
    if not isinstance(error, HttpResponseError):
        return ProviderError(str(error))
    code = (error.error.code if error.error else None) or str(error.status_code or "")
    message = (error.error.message if error.error else None) or error.reason or str(error)
    status = error.status_code or 0
    retryable = code in RETRYABLE_CODES or status == 429 or status >= 500
    if status == 409 and code not in FATAL_CONFLICTS:
        retryable = True
    return ProviderError(
        f"Azure {code}: {message}",
        fatal=not retryable,
        retry_after=_retry_after(error),
        retry_kind=CLOUD_ERROR if retryable else None,
    )
