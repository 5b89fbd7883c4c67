"""The leader lease: one row in the PostgreSQL state database, timed by the database's clock.

``leader_lease(id=1, holder, epoch, acquired_at, expires_at)`` names the one instance allowed
to act.  Every statement reads ``clock_timestamp()`` on the server, so the instances' own clocks
never decide who leads:

- :meth:`LeaseStore.try_acquire` takes the lease only when it has expired (or was released),
  in one atomic ``UPDATE ... WHERE expires_at < clock_timestamp() RETURNING``, and bumps
  ``epoch``: each tenure has its own number, the fencing token.
- :meth:`LeaseStore.renew` pushes ``expires_at`` out, only for the epoch the caller holds and
  only while it has not expired.
- :data:`FENCE_SQL` is run inside every journal write transaction of the leader
  (:meth:`rotatord.engine.journal.Journal.guard_writes`): it takes a share lock on the row and
  returns the epoch.  A takeover ``UPDATE`` therefore waits for such a transaction to commit,
  and once it has committed, a deposed leader's next write reads a newer epoch and is refused.

The lease has its own small connection pool, named ``rotatord <instance> lease`` in
``pg_stat_activity``, with server-side lock and statement timeouts, so a busy journal pool never
delays a renewal.  A PostgreSQL advisory lock is not used: it is released when the server drops
the session, while the old process may still be running.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..errors import StateError
from .journal import Journal, describe_error

__all__ = [
    "FENCE_SQL",
    "InstanceAuditHead",
    "Lease",
    "LeaseInfo",
    "LeaseStore",
    "audit_head",
    "connect_args",
    "supports_lease",
]

metadata = MetaData()
leader_lease = Table(
    "leader_lease",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("acquired_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# Each instance appends to its own audit log file, so each file's chain has its own head.
audit_heads = Table(
    "audit_heads",
    metadata,
    Column("instance", String(64), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
)

#: Run by the journal's write guard on the leader's own connection, inside its transaction.
FENCE_SQL = "SELECT epoch FROM leader_lease WHERE id = 1 FOR SHARE"

_ACQUIRE = text(
    "UPDATE leader_lease SET holder = :holder, epoch = epoch + 1, acquired_at = clock_timestamp(),"
    " expires_at = clock_timestamp() + make_interval(secs => :ttl)"
    " WHERE id = 1 AND expires_at < clock_timestamp() RETURNING epoch, holder, expires_at"
)
_RENEW = text(
    "UPDATE leader_lease SET expires_at = clock_timestamp() + make_interval(secs => :ttl)"
    " WHERE id = 1 AND epoch = :epoch AND expires_at >= clock_timestamp() RETURNING epoch"
)
_RELEASE = text("UPDATE leader_lease SET expires_at = 'epoch' WHERE id = 1 AND epoch = :epoch")
_CURRENT = text(
    "SELECT holder, epoch, expires_at, EXTRACT(EPOCH FROM expires_at - clock_timestamp())"
    " FROM leader_lease WHERE id = 1"
)


def supports_lease(url: str) -> bool:
    """True for a PostgreSQL state URL: the only store where several instances may run."""
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def connect_args(instance: str, role: str) -> dict[str, Any]:
    """psycopg connection arguments naming the connection after the instance (pg_stat_activity)."""
    return {"application_name": f"rotatord {instance} {role}"[:63], "connect_timeout": 5}


@dataclass(frozen=True)
class Lease:
    """A tenure this process holds: ``epoch`` is its fencing token."""

    holder: str
    epoch: int
    expires_at: datetime


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds the lease now, as the database sees it."""

    holder: str | None
    epoch: int
    expires_at: datetime | None
    #: Seconds until it expires on the database clock (negative: expired or released).
    expires_in: float


class LeaseStore:
    """The lease row.  Every method raises StateError when the database cannot be reached."""

    def __init__(self, url: str, instance: str, timeout: timedelta) -> None:
        self.instance = instance
        ms = max(500, int(timeout.total_seconds() * 1000))
        args = connect_args(instance, "lease")
        # Server-side bounds: a renewal waiting on a lock or a slow server gives up instead of
        # hanging past the moment the leader must stop acting anyway.
        args["options"] = f"-c lock_timeout={ms} -c statement_timeout={ms}"
        try:
            self._engine = create_engine(url, pool_size=1, max_overflow=1, pool_pre_ping=True, connect_args=args)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StateError(f"state database URL is unusable: {type(exc).__name__}") from None

    def create(self) -> None:
        """Create the table and its one row (idempotent, safe when instances start together)."""
        with self._tx() as conn:
            # Serialises concurrent CREATE TABLE IF NOT EXISTS, which can otherwise collide.
            conn.execute(text("SELECT pg_advisory_xact_lock(7271017)"))
            metadata.create_all(conn)
            conn.execute(
                text(
                    "INSERT INTO leader_lease (id, holder, epoch, expires_at)"
                    " VALUES (1, '', 0, 'epoch') ON CONFLICT (id) DO NOTHING"
                )
            )

    def try_acquire(self, ttl: timedelta) -> Lease | None:
        """Take the lease if it has expired; None while someone else holds it."""
        with self._tx() as conn:
            row = conn.execute(_ACQUIRE, {"holder": self.instance, "ttl": ttl.total_seconds()}).first()
        return None if row is None else Lease(str(row.holder), int(row.epoch), row.expires_at)

    def renew(self, epoch: int, ttl: timedelta) -> bool:
        """Extend our tenure; False when it is over (expired, released or taken over)."""
        with self._tx() as conn:
            row = conn.execute(_RENEW, {"epoch": epoch, "ttl": ttl.total_seconds()}).first()
        return row is not None

    def release(self, epoch: int) -> None:
        """End our tenure now, so a standby need not wait for the expiry (clean shutdown)."""
        with self._tx() as conn:
            conn.execute(_RELEASE, {"epoch": epoch})

    def current(self) -> LeaseInfo:
        with self._tx() as conn:
            row = conn.execute(_CURRENT).first()
        if row is None:
            return LeaseInfo(None, 0, None, -1.0)
        holder, epoch, expires_at, left = row
        left_s = float(left) if left is not None else -1.0
        return LeaseInfo(str(holder) or None, int(epoch), expires_at, left_s)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        # The URL (it may carry a password) never reaches the message.
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StateError(f"leader lease: {describe_error(exc)}") from None


class InstanceAuditHead:
    """The newest ``(seq, digest)`` of one instance's audit log (rotatord.audit.AuditHead).

    With several instances each writes its own audit log file; one shared head would describe
    none of them, so the head is kept per instance name.
    """

    def __init__(self, journal: Journal, instance: str) -> None:
        self.journal = journal
        self.instance = instance
        with journal.transaction() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(7271017)"))
            audit_heads.create(conn, checkfirst=True)

    def load(self) -> tuple[int, str] | None:
        with self.journal.transaction() as conn:
            row = conn.execute(
                select(audit_heads.c.seq, audit_heads.c.digest).where(audit_heads.c.instance == self.instance)
            ).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def save(self, seq: int, digest: str) -> None:
        with self.journal.transaction() as conn:
            done = conn.execute(
                update(audit_heads).where(audit_heads.c.instance == self.instance).values(seq=seq, digest=digest)
            )
            if done.rowcount == 0:
                conn.execute(insert(audit_heads).values(instance=self.instance, seq=seq, digest=digest))


def audit_head(journal: Journal, instance: str) -> Journal | InstanceAuditHead:
    """Where the audit log's head is kept: per instance on PostgreSQL, else the journal's one row."""
    return InstanceAuditHead(journal, instance) if supports_lease(journal.url) else journal
