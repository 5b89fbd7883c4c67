"""The chaos suite's world: a real daemon managing one fernet secret whose data lives in a real
SQL store, a consumer bot behind a real webhook receiver, and the checks every case ends with.

:meth:`World.assert_converged` is the suite's definition of "nothing was lost":

- every stored datum decrypts with the ring the backend publishes, to the value the bot wrote;
- the rotation completed exactly once: the journal holds each version once, all done, each step
  done once; the backend holds exactly the versions those steps wrote; the audit log records
  each step with the journal's request id;
- every webhook of the secret was delivered at least once (a 2xx seen by the receiver for its
  ``webhook-id``), and an id always carried the same event;
- ``rotatord audit verify`` passes, and no key material reached the log, the state database, the
  audit log, the CLI or a webhook body.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from rotatord.backends.registry import open_backend
from rotatord.config import load_settings
from rotatord.crypto.keyring import multifernet
from rotatord.document import CredentialSet, FernetRing
from tests.helpers import DaemonProcess, NotifyListener, assert_no_material, cli, materials, status_json, wait_until
from tests.integration.conftest import socket_dir, write_config

__all__ = ["NAME", "World", "WorldFactory", "socket_dir", "world"]
from tests.servers.databases import url_file
from tests.servers.receivers import ReceiverServer

NAME = "chaos-db"
PATH = "bots/chaos/db-key"
ROWS = 300

EXTRA = """
[consumers.bot]
url = "{url}"
signing_secret = "chaos-hooks"

[[secrets]]
name = "chaos-hooks"
kind = "webhook_secret"
backend = "{backend}"
path = "bots/chaos/webhook"
every = "30d"

