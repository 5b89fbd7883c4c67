"""Rows of one SQL table (SQLite, PostgreSQL via psycopg 3, MariaDB/MySQL via PyMySQL), SQLAlchemy Core.

Each non-NULL cell of a configured column is one item.  The table is walked with keyset
pagination on the configured key (``ORDER BY key LIMIT batch_size``, resuming ``WHERE key >
last``), so memory stays flat and a checkpoint is just the last key seen.  Every write is a
compare-and-swap, ``UPDATE t SET col = :new WHERE key = :key AND col = :old``
(:mod:`rotatord.stores.sql_cas`), all cells of a batch in one transaction: a row a bot changed
meanwhile matches nothing and is counted as a conflict, never overwritten.

Pages are read through the DB-API cursor (:class:`_Reader`).  PostgreSQL and MariaDB write
behind, on writer threads with connections of their own (see :mod:`rotatord.stores.batch`); on
SQLite, which works inside this process, the WAL checkpoints move to a thread instead
(:class:`_WalCheckpointer`).

The URL holds a password, so it is read by reference when the store is first used and never
appears in a message: errors name the store's label, and driver messages pass through
:func:`rotatord.sensitive.redact` after the URL and its password were registered there.
"""

from __future__ import annotations

import base64
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from ..config.model import SqlStoreSettings
from ..config.references import read_credential
from ..errors import StoreError
from ..interfaces import Census, DataStore, Identify, Progress, ReencryptReport, RotateBatch
from ..sensitive import Sensitive, redact
from .batch import Batch, Pacer, count_census, decode_checkpoint, run_reencrypt
from .sql_cas import CasUpdate, cas_update

__all__ = ["SqlStore"]

#: (key values, index of the column in ``settings.columns``, the value read).  The value is the
#: str the driver returned for a text column, unless the column's compare-and-swap takes text as
#: bytes (PostgreSQL, see sql_cas): then, as for a binary column, it is the batch's token itself
#: (one object shared with the batch, not a copy).
Handle = tuple[tuple[Any, ...], int, str | bytes]


@dataclass(frozen=True)
class _Reader:
    """One page query compiled for the driver: read through the DB-API cursor, rows come back as
    the driver's tuples, keys in the driver's own types (they go back to it unchanged, in the
    next page's ``key > last`` and in the compare-and-swap).  SQLAlchemy's result rows cost
    more per row than the database's work on SQLite."""

    sql: str
    positional: tuple[str, ...] | None  # parameter names in order; None: named parameters
    fixed: dict[str, Any]  # the statement's own values (the LIMIT)

    @classmethod
    def compile(cls, statement: sa.Select[Any], dialect: sa.Dialect) -> _Reader:
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        positional = tuple(compiled.positiontup or ()) if compiled.positional else None
        fixed = {name: value for name, value in compiled.params.items() if not name.startswith("_k")}
        return cls(compiled.string, positional, fixed)

    def read(self, conn: sa.Connection, keys: Sequence[Any]) -> list[tuple[Any, ...]]:
        values = self.fixed | {f"_k{i}": v for i, v in enumerate(keys)}
        params: Any = values if self.positional is None else tuple(values[name] for name in self.positional)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, params)
            return list(cursor.fetchall())
        finally:
            cursor.close()


