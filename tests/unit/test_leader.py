"""When a Lease may be taken over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta

from kiln.leader import expired

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def lease(holder: str | None, renewed: datetime | None, duration: int = 15) -> V1Lease:
    spec = V1LeaseSpec(holder_identity=holder, renew_time=renewed, lease_duration_seconds=duration)
    return V1Lease(metadata=V1ObjectMeta(name="kiln"), spec=spec)


def test_a_lease_renewed_within_its_duration_is_held() -> None:
    assert not expired(lease("a", NOW - timedelta(seconds=14)), NOW)


def test_a_lease_not_renewed_for_its_duration_is_free() -> None:
    assert expired(lease("a", NOW - timedelta(seconds=16)), NOW)


def test_a_released_lease_is_free_at_once() -> None:
    assert expired(lease(None, None), NOW)
    assert expired(lease("", NOW), NOW)
