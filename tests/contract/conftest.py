"""Fixtures for the Backend contract suite, run against every backend implementation.

To add an implementation, write a factory below with the signature of :data:`StoreFactory` (a
context manager that starts or reaches the real server and yields a function making a new,
independent Backend object on one shared store) and register it in ``IMPLEMENTATIONS``.  The
factory receives the pytest ``request`` so it can ask for session-scoped fixtures (a real OpenBao
dev server, a moto server) with ``request.getfixturevalue``.  Tests always use fresh paths from
the ``secret_path`` fixture, so a store shared across tests is fine.
"""

from __future__ import annotations

import hashlib
import importlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
from cryptography.fernet import Fernet

from rotatord.backends.file import init_master_key
from rotatord.backends.registry import open_backend
from rotatord.config.model import FileBackendSettings
from rotatord.document import Credential, CredentialSet, Document, FernetKey, FernetRing
from rotatord.interfaces import Backend
from rotatord.sensitive import Sensitive

#: Makes another Backend object on the same store (another process, in real life).
BackendFactory = Callable[[], Backend]
StoreFactory = Callable[[pytest.FixtureRequest, Path], AbstractContextManager[BackendFactory]]

T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)


@contextmanager
def file_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    settings = FileBackendSettings(
        kind="file", directory=tmp_path / "store", master_key_file=tmp_path / "keys" / "master.key"
    )
    assert init_master_key(settings)
    yield lambda: open_backend("contract", settings)


def _lazy(module: str, attribute: str) -> StoreFactory:
    """A factory defined next to its server's fixtures (tests/servers/), imported when used."""

    def factory(request: pytest.FixtureRequest, tmp_path: Path) -> AbstractContextManager[BackendFactory]:
        store: StoreFactory = getattr(importlib.import_module(module), attribute)
        return store(request, tmp_path)

    return factory


IMPLEMENTATIONS: dict[str, StoreFactory] = {
    "file": file_store,
    "vault": _lazy("tests.servers.openbao", "vault_store"),
    "aws": _lazy("tests.servers.moto", "aws_store"),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """A function making Backend objects on one fresh store; all are closed at teardown."""
    made: list[Backend] = []
    with IMPLEMENTATIONS[request.param](request, tmp_path) as make:

        def factory() -> Backend:
            backend = make()
            made.append(backend)
            return backend

        yield factory
        for backend in made:
            backend.close()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> Backend:
    return backend_factory()


@pytest.fixture
def secret_path() -> str:
    """A path no other test uses, so shared servers need no cleanup between tests."""
    return f"contract/{uuid.uuid4().hex[:12]}/key"


def fernet_ring(name: str = "bot-db", version: int = 1, keys: int = 1, at: datetime = T0) -> FernetRing:
    """A ring of ``keys`` fresh Fernet keys; the newest is primary, the others decrypt-only."""
    members = []
    for i in range(1, keys + 1):
        key_id = f"v{version - keys + i}"
        state: Literal["primary", "decrypt_only"] = "primary" if i == keys else "decrypt_only"
        members.append(
            FernetKey(key_id, Sensitive(Fernet.generate_key().decode()), state, at - timedelta(days=keys - i))
        )
    return FernetRing(name, version, members[-1].id, tuple(members), at)


def api_tokens(name: str = "bot-api", version: int = 1, at: datetime = T0) -> CredentialSet:
    """A credential set with a current and a previous API token."""

    def cred(n: int) -> Credential:
        token = f"rtd_{uuid.uuid4().hex}{n}"
        return Credential(f"t{n}", Sensitive(token), hashlib.sha256(token.encode()).hexdigest(), at)

    return CredentialSet(name, "api_token", version, cred(version), at, previous=cred(version - 1))


def materials(doc: Document) -> list[str]:
    """Every secret value in ``doc``, for scanning messages and files."""
    if isinstance(doc, FernetRing):
        return [k.material.reveal() for k in doc.keys]
    out = [doc.current.value.reveal()]
    if doc.previous is not None:
        out.append(doc.previous.value.reveal())
    return out
