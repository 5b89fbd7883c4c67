"""Counts of revoked credentials still presented, per secret and fingerprint, in the state DB.

A bot that refuses a revoked token reports it (rotatord.daemon.reports); each report increments
the row of its (secret, fingerprint), and, at most once per :data:`NOTIFY_EVERY` per row, queues
a ``credential.revoked_use`` webhook to every security consumer in the same transaction, so a
counted report and its alert exist together.  Rows hold names, fingerprints, counts, times and
the source the bot gave; never a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Integer, String, Table, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..timeutil import format_ts
from .journal import Journal, UTCDateTime, metadata, queue_webhook

__all__ = ["EVENT_TYPE", "NOTIFY_EVERY", "RevokedUseCount", "RevokedUseStore", "Sighting"]

EVENT_TYPE = "credential.revoked_use"
#: One alert per (secret, fingerprint) per this long; every report is still counted and audited.
NOTIFY_EVERY = timedelta(minutes=10)

revoked_use = Table(
    "revoked_use",
    metadata,
    Column("secret", String(64), primary_key=True),
    Column("fingerprint", String(16), primary_key=True),
    Column("credential", String(32)),
    Column("count", Integer, nullable=False),
    Column("first_at", UTCDateTime, nullable=False),
    Column("last_at", UTCDateTime, nullable=False),
    Column("last_source", String(200)),
    Column("notified_at", UTCDateTime),
)


@dataclass(frozen=True)
class Sighting:
    """One validated report, ready to count."""

    secret: str
    fingerprint: str
    state: str
    source: str | None
    credential: str | None
    reported_at: datetime | None
    #: Where the secret lives, for the event (a bot re-reads it from there).
    backend: str
    path: str
    #: What the secret's current document says of the fingerprint (``revoked``, ``current``...),
    #: None when it keeps no credential with it (or was not read).
    known_as: str | None = None


@dataclass(frozen=True)
class RevokedUseCount:
    """The outcome of :meth:`RevokedUseStore.record`."""

    count: int  # reports of this fingerprint so far
    secret_total: int  # reports of every fingerprint of the secret
    notified: list[str]  # consumers an event was queued for (empty inside the rate limit)
    webhook_ids: list[str]


class RevokedUseStore:
    """Typed access to the ``revoked_use`` table.  Thread-safe; each method one transaction."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def record(self, s: Sighting, consumers: Sequence[str], now: datetime) -> RevokedUseCount:
        """Count one report; queue an event to ``consumers`` unless one went out within
        :data:`NOTIFY_EVERY` for the same fingerprint.  Raises StateError."""
        try:
            return self._record(s, consumers, now)
        except IntegrityError:
            # Two first reports of one fingerprint raced to insert; the loser counts as an update.
            return self._record(s, consumers, now)

    def _record(self, s: Sighting, consumers: Sequence[str], now: datetime) -> RevokedUseCount:
        key = (revoked_use.c.secret == s.secret) & (revoked_use.c.fingerprint == s.fingerprint)
        with self.journal.transaction() as conn:
            row = conn.execute(select(revoked_use.c.count, revoked_use.c.notified_at).where(key)).first()
            last = None if row is None else row[1]
            notify = bool(consumers) and (last is None or now - last >= NOTIFY_EVERY)
            values: dict[str, Any] = {"last_at": now, "last_source": s.source}
            if s.credential:
                values["credential"] = s.credential
            if notify:
                values["notified_at"] = now
            if row is None:
                count = 1
                first = {"secret": s.secret, "fingerprint": s.fingerprint, "count": 1, "first_at": now}
                conn.execute(insert(revoked_use).values(**first, **values))
            else:
                count = int(row[0]) + 1
                conn.execute(update(revoked_use).where(key).values(count=revoked_use.c.count + 1, **values))
            total = conn.execute(select(func.sum(revoked_use.c.count)).where(revoked_use.c.secret == s.secret)).scalar()
            ids = [_queue(conn, consumer, s, count, now) for consumer in consumers] if notify else []
        return RevokedUseCount(count, int(total or count), list(consumers) if notify else [], ids)

    def summary(self, secret: str) -> dict[str, Any]:
        """What ``status`` shows: total reports, distinct fingerprints, the latest one."""
        with self.journal.transaction() as conn:
            rows = conn.execute(
                select(revoked_use).where(revoked_use.c.secret == secret).order_by(revoked_use.c.last_at.desc())
            ).all()
        if not rows:
            return {
                "count": 0,
                "fingerprints": 0,
                "last_at": None,
                "last_source": None,
                "last_fingerprint": None,
                "last_credential": None,
            }
        last = rows[0]._mapping
        return {
            "count": sum(int(r._mapping["count"]) for r in rows),
            "fingerprints": len(rows),
            "last_at": format_ts(last["last_at"]),
            "last_source": last["last_source"],
            "last_fingerprint": last["fingerprint"],
            "last_credential": last["credential"],
        }


def _queue(conn: Connection, consumer: str, s: Sighting, count: int, now: datetime) -> str:
    """An outbox row of no rotation (the event is about a secret, not one of its rotations)."""
    data = {
        "secret": s.secret,
        "backend": s.backend,
        "path": s.path,
        "fingerprint": s.fingerprint,
        "credential": s.credential,
        "state": s.state,
        "known_as": s.known_as,
        "source": s.source,
        "count": count,
        "reported_at": format_ts(s.reported_at),
    }
    return queue_webhook(conn, consumer, EVENT_TYPE, data, occurred_at=now, rotation_id=None, now=now)