class _WalCheckpointer:
    """SQLite in WAL mode: the store's own connections do not checkpoint on commit
    (``wal_autocheckpoint=0``, a per-connection setting: the bots' connections keep theirs).  This
    thread checkpoints, on a connection of its own, after each batch is committed, while the next
    batch is read and re-encrypted; the next write waits for it first, so the WAL holds about
    two batches at most.  Measured: copying a batch's pages back from the WAL on commit was a
    third of the main thread's time per row.  A checkpoint moves no data a reader could see and
    is not a write transaction: a daemon killed before one leaves the WAL to the next commit."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._conn: Any = None

    def wait(self) -> None:
        """Wait for the last checkpoint; raise what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rotatord-wal-checkpoint")
        self._pending = self._executor.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        if self._conn is None:
            cargs, cparams = self._engine.dialect.create_connect_args(self._engine.url)
            cparams["check_same_thread"] = False  # closed by close(), from another thread
            self._conn = self._engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def close(self) -> None:
        """Wait for the last checkpoint (its error, if any, is dropped: callers that care
        :meth:`wait` first), then stop the thread and close the connection.  Reusable: the next
        :meth:`start` begins again."""
        with contextlib.suppress(Exception):
            self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _no_autocheckpoint(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA wal_autocheckpoint=0")
    finally:
        cursor.close()


@dataclass(frozen=True)
class _Shape:
    """The reflected table and the statements built from it once per check()."""

    table: sa.Table
    keys: tuple[sa.Column[Any], ...]
    columns: tuple[sa.Column[Any], ...]
    first: _Reader
    after: _Reader
    updates: tuple[CasUpdate, ...]


def _python_type(column: sa.Column[Any]) -> type | None:
    try:
        return column.type.python_type
    except NotImplementedError:
        return None


def _encode_key(value: Any) -> Any:
    """A key value as JSON (for the checkpoint); restored by :func:`_decode_key`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime | date | time_of_day):
        return {"iso": value.isoformat()}
    return {"str": str(value)}


def _decode_key(value: Any, python_type: type | None) -> Any:
    if not isinstance(value, dict):
        return value
    if "b64" in value:
        return base64.b64decode(value["b64"])
    if "iso" in value:
        if python_type is date:
            return date.fromisoformat(value["iso"])
        if python_type is time_of_day:
            return time_of_day.fromisoformat(value["iso"])
        return datetime.fromisoformat(value["iso"])
    text = value["str"]
    if python_type in (Decimal, uuid.UUID):
        return python_type(text)
    return text


def _checkpoint_key(encoded: Any, column: sa.Column[Any], dialect: sa.Dialect) -> Any:
    """A key value from a checkpoint (:func:`_encode_key`) as the driver takes it.  Checkpoints
    hold the driver's own values (see _Reader), which pass unchanged; those written before keys
    were read raw hold SQLAlchemy's (a ``datetime`` for a DATETIME key on SQLite), which the
    column type converts."""
    value = _decode_key(encoded, _python_type(column))
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor(value) if processor is not None else value


def _after(keys: Sequence[sa.Column[Any]], params: Sequence[sa.BindParameter[Any]], dialect: str) -> Any:
    """``key > last`` for a (possibly composite) key, in a form the dialect can use an index for."""
    if len(keys) == 1:
        return keys[0] > params[0]
    if dialect in ("postgresql", "sqlite"):
        return sa.tuple_(*keys) > sa.tuple_(*params)

    # MariaDB does not turn row-value comparisons into index ranges: spell it out, with a
    # leading ``k0 >= :k0`` that bounds the range scan.
    def greater(i: int) -> Any:
        if i == len(keys) - 1:
            return keys[i] > params[i]
        return sa.or_(keys[i] > params[i], sa.and_(keys[i] == params[i], greater(i + 1)))

    return sa.and_(keys[0] >= params[0], greater(0))


class SqlStore(DataStore):
    """One table's ciphertext columns.  ``clock``/``sleep`` drive the optional rate limit."""

    kind = "sql"

    def __init__(
        self,
        label_prefix: str,
        settings: SqlStoreSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._label = f"{label_prefix}:sql:{settings.table}({','.join(settings.columns)})"
        self._clock = clock
        self._sleep = sleep
        self._engine: Engine | None = None
        self._shape: _Shape | None = None
        self._wal: _WalCheckpointer | None = None

    @property
    def label(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"SqlStore({self._label!r})"

    # -- connection and shape ---------------------------------------------------------------

    def _open(self) -> Engine:
        if self._engine is not None:
            return self._engine
        raw = read_credential(self._settings.url_file, self._settings.url_credential, f"{self._label}: url")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise StoreError(f"{self._label}: the url file is not UTF-8 text") from None
        Sensitive(text)  # registered for redaction: driver messages may echo parts of it
        try:
            url = sa.make_url(text)
        except sa_exc.ArgumentError:
            raise StoreError(f"{self._label}: the url is not a SQLAlchemy database URL") from None
        if url.password:
            Sensitive(str(url.password))
        try:
            engine = sa.create_engine(url, pool_pre_ping=True)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
            name = getattr(exc, "name", None) or url.drivername
            raise StoreError(
                f"{self._label}: database driver {name!r} is not available "
                "(install rotatord[postgresql] or rotatord[mysql])"
            ) from None
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _no_autocheckpoint)
            self._wal = _WalCheckpointer(engine)
        self._engine = engine
        return engine

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Translate SQLAlchemy and driver exceptions into StoreError naming the store."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            # The DBAPI's own message only: SQLAlchemy's adds the statement and its parameters.
            raise self._driver_error(doing, exc.orig) from None
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"{self._label}: {doing}: {type(exc).__name__}") from None
        except Exception as exc:
            # Pages are read through the driver's cursor (see _Reader): its errors come unwrapped.
            dbapi = self._engine.dialect.loaded_dbapi if self._engine is not None else None
            if dbapi is not None and isinstance(exc, dbapi.Error):
                raise self._driver_error(doing, exc) from None
            raise

    def _driver_error(self, doing: str, exc: BaseException | None) -> StoreError:
        text = str(exc).strip()
        detail = redact(text.splitlines()[0] if text else "")[:300]
        return StoreError(f"{self._label}: {doing}: {type(exc).__name__}: {detail}")

    def check(self) -> None:
        self._shape = None
        self._prepare()

    def _prepare(self) -> _Shape:
        if self._shape is not None:
            return self._shape
        settings = self._settings
        engine = self._open()
        schema, _, name = settings.table.rpartition(".")
        with self._errors("cannot connect to the database"), engine.connect() as conn:
            try:
                table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=conn)
            except sa_exc.NoSuchTableError:
                raise StoreError(f"{self._label}: table {settings.table!r} does not exist") from None
            inspector = sa.inspect(conn)
            uniques = [
                {str(c) for c in u["column_names"]} for u in inspector.get_unique_constraints(name, schema or None)
            ]
            uniques += [
                {str(c) for c in i["column_names"]} for i in inspector.get_indexes(name, schema or None) if i["unique"]
            ]
        present = ", ".join(table.c.keys())
        for wanted in (*settings.key, *settings.columns):
            if wanted not in table.c:
                raise StoreError(f"{self._label}: column {wanted!r} does not exist in {settings.table} ({present})")
        keys = tuple(table.c[k] for k in settings.key)
        columns = tuple(table.c[c] for c in settings.columns)
        primary = {c.name for c in table.primary_key.columns}
        if set(settings.key) != primary:
            if set(settings.key) not in uniques:
                raise StoreError(f"{self._label}: key ({', '.join(settings.key)}) is not a primary or unique key")
            nullable = [k.name for k in keys if k.nullable]
            if nullable:
                raise StoreError(f"{self._label}: key column {nullable[0]!r} is nullable")
        for column in columns:
            if column.name in settings.key:
                raise StoreError(f"{self._label}: column {column.name!r} is part of the key")
            if _python_type(column) not in (str, bytes) or isinstance(column.type, sa.Enum):
                kind = type(column.type).__name__
                raise StoreError(f"{self._label}: column {column.name!r} is {kind}, not text or bytes")
        if settings.where:
            with self._errors("the where filter fails"), engine.connect() as conn:
                conn.execute(sa.select(sa.literal(1)).select_from(table).where(self._filter()).limit(1)).all()
        self._shape = self._statements(engine, table, keys, columns)
        return self._shape

    def _filter(self) -> Any:
        # Trusted operator text (see SqlStoreSettings.where), parenthesised so an OR stays inside.
        return sa.text(f"({self._settings.where})")

    def _statements(
        self, engine: Engine, table: sa.Table, keys: tuple[sa.Column[Any], ...], columns: tuple[sa.Column[Any], ...]
    ) -> _Shape:
        dialect = engine.dialect.name
        first = sa.select(*keys, *columns).order_by(*keys).limit(self._settings.batch_size)
        if self._settings.where:
            first = first.where(self._filter())
        params = [sa.bindparam(f"_k{i}", type_=k.type) for i, k in enumerate(keys)]
        after = first.where(_after(keys, params, dialect))
        updates = [cas_update(engine, table, keys, column) for column in columns]
        return _Shape(
            table,
            keys,
            columns,
            _Reader.compile(first, engine.dialect),
            _Reader.compile(after, engine.dialect),
            tuple(updates),
        )

    # -- reading ----------------------------------------------------------------------------

    def _rows(self, after: Sequence[Any] | None) -> Iterator[Sequence[Sequence[Any]]]:
        """Pages of ``(key..., column...)`` rows in key order, after ``after`` if given."""
        shape = self._prepare()
        engine = self._open()
        last = after
        while True:
            with self._errors("cannot read"), engine.connect() as conn:
                rows = shape.first.read(conn, ()) if last is None else shape.after.read(conn, last)
            if not rows:
                return
            yield rows
            if len(rows) < self._settings.batch_size:
                return
            last = tuple(rows[-1][: len(shape.keys)])

    def _batches(self, after: Sequence[Any] | None) -> Iterator[Batch[Handle]]:
        width = len(self._settings.key)
        as_bytes = [update.text_as_bytes for update in self._prepare().updates]
        for rows in self._rows(after):
            handles: list[Handle] = []
            tokens: list[bytes] = []
            for row in rows:
                key = tuple(row[:width])
                for index, value in enumerate(row[width:]):
                    if value is None:
                        continue
                    if isinstance(value, str):
                        raw = value.encode("utf-8", "surrogatepass")
                        handles.append((key, index, raw if as_bytes[index] else value))
                    else:
                        raw = bytes(value)
                        handles.append((key, index, raw))
                    tokens.append(raw)
            yield Batch(handles, tokens, [_encode_key(v) for v in rows[-1][:width]])

    def _write(self, handles: list[Handle], news: list[bytes]) -> int:
        shape = self._prepare()
        by_column: dict[int, list[tuple[Any, ...]]] = {}
        for (key, index, old), new in zip(handles, news, strict=True):
            # The new token keeps the type of the value read: text stays text, bytes stay bytes.
            by_column.setdefault(index, []).append((*key, old, new.decode("ascii") if isinstance(old, str) else new))
        written = 0
        engine = self._open()
        with self._errors("cannot write"):
            if self._wal is not None:
                self._wal.wait()
            with engine.begin() as conn:
                for index, rows in sorted(by_column.items()):
                    written += shape.updates[index].run(conn, rows)
            if self._wal is not None:
                self._wal.start()
        return written

    def _locate(self, handle: Handle) -> str:
        key, index, _ = handle
        where = ", ".join(f"{k}={v!r}" for k, v in zip(self._settings.key, key, strict=True))
        return f"{self._settings.table}.{self._settings.columns[index]}({where})"

    # -- DataStore --------------------------------------------------------------------------

    def _pacer(self) -> Pacer | None:
        rate = self._settings.rate_limit
        return Pacer(rate, self._clock, self._sleep) if rate else None

    def census(self, identify: Identify) -> Census:
        batches = (batch.tokens for batch in self._batches(None))
        return count_census(self._label, batches, identify, self._pacer())

    def reencrypt(
        self,
        rotate: RotateBatch,
        identify: Identify,
        primary_id: str,
        checkpoint: str | None,
        progress: Progress,
    ) -> ReencryptReport:
        cursor, totals = decode_checkpoint(self._label, checkpoint)
        shape = self._prepare()
        dialect = self._open().dialect
        after = None
        if cursor is not None:
            if not isinstance(cursor, list) or len(cursor) != len(shape.keys):
                raise StoreError(f"{self._label}: the checkpoint does not match the configured key")
            after = tuple(_checkpoint_key(v, k, dialect) for v, k in zip(cursor, shape.keys, strict=True))
        try:
            report = run_reencrypt(
                label=self._label,
                batches=self._batches(after),
                write=self._write,
                locate=self._locate,
                rotate=rotate,
                identify=identify,
                primary_id=primary_id,
                progress=progress,
                totals=totals,
                pacer=self._pacer(),
                write_behind=dialect.name != "sqlite",
            )
        except BaseException:
            if self._wal is not None:
                self._wal.close()  # its own error, if any, matters less than the step's
            raise
        if self._wal is not None:
            try:
                with self._errors("cannot checkpoint the WAL"):
                    self._wal.wait()
            finally:
                self._wal.close()  # no thread or connection left idle between passes
        return report

    def estimate(self) -> int | None:
        """Rows times columns (an upper bound when columns hold NULLs); from the planner's
        statistics on PostgreSQL and MariaDB, a count on SQLite; None when unknown."""
        shape = self._prepare()
        engine = self._open()
        table = shape.table
        rows: Any = None
        with self._errors("cannot estimate"), engine.connect() as conn:
            dialect = engine.dialect.name
            if dialect == "postgresql" and not self._settings.where:
                rows = conn.execute(
                    sa.text("SELECT reltuples FROM pg_class WHERE oid = CAST(:name AS regclass)"),
                    {"name": table.fullname},
                ).scalar()
            elif dialect in ("mysql", "mariadb") and not self._settings.where:
                rows = conn.execute(
                    sa.text(
                        "SELECT table_rows FROM information_schema.tables "
                        "WHERE table_schema = COALESCE(:schema, DATABASE()) AND table_name = :name"
                    ),
                    {"schema": table.schema, "name": table.name},
                ).scalar()
            elif dialect == "sqlite":
                query = sa.select(sa.func.count()).select_from(table)
                rows = conn.execute(query.where(self._filter()) if self._settings.where else query).scalar()
        if rows is None or float(rows) < 0:
            return None
        return int(float(rows)) * len(shape.columns)

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        self._shape = None
