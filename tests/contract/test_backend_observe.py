"""The drift fingerprint of the Backend contract (``observe``, ``mark_managed``), run against
every implementation: file, vault (real OpenBao) and aws (real moto)."""

from __future__ import annotations

from rotatord.document import digest
from rotatord.interfaces import Backend
from tests.contract.conftest import BackendFactory, api_tokens, fernet_ring, materials


def test_nothing_observed_at_a_missing_path(backend: Backend, secret_path: str) -> None:
    assert backend.observe(secret_path) is None


def test_observe_names_the_written_version_and_its_digest(backend: Backend, secret_path: str) -> None:
    doc = fernet_ring()
    version = backend.write(secret_path, doc, expected=None, request_id="create1")
    seen = backend.observe(secret_path)
    assert seen is not None
    assert (seen.version, seen.digest, seen.unreadable, seen.problem) == (version, digest(doc), None, None)
    assert seen.owner == (doc.name, "fernet")
    assert seen.marked
    assert seen.request_id in (None, "create1")
    assert seen.deleted == frozenset()
    assert seen.labels is None or seen.labels.get("AWSCURRENT") == version
    assert not any(m in repr(seen) for m in materials(doc))


def test_observe_follows_each_write_from_any_backend_object(backend_factory: BackendFactory, secret_path: str) -> None:
    a, b = backend_factory(), backend_factory()
    v1 = a.write(secret_path, api_tokens(version=1), expected=None, request_id="w1")
    second = api_tokens(version=2)
    v2 = a.write(secret_path, second, expected=v1, request_id="w2")
    seen = b.observe(secret_path)
    assert seen is not None
    assert (seen.version, seen.digest, seen.owner) == (v2, digest(second), ("bot-api", "api_token"))
    if seen.labels is not None:  # staging labels: the previous version keeps AWSPREVIOUS
        assert seen.labels.get("AWSPREVIOUS") == v1
        assert "AWSPENDING" not in seen.labels


def test_mark_managed_is_idempotent_and_keeps_the_document(backend: Backend, secret_path: str) -> None:
    doc = fernet_ring()
    version = backend.write(secret_path, doc, expected=None, request_id="m1")
    backend.mark_managed(secret_path)
    backend.mark_managed(secret_path)
    seen = backend.observe(secret_path)
    assert seen is not None
    assert (seen.version, seen.digest, seen.marked) == (version, digest(doc), True)
