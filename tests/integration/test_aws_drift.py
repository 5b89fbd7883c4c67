"""Drift on AWS Secrets Manager (a real moto server): AWSCURRENT moved back by hand, the
management tag removed.  Rotations pause until ``adopt`` or an emergency rotation clears it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from rotatord.engine.report import secret_status
from rotatord.errors import DriftDetected
from tests.integration.test_aws_engine import EVERY, FERNET, SECOND, T0, T1, TOKEN, Setup
from tests.servers.moto import MotoServer, assert_sane_labels

HOLD = timedelta(minutes=5)


@pytest.fixture
def setup(moto_server: MotoServer, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(moto_server, tmp_path)
    yield s
    s.close()


def move_current_back(setup: Setup, secret: str) -> tuple[str, str]:
    """Move AWSCURRENT to the AWSPREVIOUS version by hand; return (from, to)."""
    stages = setup.stages(secret)
    current = next(v for v, labels in stages.items() if "AWSCURRENT" in labels)
    previous = next(v for v, labels in stages.items() if "AWSPREVIOUS" in labels)
    setup.sm.update_secret_version_stage(
        SecretId=setup.name(secret), VersionStage="AWSCURRENT", MoveToVersionId=previous,
        RemoveFromVersionId=current,
    )  # fmt: skip
    return current, previous


def test_a_staging_label_moved_by_hand_pauses_rotations_until_adopted(setup: Setup) -> None:
    rt = setup.build()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="drill", now=T0 + SECOND)  # a second version
    due = T0 + SECOND + EVERY
    ours, previous = move_current_back(setup, FERNET)
    assert rt.engine.tick(FERNET, due) == due + HOLD
    assert setup.current(FERNET) == previous  # not written over
    (record,) = rt.journal.drift_all()
    assert (record.reason, record.observed_version, record.baseline_version) == ("label_moved", previous, ours)
    assert secret_status(rt.engine, FERNET, due)["state"] == "paused (drift)"
    with pytest.raises(DriftDetected):
        rt.engine.rollback(FERNET, trigger="cli", reason=None, now=due)
    rt.engine.adopt(FERNET, actor="cli", reason=None, now=due + SECOND)
    assert rt.journal.drift_all() == []
    rt.engine.tick(FERNET, due + SECOND)
    assert rt.journal.latest(FERNET).version == 3  # type: ignore[union-attr]
    assert setup.current(FERNET) not in (ours, previous)
    assert_sane_labels(setup.moto, setup.name(FERNET))


def test_a_removed_tag_is_drift_and_adopt_puts_it_back(setup: Setup) -> None:
    rt = setup.build()
    rt.engine.tick(TOKEN, T0)
    setup.sm.untag_resource(SecretId=setup.name(TOKEN), TagKeys=["managed-by"])
    record = rt.engine.check_drift(TOKEN, T0 + SECOND)
    assert record is not None and record.reason == "marks_removed"
    assert rt.engine.tick(TOKEN, T1) == T1 + HOLD
    rt.engine.adopt(TOKEN, actor="cli", reason=None, now=T1 + SECOND)
    tags = setup.sm.describe_secret(SecretId=setup.name(TOKEN))["Tags"]
    assert {"Key": "managed-by", "Value": "rotatord"} in tags
    rt.engine.tick(TOKEN, T1 + SECOND)
    assert rt.journal.latest(TOKEN).version == 2  # type: ignore[union-attr]
    assert rt.engine.check_drift(TOKEN, T1 + 2 * SECOND) is None


def test_emergency_rotation_clears_a_moved_label(setup: Setup) -> None:
    rt = setup.build()
    rt.engine.tick(TOKEN, T0)
    rt.engine.rotate(TOKEN, trigger="cli", emergency=True, reason="drill", now=T0 + SECOND)
    _ours, previous = move_current_back(setup, TOKEN)
    assert rt.engine.check_drift(TOKEN, T0 + 2 * SECOND) is not None
    row = rt.engine.rotate(TOKEN, trigger="cli", emergency=True, reason="leak", now=T0 + 3 * SECOND)
    assert row.status == "done"
    assert rt.journal.drift_all() == []
    assert setup.current(TOKEN) != previous
    assert rt.engine.check_drift(TOKEN, T0 + 4 * SECOND) is None
    assert_sane_labels(setup.moto, setup.name(TOKEN))
    assert rt.engine.next_due(TOKEN, T0 + 4 * SECOND) == T0 + 3 * SECOND + EVERY
