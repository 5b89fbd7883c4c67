"""End to end on every data-store engine: the real daemon re-encrypts SQLite, PostgreSQL, MariaDB,
files and Redis while a bot keeps writing, survives SIGKILL mid-batch, and retires the old key
only when the census is clean.  Nothing is lost: every datum decrypts with the final ring and
holds the bot's latest value."""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_lib
import sqlalchemy as sa
from cryptography.fernet import Fernet

from rotatord.client import FileReader, Keyring
from rotatord.crypto.keyring import multifernet
from rotatord.document import FernetRing
from rotatord.engine.runner import CRASH_ENV
from tests.helpers import (
    DaemonProcess,
    NotifyListener,
    assert_no_material,
    cli,
    materials,
    read_doc,
    status_json,
    wait_until,
)
from tests.integration.conftest import write_config
from tests.servers.databases import url_file

ROWS = 1200  # more than two batches of 500 per SQL table
PATH = "bots/demo-bot/db-key"


@dataclass
class Data:
    suffix: str
    engines: dict[str, sa.Engine]
    files: Path
    redis: redis_lib.Redis
    expected: dict[tuple[str, str], bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def table(self) -> str:
        return f"msgs_{self.suffix}"


@pytest.fixture
def data(tmp_path: Path, postgres_url: str, mariadb_url: str, redis_url: str) -> Iterator[Data]:
    suffix = uuid.uuid4().hex[:8]
    engines = {
        "sqlite": sa.create_engine(f"sqlite:///{tmp_path / 'bot.db'}"),
        "postgresql": sa.create_engine(postgres_url),
        "mariadb": sa.create_engine(mariadb_url),
    }
    meta = sa.MetaData()
    sa.Table(
        f"msgs_{suffix}",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.Text, nullable=True),
    )
    for engine in engines.values():
        meta.create_all(engine)
    client = redis_lib.Redis.from_url(redis_url)
    files = tmp_path / "files"
    files.mkdir()
    yield Data(suffix, engines, files, client)
    for engine in engines.values():
        meta.drop_all(engine)
        engine.dispose()
    for key in client.scan_iter(f"rtd:{suffix}:*"):
        client.delete(key)
    client.close()


def _config(tmp_path: Path, socket_dir: str, data: Data, urls: dict[str, str]) -> Path:
    refs = {name: url_file(tmp_path / "refs", url) for name, url in urls.items()}
    stores = "".join(
        f'[[secrets.stores]]\nkind = "sql"\nurl_file = "{refs[name]}"\ntable = "{data.table}"\n'
        f'key = ["id"]\ncolumns = ["body"]\nbatch_size = 500\n\n'
        for name in ("sqlite", "postgresql", "mariadb")
    )
    stores += f'[[secrets.stores]]\nkind = "files"\ndirectory = "{data.files}"\npattern = "*.tok"\n\n'
    stores += (
        f'[[secrets.stores]]\nkind = "redis"\nurl_file = "{refs["redis"]}"\npattern = "rtd:{data.suffix}:*"\n'
        "batch_size = 200\n\n"
    )
    config = write_config(
        tmp_path, socket_dir, {'[[secrets]]\nname = "demo-bot-api"': stores + '[[secrets]]\nname = "demo-bot-api"'}
    )
    assert cli(config, "init").returncode == 0, "init failed"
    return config


def _seed(data: Data, fernet: Fernet) -> None:
    for name, engine in data.engines.items():
        rows = [
            {"id": i, "body": None if i % 97 == 0 else fernet.encrypt(f"{name}-{i}".encode()).decode()}
            for i in range(ROWS)
        ]
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {data.table} (id, body) VALUES (:id, :body)"), rows)
        for row in rows:
            if row["body"] is not None:
                data.expected[(name, str(row["id"]))] = f"{name}-{row['id']}".encode()
    for i in range(40):
        (data.files / f"{i}.tok").write_bytes(fernet.encrypt(f"file-{i}".encode()) + b"\n")
        data.expected[("files", str(i))] = f"file-{i}".encode()
    for i in range(500):
        data.redis.set(f"rtd:{data.suffix}:{i}", fernet.encrypt(f"redis-{i}".encode()))
        data.expected[("redis", str(i))] = f"redis-{i}".encode()
    # One value no key can read: it is quarantined and reported, never rewritten, never blocking.
    with data.engines["sqlite"].begin() as conn:
        conn.execute(sa.text(f"UPDATE {data.table} SET body = 'gAAAAAB-corrupt' WHERE id = 1"))
    data.expected.pop(("sqlite", "1"))


