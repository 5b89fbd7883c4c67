"""Drift and tamper detection in process, on the real file backend: a version rotatord did not
write, a tampered version file, a write that landed just before a crash.  Drift is reported by
log, audit record, outbox event (to the secret's consumers and the security consumers) and
status; the secret's rotations pause; ``adopt`` and ``rotate --emergency`` clear it.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import timedelta

import pytest
from sqlalchemy import event

from rotatord.config.model import NotifySettings
from rotatord.daemon.runtime import Runtime
from rotatord.document import FernetRing, digest
from rotatord.engine.drift_store import DriftLedger
from rotatord.engine.report import secret_status
from rotatord.errors import DocumentInvalid, DriftDetected
from tests.engine.conftest import EVERY, FERNET, PROPAGATION, SECOND, T0, Harness, HarnessFactory, materials
from tests.helpers import assert_no_material

T1 = T0 + EVERY
PROMOTE_AT = T1 + PROPAGATION
HOLD = timedelta(minutes=5)


@pytest.fixture
def harness(make_harness: HarnessFactory) -> Harness:
    """The default secrets, consumer ``bot`` of every secret and ``sec`` as a security consumer."""
    h = make_harness(consumers=("bot", "sec"))
    h.settings = h.settings.model_copy(update={"notify": NotifySettings(security_consumers=("sec",))})
    return h


def intrude(h: Harness, name: str = FERNET) -> str:
    """Write a new version by hand, as someone with backend access would; return its version."""
    current = h.reader.read(h.secret(name).path)
    assert current is not None
    changed = replace(current.document, updated_at=current.document.updated_at + SECOND)
    return h.reader.write(h.secret(name).path, changed, expected=current.version, request_id="intruder")


def drift_events(h: Harness) -> list[tuple[str, dict[str, object]]]:
    rows = h.sql("SELECT consumer, payload FROM outbox WHERE event_type = 'secret.drift_detected' ORDER BY id")
    return [(str(c), json.loads(p)) for c, p in rows]


def audit(rt: Runtime) -> list[dict[str, object]]:
    return [json.loads(line) for line in rt.audit.path.read_text().splitlines()]


def test_a_version_written_by_hand_is_reported_everywhere_and_pauses_rotations(
    harness: Harness, log_stream: io.StringIO
) -> None:
    rt = harness.build()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    ours = harness.versions(FERNET)[-1].version
    theirs = intrude(harness)

    assert rt.engine.tick(FERNET, T1) == T1 + HOLD  # due, but paused: no rotation starts
    assert rt.journal.latest(FERNET).version == 1  # type: ignore[union-attr]
    assert [v.version for v in harness.versions(FERNET)] == [ours, theirs]

    (record,) = rt.journal.drift_all()
    assert (record.secret, record.reason) == (FERNET, "version_changed")
    assert (record.observed_version, record.baseline_version) == (theirs, ours)
    events = drift_events(harness)
    assert sorted(c for c, _ in events) == ["bot", "sec"]
    data = events[0][1]["data"]
    assert isinstance(data, dict)
    assert (data["secret"], data["reason"], data["backend_version"]) == (FERNET, "version_changed", theirs)
    assert next(e for e in audit(rt) if e["event"] == "secret.drift_detected")["reason"] == "version_changed"
    warnings = [json.loads(line) for line in log_stream.getvalue().splitlines() if '"level":"warning"' in line]
    assert any(w.get("secret") == FERNET and w.get("reason") == "version_changed" for w in warnings)
    status = secret_status(rt.engine, FERNET, T1)
    assert status["state"] == "paused (drift)"
    assert status["drift"]["reason"] == "version_changed"

    # Ticks go on holding, the drift is reported once, and an operator's plain rotate is refused.
    assert rt.engine.tick(FERNET, T1 + HOLD) == T1 + 2 * HOLD
    assert len(rt.journal.drift_all()) == 1 and len(drift_events(harness)) == 2
    with pytest.raises(DriftDetected, match="rotatord adopt bot-db"):
        rt.engine.rotate(FERNET, trigger="cli", emergency=False, reason=None, now=T1 + HOLD)
    assert [v.version for v in harness.versions(FERNET)] == [ours, theirs]

    result = rt.engine.adopt(FERNET, actor="cli", reason="planned change", now=T1 + 2 * HOLD)
    assert result == {"name": FERNET, "backend_version": theirs, "drift_cleared": True, "reason": "version_changed"}
    assert rt.journal.drift_all() == []
    assert secret_status(rt.engine, FERNET, T1 + 2 * HOLD)["drift"] is None
    assert any(e["event"] == "secret.drift_resolved" and e["resolution"] == "adopt" for e in audit(rt))
    rt.engine.tick(FERNET, T1 + 2 * HOLD)  # the rotation starts now, on top of the adopted version
    assert rt.journal.latest(FERNET).version == 2  # type: ignore[union-attr]
    assert harness.versions(FERNET)[-2].version == theirs
    assert_no_material(
        materials(harness.doc(FERNET)),
        files=[rt.audit.path, harness.db_path],
        texts=[log_stream.getvalue(), json.dumps([p for _, p in drift_events(harness)])],
    )


def test_a_step_in_progress_holds_and_writes_nothing(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT  # staged
    theirs = intrude(harness)
    assert rt.engine.tick(FERNET, PROMOTE_AT) == PROMOTE_AT + HOLD
    rot = rt.journal.active(FERNET)
    assert rot is not None and rot.phase == "staged"
    assert harness.versions(FERNET)[-1].version == theirs
    rt.engine.adopt(FERNET, actor="cli", reason=None, now=PROMOTE_AT + HOLD)
    rt.engine.tick(FERNET, PROMOTE_AT + HOLD)
    assert rt.journal.get(rot.id).phase in ("promoted", "reencrypted")


def test_emergency_rotation_clears_drift_and_rotates_on_top_of_their_version(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    theirs = intrude(harness)
    assert rt.engine.check_drift(FERNET, T0 + SECOND) is not None
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="leak", now=T0 + 2 * SECOND)
    assert rt.journal.drift_all() == []
    assert row.emergency and row.status == "done"
    versions = [v.version for v in harness.versions(FERNET)]
    assert versions.index(theirs) < len(versions) - 1  # written on top of their version
    assert harness.ring().primary == "v2"
    resolved = DriftLedger(rt.journal).history(FERNET)[0]
    assert (resolved.resolution, resolved.resolved_by) == ("emergency", "cli")
    assert rt.engine.check_drift(FERNET, T0 + 3 * SECOND) is None  # re-based on what it wrote


def test_a_tampered_version_file_is_drift_and_adopt_refuses_it_changing_nothing(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    path = harness.secret(FERNET).path
    version = harness.versions(FERNET)[-1].version
    blob = harness.backend_settings.directory / path / f"v{int(version):08d}.enc"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    record = rt.engine.check_drift(FERNET, T0 + SECOND)
    assert record is not None and record.reason == "document_invalid"
    baseline = DriftLedger(rt.journal).baseline(FERNET)
    with pytest.raises(DocumentInvalid, match="nothing was changed"):
        rt.engine.adopt(FERNET, actor="cli", reason=None, now=T0 + 2 * SECOND)
    with pytest.raises(DocumentInvalid):  # an emergency cannot rebuild a ring it cannot read
        rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="drill", now=T0 + 2 * SECOND)
    assert [d.id for d in rt.journal.drift_all()] == [record.id]
    assert DriftLedger(rt.journal).baseline(FERNET) == baseline
    assert rt.journal.latest(FERNET).version == 1  # type: ignore[union-attr]
    assert blob.read_bytes() == bytes(data)


def test_own_write_that_landed_before_a_crash_is_not_drift(harness: Harness) -> None:
    """The journal records the digest before writing: a version whose baseline was never
    recorded (killed right after the write) is recognised as rotatord's own."""
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    staged = harness.versions(FERNET)[-1].version
    ring = harness.ring()
    assert isinstance(ring, FernetRing)
    # Stage the crash: the baseline still names the first version, the pending write this one.
    first = harness.versions(FERNET)[0].version
    harness.sql("UPDATE baselines SET version = ?, digest = 'x' WHERE secret = ?", first, FERNET)
    harness.sql(
        "INSERT INTO pending_writes (secret, request_id, digest, recorded_at) VALUES (?, 'r', ?, ?)",
        FERNET, digest(ring), "2025-02-05 03:00:00.000000",
    )  # fmt: skip
    assert rt.engine.check_drift(FERNET, PROMOTE_AT) is None
    baseline = DriftLedger(rt.journal).baseline(FERNET)
    assert baseline is not None and (baseline.version, baseline.digest) == (staged, digest(ring))
    assert DriftLedger(rt.journal).pending(FERNET) is None


