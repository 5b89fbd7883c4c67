"""Emergency rotations: the blast-radius report (exposure, live counts, consumers, audit), the
priority of emergency re-encryption over routine passes, and bad input that changes nothing."""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from rotatord.crypto.keyring import multifernet
from rotatord.engine.priority import PriorityGate
from rotatord.engine.report import secret_status
from rotatord.errors import RollbackImpossible, UsageError
from tests.engine.conftest import (
    CONSUMER,
    EVERY,
    FERNET,
    PROPAGATION,
    SECOND,
    T0,
    TOKEN,
    Harness,
    HarnessFactory,
    bot_db_store,
    fernet_secret,
    materials,
)
from tests.helpers import assert_no_material, unwritable

ROWS = 30


def _blast_records(h: Harness) -> list[dict[str, object]]:
    lines = (h.settings.daemon.state_dir / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "emergency.blast_radius"]


def test_emergency_report_counts_exposure_and_ends_clean(make_harness: HarnessFactory, tmp_path: Path) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,)))
    rt = h.build()
    rt.engine.tick(FERNET, T0)  # v1 created
    v1 = h.ring()
    seen = materials(v1)
    with sqlite3.connect(db) as conn:
        old = multifernet(v1)
        conn.executemany("INSERT INTO msgs VALUES (?, ?)", [(i, old.encrypt(b"r%d" % i).decode()) for i in range(ROWS)])
        conn.execute("INSERT INTO msgs VALUES (999, 'gAAAAAB-unreadable')")

    at = T0 + timedelta(days=1)
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="laptop stolen", now=at)

    assert (row.phase, row.status) == ("retired", "done")  # grace is 7 days: skipped; the census is not
    assert [k.id for k in h.ring().keys] == ["v2"]
    seen |= materials(h.ring())
    report = secret_status(rt.engine, FERNET, at)["blast_radius"]
    assert report["compromised_key"] == "v1" and report["new_key"] == "v2"
    assert (report["state"], report["reason"], report["remaining"]) == ("done", "laptop stolen", 0)
    [s] = report["stores"]
    assert (s["exposed"], s["remaining"], s["rewritten"], s["quarantined"]) == (ROWS, 0, ROWS, 1)
    assert report["retired_at"] is not None
    assert report["unacknowledged"] == [CONSUMER]  # the outbox was never delivered in this test
    assert report["consumers"][0]["delivery"] == "pending"

    records = _blast_records(h)
    stages = [r["stage"] for r in records]
    assert stages[0] == "opened" and stages[-1] == "closed"
    assert stages.count("phase") == 3  # staged, promoted, reencrypted
    opened = records[0]["report"]
    assert isinstance(opened, dict)
    assert opened["compromised_key"] == "v1" and opened["phase"] == "pending"
    reports = [r["report"] for r in records if isinstance(r["report"], dict)]
    promoted = next(r for r in reports if r["phase"] == "promoted")
    assert isinstance(promoted, dict)
    assert promoted["stores"][0]["exposed"] == ROWS and promoted["stores"][0]["remaining"] == ROWS
    closed = records[-1]["report"]
    assert isinstance(closed, dict)
    assert closed["remaining"] == 0 and closed["retired_at"] is not None
    assert rt.audit.verify().ok
    wal = h.db_path.with_name(h.db_path.name + "-wal")  # recent writes are still in the WAL
    assert_no_material(
        seen, files=[h.settings.daemon.state_dir / "audit.log", h.db_path, *([wal] if wal.exists() else [])]
    )


def test_emergency_token_report_says_when_the_old_token_was_revoked(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(TOKEN, T0)
    old = harness.credentials().current.id
    rt.engine.rotate(TOKEN, trigger="cli", emergency=True, reason="token in a log", now=T0 + SECOND)
    report = secret_status(rt.engine, TOKEN, T0 + SECOND)["blast_radius"]
    assert report["compromised_key"] == old
    assert report["revoked_at"] is not None and report["state"] == "done"
    assert harness.credentials().previous is None
    assert report["consumers"][0]["event"] == "token.issued"


def test_emergency_declared_after_the_promotion_counts_the_stale_writes(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,), consumers=()), consumers=())
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    v1 = multifernet(h.ring())
    rt.engine.tick(FERNET, T0 + EVERY)  # staged v2
    rt.engine.tick(FERNET, T0 + EVERY + PROPAGATION)  # promoted, re-encrypted; v1 waits for the grace
    assert h.sql("SELECT phase FROM rotations WHERE version = 2") == [("reencrypted",)]
    with sqlite3.connect(db) as conn:  # a bot with a stale ring keeps writing under v1
        conn.executemany("INSERT INTO msgs VALUES (?, ?)", [(i, v1.encrypt(b"x").decode()) for i in range(5)])
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="leak", now=T0 + EVERY + PROPAGATION + SECOND)
    assert (row.phase, row.status) == ("retired", "done")
    assert [k.id for k in h.ring().keys] == ["v2"]
    report = rt.engine.blast_report(row)
    assert report["compromised_key"] == "v1"
    assert report["stores"][0]["exposed"] == 5 and report["remaining"] == 0
    assert report["consumers"] == [] and report["unacknowledged"] == []


