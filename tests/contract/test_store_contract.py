"""The DataStore contract, on every store with real servers: SQLite, PostgreSQL, MariaDB, files,
Redis strings and Redis hashes.

Assertions compare key ids, plaintexts, counts and locators; no test prints a key or a token.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from rotatord.crypto.keyring import KeyIdentifier
from rotatord.crypto.parallel import BatchRotator
from rotatord.document import FernetRing
from rotatord.errors import StoreError
from rotatord.interfaces import RotateBatch
from rotatord.stores.batch import WRITE_BEHIND_DEPTH
from rotatord.stores.sql import SqlStore
from tests.contract.store_conftest import *  # noqa: F403 - the fixtures
from tests.contract.store_conftest import (
    STAMP,
    FilesHarness,
    Harness,
    Keys,
    Recorder,
    RedisHarness,
    SqlHarness,
    fake_time,
    plain_rotate,
)
from tests.servers.databases import url_file


def plaintext(item: int, tag: str = "orig") -> bytes:
    return f"{tag}-{item}-".encode() + b"x" * 40


def token(f: Fernet, item: int, tag: str = "orig") -> bytes:
    return f.encrypt_at_time(plaintext(item, tag), STAMP)


def decrypts_with(f: Fernet, value: bytes | None) -> bytes | None:
    assert value is not None
    try:
        return f.decrypt(value)
    except InvalidToken:
        return None


def fill(harness: Harness, f: Fernet, items: range, tag: str = "orig") -> None:
    for item in items:
        harness.put(item, token(f, item, tag))


class Intercept:
    """Wraps a RotateBatch and runs ``before`` (a bot's write) the first time it is called, after
    the store read its batch and before it writes: a deterministic concurrent update."""

    def __init__(self, inner: RotateBatch, before: Any) -> None:
        self.inner = inner
        self.before = before
        self.calls = 0
        if isinstance(inner, BatchRotator):
            self.classify_rotate = self._classify_rotate

    def _fire(self) -> None:
        self.calls += 1
        if self.calls == 1:
            self.before()

    def __call__(self, tokens: Sequence[bytes]) -> list[bytes | None]:
        self._fire()
        return self.inner(tokens)

    def _classify_rotate(self, tokens: Sequence[bytes], primary_id: str) -> list[tuple[str | None, bytes | None]]:
        self._fire()
        assert isinstance(self.inner, BatchRotator)
        return self.inner.classify_rotate(tokens, primary_id)


# -- census -----------------------------------------------------------------------------------


def test_census_counts_items_per_key_and_writes_nothing(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    fill(harness, keys.old, range(0, 3))
    fill(harness, keys.new, range(3, 5))
    harness.put(5, b"not a token")
    harness.put(6, token(keys.foreign, 6))
    before = {i: harness.get(i) for i in range(7)}
    store = harness.make(batch_size=2)
    store.check()
    census = store.census(KeyIdentifier(ring))
    assert census.by_key == {"v1": 3, "v2": 2}
    assert census.unreadable == 2
    assert census.total == 7
    assert census.store == store.label
    assert {i: harness.get(i) for i in range(7)} == before


def test_empty_store_is_valid(harness: Harness, ring: FernetRing) -> None:
    store = harness.make()
    store.check()
    assert store.census(KeyIdentifier(ring)).total == 0
    progress = Recorder()
    report = store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, progress)
    assert (report.scanned, report.rewritten, report.quarantined) == (0, 0, 0)
    assert progress.quarantined == []


# -- re-encryption ----------------------------------------------------------------------------


def test_reencrypt_moves_every_item_to_the_primary(
    harness: Harness, keys: Keys, ring: FernetRing, rotate_batch: RotateBatch
) -> None:
    fill(harness, keys.old, range(0, 21))
    fill(harness, keys.new, range(21, 25))
    store = harness.make(batch_size=10)
    progress = Recorder()
    report = store.reencrypt(rotate_batch, KeyIdentifier(ring), "v2", None, progress)
    assert (report.scanned, report.rewritten, report.skipped) == (25, 21, 4)
    assert (report.conflicts, report.quarantined) == (0, 0)
    assert report.store == store.label
    for item in range(25):
        value = harness.get(item)
        assert decrypts_with(keys.new, value) == plaintext(item), item  # the primary alone reads it
        assert value is not None
        assert keys.new.extract_timestamp(value) == STAMP  # re-encryption keeps the original time
    assert store.census(KeyIdentifier(ring)).by_key == {"v2": 25}
    assert progress.checkpoints[-1][1] == report
    if harness.exact_batches:
        assert len(progress.checkpoints) == 3


def test_items_under_the_primary_are_never_decrypted(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    fill(harness, keys.new, range(0, 6))
    fill(harness, keys.old, range(6, 8))
    before = {i: harness.get(i) for i in range(6)}
    seen: list[bytes] = []
    inner = plain_rotate(ring)

    def recording(tokens: Sequence[bytes]) -> list[bytes | None]:
        seen.extend(tokens)
        return inner(tokens)

    report = harness.make(batch_size=3).reencrypt(recording, KeyIdentifier(ring), "v2", None, Recorder())
    assert report.skipped == 6
    assert report.rewritten == 2
    assert not set(seen) & set(before.values())  # never handed to the decrypting side
    assert {i: harness.get(i) for i in range(6)} == before  # and not rewritten either


def test_unreadable_items_are_quarantined_and_left_alone(
    harness: Harness, keys: Keys, ring: FernetRing, rotate_batch: RotateBatch
) -> None:
    fill(harness, keys.old, range(0, 10))
    good = token(keys.old, 10)
    bad = {
        10: good[:20] + (b"A" if good[20:21] != b"A" else b"B") + good[21:],  # corrupt: one character changed
        11: token(keys.old, 11)[:-12],  # truncated
        12: token(keys.foreign, 12),  # signed by a key outside the ring
        13: b"plain text, not a token",
    }
    for item, value in bad.items():
        harness.put(item, value)
    progress = Recorder()
    report = harness.make(batch_size=4).reencrypt(rotate_batch, KeyIdentifier(ring), "v2", None, progress)
    assert report.quarantined == 4
    assert report.rewritten == 10
    located = [locator for locator, _ in progress.quarantined]
    for item, value in bad.items():
        assert sum(harness.locator(item) in locator for locator in located) == 1, item
        assert harness.get(item) == value  # untouched
    for locator, reason in progress.quarantined:
        assert "key" in reason
        for value in bad.values():
            assert value.decode(errors="replace") not in locator + reason  # names the item, never its content
    for item in range(10):
        assert decrypts_with(keys.new, harness.get(item)) == plaintext(item)


def test_a_concurrent_update_is_never_overwritten(
    harness: Harness, keys: Keys, ring: FernetRing, rotate_batch: RotateBatch
) -> None:
    fill(harness, keys.old, range(0, 8))
    bot_token = token(keys.old, 3, "bot")
    rotate = Intercept(rotate_batch, lambda: harness.put(3, bot_token))
    first = harness.make(batch_size=10).reencrypt(rotate, KeyIdentifier(ring), "v2", None, Recorder())
    assert first.conflicts == 1
    assert first.rewritten == 7
    assert harness.get(3) == bot_token  # the bot's write survived
    second = harness.make(batch_size=10).reencrypt(rotate_batch, KeyIdentifier(ring), "v2", None, Recorder())
    assert (second.rewritten, second.skipped, second.conflicts) == (1, 7, 0)
    assert decrypts_with(keys.new, harness.get(3)) == plaintext(3, "bot")


def test_a_writer_thread_loses_no_update(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    """A bot rewrites every item under the old key, then under the new one, while the store
    re-encrypts; after the run and a second pass, each item holds the bot's latest plaintext."""
    count = 40
    fill(harness, keys.old, range(count))
    latest = {item: plaintext(item) for item in range(count)}
    started = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            started.set()
            for tag, f in (("w1", keys.old), ("w2", keys.new)):
                for item in range(0, count, 2):
                    harness.put(item, token(f, item, tag))
                    latest[item] = plaintext(item, tag)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    started.wait()
    store = harness.make(batch_size=3)
    first = store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder())
    thread.join()
    assert not errors
    passes = [first]
    while passes[-1].rewritten or passes[-1].conflicts:
        assert len(passes) < 5
        passes.append(store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder()))
    for item in range(count):
        assert decrypts_with(keys.new, harness.get(item)) == latest[item], item
    assert store.census(KeyIdentifier(ring)).by_key == {"v2": count}


