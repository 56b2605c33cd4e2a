"""Azure errors are classified once: retry what passes, stop on what will not."""

from __future__ import annotations

import json

import pytest
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.core.pipeline.transport import HttpResponse

from kiln.providers.azure.errors import classify
from kiln.providers.azure.provider import parse_id, storage_account_name
from kiln.versions import version_key


class FakeResponse(HttpResponse):
    """A real azure-core response object holding a canned ARM error body."""

    def __init__(self, status: int, code: str, message: str, retry_after: str | None) -> None:
        super().__init__(request=None, internal_response=None)  # type: ignore[arg-type]
        self.status_code = status
        self.reason = "reason"
        self.headers = {"Retry-After": retry_after} if retry_after else {}
        self.content_type = "application/json"
        self._body = json.dumps({"error": {"code": code, "message": message}}).encode()

    def body(self) -> bytes:
        return self._body

    def text(self, encoding: str | None = None) -> str:
        return self._body.decode()


def error(status: int, code: str, retry_after: str | None = None) -> HttpResponseError:
    return HttpResponseError(response=FakeResponse(status, code, f"{code} happened", retry_after))


@pytest.mark.parametrize(
    ("status", "code", "fatal"),
    [
        (429, "TooManyRequests", False),
        (500, "InternalServerError", False),
        (503, "ServiceUnavailable", False),
        (409, "AnotherOperationInProgress", False),
        (409, "Conflict", True),
        (409, "PropertyChangeNotAllowed", True),
        (409, "SomeCodeAzureAddsNextYear", True),
        (400, "SomeCodeAzureAddsNextYear", True),
        (409, "StorageAccountIsNotProvisioned", False),
        (502, "SomeCodeAzureAddsNextYear", False),
        (200, "AllocationFailed", False),
        (409, "SkuNotAvailable", True),
        (409, "OperationNotAllowed", True),
        (400, "InvalidParameter", True),
        (403, "RequestDisallowedByPolicy", True),
        (404, "ResourceNotFound", True),
    ],
)
def test_classification(status: int, code: str, fatal: bool) -> None:
    classified = classify(error(status, code))
    assert classified.fatal is fatal
    assert classified.code == code
    assert str(classified) == f"Azure {code}: {code} happened"


def test_retry_after_is_honoured() -> None:
    assert classify(error(429, "TooManyRequests", "7")).retry_after == 7.0
    assert classify(error(429, "TooManyRequests")).retry_after == 15.0


def test_unreachable_azure_is_retried() -> None:
    unreachable = classify(ServiceRequestError("connection refused"))
    assert (unreachable.fatal, unreachable.code) == (False, "Unreachable")


def test_resource_ids_and_names() -> None:
    sub, group, parts = parse_id(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d"
    )
    assert (sub, group, parts) == ("s", "rg", ["galleries", "g", "images", "d"])
    name = storage_account_name("6f1c7d0e-0000-4000-8000-000000000000")
    assert name.isalnum() and name.islower() and 3 <= len(name) <= 24
    assert name == storage_account_name("6f1c7d0e-0000-4000-8000-000000000000")
    assert version_key("1.10.2") > version_key("1.9.30")


class StorageResponse(FakeResponse):
    """An Azure Storage error answer: XML body, the code in x-ms-error-code."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(status, code, "", None)
        self.headers = {"x-ms-error-code": code}
        self.content_type = "application/xml"
        self._body = f"<?xml version='1.0'?><Error><Code>{code}</Code></Error>".encode()


@pytest.mark.parametrize(
    ("status", "code", "fatal"),
    [
        (503, "ServerBusy", False),
        (500, "OperationTimedOut", False),
        (500, "InternalError", False),
        (403, "AuthenticationFailed", True),  # e.g. an expired SAS
        (403, "AuthorizationPermissionMismatch", True),
        (404, "ContainerNotFound", True),
        (409, "LeaseIdMissing", True),
    ],
)
def test_blob_errors_are_classified_by_their_storage_code(
    status: int, code: str, fatal: bool
) -> None:
    """As azure-storage-blob raises them: the code in error_code, the message's first
    line what Storage said (the rest is request IDs and times)."""
    raised = HttpResponseError(
        message=f"{code} said this.\nRequestId:1234\nTime:now\nErrorCode:{code}",
        response=StorageResponse(status, code),
    )
    raised.error_code = code  # type: ignore[attr-defined]
    classified = classify(raised)
    assert (classified.fatal, classified.code) == (fatal, code)
    assert str(classified) == f"Azure {code}: {code} said this."