def test_a_state_database_without_baselines_starts_from_the_journal(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    harness.sql("DELETE FROM baselines")
    assert rt.engine.check_drift(FERNET, T0 + SECOND) is None
    assert DriftLedger(rt.journal).baseline(FERNET) is not None
    harness.sql("DELETE FROM baselines")
    intrude(harness)  # not the version the journal recorded: drift, even without a baseline
    record = rt.engine.check_drift(FERNET, T0 + 2 * SECOND)
    assert record is not None and record.reason == "version_changed"


def test_the_write_itself_refuses_a_version_it_did_not_expect(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second line of defence: a change landing between the pre-step check and the step's own
    read is caught by the step's check-and-set path, never written over."""
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    theirs = intrude(harness)
    monkeypatch.setattr(rt.engine, "_held", lambda *args: None)  # as if the change came just after the check
    rt.engine.tick(FERNET, PROMOTE_AT)
    rot = rt.journal.active(FERNET)
    assert rot is not None and rot.phase == "staged"
    assert rot.error is not None and rot.error.startswith("promote: ") and "drift detected" in rot.error
    assert harness.versions(FERNET)[-1].version == theirs
    assert [d.reason for d in rt.journal.drift_all()] == ["version_changed"]


def test_a_secret_deleted_from_the_backend_is_drift(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    for database in (False, True):  # with a baseline, and from a state database without one
        if database:
            harness.sql("UPDATE drift SET resolved_at = '2025-01-06 03:00:00.000000'")
            harness.sql("DELETE FROM baselines")
        directory = harness.backend_settings.directory / harness.secret(FERNET).path
        (directory / "current").rename(directory / "moved")
        record = rt.engine.check_drift(FERNET, T0 + SECOND)
        assert record is not None and record.reason == "secret_deleted"
        (directory / "moved").rename(directory / "current")


def test_the_sweep_snapshot_costs_no_query_when_nothing_changed_and_still_sees_drift(harness: Harness) -> None:
    """The periodic sweep reads every baseline once; a secret still matching it needs no query,
    one that changed (or whose baseline moved since) gets the full check."""
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    snapshot = rt.engine.drift.snapshot()
    assert FERNET in snapshot.baselines and not snapshot.open
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(rt.journal._engine, "before_cursor_execute", listener)
    try:
        assert rt.engine.drift.unchanged(harness.secret(FERNET), rt.backends["local"], snapshot)
        assert rt.engine.check_drift(FERNET, T0 + SECOND, snapshot) is None
    finally:
        event.remove(rt.journal._engine, "before_cursor_execute", listener)
    assert statements == []  # answered from the snapshot and the backend alone
    intrude(harness)
    assert not rt.engine.drift.unchanged(harness.secret(FERNET), rt.backends["local"], snapshot)
    record = rt.engine.check_drift(FERNET, T0 + 2 * SECOND, snapshot)
    assert record is not None and record.reason == "version_changed"
    later = rt.engine.drift.snapshot()
    assert later.open == {FERNET}
    assert rt.engine.check_drift(FERNET, T0 + 3 * SECOND, later) == record  # still open, full check
