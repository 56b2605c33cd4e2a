"""Every condition type and reason Kiln writes, in one place (CamelCase, as kstatus expects)."""

import re

# Condition types
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
ACCEPTED = "Accepted"
SUCCEEDED = "Succeeded"

# Template reasons
SPEC_VALID = "SpecValid"
INVALID_SPEC = "InvalidSpec"
IMAGE_BUILT = "ImageBuilt"
BUILDING = "Building"
BUILD_FAILED = "BuildFailed"

# Run reasons
WAITING_FOR_ACTIVE_RUN = "WaitingForActiveRun"
TEMPLATE_NOT_FOUND = "TemplateNotFound"
TEMPLATE_INVALID = "TemplateInvalid"
RUNNING = "Running"
CANCELED = "Canceled"
FAILED = "Failed"
PARTIALLY_SUCCEEDED = "PartiallySucceeded"
TIMED_OUT = "TimedOut"
CUSTOMIZER_FAILED = "CustomizerFailed"
VALIDATION_FAILED = "ValidationFailed"
DISTRIBUTION_FAILED = "DistributionFailed"
PROVIDER_ERROR = "ProviderError"
WAITING_FOR_SLOT = "WaitingForBuildSlot"
RETRYING = "Retrying"  # + the cloud's error code, e.g. RetryingTooManyRequests
CLEANUP_FAILED = "CleanupFailed"  # also a condition type: what cleanup could not remove

# Event reasons (besides the run reasons above, which failed steps also post, and the
# final runState, which the run-ended event carries): a stable set, documented in
# docs/troubleshooting.md.
EVENT_QUEUED = "Queued"
EVENT_STARTED = "Started"
EVENT_STEP_SUCCEEDED = "StepSucceeded"
EVENT_RETRYING = "Retrying"
EVENT_CLEANUP_FAILED = "CleanupFailed"
EVENT_OUTPUTS_EXPORTED = "OutputsExported"
EVENT_EXPORT_FAILED = "ExportFailed"


def retry_reason(code: str) -> str:
    """A CamelCase condition reason naming the cloud's code: RetryingTooManyRequests."""
    words = re.findall(r"[A-Za-z0-9]+", code)
    return RETRYING + "".join(w[:1].upper() + w[1:] for w in words)
