"""The leader lease and the journal's write fence, on a real PostgreSQL database per test."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from rotatord.audit import AuditLog
from rotatord.daemon.leader import Leadership
from rotatord.engine.journal import Journal
from rotatord.engine.lease import InstanceAuditHead, LeaseStore, audit_head
from rotatord.errors import Fenced, NotLeader
from rotatord.timeutil import utcnow
from tests.helpers import wait_until

TTL = timedelta(seconds=4)


def _leadership(url: str, instance: str, margin: float | None = None) -> Leadership:
    store = LeaseStore(url, instance, timedelta(seconds=1))
    store.create()
    lead = Leadership(store, instance, TTL.total_seconds(), 1.0)
    if margin is not None:
        lead.margin = margin
    return lead


def _journal(url: str) -> Journal:
    journal = Journal(url)
    journal.create()
    return journal


def _expire(url: str) -> None:
    """What the passing of lease_ttl does, without waiting for it."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE leader_lease SET expires_at = clock_timestamp() - interval '1 second'"))
    engine.dispose()


def test_one_holder_at_a_time_with_a_new_epoch_per_tenure(pg_state: str) -> None:
    a, b = LeaseStore(pg_state, "a", TTL), LeaseStore(pg_state, "b", TTL)
    try:
        a.create()
        b.create()  # idempotent
        first = a.try_acquire(TTL)
        assert first is not None and (first.holder, first.epoch) == ("a", 1)
        assert b.try_acquire(TTL) is None
        info = b.current()
        assert info.holder == "a" and info.epoch == 1 and 0 < info.expires_in <= TTL.total_seconds()
        assert a.renew(1, TTL)
        a.release(1)
        assert b.current().expires_in < 0
        second = b.try_acquire(TTL)
        assert second is not None and (second.holder, second.epoch) == ("b", 2)
        assert not a.renew(1, TTL), "a deposed holder must not renew"
        assert b.renew(2, TTL)
    finally:
        a.close()
        b.close()


def test_a_deposed_leaders_journal_write_is_refused_and_rolled_back(pg_state: str) -> None:
    journal = _journal(pg_state)
    a, b = _leadership(pg_state, "a"), _leadership(pg_state, "b")
    try:
        journal.guard_writes(a.check_write)
        a.acquire_now("test")
        now = utcnow()
        rot = journal.start(
            secret="s", kind="fernet", version=1, phase="created", trigger="t", emergency=False, reason=None, now=now
        )
        journal.begin_step(rot.id, "stage", now)
        # a is paused (no renewal) past the expiry; b takes over while a's local clock says "mine".
        _expire(pg_state)
        b.acquire_now("test")
        assert a.may_act(), "the scenario needs a's own deadline not yet passed"
        with pytest.raises(Fenced, match="lost the leader lease"):
            journal.update(rot.id, utcnow(), error="written by a deposed leader")
        with pytest.raises(Fenced):
            journal.begin_step(rot.id, "promote", utcnow())
        assert journal.get(rot.id).error is None
        assert [s.name for s in journal.steps(rot.id)] == ["stage"]
        assert not a.may_act() and a.role() == "standby"
        assert b.role() == "leader"
        assert journal.latest("s") is not None, "reads are never fenced"
        with pytest.raises(NotLeader, match="standby"):
            a.require_leader("rotate")
    finally:
        a.stop()
        b.stop()
        journal.close()


def test_a_leader_that_cannot_renew_stops_acting_before_the_lease_expires(pg_state: str) -> None:
    journal = _journal(pg_state)
    # Acts for only 0.5 s after taking the lease (a margin of 3.5 s of the 4 s ttl), never renewing.
    a = _leadership(pg_state, "a", margin=TTL.total_seconds() - 0.5)
    b = _leadership(pg_state, "b")
    try:
        journal.guard_writes(a.check_write)
        a.acquire_now("test")
        assert a.role() == "leader"
        wait_until(lambda: not a.may_act(), timeout=10, interval=0.02, what="a's local deadline")
        assert b.store is not None
        left = b.store.current().expires_in
        assert left > 0, "a must stop acting while its lease is still valid in the database"
        assert b.store.try_acquire(TTL) is None, "nobody may take over before the expiry"
        with pytest.raises(Fenced, match="does not hold"):
            journal.start(
                secret="s", kind="fernet", version=1, phase="created", trigger="t", emergency=False, reason=None,
                now=utcnow(),
            )  # fmt: skip
        assert journal.latest("s") is None
    finally:
        a.stop()
        b.stop()
        journal.close()


def test_a_standby_takes_over_after_the_expiry_and_a_released_lease_at_once(pg_state: str) -> None:
    a, b = _leadership(pg_state, "a"), _leadership(pg_state, "b")
    try:
        a.start()
        wait_until(lambda: a.role() == "leader", timeout=10, what="a to lead")
        b.start()
        wait_until(lambda: b.leader_name() == "a", timeout=10, what="b to see a as leader")
        assert b.role() == "standby"
        a.stop()  # releases
        wait_until(lambda: b.role() == "leader", timeout=5, what="b to take the released lease")
        assert b.epoch == 2
    finally:
        a.stop()
        b.stop()


def test_instances_starting_together_create_the_schema_once(pg_state: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            journal = _journal(pg_state)
            LeaseStore(pg_state, "x", TTL).create()
            InstanceAuditHead(journal, "x")
            journal.close()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a start-up is stuck"
    assert errors == []


def test_each_instance_keeps_its_own_audit_head(pg_state: str, tmp_path: Path) -> None:
    journal = _journal(pg_state)
    try:
        logs = {name: AuditLog(tmp_path / f"{name}.log", audit_head(journal, name)) for name in ("a", "b")}
        for i in range(3):
            logs["a"].append("test.a", n=i)
        logs["b"].append("test.b")
        logs["a"].append("test.a", n=3)
        assert {name: log.verify().records for name, log in logs.items()} == {"a": 4, "b": 1}
        assert all(log.verify().ok for log in logs.values())
    finally:
        journal.close()


def test_sqlite_state_is_single(tmp_path: Path) -> None:
    lead = Leadership(None, "x", 15.0, 5.0)
    assert lead.role() == "single" and lead.may_act() and not lead.multi
    lead.require_leader("rotate")  # never refuses
    journal = _journal(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert audit_head(journal, "x") is journal
    finally:
        journal.close()