def test_resume_from_a_checkpoint_processes_each_item_once(
    harness: Harness, keys: Keys, ring: FernetRing, rotate_batch: RotateBatch
) -> None:
    count = 53  # several batches more than a stop can finish (at most WRITE_BEHIND_DEPTH in flight)
    fill(harness, keys.old, range(count))
    stopping = Recorder(stop_after=1)
    first = harness.make(batch_size=10).reencrypt(rotate_batch, KeyIdentifier(ring), "v2", None, stopping)
    # A stop reads no more batches and finishes, then checkpoints, those already in flight.
    assert 1 <= len(stopping.checkpoints) <= 1 + WRITE_BEHIND_DEPTH
    assert 0 < first.rewritten < count
    under_new = [i for i in range(count) if decrypts_with(keys.new, harness.get(i)) is not None]
    assert len(under_new) == first.rewritten  # every item written is counted in the last checkpoint
    resumed = Recorder()
    final = harness.make(batch_size=10).reencrypt(rotate_batch, KeyIdentifier(ring), "v2", stopping.last, resumed)
    assert final.rewritten == count  # cumulative: each item rewritten exactly once over both runs
    assert final.conflicts == 0
    assert final.scanned >= count
    for item in range(count):
        assert decrypts_with(keys.new, harness.get(item)) == plaintext(item)
    # Resuming after the last checkpoint finds nothing left to do.
    again = harness.make(batch_size=10).reencrypt(rotate_batch, KeyIdentifier(ring), "v2", resumed.last, Recorder())
    assert again.rewritten == count
    assert again.scanned == final.scanned


