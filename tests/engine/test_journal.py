"""The state database: one active rotation per secret, intent/result steps, the outbox, the audit head."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from rotatord.audit import AuditLog
from rotatord.engine.journal import Journal, RotationRow
from rotatord.errors import RotationInProgress, StateError
from rotatord.interfaces import Event
from tests.engine.conftest import FERNET, T0, HarnessFactory, fernet_secret, materials


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def journal(url: str) -> Iterator[Journal]:
    j = Journal(url)
    j.create()
    yield j
    j.close()


def start(j: Journal, secret: str = FERNET, version: int = 1, now: datetime = T0) -> RotationRow:
    return j.start(
        secret=secret, kind="fernet", version=version, phase="pending", trigger="schedule",
        emergency=False, reason=None, now=now,
    )  # fmt: skip


def event(rotation_id: int, etype: str = "key.staged") -> Event:
    return Event(
        type=etype, secret="bot-db", rotation_id=rotation_id, version=1, phase="staged", backend="local",
        path="bots/bot/db-key", backend_version="3", occurred_at=T0, detail={"key": "v1"},
    )  # fmt: skip


def outbox_rows(url: str) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        rows = conn.execute("SELECT consumer, event_type, payload FROM outbox ORDER BY id").fetchall()
    finally:
        conn.close()
    return [(str(c), str(e), str(p)) for c, e, p in rows]


# -- one active rotation per secret --------------------------------------------------------------


def test_a_second_active_rotation_of_one_secret_is_refused(journal: Journal) -> None:
    first = start(journal)
    with pytest.raises(RotationInProgress, match=r"version 1, phase pending"):
        start(journal, version=2)
    other = start(journal, secret="bot-api")  # other secrets are independent
    assert other.active
    journal.update(first.id, T0, status="done", finished_at=T0)
    second = start(journal, version=2)
    assert second.version == 2
    assert journal.active("bot-db") == second
    assert [r.version for r in journal.history("bot-db")] == [2, 1]


def test_the_database_refuses_two_active_rotations_across_journal_objects(url: str) -> None:
    journals = [Journal(url) for _ in range(6)]
    journals[0].create()
    barrier = threading.Barrier(len(journals))
    won: list[int] = []
    refused: list[int] = []

    def race(i: int, j: Journal) -> None:
        barrier.wait()
        try:
            start(j, version=1)
            won.append(i)
        except RotationInProgress:
            refused.append(i)

    threads = [threading.Thread(target=race, args=(i, j)) for i, j in enumerate(journals)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert len(won) == 1
        assert len(refused) == len(journals) - 1
        assert len(journals[1].all_active()) == 1
        with pytest.raises(RotationInProgress):
            start(journals[2], version=2)
    finally:
        for j in journals:
            j.close()


# -- steps and the outbox ------------------------------------------------------------------------


def test_begin_step_records_the_intent_once_and_returns_it_again(journal: Journal) -> None:
    rot = start(journal)
    intent = journal.begin_step(rot.id, "stage", T0)
    again = journal.begin_step(rot.id, "stage", T0 + timedelta(hours=1))
    assert intent.state == "intent"
    assert again == intent  # same request id, same start time: a resumed step is the same step
    assert len(intent.request_id) >= 32
    other = journal.begin_step(rot.id, "promote", T0)
    assert other.request_id != intent.request_id


def test_complete_step_moves_the_rotation_and_queues_one_event_per_consumer(journal: Journal, url: str) -> None:
    rot = start(journal)
    journal.update(rot.id, T0, error="stage: boom", attempts=3, next_attempt_at=T0 + timedelta(minutes=1))
    journal.begin_step(rot.id, "stage", T0)
    at = T0 + timedelta(minutes=2)
    after = journal.complete_step(
        rot.id, "stage", at, {"key": "v1"}, {"phase": "staged", "new_key": "v1"},
        [("support-bot", event(rot.id)), ("billing-bot", event(rot.id))],
    )  # fmt: skip
    assert (after.phase, after.new_key, after.updated_at) == ("staged", "v1", at)
    assert (after.error, after.attempts, after.next_attempt_at) == (None, 0, None)
    step = journal.step(rot.id, "stage")
    assert step is not None
    assert (step.state, step.finished_at, step.result) == ("done", at, {"key": "v1"})
    rows = outbox_rows(url)
    assert [(c, e) for c, e, _p in rows] == [("support-bot", "key.staged"), ("billing-bot", "key.staged")]
    payload = json.loads(rows[0][2])
    assert payload["type"] == "key.staged"
    assert payload["data"]["rotation_id"] == rot.id
    assert payload["data"]["path"] == "bots/bot/db-key"
    assert payload["data"]["key"] == "v1"
    assert journal.pending_deliveries() == 2


def test_complete_step_is_one_transaction(journal: Journal, url: str) -> None:
    """If queueing an event fails, the step stays at its intent and the phase does not move."""
    rot = start(journal)
    journal.begin_step(rot.id, "stage", T0)
    broken = [("support-bot", event(rot.id)), (None, event(rot.id))]  # consumer is NOT NULL
    with pytest.raises(IntegrityError):
        journal.complete_step(rot.id, "stage", T0, {"key": "v1"}, {"phase": "staged"}, broken)  # type: ignore[arg-type]
    step = journal.step(rot.id, "stage")
    assert step is not None
    assert step.state == "intent"
    assert journal.get(rot.id).phase == "pending"
    assert outbox_rows(url) == []


def test_engine_queues_each_phase_event_for_every_consumer(make_harness: HarnessFactory) -> None:
    h = make_harness(fernet_secret(consumers=("support-bot", "billing-bot")), consumers=("support-bot", "billing-bot"))
    rt = h.build()
    secrets: set[str] = set()
    rt.engine.on_change = lambda _name: secrets.update(materials(h.doc(FERNET)))
    rt.engine.tick(FERNET, T0)
    t1 = T0 + timedelta(days=30)
    promote_at = rt.engine.tick(FERNET, t1)
    retire_at = rt.engine.tick(FERNET, promote_at)
    rt.engine.tick(FERNET, retire_at)
    second = rt.journal.latest(FERNET)
    assert second is not None
    rows = h.sql("SELECT consumer, event_type, created_at, payload FROM outbox WHERE rotation_id = ? ORDER BY id",
                 second.id)  # fmt: skip
    assert [(c, e) for c, e, _t, _p in rows] == [
        ("support-bot", "key.staged"), ("billing-bot", "key.staged"),
        ("support-bot", "key.promoted"), ("billing-bot", "key.promoted"),
        ("support-bot", "key.retired"), ("billing-bot", "key.retired"),
    ]  # fmt: skip
    data = [json.loads(p)["data"] for _c, _e, _t, p in rows]
    assert {(d["version"], d["backend"], d["path"]) for d in data} == {(2, "local", "bots/bot/db-key")}
    assert [d["phase"] for d in data[::2]] == ["staged", "promoted", "retired"]
    assert data[-1]["backend_version"] == h.versions(FERNET)[-1].version
    assert secrets
    assert not any(s in p for s in secrets for _c, _e, _t, p in rows)


# -- audit head and timestamps -------------------------------------------------------------------


def test_audit_head_is_saved_and_loaded(journal: Journal) -> None:
    assert journal.load() is None
    journal.save(1, "a" * 64)
    assert journal.load() == (1, "a" * 64)
    journal.save(2, "b" * 64)
    assert journal.load() == (2, "b" * 64)


def test_audit_log_chained_to_the_journal_head_verifies_after_a_lifecycle(make_harness: HarnessFactory) -> None:
    h = make_harness(fernet_secret())
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="drill", now=T0 + timedelta(hours=1))
    lines = rt.audit.path.read_bytes().splitlines()
    head = rt.journal.load()
    assert head is not None
    assert head[0] == len(lines) >= 8
    # A fresh journal object (another process) sees the same head, and the chain checks out.
    other = Journal(h.settings.daemon.database_url)
    try:
        report = AuditLog(rt.audit.path, other).verify()
        assert report.ok, report.problems
        assert report.records == len(lines)
    finally:
        other.close()


def test_datetimes_round_trip_as_aware_utc(journal: Journal) -> None:
    local = datetime(2025, 3, 30, 1, 59, 59, 123456, tzinfo=timezone(timedelta(hours=2)))
    rot = start(journal, now=local)
    row = journal.get(rot.id)
    assert row.started_at == local
    assert row.started_at.tzinfo == UTC
    assert row.started_at.microsecond == 123456
    later = journal.update(rot.id, local, promote_after=local + timedelta(minutes=10))
    assert later.promote_after == datetime(2025, 3, 30, 0, 9, 59, 123456, tzinfo=UTC)
    step = journal.begin_step(rot.id, "stage", local)
    assert step.started_at == local
    assert step.started_at.tzinfo == UTC


def test_naive_datetimes_are_refused(journal: Journal) -> None:
    with pytest.raises(ValueError, match="naive"):
        start(journal, now=datetime(2025, 1, 1, 12, 0))
    assert journal.all_active() == []


def test_unusable_state_database_raises_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="unusable"):
        Journal("nosuchdialect://x")
    broken = Journal(f"sqlite:///{tmp_path / 'missing-dir' / 'state.db'}")
    try:
        with pytest.raises(StateError, match=r"cannot (initialise|create)"):
            broken.create()
    finally:
        broken.close()
