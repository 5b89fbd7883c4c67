"""The webhook outbox in the state database: claiming due rows, recording attempts, endpoints.

The engine writes ``outbox`` rows (rotatord.engine.journal) in the same transaction as the phase
change that causes them; this module owns what happens to them afterwards, and one table of its
own, ``webhook_endpoints``: per consumer, since when every attempt failed, whether it was marked
failing, whether it answered 410 Gone (disabled), and its last success.  Rows hold names,
versions, statuses and short error summaries, never a response body or a secret.

Row status: ``pending`` (to send, at ``next_attempt_at``), ``delivered`` (a 2xx: the
acknowledgement), ``skipped`` (the consumer does not subscribe to the event type), ``dead``
(the schedule is exhausted, the endpoint is disabled, or the consumer is no longer configured).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Index, String, Table, Text, bindparam, case, distinct, func, insert, select, update

from ..engine.journal import Journal, UTCDateTime, metadata, outbox
from ..timeutil import format_ts

__all__ = [
    "AttemptRecord",
    "DeliveryFilter",
    "EndpointState",
    "OutboxRow",
    "OutboxStore",
    "STATUSES",
    "url_digest",
]

STATUSES = ("pending", "delivered", "skipped", "dead")

endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("failing_since", UTCDateTime),  # first failure after the last success
    Column("failing_at", UTCDateTime),  # when it was marked failing (failing_since + failing_after)
    Column("disabled_at", UTCDateTime),  # it answered 410 Gone
    Column("disabled_url", String(64)),  # SHA-256 of the URL that said so: a new URL is a new endpoint
    Column("last_success_at", UTCDateTime),
    Column("last_failure_at", UTCDateTime),
    Column("last_error", Text),
)
# The worker looks for due rows at least once a second; the outbox only grows.
due_index = Index("ix_outbox_due", outbox.c.status, outbox.c.next_attempt_at)


def url_digest(url: str) -> str:
    """What ``webhook_endpoints`` keeps of a URL (a query string may hold a bot's own token)."""
    return hashlib.sha256(url.encode()).hexdigest()


@dataclass(frozen=True)
class OutboxRow:
    id: int
    webhook_id: str
    rotation_id: int | None
    consumer: str
    event_type: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class EndpointState:
    consumer: str
    failing_since: datetime | None
    failing_at: datetime | None
    disabled_at: datetime | None
    disabled_url: str | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str | None

    def disabled_for(self, url: str) -> bool:
        return self.disabled_at is not None and self.disabled_url == url_digest(url)


@dataclass(frozen=True)
class AttemptRecord:
    """The result of one HTTP attempt, ready to write.  ``next_attempt_at`` None and not
    ``delivered``: the row is dead.  ``disable_url``: the endpoint answered 410 at that URL."""

    row_id: int
    consumer: str
    attempts: int
    finished_at: datetime
    delivered: bool
    error: str | None = None
    next_attempt_at: datetime | None = None
    disable_url: str | None = None


@dataclass(frozen=True)
class DeliveryFilter:
    """``rotatord webhooks list`` filters; every set field must match."""

    consumer: str | None = None
    status: str | None = None
    rotation_id: int | None = None
    event_type: str | None = None
    webhook_id: str | None = None
    since: datetime | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if self.limit < 1:
            raise ValueError("limit must be at least 1")


def _endpoint(m: Any) -> EndpointState:
    return EndpointState(**{k: m[k] for k in EndpointState.__dataclass_fields__})


class OutboxStore:
    """Typed access to the outbox and endpoint tables.  Thread-safe; each method one transaction."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def ensure_schema(self, consumers: Iterable[str]) -> None:
        """Create this module's table and index if missing, and a row per configured consumer."""
        with self.journal.transaction() as conn:
            endpoints.create(conn, checkfirst=True)
            due_index.create(conn, checkfirst=True)
            known = set(conn.execute(select(endpoints.c.consumer)).scalars())
            missing = [{"consumer": c} for c in consumers if c not in known]
            if missing:
                conn.execute(insert(endpoints), missing)

    # -- the worker's side ---------------------------------------------------------------------

    def claim(self, now: datetime, limit: int) -> tuple[list[OutboxRow], dict[str, str]]:
        """Pending rows due at ``now`` (oldest first), and the disabled endpoints (consumer ->
        digest of the URL that answered 410)."""
        with self.journal.transaction() as conn:
            rows = conn.execute(
                select(
                    outbox.c.id,
                    outbox.c.webhook_id,
                    outbox.c.rotation_id,
                    outbox.c.consumer,
                    outbox.c.event_type,
                    outbox.c.payload,
                    outbox.c.attempts,
                )
                .where(outbox.c.status == "pending", outbox.c.next_attempt_at <= now)
                .order_by(outbox.c.next_attempt_at, outbox.c.id)
                .limit(limit)
            ).all()
            disabled = conn.execute(
                select(endpoints.c.consumer, endpoints.c.disabled_url).where(endpoints.c.disabled_at.is_not(None))
            ).all()
        return [OutboxRow(*r) for r in rows], {c: str(u) for c, u in disabled}

    def next_due(self, after: datetime) -> datetime | None:
        """The earliest ``next_attempt_at`` of a pending row later than ``after``."""
        with self.journal.transaction() as conn:
            value = conn.execute(
                select(func.min(outbox.c.next_attempt_at)).where(
                    outbox.c.status == "pending", outbox.c.next_attempt_at > after
                )
            ).scalar()
        return value if isinstance(value, datetime) else None

    def settle(self, row_ids: Collection[int], status: str, error: str | None) -> None:
        """Close rows that were never sent (``skipped``, or ``dead`` for a reason named in ``error``)."""
        if not row_ids:
            return
        with self.journal.transaction() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(list(row_ids)), outbox.c.status == "pending")
                .values(status=status, last_error=error, next_attempt_at=None)
            )

    def postpone(self, row_ids: Collection[int], until: datetime, error: str) -> None:
        """Try again at ``until`` without counting an attempt (nothing reached the consumer)."""
        if not row_ids:
            return
        with self.journal.transaction() as conn:
            conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(list(row_ids)), outbox.c.status == "pending")
                .values(next_attempt_at=until, last_error=error)
            )

    def record(self, records: Sequence[AttemptRecord], failing_after: timedelta) -> list[str]:
        """Write attempts and their endpoints' state in one transaction.

        Returns the consumers newly marked failing (every attempt failed for ``failing_after``).
        """
        if not records:
            return []
        ordered = sorted(records, key=lambda r: r.finished_at)
        delivered = [{"row_id": r.row_id, "n": r.attempts, "at": r.finished_at} for r in ordered if r.delivered]
        failed = [
            {
                "row_id": r.row_id,
                "n": r.attempts,
                "new_status": "pending" if r.next_attempt_at else "dead",
                "next_at": r.next_attempt_at,
                "error": r.error,
            }
            for r in ordered
            if not r.delivered
        ]
        with self.journal.transaction() as conn:
            if delivered:
                conn.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("row_id"))
                    .values(
                        status="delivered",
                        attempts=bindparam("n"),
                        delivered_at=bindparam("at"),
                        next_attempt_at=None,
                        last_error=None,
                    ),
                    delivered,
                )
            if failed:
                conn.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("row_id"))
                    .values(
                        status=bindparam("new_status"),
                        attempts=bindparam("n"),
                        next_attempt_at=bindparam("next_at"),
                        last_error=bindparam("error"),
                    ),
                    failed,
                )
            # The endpoint's state after this batch is decided by its latest attempt here.
            latest = {r.consumer: r for r in ordered}
            first_failure: dict[str, datetime] = {}
            for r in ordered:
                if r.delivered:
                    first_failure.pop(r.consumer, None)
                else:
                    first_failure.setdefault(r.consumer, r.finished_at)
            ok = [c for c, r in latest.items() if r.delivered]
            bad = [
                {"c": c, "t": r.finished_at, "since": first_failure[c], "err": r.error}
                for c, r in latest.items()
                if not r.delivered
            ]
            if ok:
                # One statement for the whole batch: last_success_at is the batch's last moment.
                conn.execute(
                    update(endpoints)
                    .where(endpoints.c.consumer.in_(ok))
                    .values(
                        last_success_at=ordered[-1].finished_at, failing_since=None, failing_at=None, last_error=None
                    )
                )
            if bad:
                conn.execute(
                    update(endpoints)
                    .where(endpoints.c.consumer == bindparam("c"))
                    .values(
                        failing_since=func.coalesce(endpoints.c.failing_since, bindparam("since")),
                        last_failure_at=bindparam("t"),
                        last_error=bindparam("err"),
                    ),
                    bad,
                )
            disabled = [{"c": r.consumer, "t": r.finished_at, "u": r.disable_url} for r in ordered if r.disable_url]
            if disabled:
                conn.execute(
                    update(endpoints)
                    .where(endpoints.c.consumer == bindparam("c"))
                    .values(disabled_at=bindparam("t"), disabled_url=bindparam("u")),
                    disabled,
                )
            newly: list[str] = []
            for c, r in latest.items():
                if r.delivered:
                    continue
                marked = conn.execute(
                    update(endpoints)
                    .where(
                        endpoints.c.consumer == c,
                        endpoints.c.failing_at.is_(None),
                        endpoints.c.failing_since <= r.finished_at - failing_after,
                    )
                    .values(failing_at=r.finished_at)
                ).rowcount
                if marked:
                    newly.append(c)
        return newly

    # -- queries for acknowledgements, status and the CLI ----------------------------------------

    def acknowledged(self, rotation_id: int, event_type: str, required: Collection[str]) -> bool:
        """Every consumer of ``required`` that has a row for this event has one delivered."""
        if not required:
            return True
        delivered = case((outbox.c.status == "delivered", outbox.c.consumer))
        with self.journal.transaction() as conn:
            told, acked = conn.execute(
                select(func.count(distinct(outbox.c.consumer)), func.count(distinct(delivered))).where(
                    outbox.c.rotation_id == rotation_id,
                    outbox.c.event_type == event_type,
                    outbox.c.consumer.in_(list(required)),
                )
            ).one()
        return bool(told == acked)

    def endpoint_states(self) -> dict[str, EndpointState]:
        with self.journal.transaction() as conn:
            return {s.consumer: _endpoint(s._mapping) for s in conn.execute(select(endpoints)).all()}

    def deliveries(self, flt: DeliveryFilter) -> list[dict[str, Any]]:
        query = select(outbox).order_by(outbox.c.id.desc()).limit(flt.limit)
        for column, value in (
            (outbox.c.consumer, flt.consumer),
            (outbox.c.status, flt.status),
            (outbox.c.rotation_id, flt.rotation_id),
            (outbox.c.event_type, flt.event_type),
            (outbox.c.webhook_id, flt.webhook_id),
        ):
            if value is not None:
                query = query.where(column == value)
        if flt.since is not None:
            query = query.where(outbox.c.created_at >= flt.since)
        with self.journal.transaction() as conn:
            rows = conn.execute(query).all()
        return [
            {
                "webhook_id": r.webhook_id,
                "rotation_id": r.rotation_id,
                "consumer": r.consumer,
                "event_type": r.event_type,
                "status": r.status,
                "attempts": r.attempts,
                "created_at": format_ts(r.created_at),
                "next_attempt_at": format_ts(r.next_attempt_at),
                "delivered_at": format_ts(r.delivered_at),
                "last_error": r.last_error,
            }
            for r in rows
        ]

    def replay(
        self,
        now: datetime,
        *,
        webhook_id: str | None,
        consumer: str | None,
        since: datetime | None,
        include_delivered: bool,
    ) -> int:
        """Set rows back to pending with a fresh schedule; re-enable their endpoints."""
        if (webhook_id is None) == (consumer is None):
            raise ValueError("replay takes a webhook id or a consumer, not both")
        query = update(outbox)
        if webhook_id is not None:
            query = query.where(outbox.c.webhook_id == webhook_id)
        else:
            statuses = ["dead", "delivered"] if include_delivered else ["dead"]
            query = query.where(outbox.c.consumer == consumer, outbox.c.status.in_(statuses))
            if since is not None:
                query = query.where(outbox.c.created_at >= since)
        with self.journal.transaction() as conn:
            touched = conn.execute(
                query.values(status="pending", attempts=0, next_attempt_at=now, delivered_at=None, last_error=None)
            )
            count = int(touched.rowcount or 0)
            if count:
                owner = select(outbox.c.consumer).where(outbox.c.webhook_id == webhook_id)
                who = [consumer] if consumer is not None else list(conn.execute(owner).scalars())
                conn.execute(
                    update(endpoints).where(endpoints.c.consumer.in_(who)).values(disabled_at=None, disabled_url=None)
                )
        return count

    def pending_count(self) -> int:
        with self.journal.transaction() as conn:
            n = conn.execute(select(func.count()).select_from(outbox).where(outbox.c.status == "pending")).scalar()
        return int(n or 0)