def test_a_store_one_item_larger_than_a_batch(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    fill(harness, keys.old, range(11))
    progress = Recorder()
    report = harness.make(batch_size=10).reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, progress)
    assert report.rewritten == 11
    assert decrypts_with(keys.new, harness.get(10)) == plaintext(10)
    if harness.exact_batches:
        assert [totals.scanned for _, totals in progress.checkpoints] == [10, 11]


def test_absent_items_are_not_items(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    fill(harness, keys.old, range(6))
    harness.put(2, None)
    harness.put(4, None)
    report = harness.make(batch_size=2).reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder())
    assert (report.scanned, report.rewritten, report.quarantined) == (4, 4, 0)
    assert harness.get(2) is None


def test_rate_limit_paces_items(harness: Harness, keys: Keys, ring: FernetRing) -> None:
    fill(harness, keys.old, range(30))
    clock, sleep, sleeps = fake_time()
    store = harness.make(batch_size=10, rate_limit=10.0, clock=clock, sleep=sleep)
    report = store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder())
    assert report.rewritten == 30
    # A full bucket lets 10 items pass at once; the other 20 at 10 per second.
    assert sum(sleeps) == pytest.approx(2.0, abs=0.01)
    assert max(sleeps) <= 0.25  # in slices, so a stopping daemon is not held up


def test_a_foreign_checkpoint_is_refused(harness: Harness, ring: FernetRing) -> None:
    store = harness.make()
    with pytest.raises(StoreError) as caught:
        store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", "not a checkpoint", Recorder())
    assert store.label in str(caught.value)


# -- SQL specifics ----------------------------------------------------------------------------


def test_sql_composite_keys_and_null_columns(sql_harness: SqlHarness, keys: Keys, ring: FernetRing) -> None:
    sql = sql_harness
    table = sql.create(
        sa.Column("tenant", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.String(20), primary_key=True),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("extra", sa.Text, nullable=True),
    )
    rows = []
    for tenant in (1, 2):
        for seq in range(7):  # ties on the first key column across batch boundaries
            n = tenant * 100 + seq
            rows.append(
                {
                    "tenant": tenant,
                    "seq": f"s{seq:02d}",
                    "body": token(keys.old, n).decode(),
                    "extra": None if seq % 3 == 0 else token(keys.old, n + 50).decode(),
                }
            )
    with sql.engine.begin() as conn:
        conn.execute(table.insert(), rows)
    store = sql.make(batch_size=4, table=table.name, key=("tenant", "seq"), columns=("body", "extra"))
    stopping = Recorder(stop_after=2)
    store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, stopping)
    report = store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", stopping.last, Recorder())
    non_null = sum(1 for r in rows for c in ("body", "extra") if r[c] is not None)
    assert (report.rewritten, report.scanned, report.conflicts) == (non_null, non_null, 0)
    with sql.engine.connect() as conn:
        stored = conn.execute(sa.select(table)).mappings().all()
    assert len(stored) == len(rows)
    for row in stored:
        n = row["tenant"] * 100 + int(row["seq"][1:])
        assert keys.new.decrypt(row["body"].encode()) == plaintext(n)
        if int(row["seq"][1:]) % 3 == 0:
            assert row["extra"] is None
        else:
            assert keys.new.decrypt(row["extra"].encode()) == plaintext(n + 50)


def test_sql_binary_columns_stay_binary(sql_harness: SqlHarness, keys: Keys, ring: FernetRing) -> None:
    sql = sql_harness
    table = sql.create(
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("blob", sa.LargeBinary, nullable=True),
    )
    with sql.engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "blob": token(keys.old, i)} for i in range(5)])
    store = sql.make(table=table.name, columns=("blob",))
    assert store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder()).rewritten == 5
    with sql.engine.connect() as conn:
        values = conn.execute(sa.select(table.c.blob).order_by(table.c.id)).scalars().all()
    assert [keys.new.decrypt(bytes(v)) for v in values] == [plaintext(i) for i in range(5)]
    assert all(isinstance(v, bytes | memoryview) for v in values)


