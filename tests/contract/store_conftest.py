"""Fixtures for the DataStore contract suite, run against every store on real servers.

A :class:`Harness` owns one fresh store (its own table, directory or key prefix) and touches the
data the way a bot would, directly through the engine's own client, so the tests can plant
tokens and look at what the store left behind.  Items are numbered; what an item is (a row's
cell, a file, a Redis key or hash field) is the harness's business.

To add a store: write a Harness subclass and a branch in :func:`harness`.  The test module imports
these fixtures (``tests/contract/conftest.py`` belongs to the backend suite).
"""

from __future__ import annotations

import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet

from rotatord.config.model import FilesStoreSettings, RedisStoreSettings, SqlStoreSettings
from rotatord.crypto.parallel import BatchRotator
from rotatord.document import FernetKey, FernetRing
from rotatord.engine.reencrypt import serial_batch_rotator
from rotatord.interfaces import DataStore, Progress, ReencryptReport, RotateBatch
from rotatord.sensitive import Sensitive
from rotatord.stores.files import FilesStore
from rotatord.stores.redis import RedisStore
from rotatord.stores.sql import SqlStore
from tests.servers.databases import mariadb_url, postgres_url, redis_url, url_file

#: The fixtures, for ``from tests.contract.store_conftest import *`` in the test module.
__all__ = [
    "files_harness",
    "harness",
    "keys",
    "mariadb_url",
    "pool_rotator",
    "postgres_url",
    "redis_harness",
    "redis_url",
    "ring",
    "rotate_batch",
    "sql_harness",
]

T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
STAMP = int(T0.timestamp())
IMPLEMENTATIONS = ["sqlite", "postgresql", "mariadb", "files", "redis-string", "redis-hash"]


class Keys:
    """The ring's keys as Fernet objects (old = v1, decrypt-only; new = v2, primary) and a
    foreign key that is not in the ring."""

    def __init__(self) -> None:
        self.material = {"v1": Fernet.generate_key(), "v2": Fernet.generate_key()}
        self.old = Fernet(self.material["v1"])
        self.new = Fernet(self.material["v2"])
        self.foreign = Fernet(Fernet.generate_key())

    def ring(self) -> FernetRing:
        members = (
            FernetKey("v1", Sensitive(self.material["v1"].decode()), "decrypt_only", T0 - timedelta(days=30)),
            FernetKey("v2", Sensitive(self.material["v2"].decode()), "primary", T0),
        )
        return FernetRing("bot-db", 2, "v2", members, T0)


class Recorder(Progress):
    """A Progress that remembers everything and can ask the store to stop after N batches."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.checkpoints: list[tuple[str, ReencryptReport]] = []
        self.quarantined: list[tuple[str, str]] = []

    def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
        self.checkpoints.append((checkpoint, totals))

    def quarantine(self, locator: str, reason: str) -> None:
        self.quarantined.append((locator, reason))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.checkpoints) >= self.stop_after

    @property
    def last(self) -> str | None:
        return self.checkpoints[-1][0] if self.checkpoints else None


#: The simplest RotateBatch: the engine's own in-process fallback, one token at a time.
plain_rotate = serial_batch_rotator


class Harness(ABC):
    """One store under test plus a bot's direct access to its data."""

    name: str
    #: Whether a batch holds exactly ``batch_size`` items (false for Redis: SCAN's COUNT is a hint).
    exact_batches = True

    @abstractmethod
    def make(self, batch_size: int = 10, **kwargs: Any) -> DataStore:
        """A new store object on this data; ``kwargs`` go to the store's constructor."""

    @abstractmethod
    def put(self, item: int, token: bytes | None) -> None:
        """Create or replace item ``item`` (None: an absent item: NULL cell, no file, no key)."""

    @abstractmethod
    def get(self, item: int) -> bytes | None:
        """What item ``item`` holds now, as the token bytes."""

    @abstractmethod
    def locator(self, item: int) -> str:
        """A substring the store's locator for ``item`` contains."""

    def cleanup(self) -> None:  # noqa: B027 - optional
        pass


