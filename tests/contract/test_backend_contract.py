"""The Backend contract (rotatord.interfaces.Backend), run against every implementation."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from rotatord.document import Document, digest
from rotatord.errors import ConflictError
from rotatord.interfaces import Backend
from tests.contract.conftest import BackendFactory, api_tokens, fernet_ring, materials


def test_missing_path_reads_as_none(backend: Backend, secret_path: str) -> None:
    assert backend.read(secret_path) is None
    assert backend.history(secret_path) == []


def test_check_and_close(backend: Backend) -> None:
    backend.check()
    backend.close()
    backend.close()  # idempotent


@pytest.mark.parametrize("make", [fernet_ring, api_tokens], ids=["fernet", "api_token"])
def test_create_then_read_back(backend: Backend, secret_path: str, make: Callable[[], Document]) -> None:
    doc = make()
    version = backend.write(secret_path, doc, expected=None, request_id="create-1")
    got = backend.read(secret_path)
    assert got is not None
    assert got.version == version
    assert digest(got.document) == digest(doc)
    assert got.request_id in (None, "create-1")


def test_update_with_check_and_set(backend: Backend, secret_path: str) -> None:
    first = fernet_ring(version=1)
    v1 = backend.write(secret_path, first, expected=None, request_id="r1")
    read1 = backend.read(secret_path)
    assert read1 is not None
    second = fernet_ring(version=2, keys=2)
    v2 = backend.write(secret_path, second, expected=read1.version, request_id="r2")
    assert v2 != v1
    read2 = backend.read(secret_path)
    assert read2 is not None
    assert (read2.version, digest(read2.document)) == (v2, digest(second))


def test_stale_expected_conflicts_and_writes_nothing(backend: Backend, secret_path: str) -> None:
    v1 = backend.write(secret_path, fernet_ring(version=1), expected=None, request_id="r1")
    current = fernet_ring(version=2)
    v2 = backend.write(secret_path, current, expected=v1, request_id="r2")
    before = backend.history(secret_path)
    loser = fernet_ring(version=3)
    with pytest.raises(ConflictError) as info:
        backend.write(secret_path, loser, expected=v1, request_id="r3")
    message = str(info.value)
    assert secret_path in message
    assert not any(m in message for m in materials(loser) + materials(current))
    assert backend.history(secret_path) == before
    got = backend.read(secret_path)
    assert got is not None
    assert (got.version, digest(got.document)) == (v2, digest(current))


def test_create_on_existing_path_conflicts(backend: Backend, secret_path: str) -> None:
    original = api_tokens()
    version = backend.write(secret_path, original, expected=None, request_id="r1")
    with pytest.raises(ConflictError):
        backend.write(secret_path, api_tokens(), expected=None, request_id="r2")
    got = backend.read(secret_path)
    assert got is not None
    assert (got.version, digest(got.document)) == (version, digest(original))
    assert len(backend.history(secret_path)) == 1


def test_concurrent_writers_exactly_one_wins(backend_factory: BackendFactory, secret_path: str) -> None:
    writers = 8
    # Two Backend objects shared by the threads: contention within one object and across objects.
    backends = [backend_factory(), backend_factory()]
    base = backends[0].write(secret_path, fernet_ring(version=1), expected=None, request_id="base")
    barrier = threading.Barrier(writers)
    won: dict[int, str] = {}
    lost: list[int] = []
    failures: list[BaseException] = []
    guard = threading.Lock()

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            version = backends[i % 2].write(secret_path, fernet_ring(version=2), expected=base, request_id=f"w{i}")
        except ConflictError:
            with guard:
                lost.append(i)
        except BaseException as exc:
            with guard:
                failures.append(exc)
        else:
            with guard:
                won[i] = version

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures
    assert len(won) == 1 and len(lost) == writers - 1

    written = [base, *won.values()]
    request_ids = ["base", *(f"w{i}" for i in won)]
    for i in sorted(lost):  # each loser re-reads and retries once, in turn
        b = backends[i % 2]
        seen = b.read(secret_path)
        assert seen is not None
        written.append(b.write(secret_path, fernet_ring(version=2), expected=seen.version, request_id=f"w{i}"))
        request_ids.append(f"w{i}")
    assert len(set(written)) == writers + 1  # no version duplicated
    history = backends[0].history(secret_path)
    assert [h.version for h in history] == written  # none lost, in write order
    assert [h.request_id for h in history if h.request_id is not None] in (request_ids, [])
    assert [h.version for h in history if h.current] == [written[-1]]


def test_repeated_request_id_is_idempotent(backend: Backend, secret_path: str) -> None:
    first = fernet_ring(version=1)
    v1 = backend.write(secret_path, first, expected=None, request_id="create")
    assert backend.write(secret_path, first, expected=None, request_id="create") == v1
    assert len(backend.history(secret_path)) == 1
    second = fernet_ring(version=2)
    v2 = backend.write(secret_path, second, expected=v1, request_id="update")
    # A retry after a crash repeats the call exactly, with the version it had read before.
    assert backend.write(secret_path, second, expected=v1, request_id="update") == v2
    assert [h.version for h in backend.history(secret_path)] == [v1, v2]
    got = backend.read(secret_path)
    assert got is not None
    assert (got.version, digest(got.document)) == (v2, digest(second))


def test_history_is_oldest_first_with_one_current(backend: Backend, secret_path: str) -> None:
    versions: list[str] = []
    expected: str | None = None
    for n in range(1, 4):
        expected = backend.write(secret_path, fernet_ring(version=n), expected=expected, request_id=f"r{n}")
        versions.append(expected)
    history = backend.history(secret_path)
    assert [h.version for h in history] == versions
    assert [h.current for h in history] == [False, False, True]
    for n, info in enumerate(history, start=1):
        assert info.request_id in (None, f"r{n}")
    stamps = [h.created_at for h in history if h.created_at is not None]
    assert stamps == sorted(stamps)


def test_second_backend_object_sees_writes(backend_factory: BackendFactory, secret_path: str) -> None:
    a, b = backend_factory(), backend_factory()
    doc = fernet_ring(version=1)
    v1 = a.write(secret_path, doc, expected=None, request_id="a1")
    seen = b.read(secret_path)
    assert seen is not None
    assert (seen.version, digest(seen.document)) == (v1, digest(doc))
    update = fernet_ring(version=2, keys=2)
    v2 = b.write(secret_path, update, expected=v1, request_id="b1")
    back = a.read(secret_path)
    assert back is not None
    assert (back.version, digest(back.document)) == (v2, digest(update))
    with pytest.raises(ConflictError):
        a.write(secret_path, fernet_ring(version=2), expected=v1, request_id="a2")


def test_read_version_returns_each_kept_version(backend: Backend, secret_path: str) -> None:
    docs = [fernet_ring(version=n, keys=min(n, 2)) for n in (1, 2, 3)]
    expected: str | None = None
    written = []
    for n, doc in enumerate(docs, start=1):
        expected = backend.write(secret_path, doc, expected=expected, request_id=f"r{n}")
        written.append(expected)
    for version, doc in zip(written, docs, strict=True):
        got = backend.read_version(secret_path, version)
        assert got is not None, f"version {version} is kept but unreadable"
        assert (got.version, digest(got.document)) == (version, digest(doc))
    # A version that never existed reads as None, and nothing changed.
    missing = "999999" if written[0].isdigit() else "00000000-0000-0000-0000-000000000000"
    assert backend.read_version(secret_path, missing) is None
    assert [h.version for h in backend.history(secret_path)] == written
