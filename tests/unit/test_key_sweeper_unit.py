"""Which key Secrets belong to which run, decided from their labels and annotations."""

from __future__ import annotations

from kiln.reconcile.keysweeper import is_orphan, owner_of


def secret(labels: dict[str, str], annotations: dict[str, str]) -> dict:
    return {"metadata": {"name": "s", "labels": labels, "annotations": annotations}}


def test_owner_needs_the_uid_label_and_both_annotations() -> None:
    names = {"kiln.dev/run-namespace": "team", "kiln.dev/run-name": "r"}
    assert owner_of(secret({"kiln.dev/run-uid": "u"}, names)) == ("team", "r", "u")
    assert owner_of(secret({"kiln.dev/run-uid": "u"}, {"kiln.dev/run-name": "r"})) is None
    assert owner_of(secret({}, names)) is None


def test_a_run_that_is_gone_or_replaced_orphans_its_secret() -> None:
    assert is_orphan(None, "u")
    assert is_orphan({"metadata": {"uid": "other"}}, "u")
    assert not is_orphan({"metadata": {"uid": "u"}}, "u")