def _writer(data: Data, keyring: Keyring, stop: threading.Event) -> None:
    """A bot updating rows with whatever ring it currently reads (old key, then new)."""
    rng = random.Random(7)
    n = 0
    while not stop.is_set():
        name = rng.choice(["sqlite", "postgresql", "mariadb"])
        row_id = rng.randrange(2, ROWS)
        if row_id % 97 == 0:
            continue
        value = f"{name}-{row_id}-update-{n}".encode()
        with data.lock, data.engines[name].begin() as conn:
            conn.execute(
                sa.text(f"UPDATE {data.table} SET body = :b WHERE id = :i"),
                {"b": keyring.encrypt(value).decode(), "i": row_id},
            )
            data.expected[(name, str(row_id))] = value
        n += 1
        stop.wait(0.005)


def _all_values(data: Data) -> dict[tuple[str, str], bytes]:
    out: dict[tuple[str, str], bytes] = {}
    for name, engine in data.engines.items():
        with engine.connect() as conn:
            for row_id, body in conn.execute(sa.text(f"SELECT id, body FROM {data.table}")):
                if body is not None:
                    out[(name, str(row_id))] = body.encode() if isinstance(body, str) else bytes(body)
    for path in data.files.glob("*.tok"):
        out[("files", path.stem)] = path.read_bytes().strip()
    for key in data.redis.scan_iter(f"rtd:{data.suffix}:*"):
        value = data.redis.get(key)
        assert isinstance(value, bytes)
        out[("redis", key.decode().rsplit(":", 1)[1])] = value
    return out


def test_reencrypts_every_engine_through_a_crash_while_a_bot_writes(
    tmp_path: Path,
    socket_dir: str,
    notify: NotifyListener,
    data: Data,
    postgres_url: str,
    mariadb_url: str,
    redis_url: str,
) -> None:
    urls = {
        "sqlite": str(data.engines["sqlite"].url),
        "postgresql": postgres_url,
        "mariadb": mariadb_url,
        "redis": redis_url,
    }
    config = _config(tmp_path, socket_dir, data, urls)
    seen: set[str] = set()

    first = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        first.wait_ready()
        wait_until(lambda: status_json(config)["demo-bot-db"]["state"] == "done", what="v1 created and settled")
        assert first.stop() == 0
    finally:
        first.kill()
    v1 = read_doc(config, "local", PATH)
    assert isinstance(v1, FernetRing)
    seen |= materials(v1)
    _seed(data, multifernet(v1))

    keyring = Keyring(
        FileReader(config.parent / "var" / "secrets", PATH, master_key_file=config.parent / "var" / "master.key"),
        ttl=0.3,
    )
    stop = threading.Event()
    writer = threading.Thread(target=_writer, args=(data, keyring, stop), daemon=True)
    writer.start()
    try:
        crashing = DaemonProcess(config, tmp_path / "daemon.log", notify, env={CRASH_ENV: "reencrypt.batch"})
        try:
            crashing.wait_ready()
            cli(config, "rotate", "demo-bot-db")
            assert crashing.wait(60) == -9, "the daemon should die after its first committed batch"
        finally:
            crashing.kill()
        seen |= materials(read_doc(config, "local", PATH))

        resumed = DaemonProcess(config, tmp_path / "daemon.log", notify)
        try:
            resumed.wait_ready()
            wait_until(
                lambda: (
                    json.loads(cli(config, "status", "demo-bot-db", "--json").stdout)["secrets"][0]["phase"]
                    == "retired"
                ),
                timeout=120,
                interval=0.5,
                what="rotation 2 retired",
            )
            stop.set()
            writer.join(10)
            census = json.loads(cli(config, "census", "demo-bot-db", "--json").stdout)
            history = json.loads(cli(config, "history", "demo-bot-db", "--json").stdout)
            assert resumed.stop() == 0
        finally:
            resumed.kill()
    finally:
        stop.set()
        writer.join(10)

    final = read_doc(config, "local", PATH)
    assert isinstance(final, FernetRing)
    seen |= materials(final)
    assert [k.id for k in final.keys] == ["v2"]
    assert [h["version"] for h in history] == [2, 1] and history[0]["status"] == "done"
    only_v2 = Fernet(final.primary_key.material.reveal())
    values = _all_values(data)
    with data.lock:
        expected = dict(data.expected)
    for where, plaintext in expected.items():
        assert only_v2.decrypt(values[where]) == plaintext, f"{where} lost its value or its key"
    assert values[("sqlite", "1")] == b"gAAAAAB-corrupt"  # quarantined, untouched
    for store in census["stores"]:
        assert set(store["by_key"]) <= {"v2"}, store
    quarantined = [q for q in census["quarantined"] if q["store"].startswith("demo-bot-db.stores[0]:")]
    assert len(quarantined) == 1 and "1" in quarantined[0]["locator"], census["quarantined"]
    assert_no_material(seen, files=[tmp_path / "daemon.log", config.parent / "var" / "state.db"])