[[secrets]]
name = "chaos-db"
kind = "fernet"
backend = "{backend}"
path = "bots/chaos/db-key"
every = "30d"
grace = "{grace}"
propagation = "{propagation}"
consumers = ["bot"]

  [[secrets.stores]]
  kind = "sql"
  url_file = "{store_url}"
  table = "{table}"
  key = ["id"]
  columns = ["body"]
  batch_size = 50
{store_extra}
"""


@dataclass
class World:
    tmp: Path
    config: Path
    notify: NotifyListener
    receivers: ReceiverServer
    engine: sa.Engine
    table: str
    backend: str
    expected: dict[int, bytes] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    #: A PostgreSQL state database shared by several instances (None: the SQLite file under var/).
    state_url: str | None = None
    #: Further instances' configs (the failover case); their audit logs and logs are checked too.
    others: list[Path] = field(default_factory=list)

    @property
    def state_db(self) -> Path:
        return self.config.parent / "var" / "state.db"

    @property
    def log(self) -> Path:
        return self.config.parent / "daemon.log"

    def daemon(
        self, env: dict[str, str] | None = None, config: Path | None = None, notify: NotifyListener | None = None
    ) -> DaemonProcess:
        config = config or self.config
        return DaemonProcess(config, config.parent / "daemon.log", notify or self.notify, env=env)

    def cli(self, *args: str, timeout: float = 30) -> Any:
        result = cli(self.config, *args, timeout=timeout)
        self.texts += [result.stdout, result.stderr]
        return result

    def ring(self) -> FernetRing:
        settings = load_settings(self.config)
        backend = open_backend(self.backend, settings.backends[self.backend])
        try:
            found = backend.read(PATH)
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        assert found is not None and isinstance(found.document, FernetRing)
        self.seen |= materials(found.document)
        return found.document

    def history(self) -> list[str]:
        settings = load_settings(self.config)
        backend = open_backend(self.backend, settings.backends[self.backend])
        try:
            return [h.version for h in backend.history(PATH)]
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                close()

    def rows(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        if self.state_url is None:
            with sqlite3.connect(self.state_db) as conn:
                return conn.execute(sql, params).fetchall()
        parts = sql.split("?")
        named = parts[0] + "".join(f":p{i}{rest}" for i, rest in enumerate(parts[1:]))
        engine = sa.create_engine(self.state_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(named), {f"p{i}": v for i, v in enumerate(params)})]
        finally:
            engine.dispose()

    def rotations(self) -> list[tuple[int, str, str]]:
        return [
            (v, p, s)
            for v, p, s in self.rows("SELECT version, phase, status FROM rotations WHERE secret = ? ORDER BY id", NAME)
        ]

    def status(self) -> dict[str, Any]:
        entry: dict[str, Any] = status_json(self.config)[NAME]
        return entry

    def wait_created(self) -> None:
        wait_until(
            lambda: (
                self.rotations() == [(1, "retired", "done")]
                and all(s["state"] == "done" for s in status_json(self.config).values())
            ),
            timeout=60,
            what="every secret created",
        )
        hooks = self.cli("status", "--json")
        assert hooks.returncode == 0

    def listen_as_bot(self) -> None:
        """The bot now verifies every request with the signing secret it reads from the backend."""
        settings = load_settings(self.config)
        backend = open_backend(self.backend, settings.backends[self.backend])
        found = backend.read("bots/chaos/webhook")
        assert found is not None
        self.seen |= materials(found.document)
        assert isinstance(found.document, CredentialSet)
        whsec = found.document.current.value.reveal()
        self.receivers.endpoint("bot", secrets=[whsec])

    def prepare(self, daemon: DaemonProcess) -> None:
        """The common start of every case: the daemon ready, every secret created, the bot
        listening with its signing secret, and the store filled under the current ring."""
        daemon.wait_ready()
        self.wait_created()
        self.listen_as_bot()
        self.fill()

    def fill(self) -> None:
        """ROWS rows encrypted under the current ring, as the bot would write them."""
        fernet = multifernet(self.ring())
        with self.engine.begin() as conn:
            for i in range(ROWS):
                value = f"message {i}".encode()
                token = fernet.encrypt(value).decode()
                conn.execute(sa.text(f"INSERT INTO {self.table} (id, body) VALUES (:i, :b)"), {"i": i, "b": token})
                self.expected[i] = value

    def wait_rotated(self, timeout: float = 90) -> None:
        wait_until(
            lambda: self.rotations() == [(1, "retired", "done"), (2, "retired", "done")],
            timeout=timeout,
            what="rotation 2 to complete",
        )

    def settle(self) -> None:
        """Wait for rotation 2 to finish and every delivery to the bot to be settled."""
        self.wait_rotated()
        wait_until(lambda: self.status()["state"] == "done", what="status to settle")
        wait_until(
            lambda: all(r[0] == "delivered" for r in self.rows("SELECT status FROM outbox WHERE consumer = 'bot'")),
            timeout=60,
            what="every delivery settled",
        )

    def assert_converged(self) -> None:
        ring = self.ring()
        assert ring.primary == "v2" and [k.id for k in ring.keys] == ["v2"]
        # Every datum decrypts with the published ring, to what the bot wrote.
        fernet = multifernet(ring)
        with self.engine.connect() as conn:
            stored = dict(conn.execute(sa.text(f"SELECT id, body FROM {self.table}")).all())
        assert set(stored) == set(self.expected)
        for i, token in stored.items():
            assert fernet.decrypt(token.encode()) == self.expected[i], f"row {i} lost"
        # Exactly once: the journal, the backend and the audit log agree.
        assert self.rotations() == [(1, "retired", "done"), (2, "retired", "done")]
        steps = self.rows(
            "SELECT s.name, s.state, s.request_id FROM steps s JOIN rotations r ON r.id = s.rotation_id "
            "WHERE r.secret = ? AND r.version = 2 ORDER BY s.started_at",
            NAME,
        )
        assert sorted(name for name, _, _ in steps) == sorted(["stage", "promote", "reencrypt", "retire"])
        assert all(state == "done" for _, state, _ in steps)
        # v1 created; v2 staged, promoted, retired: one backend version per writing step, none twice.
        assert len(self.history()) == 4, self.history()
        audit = [
            json.loads(line)
            for config in (self.config, *self.others)
            for line in (config.parent / "var" / "audit.log").read_text().splitlines()
        ]
        mine = [a for a in audit if a.get("secret") == NAME and a.get("version") == 2]
        for name, _, request_id in steps:
            phase = {"stage": "staged", "promote": "promoted", "reencrypt": "reencrypted", "retire": "retired"}[name]
            records = [a for a in mine if a.get("event") == f"rotation.{phase}"]
            assert records, f"no audit record of {phase}"
            assert {a.get("request_id") for a in records} == {request_id}, f"{phase} acted under two request ids"
        # Every webhook of the secret delivered at least once, each id always the same event.
        outbox = self.rows(
            "SELECT o.webhook_id, o.event_type, o.status FROM outbox o JOIN rotations r ON r.id = o.rotation_id "
            "WHERE r.secret = ? AND r.version = 2 AND o.consumer = 'bot'",
            NAME,
        )
        assert {event for _, event, _ in outbox} >= {"key.staged", "key.promoted", "key.retired"}
        received = self.receivers.requests("bot")
        acknowledged = {r.webhook_id for r in received if r.status is not None and 200 <= r.status < 300}
        for webhook_id, event, status in outbox:
            assert status == "delivered", (webhook_id, event, status)
            assert webhook_id in acknowledged, f"{event} ({webhook_id}) never acknowledged by the bot"
        by_id: dict[str, set[str]] = {}
        for r in received:
            by_id.setdefault(r.webhook_id, set()).add(json.loads(r.body)["type"])
        assert all(len(types) == 1 for types in by_id.values()), by_id
        files: list[Path] = []
        for config in (self.config, *self.others):
            verify = cli(config, "audit", "verify")
            assert verify.returncode == 0, verify.stdout + verify.stderr
            var = config.parent / "var"
            files += [config.parent / "daemon.log", var / "audit.log"]
            files += [var / "state.db", var / "state.db-wal"] if self.state_url is None else []
        assert_no_material(
            self.seen,
            files=[f for f in files if f.exists()],
            texts=[*self.texts, *(r.body.decode() for r in self.receivers.all_requests())],
        )


WorldFactory = Callable[..., World]


@pytest.fixture
def world(tmp_path: Path, socket_dir: str) -> Iterator[WorldFactory]:
    """Builds the world once per test: ``world(receivers, backend=..., engine_url=...)``."""
    built: list[World] = []
    notify = NotifyListener()
    sockets: list[str] = []

    def build(
        receivers: ReceiverServer,
        *,
        backend: str = "local",
        backend_toml: str = "",
        store_url: str | None = None,
        store_extra: str = "",
        grace: str = "1s",
        propagation: str = "1s",
        replacements: dict[str, str] | None = None,
        state_url: str | None = None,
    ) -> World:
        """``state_url``: a PostgreSQL state database shared by two instances, "a" (the world's
        config) and "b" (``World.others[0]``), with one file backend and a 3 s lease."""
        url = store_url or f"sqlite:///{tmp_path / 'bot.db'}"
        # pool_pre_ping: the bot's own connections survive a test dropping the store's connections.
        engine = sa.create_engine(url, pool_pre_ping=True)
        table = f"chaos_{uuid.uuid4().hex[:10]}"
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
        receivers.endpoint("bot")
        extra = backend_toml + EXTRA.format(
            url=receivers.url("bot"),
            backend=backend,
            grace=grace,
            propagation=propagation,
            store_url=url_file(tmp_path, url),
            table=table,
            store_extra=store_extra,
        )
        common = {
            "allow = []": 'allow = ["127.0.0.1/32"]',
            'retry_schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]': (
                'retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]'
            ),
            'step_retry_max = "10m"': 'step_retry_max = "2s"',
            **(replacements or {}),
        }

        def instance(name: str) -> dict[str, str]:
            if state_url is None:
                return {}
            shared = tmp_path / "shared"
            return {
                '# state_url = "postgresql+psycopg://rotatord@db.internal/rotatord"': f'state_url = "{state_url}"',
                '# instance_name = "rotatord-a"': f'instance_name = "{name}" #',
                '# lease_ttl = "15s"': 'lease_ttl = "3s" #',
                'directory = "var/secrets"': f'directory = "{shared}/secrets"',
                'master_key_file = "var/master.key"': f'master_key_file = "{shared}/master.key"',
            }

        config = write_config(tmp_path, socket_dir, {**common, **instance("a")}, extra=extra)
        result = cli(config, "init")
        assert result.returncode == 0, result.stderr
        others: list[Path] = []
        if state_url is not None:
            (tmp_path / "b").mkdir()
            sockets.append(tempfile.mkdtemp(prefix="rtd-s-", dir="/tmp"))
            others.append(write_config(tmp_path / "b", sockets[-1], {**common, **instance("b")}, extra=extra))
            result = cli(others[-1], "init")
            assert result.returncode == 0, result.stderr
        w = World(tmp_path, config, notify, receivers, engine, table, backend, state_url=state_url, others=others)
        built.append(w)
        return w

    try:
        yield build
    finally:
        notify.close()
        for directory in sockets:
            shutil.rmtree(directory, ignore_errors=True)
        for w in built:
            with w.engine.begin() as conn:
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {w.table}"))
            w.engine.dispose()
