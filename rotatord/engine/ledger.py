"""Re-encryption bookkeeping in the state database: checkpoints, quarantine and census counts.

Holds locators (primary keys, paths, Redis keys) and counts, never a ciphertext or a key.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ..interfaces import Census, Progress, ReencryptReport
from .journal import Journal, UTCDateTime, metadata

__all__ = ["CheckpointRow", "JournalProgress", "StoreLedger"]

checkpoints = Table(
    "store_checkpoints",
    metadata,
    Column("rotation_id", Integer, primary_key=True),
    Column("step", String(32), primary_key=True),
    Column("store", String(200), primary_key=True),
    Column("checkpoint", Text),
    Column("done", Boolean, nullable=False, default=False),
    Column("totals", Text, nullable=False),
    Column("estimate", Integer),
    Column("updated_at", UTCDateTime, nullable=False),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret", String(64), nullable=False),
    Column("rotation_id", Integer),
    Column("store", String(200), nullable=False),
    Column("locator", String(500), nullable=False),
    Column("reason", String(200), nullable=False),
    Column("found_at", UTCDateTime, nullable=False),
    UniqueConstraint("secret", "store", "locator", name="uq_quarantine_item"),
)

census_counts = Table(
    "census",
    metadata,
    Column("secret", String(64), primary_key=True),
    Column("store", String(200), primary_key=True),
    Column("key_id", String(32), primary_key=True),  # "" for unreadable items
    Column("count", Integer, nullable=False),
    Column("taken_at", UTCDateTime, nullable=False),
)


@dataclass(frozen=True)
class CheckpointRow:
    store: str
    step: str
    checkpoint: str | None
    done: bool
    totals: ReencryptReport
    estimate: int | None
    updated_at: datetime


def _report(store: str, raw: str) -> ReencryptReport:
    data = json.loads(raw)
    return ReencryptReport(store=store, **{k: int(v) for k, v in data.items()})


def _totals(report: ReencryptReport) -> str:
    return json.dumps(
        {
            "scanned": report.scanned,
            "rewritten": report.rewritten,
            "skipped": report.skipped,
            "conflicts": report.conflicts,
            "quarantined": report.quarantined,
        },
        sort_keys=True,
    )


class StoreLedger:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def load(self, rotation_id: int, step: str, store: str) -> CheckpointRow | None:
        with self.journal.transaction() as conn:
            row = conn.execute(
                select(checkpoints).where(
                    checkpoints.c.rotation_id == rotation_id, checkpoints.c.step == step, checkpoints.c.store == store
                )
            ).first()
        return None if row is None else _checkpoint(row._mapping)

    def for_rotation(self, rotation_id: int) -> list[CheckpointRow]:
        with self.journal.transaction() as conn:
            rows = conn.execute(select(checkpoints).where(checkpoints.c.rotation_id == rotation_id)).all()
        return [_checkpoint(r._mapping) for r in rows]

    def save(
        self,
        rotation_id: int,
        step: str,
        store: str,
        checkpoint: str | None,
        totals: ReencryptReport,
        *,
        done: bool,
        estimate: int | None,
        now: datetime,
    ) -> None:
        values = {"checkpoint": checkpoint, "done": done, "totals": _totals(totals), "estimate": estimate}
        with self.journal.transaction() as conn:
            changed = conn.execute(
                update(checkpoints)
                .where(
                    checkpoints.c.rotation_id == rotation_id, checkpoints.c.step == step, checkpoints.c.store == store
                )
                .values(updated_at=now, **values)
            ).rowcount
            if not changed:
                conn.execute(
                    insert(checkpoints).values(
                        rotation_id=rotation_id, step=step, store=store, updated_at=now, **values
                    )
                )

    def reset(self, rotation_id: int, step: str) -> None:
        with self.journal.transaction() as conn:
            conn.execute(
                delete(checkpoints).where(checkpoints.c.rotation_id == rotation_id, checkpoints.c.step == step)
            )

    def quarantine(
        self, secret: str, rotation_id: int | None, store: str, locator: str, reason: str, now: datetime
    ) -> bool:
        """Record an unreadable item; True if it is new.  An item recorded before keeps its first
        ``found_at`` and takes the rotation that found it again (see :meth:`forget_quarantined`)."""
        locator, reason = locator[:500], reason[:200]
        item = (quarantine.c.secret == secret, quarantine.c.store == store, quarantine.c.locator == locator)
        try:
            with self.journal.transaction() as conn:
                if conn.execute(
                    update(quarantine).where(*item).values(rotation_id=rotation_id, reason=reason)
                ).rowcount:
                    return False
                conn.execute(
                    insert(quarantine).values(
                        secret=secret,
                        rotation_id=rotation_id,
                        store=store,
                        locator=locator,
                        reason=reason,
                        found_at=now,
                    )
                )
        except IntegrityError:
            return False  # recorded meanwhile
        return True

    def forget_quarantined(self, secret: str, store: str, rotation_id: int) -> int:
        """After a complete pass over ``store`` in rotation ``rotation_id``: forget the items it did
        not find unreadable (a bot rewrote them since, or they are gone); how many."""
        with self.journal.transaction() as conn:
            return int(
                conn.execute(
                    delete(quarantine).where(
                        quarantine.c.secret == secret,
                        quarantine.c.store == store,
                        or_(quarantine.c.rotation_id.is_(None), quarantine.c.rotation_id != rotation_id),
                    )
                ).rowcount
            )

    def quarantined(self, secret: str) -> list[dict[str, Any]]:
        with self.journal.transaction() as conn:
            rows = conn.execute(select(quarantine).where(quarantine.c.secret == secret).order_by(quarantine.c.id)).all()
        return [
            {
                "store": r.store,
                "locator": r.locator,
                "reason": r.reason,
                "found_at": r.found_at,
                "rotation_id": r.rotation_id,
            }
            for r in rows
        ]

    def record_census(self, secret: str, results: list[Census], now: datetime) -> None:
        with self.journal.transaction() as conn:
            conn.execute(delete(census_counts).where(census_counts.c.secret == secret))
            for census in results:
                counts = dict(census.by_key)
                if census.unreadable:
                    counts[""] = census.unreadable
                for key_id, count in counts.items():
                    conn.execute(
                        insert(census_counts).values(
                            secret=secret, store=census.store, key_id=key_id, count=count, taken_at=now
                        )
                    )

    def latest_census(self, secret: str) -> list[Census]:
        with self.journal.transaction() as conn:
            rows = conn.execute(select(census_counts).where(census_counts.c.secret == secret)).all()
        by_store: dict[str, dict[str, int]] = {}
        taken: dict[str, datetime] = {}
        for r in rows:
            m = r._mapping
            by_store.setdefault(m["store"], {})[m["key_id"]] = int(m["count"])
            taken[m["store"]] = m["taken_at"]
        out = []
        for store, counts in sorted(by_store.items()):
            unreadable = counts.pop("", 0)
            out.append(Census(store=store, by_key=counts, unreadable=unreadable, taken_at=taken[store]))
        return out


def _checkpoint(m: Any) -> CheckpointRow:
    return CheckpointRow(
        store=m["store"],
        step=m["step"],
        checkpoint=m["checkpoint"],
        done=bool(m["done"]),
        totals=_report(m["store"], m["totals"]),
        estimate=m["estimate"],
        updated_at=m["updated_at"],
    )


class JournalProgress(Progress):
    """Persists a store's progress after each batch, so a restart resumes from the checkpoint."""

    def __init__(
        self,
        ledger: StoreLedger,
        *,
        secret: str,
        rotation_id: int,
        step: str,
        store: str,
        estimate: int | None,
        clock: Any,
        stopping: Any,
        pause: Any = None,
    ) -> None:
        self.ledger = ledger
        self.secret = secret
        self.rotation_id = rotation_id
        self.step = step
        self.store = store
        self.estimate = estimate
        self._clock = clock
        self._stopping = stopping
        #: Called after each committed batch: waits while an emergency elsewhere runs first.
        self._pause = pause
        self.new_quarantined = 0

    def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
        self.ledger.save(
            self.rotation_id,
            self.step,
            self.store,
            checkpoint,
            totals,
            done=False,
            estimate=self.estimate,
            now=self._clock(),
        )
        # Test-only: die right after a committed batch, to prove a restart resumes mid-store.
        if "reencrypt.batch" in os.environ.get("ROTATORD_TEST_CRASH_AT", "").split(","):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._pause is not None:
            self._pause()

    def quarantine(self, locator: str, reason: str) -> None:
        if self.ledger.quarantine(self.secret, self.rotation_id, self.store, locator, reason, self._clock()):
            self.new_quarantined += 1

    def should_stop(self) -> bool:
        return bool(self._stopping())
