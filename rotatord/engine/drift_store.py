"""Drift bookkeeping in the state database: what rotatord last wrote, and drift it found.

Three tables, created by :meth:`Journal.create` like every other (``create_all`` adds missing
tables to an existing database, so an older state database gains them at the next start):

- ``baselines``: per secret, the fingerprint of the version rotatord last wrote or an operator
  adopted (backend version, document digest, marks, labels, deleted versions);
- ``pending_writes``: per secret, the request id and digest of a write about to be made, so a
  write that landed just before a crash is recognised as rotatord's own, not as drift;
- ``drift``: each detection (reason code, a message without material, what was seen), open
  until ``rotatord adopt`` or ``rotatord rotate --emergency`` resolves it.

The digests are plain SHA-256 of the canonical document JSON.  They cannot be used to recover
material: every document holds at least one 256-bit random key or token, so there is nothing to
brute-force; an HMAC keyed per database would add a key to guard and no protection.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Column, Integer, String, Table, Text, delete, insert, select, update
from sqlalchemy.engine import Connection

from ..interfaces import Event, Observed
from .journal import Journal, UTCDateTime, _queue, metadata

__all__ = ["Baseline", "DriftLedger", "DriftRecord"]

baselines = Table(
    "baselines",
    metadata,
    Column("secret", String(64), primary_key=True),
    Column("version", String(128)),
    Column("digest", String(64)),
    Column("marked", Boolean, nullable=False),
    Column("labels", Text),  # JSON object, or NULL where the backend has no labels
    Column("deleted", Text, nullable=False),  # JSON list of versions already deleted/destroyed
    Column("source", String(16), nullable=False),  # write | adopt
    Column("recorded_at", UTCDateTime, nullable=False),
)

pending_writes = Table(
    "pending_writes",
    metadata,
    Column("secret", String(64), primary_key=True),
    Column("request_id", String(64), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("recorded_at", UTCDateTime, nullable=False),
)

drift = Table(
    "drift",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret", String(64), nullable=False, index=True),
    Column("reason", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("observed_version", String(128)),
    Column("baseline_version", String(128)),
    Column("detected_at", UTCDateTime, nullable=False),
    Column("resolved_at", UTCDateTime),
    Column("resolved_by", String(128)),
    Column("resolution", String(16)),  # adopt | emergency
)


@dataclass(frozen=True)
class Baseline:
    secret: str
    version: str | None
    digest: str | None
    marked: bool
    labels: dict[str, str] | None
    deleted: frozenset[str]
    source: str
    recorded_at: datetime


@dataclass(frozen=True)
class DriftRecord:
    """One detection.  ``message`` names versions and what differs, never a value."""

    id: int
    secret: str
    reason: str
    message: str
    observed_version: str | None
    baseline_version: str | None
    detected_at: datetime
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None

    @property
    def open(self) -> bool:
        return self.resolved_at is None


class DriftLedger:
    """Typed access to the drift tables.  Thread-safe; each method one transaction."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    # -- baselines ---------------------------------------------------------------------------

    def baseline(self, secret: str) -> Baseline | None:
        with self.journal.transaction() as conn:
            row = conn.execute(select(baselines).where(baselines.c.secret == secret)).first()
        return None if row is None else _baseline(row)

    def all_baselines(self) -> dict[str, Baseline]:
        """Every secret's baseline, in one query (the periodic sweep's first look)."""
        with self.journal.transaction() as conn:
            rows = conn.execute(select(baselines)).all()
        return {b.secret: b for b in map(_baseline, rows)}

    def set_baseline(
        self, secret: str, seen: Observed, source: str, now: datetime, *, resolve: tuple[str, str] | None = None
    ) -> None:
        """Record ``seen`` as what rotatord expects at ``secret``'s path; clear its pending write.
        With ``resolve`` = (actor, resolution), close its open drift in the same transaction."""
        values = {
            "version": seen.version,
            "digest": seen.digest,
            "marked": seen.marked,
            "labels": json.dumps(dict(seen.labels), sort_keys=True) if seen.labels is not None else None,
            "deleted": json.dumps(sorted(seen.deleted)),
            "source": source,
            "recorded_at": now,
        }
        with self.journal.transaction() as conn:
            if not conn.execute(update(baselines).where(baselines.c.secret == secret).values(**values)).rowcount:
                conn.execute(insert(baselines).values(secret=secret, **values))
            conn.execute(delete(pending_writes).where(pending_writes.c.secret == secret))
            if resolve is not None:
                _resolve(conn, secret, now, *resolve)

    def pending(self, secret: str) -> tuple[str, str] | None:
        """(request_id, digest) of the write rotatord was about to make, if any."""
        with self.journal.transaction() as conn:
            row = conn.execute(
                select(pending_writes.c.request_id, pending_writes.c.digest).where(pending_writes.c.secret == secret)
            ).first()
        return None if row is None else (str(row[0]), str(row[1]))

    def set_pending(self, secret: str, request_id: str, digest: str, now: datetime) -> None:
        values = {"request_id": request_id, "digest": digest, "recorded_at": now}
        with self.journal.transaction() as conn:
            if not conn.execute(
                update(pending_writes).where(pending_writes.c.secret == secret).values(**values)
            ).rowcount:
                conn.execute(insert(pending_writes).values(secret=secret, **values))

    # -- drift records -----------------------------------------------------------------------

    def open_drift(self, secret: str) -> DriftRecord | None:
        with self.journal.transaction() as conn:
            row = conn.execute(
                select(drift).where(drift.c.secret == secret, drift.c.resolved_at.is_(None)).order_by(drift.c.id)
            ).first()
        return None if row is None else _record(row)

    def all_open(self) -> list[DriftRecord]:
        with self.journal.transaction() as conn:
            rows = conn.execute(select(drift).where(drift.c.resolved_at.is_(None)).order_by(drift.c.id)).all()
        return [_record(r) for r in rows]

    def history(self, secret: str, limit: int = 50) -> list[DriftRecord]:
        with self.journal.transaction() as conn:
            rows = conn.execute(
                select(drift).where(drift.c.secret == secret).order_by(drift.c.id.desc()).limit(limit)
            ).all()
        return [_record(r) for r in rows]

    def record(
        self,
        secret: str,
        reason: str,
        message: str,
        observed_version: str | None,
        baseline_version: str | None,
        now: datetime,
        events: Sequence[tuple[str, Event]],
    ) -> DriftRecord:
        """Open a drift record and queue its webhooks in ONE transaction (as phase changes do)."""
        with self.journal.transaction() as conn:
            key = conn.execute(
                insert(drift).values(
                    secret=secret,
                    reason=reason,
                    message=message,
                    observed_version=observed_version,
                    baseline_version=baseline_version,
                    detected_at=now,
                )
            ).inserted_primary_key
            for consumer, ev in events:
                _queue(conn, consumer, ev, now)
        assert key is not None
        return DriftRecord(int(key[0]), secret, reason, message, observed_version, baseline_version, now)


def _resolve(conn: Connection, secret: str, now: datetime, actor: str, resolution: str) -> None:
    conn.execute(
        update(drift)
        .where(drift.c.secret == secret, drift.c.resolved_at.is_(None))
        .values(resolved_at=now, resolved_by=actor[:128], resolution=resolution)
    )


def _baseline(row: Any) -> Baseline:
    m = row._mapping
    return Baseline(
        secret=m["secret"],
        version=m["version"],
        digest=m["digest"],
        marked=bool(m["marked"]),
        labels=json.loads(m["labels"]) if m["labels"] is not None else None,
        deleted=frozenset(json.loads(m["deleted"])),
        source=m["source"],
        recorded_at=m["recorded_at"],
    )


def _record(row: Any) -> DriftRecord:
    m = row._mapping
    return DriftRecord(**{k: m[k] for k in DriftRecord.__dataclass_fields__})
