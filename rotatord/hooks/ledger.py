"""Hook runs in the state database: one row per (rotation, phase, occasion, hook).

A lifecycle phase's rows are written in the same transaction as the phase change itself (see
``Journal.complete_step``), so a phase that happened has its hooks recorded, and a restart finds
every run not yet done.  A run is marked done only after its command succeeded: it runs at least
once, and never again once it is done.  Rows hold the event JSON (never material) and outcomes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Integer, String, Table, Text, UniqueConstraint, func, insert, select, update
from sqlalchemy.engine import Connection

from ..engine.journal import Journal, UTCDateTime, metadata

__all__ = ["DONE", "DROPPED", "FAILED", "PENDING", "HookLedger", "HookRunRow", "NewRun"]

PENDING, DONE, FAILED, DROPPED = "pending", "done", "failed", "dropped"

hook_runs = Table(
    "hook_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret", String(64), nullable=False),
    Column("rotation_id", Integer, nullable=False),  # 0: not part of a rotation (drift)
    Column("phase", String(20), nullable=False),
    # What makes two runs of one phase distinct: the failed step, the drift observation; else "".
    Column("occasion", String(128), nullable=False),
    Column("hook", String(64), nullable=False),  # HookSpec.key: stable across restarts
    Column("label", String(200), nullable=False),
    Column("event", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | done | failed (ignored) | dropped
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("last_error", Text),
    UniqueConstraint("secret", "rotation_id", "phase", "occasion", "hook", name="uq_hook_run"),
)


@dataclass(frozen=True)
class NewRun:
    secret: str
    rotation_id: int
    phase: str
    occasion: str
    hook: str
    label: str
    event: dict[str, Any]


@dataclass(frozen=True)
class HookRunRow:
    id: int
    secret: str
    rotation_id: int
    phase: str
    occasion: str
    hook: str
    label: str
    event: dict[str, Any]
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None


def _row(row: Any) -> HookRunRow:
    m = row._mapping
    return HookRunRow(
        id=m["id"], secret=m["secret"], rotation_id=m["rotation_id"], phase=m["phase"], occasion=m["occasion"],
        hook=m["hook"], label=m["label"], event=json.loads(m["event"]), state=m["state"], attempts=m["attempts"],
        next_attempt_at=m["next_attempt_at"], last_error=m["last_error"],
    )  # fmt: skip


class HookLedger:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    @staticmethod
    def queue_in(conn: Connection, runs: Sequence[NewRun], now: datetime) -> None:
        """Record ``runs`` inside the caller's transaction; a run already recorded is kept as it is
        (a step resumed after a crash queues the same runs again)."""
        for run in runs:
            key = (
                (hook_runs.c.secret == run.secret)
                & (hook_runs.c.rotation_id == run.rotation_id)
                & (hook_runs.c.phase == run.phase)
                & (hook_runs.c.occasion == run.occasion)
                & (hook_runs.c.hook == run.hook)
            )
            if conn.execute(select(hook_runs.c.id).where(key)).first() is not None:
                continue
            values = dict(
                secret=run.secret, rotation_id=run.rotation_id, phase=run.phase, occasion=run.occasion,
                hook=run.hook, label=run.label, event=json.dumps(run.event, sort_keys=True), state=PENDING,
                attempts=0, created_at=now, next_attempt_at=now,
            )  # fmt: skip
            conn.execute(insert(hook_runs).values(**values))

    def queue(self, runs: Sequence[NewRun], now: datetime) -> None:
        with self.journal.transaction() as conn:
            self.queue_in(conn, runs, now)

    def due(self, secret: str, now: datetime) -> list[HookRunRow]:
        """Pending runs of ``secret`` whose time has come, oldest first."""
        query = (
            select(hook_runs)
            .where(hook_runs.c.secret == secret, hook_runs.c.state == PENDING, hook_runs.c.next_attempt_at <= now)
            .order_by(hook_runs.c.id)
        )
        with self.journal.transaction() as conn:
            return [_row(r) for r in conn.execute(query).all()]

    def pending(self, secret: str, rotation_id: int | None = None) -> list[HookRunRow]:
        query = select(hook_runs).where(hook_runs.c.secret == secret, hook_runs.c.state == PENDING)
        if rotation_id is not None:
            query = query.where(hook_runs.c.rotation_id == rotation_id)
        with self.journal.transaction() as conn:
            return [_row(r) for r in conn.execute(query.order_by(hook_runs.c.id)).all()]

    def next_at(self, secret: str) -> datetime | None:
        """When the earliest pending run of ``secret`` is due, or None."""
        query = select(func.min(hook_runs.c.next_attempt_at)).where(
            hook_runs.c.secret == secret, hook_runs.c.state == PENDING
        )
        with self.journal.transaction() as conn:
            value: datetime | None = conn.execute(query).scalar()
        return value

    def runs(self, rotation_id: int) -> list[HookRunRow]:
        with self.journal.transaction() as conn:
            query = select(hook_runs).where(hook_runs.c.rotation_id == rotation_id).order_by(hook_runs.c.id)
            return [_row(r) for r in conn.execute(query).all()]

    def record(
        self, run_id: int, now: datetime, *, state: str, attempts: int, next_attempt_at: datetime, error: str | None
    ) -> None:
        finished = now if state != PENDING else None
        values = dict(
            state=state, attempts=attempts, next_attempt_at=next_attempt_at, finished_at=finished, last_error=error
        )
        with self.journal.transaction() as conn:
            conn.execute(update(hook_runs).where(hook_runs.c.id == run_id).values(**values))
