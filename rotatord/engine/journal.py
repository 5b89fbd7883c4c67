"""The state database: rotations, their steps, the webhook outbox and the audit head.

It holds versions, phases, checkpoints, deliveries and audit digests, never key material.
SQLite (WAL) by default; the URL is configurable so PostgreSQL can hold it for several instances.
Each step records its intent (with a fresh request id) before acting and its result after, so a
process killed anywhere resumes the step with the same request id and never repeats its effect.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.types import TypeDecorator

from ..errors import RotationInProgress, StateError
from ..interfaces import Event
from ..timeutil import format_ts

if TYPE_CHECKING:
    from .drift_store import DriftRecord

__all__ = ["Journal", "RotationRow", "StepRow"]

ACTIVE = "active"
_CHECKED = "rotatord_write_checked"
_WRITE_RE = re.compile(r"\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every database (SQLite stores them naive)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData()

rotations = Table(
    "rotations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("secret", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(20), nullable=False),
    Column("phase", String(20), nullable=False),
    Column("status", String(16), nullable=False),
    Column("trigger", String(128), nullable=False),
    Column("emergency", Boolean, nullable=False, default=False),
    Column("reason", Text),
    Column("started_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("promote_after", UTCDateTime),
    Column("retire_after", UTCDateTime),
    Column("backend_version", String(128)),
    Column("previous_key", String(32)),
    Column("new_key", String(32)),
    Column("error", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    UniqueConstraint("secret", "version", name="uq_rotation_version"),
)
# Never two rotations of one secret at once, enforced by the database itself, across processes.
Index(
    "uq_one_active_rotation",
    rotations.c.secret,
    unique=True,
    sqlite_where=rotations.c.status == ACTIVE,
    postgresql_where=rotations.c.status == ACTIVE,
)

steps = Table(
    "steps",
    metadata,
    Column("rotation_id", Integer, ForeignKey("rotations.id"), primary_key=True),
    Column("name", String(32), primary_key=True),
    Column("state", String(16), nullable=False),  # intent | done
    Column("request_id", String(64), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("result", Text),  # JSON of non-secret facts: versions, key ids, counts
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("webhook_id", String(64), nullable=False, unique=True),
    Column("rotation_id", Integer, ForeignKey("rotations.id")),
    Column("consumer", String(64), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | skipped | dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime),
    Column("delivered_at", UTCDateTime),
    Column("last_error", Text),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("digest", String(64), nullable=False),
)


@dataclass(frozen=True)
class RotationRow:
    id: int
    secret: str
    version: int
    kind: str
    phase: str
    status: str
    trigger: str
    emergency: bool
    reason: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    promote_after: datetime | None
    retire_after: datetime | None
    backend_version: str | None
    previous_key: str | None
    new_key: str | None
    error: str | None
    attempts: int
    next_attempt_at: datetime | None

    @property
    def active(self) -> bool:
        return self.status == ACTIVE


@dataclass(frozen=True)
class StepRow:
    rotation_id: int
    name: str
    state: str
    request_id: str
    started_at: datetime
    finished_at: datetime | None
    result: dict[str, Any] | None


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Journal:
    """Typed access to the state database.  Thread-safe; every method is one transaction."""

    def __init__(self, url: str, *, connect_args: Mapping[str, Any] | None = None) -> None:
        self.url = url
        try:
            self._engine: Engine = create_engine(
                url, future=True, pool_pre_ping=True, connect_args=dict(connect_args or {})
            )
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StateError(f"state database URL is unusable: {type(exc).__name__}") from None
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)

    def create(self) -> None:
        """Create missing tables (idempotent).  A new SQLite file is created 0600 (its WAL too)."""
        database = self._engine.url.database
        if self._engine.dialect.name == "sqlite" and database and database != ":memory:":
            try:
                os.close(os.open(database, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
            except OSError as exc:
                raise StateError(f"cannot create the state database {database}: {exc.strerror}") from None
        from ..hooks import ledger as _hook_ledger  # noqa: F401 - registers its table too
        from . import drift_store, ledger, revoked_use  # noqa: F401 - register their tables on the shared metadata

        try:
            with self._engine.begin() as conn:
                if self._engine.dialect.name == "postgresql":
                    # Instances starting together would collide in CREATE TABLE IF NOT EXISTS.
                    conn.execute(select(func.pg_advisory_xact_lock(7271016)))
                metadata.create_all(conn)
        except SQLAlchemyError as exc:
            raise StateError(f"cannot initialise the state database: {describe_error(exc)}") from None

    def close(self) -> None:
        self._engine.dispose()

    def guard_writes(self, check: Callable[[Any], None]) -> None:
        """Call ``check(dbapi_connection)`` before the first write of every transaction.

        ``check`` runs inside that transaction (the leader's fencing: rotatord.daemon.leader);
        whatever it raises aborts the statement and rolls the transaction back, and reaches the
        caller unchanged.  Reads are never checked, so a standby still answers ``status``.
        """

        def before(conn: Connection, cursor: Any, statement: str, *_args: Any) -> None:
            if not conn.info.get(_CHECKED) and _WRITE_RE.match(statement):
                check(cursor.connection)
                conn.info[_CHECKED] = True

        def begin(conn: Connection) -> None:
            conn.info.pop(_CHECKED, None)

        event.listen(self._engine, "begin", begin)
        event.listen(self._engine, "before_cursor_execute", before)

    def transaction(self) -> AbstractContextManager[Connection]:
        """One transaction, for the modules that keep their own tables here (engine.ledger)."""
        return self._tx()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except OperationalError as exc:
            raise StateError(f"state database error: {describe_error(exc)}") from None
        except StatementError as exc:
            # A value the column type refused (a naive datetime) is the caller's mistake: say so
            # with the ValueError/TypeError itself instead of leaking SQLAlchemy's wrapper.
            if isinstance(exc.orig, ValueError | TypeError):
                raise exc.orig from None
            raise StateError(f"state database error: {describe_error(exc)}") from None

    # -- rotations -------------------------------------------------------------------------

    def latest(self, secret: str) -> RotationRow | None:
        with self._tx() as conn:
            row = conn.execute(
                select(rotations).where(rotations.c.secret == secret).order_by(rotations.c.version.desc()).limit(1)
            ).first()
        return _rotation(row)

    def active(self, secret: str) -> RotationRow | None:
        with self._tx() as conn:
            row = conn.execute(
                select(rotations).where(rotations.c.secret == secret, rotations.c.status == ACTIVE)
            ).first()
        return _rotation(row)

    def latest_all(self) -> dict[str, RotationRow]:
        """The latest rotation of every secret, in one query."""
        newest = (
            select(rotations.c.secret, func.max(rotations.c.version).label("v")).group_by(rotations.c.secret).subquery()
        )
        query = select(rotations).join(
            newest, (rotations.c.secret == newest.c.secret) & (rotations.c.version == newest.c.v)
        )
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return {r.secret: r for r in map(_rotation, rows) if r is not None}

    def all_active(self) -> list[RotationRow]:
        with self._tx() as conn:
            rows = conn.execute(select(rotations).where(rotations.c.status == ACTIVE)).all()
        return [r for r in map(_rotation, rows) if r is not None]

    def history(self, secret: str, limit: int = 100) -> list[RotationRow]:
        with self._tx() as conn:
            rows = conn.execute(
                select(rotations).where(rotations.c.secret == secret).order_by(rotations.c.version.desc()).limit(limit)
            ).all()
        return [r for r in map(_rotation, rows) if r is not None]

    def get(self, rotation_id: int) -> RotationRow:
        with self._tx() as conn:
            row = conn.execute(select(rotations).where(rotations.c.id == rotation_id)).first()
        result = _rotation(row)
        if result is None:
            raise StateError(f"rotation {rotation_id} is not in the journal")
        return result

    def start(
        self,
        *,
        secret: str,
        kind: str,
        version: int,
        phase: str,
        trigger: str,
        emergency: bool,
        reason: str | None,
        now: datetime,
    ) -> RotationRow:
        """Record a new active rotation; raise RotationInProgress if the secret already has one."""
        try:
            with self._tx() as conn:
                rid = conn.execute(
                    insert(rotations).values(
                        secret=secret,
                        kind=kind,
                        version=version,
                        phase=phase,
                        status=ACTIVE,
                        trigger=trigger,
                        emergency=emergency,
                        reason=reason,
                        started_at=now,
                        updated_at=now,
                        attempts=0,
                    )
                ).inserted_primary_key
        except IntegrityError:
            current = self.active(secret)
            where = f" (version {current.version}, phase {current.phase})" if current else ""
            raise RotationInProgress(f"a rotation of {secret!r} is already in progress{where}") from None
        assert rid is not None
        return self.get(int(rid[0]))

    def update(self, rotation_id: int, now: datetime, **values: Any) -> RotationRow:
        with self._tx() as conn:
            conn.execute(update(rotations).where(rotations.c.id == rotation_id).values(updated_at=now, **values))
        return self.get(rotation_id)

    # -- steps -----------------------------------------------------------------------------

    def step(self, rotation_id: int, name: str) -> StepRow | None:
        with self._tx() as conn:
            row = conn.execute(select(steps).where(steps.c.rotation_id == rotation_id, steps.c.name == name)).first()
        return _step(row)

    def steps(self, rotation_id: int) -> list[StepRow]:
        with self._tx() as conn:
            rows = conn.execute(
                select(steps).where(steps.c.rotation_id == rotation_id).order_by(steps.c.started_at)
            ).all()
        return [s for s in map(_step, rows) if s is not None]

    def begin_step(self, rotation_id: int, name: str, now: datetime) -> StepRow:
        """Record the intent to run a step, or return the existing record (same request id)."""
        existing = self.step(rotation_id, name)
        if existing is not None:
            return existing
        request_id = uuid.uuid4().hex
        try:
            with self._tx() as conn:
                conn.execute(
                    insert(steps).values(
                        rotation_id=rotation_id, name=name, state="intent", request_id=request_id, started_at=now
                    )
                )
        except IntegrityError:
            pass  # another thread recorded it first; theirs is the intent
        step = self.step(rotation_id, name)
        assert step is not None
        return step

    def complete_step(
        self,
        rotation_id: int,
        name: str,
        now: datetime,
        result: Mapping[str, Any],
        rotation: Mapping[str, Any],
        events: Sequence[tuple[str, Event]] = (),
        also: Callable[[Connection], None] | None = None,
    ) -> RotationRow:
        """In ONE transaction: mark the step done, move the rotation on, and queue its events.

        ``events`` are (consumer, event) pairs for the webhook outbox, so a notification exists
        exactly when the phase change that causes it does.  ``also`` writes more rows in that
        transaction (the phase's hook runs, see rotatord.hooks.ledger).
        """
        with self._tx() as conn:
            conn.execute(
                update(steps)
                .where(steps.c.rotation_id == rotation_id, steps.c.name == name)
                .values(state="done", finished_at=now, result=json.dumps(dict(result), sort_keys=True))
            )
            conn.execute(
                update(rotations)
                .where(rotations.c.id == rotation_id)
                .values(updated_at=now, error=None, attempts=0, next_attempt_at=None, **rotation)
            )
            for consumer, ev in events:
                _queue(conn, consumer, ev, now)
            if also is not None:
                also(conn)
        return self.get(rotation_id)

    def queue_events(self, events: Sequence[tuple[str, Event]], now: datetime) -> None:
        with self._tx() as conn:
            for consumer, ev in events:
                _queue(conn, consumer, ev, now)

    def pending_deliveries(self) -> int:
        with self._tx() as conn:
            n = conn.execute(select(func.count()).select_from(outbox).where(outbox.c.status == "pending")).scalar()
        return int(n or 0)

    # -- drift (see rotatord.engine.drift_store) ------------------------------------------

    def drift_all(self) -> list[DriftRecord]:
        """The open drift records of every secret, oldest first: for status and metrics
        collectors (e.g. a gauge of open drift per secret and reason).  No material."""
        from .drift_store import DriftLedger

        return DriftLedger(self).all_open()

    # -- audit head (see rotatord.audit.AuditHead) -----------------------------------------

    def load(self) -> tuple[int, str] | None:
        with self._tx() as conn:
            row = conn.execute(select(audit_head.c.seq, audit_head.c.digest).where(audit_head.c.id == 1)).first()
        return None if row is None else (int(row[0]), str(row[1]))

    def save(self, seq: int, digest: str) -> None:
        with self._tx() as conn:
            done = conn.execute(update(audit_head).where(audit_head.c.id == 1).values(seq=seq, digest=digest))
            if done.rowcount == 0:
                conn.execute(insert(audit_head).values(id=1, seq=seq, digest=digest))


def _queue(conn: Connection, consumer: str, ev: Event, now: datetime) -> None:
    data = {
        "secret": ev.secret,
        "rotation_id": ev.rotation_id,
        "version": ev.version,
        "phase": ev.phase,
        "backend": ev.backend,
        "path": ev.path,
        "backend_version": ev.backend_version,
        **dict(ev.detail),
    }
    queue_webhook(conn, consumer, ev.type, data, occurred_at=ev.occurred_at, rotation_id=ev.rotation_id, now=now)


def queue_webhook(
    conn: Connection,
    consumer: str,
    event_type: str,
    data: dict[str, Any],
    *,
    occurred_at: datetime,
    rotation_id: int | None,
    now: datetime,
) -> str:
    """One outbox row (Standard Webhooks payload ``{type, timestamp, data}``), due now, inside the
    caller's transaction; returns its ``webhook-id``."""
    webhook_id = f"msg_{uuid.uuid4().hex}"
    payload = {"type": event_type, "timestamp": format_ts(occurred_at), "data": data}
    conn.execute(
        insert(outbox).values(
            webhook_id=webhook_id,
            rotation_id=rotation_id,
            consumer=consumer,
            event_type=event_type,
            payload=json.dumps(payload, sort_keys=True, separators=(",", ":")),
            status="pending",
            attempts=0,
            created_at=now,
            next_attempt_at=now,
        )
    )
    return webhook_id


def _rotation(row: Any) -> RotationRow | None:
    if row is None:
        return None
    m = row._mapping
    return RotationRow(**{k: m[k] for k in RotationRow.__dataclass_fields__})


def _step(row: Any) -> StepRow | None:
    if row is None:
        return None
    m = row._mapping
    return StepRow(
        rotation_id=m["rotation_id"],
        name=m["name"],
        state=m["state"],
        request_id=m["request_id"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        result=json.loads(m["result"]) if m["result"] else None,
    )


def describe_error(exc: SQLAlchemyError) -> str:
    """The driver's error in one line (class and first line of its message), for StateError."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {str(orig or exc).splitlines()[0][:200]}"