# -- SQL ------------------------------------------------------------------------------------


class SqlHarness(Harness):
    """Table ``t_<random>(id INTEGER PRIMARY KEY, body TEXT NULL)``; item i is row i's body."""

    def __init__(self, name: str, url: str, directory: Path) -> None:
        self.name = name
        self.url = url
        self.engine = sa.create_engine(url)
        self.table_name = f"t_{uuid.uuid4().hex[:10]}"
        self.metadata = sa.MetaData()
        self.table = sa.Table(
            self.table_name,
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
            sa.Column("body", sa.Text, nullable=True),
        )
        self.metadata.create_all(self.engine)
        self.url_path = url_file(directory, url)
        self.extra: list[sa.Table] = []

    def settings(self, batch_size: int = 10, **overrides: Any) -> SqlStoreSettings:
        values: dict[str, Any] = {
            "kind": "sql",
            "url_file": self.url_path,
            "table": self.table_name,
            "key": ("id",),
            "columns": ("body",),
            "batch_size": batch_size,
        }
        values.update(overrides)
        return SqlStoreSettings(**values)

    def make(self, batch_size: int = 10, **kwargs: Any) -> DataStore:
        overrides = {k: kwargs.pop(k) for k in ("rate_limit", "where", "table", "key", "columns") if k in kwargs}
        return SqlStore(f"contract-{self.name}", self.settings(batch_size, **overrides), **kwargs)

    def put(self, item: int, token: bytes | None) -> None:
        value = token.decode() if token is not None else None
        with self.engine.begin() as conn:
            updated = conn.execute(self.table.update().where(self.table.c.id == item).values(body=value)).rowcount
            if not updated:
                conn.execute(self.table.insert().values(id=item, body=value))

    def get(self, item: int) -> bytes | None:
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(self.table.c.body).where(self.table.c.id == item)).scalar()
        return value.encode() if value is not None else None

    def locator(self, item: int) -> str:
        return f"id={item}"

    def create(self, *columns: sa.Column[Any]) -> sa.Table:
        """Another table for one test, dropped at cleanup."""
        table = sa.Table(f"t_{uuid.uuid4().hex[:10]}", sa.MetaData(), *columns)
        table.create(self.engine)
        self.extra.append(table)
        return table

    def cleanup(self) -> None:
        for table in self.extra:
            table.drop(self.engine, checkfirst=True)
        self.metadata.drop_all(self.engine)
        self.engine.dispose()


# -- files ----------------------------------------------------------------------------------


class FilesHarness(Harness):
    """``<dir>/NNNNN.tok`` files, each a token and a newline; item i is file i."""

    name = "files"

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "tokens"
        self.directory.mkdir()

    def make(self, batch_size: int = 10, **kwargs: Any) -> DataStore:
        overrides: dict[str, Any] = {k: kwargs.pop(k) for k in ("rate_limit", "pattern", "directory") if k in kwargs}
        values: dict[str, Any] = {"kind": "files", "directory": self.directory, "pattern": "*.tok"}
        values.update(overrides)
        return FilesStore("contract-files", FilesStoreSettings(batch_size=batch_size, **values), **kwargs)

    def path(self, item: int) -> Path:
        return self.directory / f"{item:05d}.tok"

    def put(self, item: int, token: bytes | None) -> None:
        if token is None:
            self.path(item).unlink(missing_ok=True)
            return
        tmp = self.directory / f".bot-{item}.tmp"
        tmp.write_bytes(token + b"\n")
        os.replace(tmp, self.path(item))  # bots write by rename too

    def get(self, item: int) -> bytes | None:
        try:
            return self.path(item).read_bytes().rstrip(b"\n")
        except FileNotFoundError:
            return None

    def locator(self, item: int) -> str:
        return f"{item:05d}.tok"


# -- Redis ----------------------------------------------------------------------------------


