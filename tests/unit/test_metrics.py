"""Metric names, labels and the ARM operation label, read back from the registry."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from kiln import metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("method", "path", "operation"),
    [
        (
            "put",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
            "PUT Microsoft.Compute/virtualMachines",
        ),
        (
            "GET",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v"
            "/subnets/default?api-version=2024-05-01",
            "GET Microsoft.Network/virtualNetworks/subnets",
        ),
        (
            "GET",
            "/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/operations/1",
            "GET Microsoft.Compute/locations/operations",
        ),
        ("DELETE", "/subscriptions/s/resourcegroups/IT_rg_t_1", "DELETE resourceGroups"),
        ("GET", "/subscriptions/s", "GET subscriptions"),
    ],
)
def test_the_operation_label_names_the_resource_type_never_a_resource(
    method: str, path: str, operation: str
) -> None:
    assert metrics.arm_operation(method, path) == operation


def test_a_429_counts_as_a_request_and_as_throttled() -> None:
    op = "PUT Microsoft.Test/things"
    before = sample("kiln_cloud_api_requests_total", operation=op, code="429")
    throttled = sample("kiln_cloud_api_throttled_total")
    metrics.cloud_request(op, "429")
    metrics.cloud_request(op, "200")
    assert sample("kiln_cloud_api_requests_total", operation=op, code="429") == before + 1
    assert sample("kiln_cloud_api_throttled_total") == throttled + 1


def test_step_durations_and_queue_waits_come_from_the_recorded_times() -> None:
    count = sample("kiln_build_step_duration_seconds_count", provider="local", step="test")
    total = sample("kiln_build_step_duration_seconds_sum", provider="local", step="test")
    metrics.step_ended("local", "test", "2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z")
    metrics.step_ended("local", "test", None, "2026-01-01T00:01:30Z")  # never started
    assert sample("kiln_build_step_duration_seconds_count", provider="local", step="test") == (
        count + 1
    )
    assert sample("kiln_build_step_duration_seconds_sum", provider="local", step="test") == (
        total + 90
    )
    waits = sample("kiln_build_queue_wait_seconds_count")
    metrics.run_started("2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z")
    assert sample("kiln_build_queue_wait_seconds_count") == waits + 1


def test_a_run_without_a_provider_counts_as_unknown() -> None:
    before = sample("kiln_build_runs_total", provider="unknown", result="Canceled")
    metrics.run_ended(None, "Canceled")
    assert sample("kiln_build_runs_total", provider="unknown", result="Canceled") == before + 1


def test_in_flight_goes_up_while_a_run_builds_and_down_after() -> None:
    with metrics.in_flight("azure").track_inprogress():
        inside = sample("kiln_build_runs_in_flight", provider="azure")
    assert sample("kiln_build_runs_in_flight", provider="azure") == inside - 1
