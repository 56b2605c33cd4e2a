"""docs/troubleshooting.md names every condition reason, event reason and metric Kiln has."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from kiln import metrics, reasons

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_reason_is_documented() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    constants = {k: v for k, v in vars(reasons).items() if k.isupper()}
    missing = [value for value in constants.values() if f"`{value}`" not in text]
    assert missing == []


def test_every_kiln_metric_is_documented() -> None:
    text = (DOCS / "troubleshooting.md").read_text()
    assert metrics.BUILD_RUNS  # the module registered its metrics
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("kiln_")}
    exposed = {f"{n}_total" if not n.endswith(("_seconds", "_in_flight")) else n for n in names}
    assert exposed == {
        "kiln_build_runs_total",
        "kiln_build_runs_in_flight",
        "kiln_build_step_duration_seconds",
        "kiln_build_queue_wait_seconds",
        "kiln_cloud_api_requests_total",
        "kiln_cloud_api_throttled_total",
        "kiln_reconcile_errors_total",
    }
    assert [name for name in exposed if f"`{name}`" not in text] == []