def test_emergency_needs_a_reason_and_changes_nothing_without_one(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    before = (harness.sql("SELECT * FROM rotations"), harness.versions(FERNET))
    for reason in (None, "", "   "):
        with pytest.raises(UsageError, match="needs a reason"):
            rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason=reason, now=T0 + SECOND)
    assert (harness.sql("SELECT * FROM rotations"), harness.versions(FERNET)) == before


def test_rollback_after_an_emergency_is_impossible_once_the_key_is_gone(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="leak", now=T0 + SECOND)
    before = (harness.sql("SELECT * FROM rotations"), harness.sql("SELECT * FROM steps"), harness.versions(FERNET))
    with pytest.raises(RollbackImpossible, match="no longer in the ring"):
        rt.engine.rollback(FERNET, trigger="cli", reason="bots broke", now=T0 + 2 * SECOND)
    after = (harness.sql("SELECT * FROM rotations"), harness.sql("SELECT * FROM steps"), harness.versions(FERNET))
    assert after == before


def test_rollback_records_its_reason_in_the_journal(harness: Harness) -> None:
    rt = harness.build()
    rt.engine.tick(FERNET, T0)
    rt.engine.tick(FERNET, T0 + EVERY)
    rt.engine.tick(FERNET, T0 + EVERY + PROPAGATION)  # v2 promoted, v1 decrypt-only for the grace
    row = rt.engine.rollback(FERNET, trigger="cli", reason="bots crash on v2", now=T0 + EVERY + PROPAGATION + SECOND)
    assert row.status == "rolled_back" and h_primary(harness) == "v1"
    from rotatord.engine.report import history_report

    assert history_report(rt.engine, FERNET)[0]["rollback_reason"] == "bots crash on v2"


def h_primary(harness: Harness) -> str:
    return harness.ring().primary


def test_priority_gate_pauses_other_secrets_until_the_emergency_ends() -> None:
    gate = PriorityGate(poll=0.01)
    entered = threading.Event()
    release = threading.Event()
    resumed = threading.Event()

    def emergency() -> None:
        with gate.urgent("leaked"):
            entered.set()
            release.wait(10)

    def routine() -> None:
        gate.wait_turn("routine")
        resumed.set()

    a = threading.Thread(target=emergency)
    a.start()
    assert entered.wait(10)
    b = threading.Thread(target=routine)
    b.start()
    assert not resumed.wait(0.2), "a routine pass went on while an emergency held the gate"
    assert gate.holders() == ["leaked"]
    gate.wait_turn("leaked")  # the emergency's own passes never wait for themselves
    release.set()
    a.join(10)
    assert resumed.wait(10)
    b.join(10)
    assert gate.holders() == []


def test_priority_gate_lets_a_stopping_daemon_go() -> None:
    gate = PriorityGate(poll=0.01)
    with gate.urgent("leaked"):
        waiter = threading.Thread(target=gate.wait_turn, args=("routine",), kwargs={"should_stop": lambda: True})
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "a stopping daemon waited for the emergency to end"


def test_routine_reencryption_pauses_while_an_emergency_runs(make_harness: HarnessFactory, tmp_path: Path) -> None:
    """A real pass of another secret waits at its checkpoint while the gate is held, then finishes."""
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,)), consumers=())
    gate = PriorityGate(poll=0.01)
    rt = h.build()
    rt.engine.reencryptor.priority = gate
    rt.engine.tick(FERNET, T0)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO msgs VALUES (?, ?)", [(i, multifernet(h.ring()).encrypt(b"x").decode()) for i in range(5)]
        )
    rt.engine.tick(FERNET, T0 + EVERY)
    done = threading.Event()

    def routine() -> None:
        rt.engine.tick(FERNET, T0 + EVERY + PROPAGATION)  # promote, then re-encrypt (pauses)
        done.set()

    with gate.urgent("another-secret"):
        worker = threading.Thread(target=routine)
        worker.start()
        assert not done.wait(0.5), "the routine re-encryption did not yield to the emergency"
    assert done.wait(30)
    worker.join(10)
    assert h.sql("SELECT phase FROM rotations WHERE version = 2") == [("reencrypted",)]


def test_rollback_of_an_emergency_that_cannot_finish_closes_its_report(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,), consumers=()), consumers=())
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    v1 = multifernet(h.ring())
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO msgs VALUES (?, ?)", [(i, v1.encrypt(b"x").decode()) for i in range(5)])
    at = T0 + SECOND
    with unwritable(db):
        row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="leak", now=at)
    assert (row.phase, row.status) == ("promoted", "active") and row.error
    live = rt.engine.blast_report(row)
    assert (live["state"], live["next_step"], live["remaining"]) == ("failing", "reencrypt", 5)
    back = rt.engine.rollback(FERNET, trigger="cli", reason="v2 breaks the bots", now=at + SECOND)
    assert back.status == "rolled_back" and h.ring().primary == "v1"
    report = rt.engine.blast_report(back)
    assert (report["state"], report["retired_at"], report["next_step"]) == ("rolled back", None, None)
    last = _blast_records(h)[-1]
    assert last["stage"] == "closed" and isinstance(last["report"], dict)
    assert last["report"]["state"] == "rolled back"
