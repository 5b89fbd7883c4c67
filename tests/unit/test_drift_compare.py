"""engine.drift.compare: each difference between a baseline and an observation, by reason code."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from rotatord.engine.drift import compare
from rotatord.engine.drift_store import Baseline
from rotatord.interfaces import Observed

AT = datetime(2025, 1, 6, tzinfo=UTC)
BASE = Baseline("s", "v2", "d2", True, {"AWSCURRENT": "v2", "AWSPREVIOUS": "v1"}, frozenset({"v0"}), "write", AT)
SAME = Observed("v2", "d2", marked=True, labels={"AWSCURRENT": "v2", "AWSPREVIOUS": "v1"}, deleted=frozenset({"v0"}))


def reasons(seen: Observed | None, base: Baseline = BASE) -> list[str]:
    return [f.reason for f in compare(base, seen)]


def test_an_identical_observation_is_no_drift() -> None:
    assert compare(BASE, SAME) == []


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        (None, ["secret_deleted"]),
        (Observed("v2", None, unreadable="destroyed", labels=SAME.labels, deleted=SAME.deleted), ["version_destroyed"]),
        (Observed("v2", None, unreadable="deleted", labels=SAME.labels, deleted=SAME.deleted), ["version_deleted"]),
        (Observed("v3", None, unreadable="invalid", labels={"AWSCURRENT": "v3", "AWSPREVIOUS": "v2"}),
         ["document_invalid", "labels_changed"]),
        (Observed("v1", "d1", labels={"AWSCURRENT": "v1", "AWSPREVIOUS": "v2"}, deleted=SAME.deleted),
         ["label_moved"]),
        (Observed("v3", "d3", labels={"AWSCURRENT": "v3", "AWSPREVIOUS": "v2"}, deleted=SAME.deleted),
         ["version_changed", "labels_changed"]),
        (Observed("v2", "dX", labels=SAME.labels, deleted=SAME.deleted), ["document_changed"]),
        (Observed("v2", "d2", marked=False, labels=SAME.labels, deleted=SAME.deleted), ["marks_removed"]),
        (Observed("v2", "d2", labels=SAME.labels, deleted=frozenset({"v0", "v1"})), ["version_destroyed"]),
        (Observed("v2", "d2", labels={"AWSCURRENT": "v2", "AWSPREVIOUS": "v1", "mine": "v1"}, deleted=SAME.deleted),
         ["labels_changed"]),
    ],
)  # fmt: skip
def test_each_difference_has_its_reason(seen: Observed | None, expected: list[str]) -> None:
    assert reasons(seen) == expected


def test_versions_pruned_by_the_backend_are_not_drift() -> None:
    assert reasons(Observed("v2", "d2", labels=SAME.labels, deleted=frozenset())) == []


def test_messages_name_versions() -> None:
    (finding,) = compare(BASE, Observed("v9", "d9", labels=None, deleted=SAME.deleted))
    assert finding.message == "version v9 is current, rotatord wrote v2"
