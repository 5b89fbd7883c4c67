"""Fixtures for the engine tests: a real file backend, a real SQLite journal, time as a parameter.

Each test builds :class:`~rotatord.config.model.Settings` pointing into its ``tmp_path`` and
wires them with :func:`rotatord.daemon.runtime.build_runtime`, exactly as the daemon does.  No
test sleeps: every ``tick`` receives the ``now`` the test chooses.  Several runtimes may be
built on one state directory; that stands in for a daemon restarted after a crash.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.backends.file import FileBackend, init_master_key
from rotatord.config.model import (
    ConsumerSettings,
    DaemonSettings,
    FileBackendSettings,
    SecretSettings,
    Settings,
    SqlStoreSettings,
)
from rotatord.daemon.runtime import Runtime, build_runtime
from rotatord.document import CredentialSet, Document, FernetRing
from rotatord.interfaces import VersionInfo

#: A Monday, so cron schedules are easy to reason about.
T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
EVERY = timedelta(days=30)
GRACE = timedelta(days=7)
PROPAGATION = timedelta(minutes=10)
SECOND = timedelta(seconds=1)

FERNET = "bot-db"
TOKEN = "bot-api"
CONSUMER = "bot"


def bot_db_store(tmp_path: Path) -> tuple[Path, SqlStoreSettings]:
    """An empty SQLite table ``msgs (id, body)`` under ``tmp_path``, and a store on its body column
    (the URL by reference, in a 0600 file)."""
    db = tmp_path / "bot.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE msgs (id INTEGER PRIMARY KEY, body TEXT)")
    url = tmp_path / "bot-db.url"
    url.write_text(f"sqlite:///{db}")
    url.chmod(0o600)
    return db, SqlStoreSettings(kind="sql", url_file=url, table="msgs", key=("id",), columns=("body",))


def fernet_secret(**overrides: Any) -> SecretSettings:
    values: dict[str, Any] = {
        "name": FERNET,
        "kind": "fernet",
        "backend": "local",
        "path": "bots/bot/db-key",
        "every": EVERY,
        "grace": GRACE,
        "propagation": PROPAGATION,
        "consumers": (CONSUMER,),
    }
    values.update(overrides)
    return SecretSettings(**values)


def token_secret(**overrides: Any) -> SecretSettings:
    values: dict[str, Any] = {
        "name": TOKEN,
        "kind": "api_token",
        "backend": "local",
        "path": "bots/bot/api-token",
        "every": EVERY,
        "grace": GRACE,
        "consumers": (CONSUMER,),
        "token_prefix": "bot",
    }
    values.update(overrides)
    return SecretSettings(**values)


def materials(doc: Document | None) -> set[str]:
    """Every secret value a document holds, for scanning files and logs (never for printing)."""
    if doc is None:
        return set()
    if isinstance(doc, FernetRing):
        return {k.material.reveal() for k in doc.keys}
    out = {doc.current.value.reveal()}
    if doc.previous is not None:
        out.add(doc.previous.value.reveal())
    return out


@dataclass
class Harness:
    """One state directory and one secret store, and the runtimes built on them."""

    root: Path
    settings: Settings
    runtimes: list[Runtime] = field(default_factory=list)
    _reader: FileBackend | None = None

    @property
    def backend_settings(self) -> FileBackendSettings:
        return self.settings.backends["local"]

    @property
    def db_path(self) -> Path:
        return self.settings.daemon.state_dir / "state.db"

    def build(self) -> Runtime:
        """A fresh runtime on the shared state: a new Journal, AuditLog, backend and Engine."""
        runtime = build_runtime(self.settings)
        self.runtimes.append(runtime)
        return runtime

    @property
    def reader(self) -> FileBackend:
        """A backend object of its own, as a bot would hold one, to read what is published."""
        if self._reader is None:
            self._reader = FileBackend("local", self.backend_settings)
        return self._reader

    def secret(self, name: str) -> SecretSettings:
        found = self.settings.secret(name)
        assert found is not None
        return found

    def doc(self, name: str) -> Document | None:
        current = self.reader.read(self.secret(name).path)
        return current.document if current else None

    def ring(self, name: str = FERNET) -> FernetRing:
        doc = self.doc(name)
        assert isinstance(doc, FernetRing)
        return doc

    def credentials(self, name: str = TOKEN) -> CredentialSet:
        doc = self.doc(name)
        assert isinstance(doc, CredentialSet)
        return doc

    def versions(self, name: str) -> list[VersionInfo]:
        return self.reader.history(self.secret(name).path)

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run raw SQL on the state database (to inspect it, or to stage a crash)."""
        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.close()
        if self._reader is not None:
            self._reader.close()


HarnessFactory = Callable[..., Harness]


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[HarnessFactory]:
    """``make_harness(*secrets, consumers=...)``: settings in ``tmp_path``, master key created."""
    made: list[Harness] = []

    def make(*secrets: SecretSettings, consumers: tuple[str, ...] = (CONSUMER,)) -> Harness:
        root = tmp_path / f"h{len(made)}"
        settings = Settings(
            daemon=DaemonSettings(
                state_dir=root / "state",
                step_retry_initial=timedelta(seconds=5),
                step_retry_max=timedelta(minutes=10),
            ),
            backends={
                "local": FileBackendSettings(
                    kind="file", directory=root / "secrets", master_key_file=root / "keys" / "master.key"
                )
            },
            consumers={
                c: ConsumerSettings(url=f"http://127.0.0.1:9/hooks/{c}", signing_secret="bot-webhook")
                for c in consumers
            },
            secrets=secrets or (fernet_secret(), token_secret()),
        )
        assert init_master_key(settings.backends["local"])
        harness = Harness(root, settings)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def harness(make_harness: HarnessFactory) -> Harness:
    """The default: one fernet and one api_token secret, one consumer."""
    return make_harness()
