"""The SQL store's compare-and-swap writes, one strategy per engine.

Every strategy runs ``UPDATE t SET col = :new WHERE key = :key AND col = :old`` for each cell of
a batch, inside the caller's transaction, and returns how many rows it changed; a cell a bot
changed since it was read matches nothing.  They differ only in how the rows reach the server:

- PostgreSQL: one statement per :data:`ROWS_PER_STATEMENT` rows, the rows as arrays
  (``UPDATE ... FROM unnest(...)``) in psycopg's binary format, text sent as its UTF-8 bytes.
  Few parses, few round trips; psycopg's text format for arrays of long strings is slow, hence
  binary.
- SQLite and MariaDB/MySQL: the driver's ``executemany``, with the statement compiled once.

Both bypass SQLAlchemy's per-row parameter handling, which costs more than the UPDATE itself
on SQLite.  Keys are passed as the driver returned them (the store reads pages through the
DB-API cursor), so a key of a type the dialect would convert (a DATETIME on SQLite) matches
exactly as it was read; the ciphertext values go through their column type's bind processor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

import sqlalchemy as sa

__all__ = ["CasUpdate", "cas_update"]

Processor = Callable[[Any], Any]

#: Rows per PostgreSQL UPDATE: libpq keeps a connection's output buffer at the size of its
#: largest message, so one statement per 1000-row batch left ≈ 4 MB behind per connection.
ROWS_PER_STATEMENT = 250


class CasUpdate(Protocol):
    @property
    def text_as_bytes(self) -> bool:
        """Whether ``old`` and ``new`` of a text column are given as UTF-8 bytes (else as str)."""

    def run(self, conn: sa.Connection, rows: Sequence[Sequence[Any]]) -> int:
        """Apply ``rows`` (each ``(*key, old, new)``); the number written."""


def _processors(dialect: sa.Dialect, column: sa.Column[Any], at: int) -> tuple[tuple[int, Processor], ...]:
    """The bind processor of ``column`` for the old and the new value, at ``at`` and ``at + 1``
    in the flat row ``[*key, old, new]`` (none when the column type needs none)."""
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    return () if processor is None else ((at, processor), (at + 1, processor))


def _process(processors: tuple[tuple[int, Processor], ...], rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
    """``rows`` with each column's bind processor applied (the same rows when there is none)."""
    if not processors:
        return rows
    out = [list(row) for row in rows]
    for index, processor in processors:
        for row in out:
            row[index] = processor(row[index])
    return out


@dataclass(frozen=True)
class _ExecuteMany:
    sql: str
    #: For each driver parameter, its index in the flat row ``[*key, old, new]``.
    order: tuple[int, ...]
    names: tuple[str, ...] | None  # None: positional parameters
    processors: tuple[tuple[int, Processor], ...]
    text_as_bytes = False

    def run(self, conn: sa.Connection, rows: Sequence[Sequence[Any]]) -> int:
        rows = _process(self.processors, rows)
        # itemgetter picks the driver's parameter order in C: this runs once per re-encrypted row.
        pick = itemgetter(*self.order)
        if self.names is None:
            params: list[Any] = list(map(pick, rows))
        else:
            names = self.names
            params = [dict(zip(names, pick(row), strict=True)) for row in rows]
        return conn.exec_driver_sql(self.sql, params).rowcount


def _execute_many(
    dialect: sa.Dialect, table: sa.Table, keys: Sequence[sa.Column[Any]], column: sa.Column[Any]
) -> _ExecuteMany:
    current: Any = column
    if dialect.name in ("mysql", "mariadb") and column.type.python_type is str:
        # MariaDB compares text under the column's collation, often case-insensitive and blind
        # to trailing spaces: compare the bytes, as the other engines do.
        current = sa.cast(column, sa.LargeBinary)
    match_key = [k == sa.bindparam(f"_k{i}", type_=k.type) for i, k in enumerate(keys)]
    old = sa.bindparam("_old", type_=column.type)
    new = sa.bindparam("_new", type_=column.type)
    statement = sa.update(table).where(*match_key, current == old).values({column: new})
    compiled = statement.compile(dialect=dialect)
    source = {f"_k{i}": i for i in range(len(keys))} | {"_old": len(keys), "_new": len(keys) + 1}
    names = tuple(compiled.positiontup or ()) if compiled.positional else tuple(compiled.binds)
    order = tuple(source[name] for name in names)
    return _ExecuteMany(
        compiled.string,
        order,
        None if compiled.positional else names,
        _processors(dialect, column, len(keys)),
    )


@dataclass(frozen=True)
class _PostgresArrays:
    sql: str
    names: tuple[str, ...]
    processors: tuple[tuple[int, Processor], ...]
    #: A text column's values go as the bytes read and the bytes of the new token, in the text
    #: type's binary format (which is the UTF-8 bytes): no str is made of them, on either side.
    text_as_bytes: bool

    def run(self, conn: sa.Connection, rows: Sequence[Sequence[Any]]) -> int:
        rows = _process(self.processors, rows)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        written = 0
        try:
            if self.text_as_bytes:
                cursor.adapters.register_dumper(bytes, _bytes_as_text())  # this cursor only
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                part = rows[start : start + ROWS_PER_STATEMENT]
                cursor.execute(self.sql, {name: [row[i] for row in part] for i, name in enumerate(self.names)})
                written += int(cursor.rowcount)
            return written
        finally:
            cursor.close()


@functools.cache
def _bytes_as_text() -> type:
    """A psycopg dumper sending bytes as ``text`` in binary format (the bytes themselves)."""
    from psycopg.adapt import Dumper
    from psycopg.postgres import types
    from psycopg.pq import Format

    class BytesAsText(Dumper):
        format = Format.BINARY
        oid = types["text"].oid

        def dump(self, obj: Any) -> Any:
            return obj

    return BytesAsText


def _postgres_arrays(
    dialect: sa.Dialect, table: sa.Table, keys: Sequence[sa.Column[Any]], column: sa.Column[Any]
) -> _PostgresArrays:
    quote = dialect.identifier_preparer.quote
    target = dialect.identifier_preparer.format_table(table)
    columns = [*keys, column, column]
    names = (*(f"k{i}" for i in range(len(keys))), "old", "new")
    arrays = ", ".join(
        # %(name)b: psycopg's binary format.  Column types come from reflection, never from input.
        f"%({name})b::{c.type.compile(dialect=dialect)}[]"
        for name, c in zip(names, columns, strict=True)
    )
    match = " AND ".join(f"t.{quote(k.name)} = v.k{i}" for i, k in enumerate(keys))
    # Identifiers are quoted reflected names; values travel as parameters.
    sql = (
        f"UPDATE {target} AS t SET {quote(column.name)} = v.new "  # noqa: S608
        f"FROM unnest({arrays}) AS v({', '.join(names)}) "
        f"WHERE {match} AND t.{quote(column.name)} = v.old"
    )
    text = column.type.python_type is str
    return _PostgresArrays(sql, names, () if text else _processors(dialect, column, len(keys)), text)


def cas_update(engine: sa.Engine, table: sa.Table, keys: Sequence[sa.Column[Any]], column: sa.Column[Any]) -> CasUpdate:
    """The compare-and-swap strategy for ``column`` on this engine (see the module docstring)."""
    if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
        return _postgres_arrays(engine.dialect, table, keys, column)
    return _execute_many(engine.dialect, table, keys, column)
