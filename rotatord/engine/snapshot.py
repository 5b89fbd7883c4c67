"""One read of the state database for metrics: a fixed number of queries, whatever the secret count.

A Prometheus scrape must stay cheap with 1,000 secrets, so every table is read once, grouped
in SQL where it can be, inside one transaction (one consistent picture).  Holds names, phases,
counts and timestamps, never key material (the state database holds none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, case, func, select
from sqlalchemy.engine import Connection, RowMapping

from ..interfaces import ReencryptReport
from .drift_store import drift
from .journal import Journal, RotationRow, _rotation, outbox, rotations
from .ledger import _report, census_counts, checkpoints, quarantine

#: Outbox statuses counted at each scrape: waiting, and dead-lettered (an operator replays them).
OPEN_STATUSES = ("pending", "dead")

__all__ = ["OPEN_STATUSES", "CensusCount", "EndpointHealth", "StateSnapshot", "StoreProgress", "take_snapshot"]


@dataclass(frozen=True)
class StoreProgress:
    """Re-encryption totals of one store in one step of a secret's latest rotation."""

    secret: str
    store: str
    step: str
    done: bool
    estimate: int | None
    totals: ReencryptReport


@dataclass(frozen=True)
class CensusCount:
    secret: str
    store: str
    key_id: str  # "" counts the items no key of the ring could read
    count: int
    taken_at: datetime


@dataclass(frozen=True)
class EndpointHealth:
    consumer: str
    failing: bool
    disabled: bool
    last_success_at: datetime | None


@dataclass(frozen=True)
class StateSnapshot:
    latest: dict[str, RotationRow]
    #: (secret, rotation status) -> rotations; status is active, done or rolled_back.
    rotations: dict[tuple[str, str], int]
    progress: list[StoreProgress]
    census: list[CensusCount]
    #: (secret, store) -> quarantined items.
    quarantined: dict[tuple[str, str], int]
    #: (consumer, outbox status) -> rows, for the OPEN_STATUSES.
    deliveries: dict[tuple[str, str], int]
    #: consumer -> pending rows that have failed at least once (being retried).
    retrying: dict[str, int]
    endpoints: dict[str, EndpointHealth] = field(default_factory=dict)
    #: (secret, reason) -> open drift records (rotations paused until adopt / emergency).
    drift: dict[tuple[str, str], int] = field(default_factory=dict)


def take_snapshot(journal: Journal, *, endpoints: bool) -> StateSnapshot:
    """Read everything the metrics show, in one transaction.

    ``endpoints``: also read ``webhook_endpoints`` (it exists once an outbox worker ran, i.e.
    when consumers are configured).  Raises StateError when the database cannot be read.
    """
    newest = (
        select(rotations.c.secret, func.max(rotations.c.version).label("v")).group_by(rotations.c.secret).subquery()
    )
    latest_q = select(rotations).join(
        newest, and_(rotations.c.secret == newest.c.secret, rotations.c.version == newest.c.v)
    )
    latest_ids = select(rotations.c.id).join(
        newest, and_(rotations.c.secret == newest.c.secret, rotations.c.version == newest.c.v)
    )
    progress_q = (
        select(rotations.c.secret, checkpoints)
        .join(rotations, rotations.c.id == checkpoints.c.rotation_id)
        .where(checkpoints.c.rotation_id.in_(latest_ids))
    )
    retrying = func.sum(case((outbox.c.attempts > 0, 1), else_=0))
    with journal.transaction() as conn:
        latest = [r for r in map(_rotation, conn.execute(latest_q).all()) if r is not None]
        counts = conn.execute(
            select(rotations.c.secret, rotations.c.status, func.count()).group_by(
                rotations.c.secret, rotations.c.status
            )
        ).all()
        progress_rows = conn.execute(progress_q).all()
        census_rows = conn.execute(select(census_counts)).all()
        quarantine_rows = conn.execute(
            select(quarantine.c.secret, quarantine.c.store, func.count()).group_by(
                quarantine.c.secret, quarantine.c.store
            )
        ).all()
        # Only the open rows: delivered and skipped ones pile up forever, and counting them
        # would make every scrape scan the whole history (attempts are counted as they happen).
        delivery_rows = conn.execute(
            select(outbox.c.consumer, outbox.c.status, func.count(), retrying)
            .where(outbox.c.status.in_(OPEN_STATUSES))
            .group_by(outbox.c.consumer, outbox.c.status)
        ).all()
        endpoint_rows = _endpoint_rows(conn) if endpoints else []
        drift_rows = conn.execute(
            select(drift.c.secret, drift.c.reason, func.count())
            .where(drift.c.resolved_at.is_(None))
            .group_by(drift.c.secret, drift.c.reason)
        ).all()
    return StateSnapshot(
        latest={r.secret: r for r in latest},
        rotations={(secret, status): int(n) for secret, status, n in counts},
        progress=[_progress(r._mapping) for r in progress_rows],
        census=[
            CensusCount(m["secret"], m["store"], m["key_id"], int(m["count"]), m["taken_at"])
            for m in (r._mapping for r in census_rows)
        ],
        quarantined={(secret, store): int(n) for secret, store, n in quarantine_rows},
        deliveries={(consumer, status): int(n) for consumer, status, n, _ in delivery_rows},
        retrying={consumer: int(n or 0) for consumer, status, _, n in delivery_rows if status == "pending" and n},
        endpoints={e.consumer: e for e in endpoint_rows},
        drift={(secret, reason): int(n) for secret, reason, n in drift_rows},
    )


def _progress(m: RowMapping) -> StoreProgress:
    return StoreProgress(
        secret=m["secret"],
        store=m["store"],
        step=m["step"],
        done=bool(m["done"]),
        estimate=m["estimate"],
        totals=_report(m["store"], m["totals"]),
    )


def _endpoint_rows(conn: Connection) -> list[EndpointHealth]:
    # Imported here: the outbox module owns this table, and only daemons with consumers have it.
    from ..notify.outbox import endpoints

    rows = conn.execute(
        select(endpoints.c.consumer, endpoints.c.failing_at, endpoints.c.disabled_at, endpoints.c.last_success_at)
    ).all()
    return [EndpointHealth(c, failing is not None, disabled is not None, last) for c, failing, disabled, last in rows]