class RedisHarness(Harness):
    """Keys ``rtd:<random>:NNNNN``; strings, or the ``token`` field of hashes."""

    exact_batches = False

    def __init__(self, url: str, directory: Path, hashes: bool) -> None:
        import redis

        self.name = "redis-hash" if hashes else "redis-string"
        self.client = redis.Redis.from_url(url)
        self.prefix = f"rtd:{uuid.uuid4().hex[:10]}:"
        self.hashes = hashes
        self.url_path = url_file(directory, url)

    def key(self, item: int) -> str:
        return f"{self.prefix}{item:05d}"

    def make(self, batch_size: int = 10, **kwargs: Any) -> DataStore:
        overrides: dict[str, Any] = {k: kwargs.pop(k) for k in ("rate_limit", "pattern", "url_file") if k in kwargs}
        values: dict[str, Any] = {
            "kind": "redis",
            "url_file": self.url_path,
            "pattern": f"{self.prefix}*",
            "hash_fields": ("token",) if self.hashes else (),
            "batch_size": batch_size,
        }
        values.update(overrides)
        return RedisStore(f"contract-{self.name}", RedisStoreSettings(**values), **kwargs)

    def put(self, item: int, token: bytes | None) -> None:
        if token is None:
            self.client.delete(self.key(item))
        elif self.hashes:
            self.client.hset(self.key(item), mapping={"token": token, "other": b"not a token"})
        else:
            self.client.set(self.key(item), token)

    def get(self, item: int) -> bytes | None:
        value = self.client.hget(self.key(item), "token") if self.hashes else self.client.get(self.key(item))
        assert value is None or isinstance(value, bytes)
        return value

    def locator(self, item: int) -> str:
        return self.key(item)

    def cleanup(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            self.client.delete(*keys)
        self.client.close()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="session")
def ring(keys: Keys) -> FernetRing:
    return keys.ring()


@pytest.fixture(scope="session")
def pool_rotator(ring: FernetRing) -> Iterator[BatchRotator]:
    """Two worker processes, used for every batch (min_parallel=1), shared by the session."""
    with BatchRotator(ring, 2, min_parallel=1) as rotate:
        yield rotate


@pytest.fixture(params=["plain", "pool"])
def rotate_batch(request: pytest.FixtureRequest, ring: FernetRing) -> RotateBatch:
    """Each RotateBatch a store may get: a plain function (the store identifies, then rotates)
    and the process pool (identify and rotate fused in its workers)."""
    if request.param == "plain":
        return plain_rotate(ring)
    rotate: BatchRotator = request.getfixturevalue("pool_rotator")
    return rotate


def _make_harness(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if kind == "sqlite":
        return SqlHarness(kind, f"sqlite:///{tmp_path / 'bots.db'}", tmp_path / "urls")
    if kind == "postgresql":
        return SqlHarness(kind, request.getfixturevalue("postgres_url"), tmp_path / "urls")
    if kind == "mariadb":
        return SqlHarness(kind, request.getfixturevalue("mariadb_url"), tmp_path / "urls")
    if kind == "files":
        return FilesHarness(tmp_path)
    return RedisHarness(request.getfixturevalue("redis_url"), tmp_path / "urls", hashes=kind == "redis-hash")


@pytest.fixture(params=IMPLEMENTATIONS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """Every store, each on fresh data."""
    made = _make_harness(request.param, request, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def sql_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlHarness]:
    """Every SQL engine, each on a fresh table."""
    made = _make_harness(request.param, request, tmp_path)
    assert isinstance(made, SqlHarness)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(params=["redis-string", "redis-hash"])
def redis_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisHarness]:
    made = _make_harness(request.param, request, tmp_path)
    assert isinstance(made, RedisHarness)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def files_harness(tmp_path: Path) -> FilesHarness:
    return FilesHarness(tmp_path)


def fake_time() -> tuple[Callable[[], float], Callable[[float], None], list[float]]:
    """A clock and a sleep function advancing it, with the list of sleeps (time as a parameter)."""
    now = [1000.0]
    sleeps: list[float] = []

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    return clock, sleep, sleeps