def test_sql_where_filter_limits_the_rows(sql_harness: SqlHarness, keys: Keys, ring: FernetRing) -> None:
    sql = sql_harness
    fill(sql, keys.old, range(10))
    store = sql.make(where="id < 3 OR id = 9")
    report = store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder())
    assert report.rewritten == 4
    moved = [i for i in range(10) if decrypts_with(keys.new, sql.get(i)) is not None]
    assert moved == [0, 1, 2, 9]
    assert store.estimate() in (None, 4, 10)  # an estimate, at most the table's rows


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"table": "no_such_table"}, "does not exist"),
        ({"columns": ("nope",)}, "column 'nope' does not exist"),
        ({"columns": ("number",)}, "not text or bytes"),
        ({"key": ("body",), "columns": ("number",)}, "not a primary or unique key"),
        ({"columns": ("id",)}, "part of the key"),
        ({"where": "no_such_column = 1"}, "where filter"),
    ],
)
def test_sql_bad_shapes_are_refused_before_writing(
    sql_harness: SqlHarness, keys: Keys, ring: FernetRing, overrides: dict[str, Any], expected: str
) -> None:
    sql = sql_harness
    table = sql.create(
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.Text),
        sa.Column("number", sa.Integer),
    )
    with sql.engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": token(keys.old, i).decode(), "number": i} for i in range(3)])
    values = {"table": table.name, "columns": ("body",)} | overrides
    store = sql.make(**values)
    for action in (
        store.check,
        lambda: store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder()),
    ):
        with pytest.raises(StoreError) as caught:
            action()
        assert store.label in str(caught.value)
        assert expected in str(caught.value)
    with sql.engine.connect() as conn:
        bodies = conn.execute(sa.select(table.c.body).order_by(table.c.id)).scalars().all()
    assert [keys.old.decrypt(b.encode()) for b in bodies] == [plaintext(i) for i in range(3)]


def test_sql_unreachable_database_names_the_store_never_the_password(sql_harness: SqlHarness, ring: FernetRing) -> None:
    sql = sql_harness
    if sql.name == "sqlite":
        url = "sqlite:////nonexistent-dir/for/sure/bots.db"
    else:
        scheme = sql.url.split("://")[0]
        url = f"{scheme}://bot:Sup3rSecretPassw0rd@127.0.0.1:1/test"
    made = SqlStore("contract", sql.settings(url_file=url_file(sql.url_path.parent, url)))
    with pytest.raises(StoreError) as caught:
        made.check()
    message = str(caught.value)
    assert made.label in message
    assert "Sup3rSecretPassw0rd" not in message + repr(made)
    assert "cannot connect" in message


# -- files specifics --------------------------------------------------------------------------


def test_files_missing_directory_is_an_error_empty_match_is_not(files_harness: FilesHarness, ring: FernetRing) -> None:
    harness = files_harness
    missing = harness.make(directory=harness.directory / "missing")
    with pytest.raises(StoreError, match="does not exist") as caught:
        missing.check()
    assert missing.label in str(caught.value)
    empty = harness.make(pattern="*.nothing")
    empty.check()
    assert empty.census(KeyIdentifier(ring)).total == 0


# -- Redis specifics --------------------------------------------------------------------------


def test_redis_wrong_type_stops_before_writing(redis_harness: RedisHarness, keys: Keys, ring: FernetRing) -> None:
    harness = redis_harness
    fill(harness, keys.old, range(5))
    odd = f"{harness.prefix}zz-list"
    harness.client.rpush(odd, b"a list")
    store = harness.make(batch_size=100)
    for action in (
        store.check,
        lambda: store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder()),
    ):
        with pytest.raises(StoreError) as caught:
            action()
        assert store.label in str(caught.value)
        assert "zz-list" in str(caught.value)
        assert "list" in str(caught.value)
    assert all(decrypts_with(keys.old, harness.get(i)) == plaintext(i) for i in range(5))


def test_redis_keeps_expiry_and_other_fields(redis_harness: RedisHarness, keys: Keys, ring: FernetRing) -> None:
    harness = redis_harness
    fill(harness, keys.old, range(3))
    harness.client.expire(harness.key(1), 3600)
    store = harness.make()
    assert store.reencrypt(plain_rotate(ring), KeyIdentifier(ring), "v2", None, Recorder()).rewritten == 3
    assert 3500 < harness.client.ttl(harness.key(1)) <= 3600
    assert harness.client.ttl(harness.key(0)) == -1
    if harness.hashes:
        assert harness.client.hget(harness.key(0), "other") == b"not a token"


def test_redis_unreachable_names_the_store(redis_harness: RedisHarness, ring: FernetRing) -> None:
    harness = redis_harness
    store = harness.make(url_file=url_file(harness.url_path.parent, "redis://:Sup3rSecretPassw0rd@127.0.0.1:1/0"))
    with pytest.raises(StoreError) as caught:
        store.check()
    assert store.label in str(caught.value)
    assert "Sup3rSecretPassw0rd" not in str(caught.value)
