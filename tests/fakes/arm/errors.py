"""ARM error bodies and the status codes Azure answers them with.

Handlers raise ArmError; the server turns it into `{"error": {"code", "message"}}` so the
SDK raises HttpResponseError exactly as it would against Azure.
"""

from __future__ import annotations

from typing import Any

NOT_FOUND_HINT = "For more details please go to https://aka.ms/ARMResourceNotFoundFix"


class ArmError(Exception):
    """An error ARM would answer with: HTTP status, error code, message, optional target."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        target: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.target = target
        self.details = details
        self.headers = headers or {}

    def error(self) -> dict[str, Any]:
        """The inner `error` object (also used inside failed operation status bodies)."""
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target:
            err["target"] = self.target
        if self.details:
            err["details"] = self.details
        return err

    def body(self) -> dict[str, Any]:
        return {"error": self.error()}


def resource_not_found(type_name: str, name: str, resource_group: str) -> ArmError:
    """404 the way ARM's front door answers a GET of a missing resource."""
    return ArmError(
        404,
        "ResourceNotFound",
        f"The Resource '{type_name}/{name}' under resource group '{resource_group}' was not "
        f"found. {NOT_FOUND_HINT}",
    )


def resource_group_not_found(name: str) -> ArmError:
    return ArmError(404, "ResourceGroupNotFound", f"Resource group '{name}' could not be found.")


def invalid_parameter(message: str, target: str | None = None, status: int = 400) -> ArmError:
    return ArmError(status, "InvalidParameter", message, target=target)


def missing_parameter(path: str) -> ArmError:
    """Compute's wording for a required property that is absent."""
    return ArmError(
        400, "InvalidParameter", f"Required parameter '{path}' is missing (null).", target=path
    )


def invalid_request_content(message: str) -> ArmError:
    return ArmError(
        400,
        "InvalidRequestContent",
        f"The request content was invalid and could not be deserialized: '{message}'.",
    )


def another_operation_in_progress(resource_id: str, status_url: str | None = None) -> ArmError:
    message = f"Another operation on this or dependent resource is in progress ({resource_id})."
    if status_url:
        message += f" To retrieve status of the operation use uri: {status_url}."
    return ArmError(409, "AnotherOperationInProgress", message)


def invalid_resource_reference(referenced: str, referrer: str) -> ArmError:
    """Network RP's 400 for a reference to a resource that does not exist (or is elsewhere)."""
    return ArmError(
        400,
        "InvalidResourceReference",
        f"Resource {referenced} referenced by resource {referrer} was not found. Please make "
        "sure that the referenced resource exists, and that both resources are in the same "
        "region.",
    )
