"""Several real daemons on one PostgreSQL state database: one leader, standbys, failover, fencing.

Each instance has its own state directory, control socket, audit log and NOTIFY_SOCKET; they
share the state database (a fresh one per test) and the file backend (one directory, one master
key).  Leases are short (lease_ttl 3s) so failovers take seconds.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from rotatord.backends.file import FileBackend
from rotatord.config import load_settings
from rotatord.daemon.runtime import build_runtime
from rotatord.document import FernetRing
from rotatord.engine.runner import CRASH_ENV
from rotatord.timeutil import utcnow
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
from tests.servers.databases import database_url

SECRET, PATH = "demo-bot-db", "bots/demo-bot/db-key"
TTL = 3.0


@pytest.fixture
def short_dirs() -> Iterator[list[str]]:
    """Short directories for control sockets (sun_path holds 107 bytes), removed afterwards."""
    made: list[str] = []
    yield made
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def listeners() -> Iterator[dict[str, NotifyListener]]:
    made = {name: NotifyListener() for name in ("a", "b")}
    yield made
    for listener in made.values():
        listener.close()


def _configs(
    tmp_path: Path, short_dirs: list[str], urls: dict[str, str], replacements: dict[str, str] | None = None
) -> dict[str, Path]:
    shared = tmp_path / "shared"
    shared.mkdir()
    configs = {}
    for name, url in urls.items():
        directory = tmp_path / name
        directory.mkdir()
        short_dirs.append(tempfile.mkdtemp(prefix="rtd-s-", dir="/tmp"))
        mine = {
            '# state_url = "postgresql+psycopg://rotatord@db.internal/rotatord"': f'state_url = "{url}"',
            '# instance_name = "rotatord-a"': f'instance_name = "{name}" #',
            '# lease_ttl = "15s"': f'lease_ttl = "{TTL:g}s" #',
            'directory = "var/secrets"': f'directory = "{shared}/secrets"',
            'master_key_file = "var/master.key"': f'master_key_file = "{shared}/master.key"',
        }
        configs[name] = write_config(directory, short_dirs[-1], {**mine, **(replacements or {})})
        result = cli(configs[name], "init")
        assert result.returncode == 0, result.stderr
    return configs


def _seed(config: Path) -> None:
    """Version 1 of every secret, created in this process by the daemon's own engine."""
    runtime = build_runtime(load_settings(config))
    try:
        for name in runtime.engine.secrets:
            runtime.engine.tick(name, utcnow())
    finally:
        runtime.close()


def _rows(url: str) -> list[tuple[int, str, str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT version, phase, status FROM rotations WHERE secret = :s ORDER BY version"),
                {"s": SECRET},
            ).all()
    finally:
        engine.dispose()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _status(notify: NotifyListener) -> str:
    lines = [fields["STATUS"] for _pid, fields in notify.messages if "STATUS" in fields]
    return lines[-1] if lines else ""


def _wait_role(notify: NotifyListener, prefix: str, timeout: float = 30) -> float:
    what = f"STATUS {prefix} (last: {_status(notify)!r})"
    wait_until(lambda: _status(notify).startswith(prefix), timeout=timeout, interval=0.02, what=what)
    return time.monotonic()


def _daemon_info(config: Path) -> dict[str, Any]:
    result = cli(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)["daemon"]
    return info


def _history(config: Path) -> list[str]:
    settings = load_settings(config)
    return [h.version for h in FileBackend("local", settings.backends["local"]).history(PATH)]


def _log_time(log: Path, message: str) -> datetime:
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg") == message:
                return datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    raise AssertionError(f"{log.name}: no log line {message!r}")


def _assert_rotated_once(url: str, configs: dict[str, Path]) -> None:
    """Versions 1 and 2, each recorded once, done; the backend wrote each phase exactly once."""
    assert _rows(url) == [(1, "retired", "done"), (2, "retired", "done")]
    doc = read_doc(configs["a"], "local", PATH)
    assert isinstance(doc, FernetRing) and doc.primary == "v2" and [k.id for k in doc.keys] == ["v2"]
    # v1 created; v2 staged, promoted, retired.  A step acted twice would add a version.
    assert _history(configs["a"]) == ["1", "2", "3", "4"]
    for name, config in configs.items():
        result = cli(config, "audit", "verify")
        assert result.returncode == 0, f"audit log of {name}: {result.stdout}{result.stderr}"


def test_one_leader_the_other_stands_by_and_refuses_changes(
    tmp_path: Path, short_dirs: list[str], listeners: dict[str, NotifyListener], pg_state: str
) -> None:
    configs = _configs(tmp_path, short_dirs, {"a": pg_state, "b": pg_state})
    _seed(configs["a"])
    a = DaemonProcess(configs["a"], tmp_path / "a.log", listeners["a"])
    b: DaemonProcess | None = None
    try:
        a.wait_ready()
        _wait_role(listeners["a"], "leader a (epoch 1)")
        b = DaemonProcess(configs["b"], tmp_path / "b.log", listeners["b"])
        b.wait_ready()
        _wait_role(listeners["b"], "standby b (leader: a)")
        assert _daemon_info(configs["a"]) == {"running": True, "role": "leader", "instance": "a", "leader": "a"}
        assert _daemon_info(configs["b"]) == {"running": True, "role": "standby", "instance": "b", "leader": "a"}
        text = cli(configs["b"], "status")
        assert text.returncode == 0 and "daemon: standby (instance b); leader: a" in text.stdout
        assert SECRET in text.stdout, "a standby answers status from the shared state"

        rows, history, doc = _rows(pg_state), _history(configs["a"]), read_doc(configs["a"], "local", PATH)
        for args in (("rotate", SECRET), ("rollback", SECRET), ("reencrypt", SECRET)):
            refused = cli(configs["b"], *args)
            assert refused.returncode == 75, (args, refused.stdout, refused.stderr)
            assert "this instance ('b') is a standby; the leader is instance 'a'" in refused.stderr
        # A reload keeps a standby standing by: it arms nothing and still refuses.
        mark = len(listeners["b"].messages)
        b.signal(signal.SIGHUP)
        listeners["b"].wait_for("READY", "1", since=mark)
        assert _status(listeners["b"]).startswith("standby b (leader: a)")
        assert cli(configs["b"], "rotate", SECRET).returncode == 75
        assert {s["scheduled_at"] for s in status_json(configs["b"]).values()} == {None}, "a standby schedules"
        assert all(s["scheduled_at"] for s in status_json(configs["a"]).values()), "the leader schedules"
        assert b.stop() == 0
        # Offline, without its daemon, b still may not act while a holds the lease.
        offline = cli(configs["b"], "rotate", SECRET, "--offline")
        assert offline.returncode == 75 and "instance 'a' holds the leader lease" in offline.stderr
        assert (_rows(pg_state), _history(configs["a"])) == (rows, history), "a refused request changed something"
        assert read_doc(configs["a"], "local", PATH) == doc
        assert _daemon_info(configs["a"])["role"] == "leader"
        assert a.stop() == 0
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_leader_killed_mid_rotation_the_standby_finishes_it_exactly_once(
    tmp_path: Path, short_dirs: list[str], listeners: dict[str, NotifyListener], pg_state: str
) -> None:
    configs = _configs(tmp_path, short_dirs, {"a": pg_state, "b": pg_state})
    _seed(configs["a"])
    seen = materials(read_doc(configs["a"], "local", PATH))
    a = DaemonProcess(configs["a"], tmp_path / "a.log", listeners["a"], env={CRASH_ENV: "promote.intent"})
    b: DaemonProcess | None = None
    try:
        a.wait_ready()
        _wait_role(listeners["a"], "leader a")
        b = DaemonProcess(configs["b"], tmp_path / "b.log", listeners["b"])
        b.wait_ready()
        _wait_role(listeners["b"], "standby b (leader: a)")
        started = cli(configs["a"], "rotate", SECRET)  # staged now; the promotion kills a
        assert started.returncode == 0, started.stderr
        assert a.wait(30) == -9, "a should have SIGKILLed itself at promote.intent"
        killed = time.monotonic()
        seen |= materials(read_doc(configs["a"], "local", PATH))
        leading = _wait_role(listeners["b"], "leader b (epoch 2)", timeout=TTL + 10)
        wait_until(lambda: _rows(pg_state)[-1] == (2, "retired", "done"), timeout=30, interval=0.05, what="rotation 2")
        done = time.monotonic()
        print(f"\nfailover: SIGKILL -> standby leads {leading - killed:.2f}s -> rotation done {done - killed:.2f}s")
        assert _daemon_info(configs["b"])["role"] == "leader"
        assert b.stop() == 0
    finally:
        a.kill()
        if b is not None:
            b.kill()
    _assert_rotated_once(pg_state, configs)
    seen |= materials(read_doc(configs["a"], "local", PATH))
    files = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "a/var/audit.log", tmp_path / "b/var/audit.log"]
    assert_no_material(seen, files=files)


@pytest.fixture
def login_roles(postgres_url: str) -> Iterator[dict[str, str]]:
    """A PostgreSQL login role per instance, so one instance's access can be cut alone."""
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    roles = {name: f"rtd_{name}_{uuid.uuid4().hex[:12]}" for name in ("a", "b")}
    with admin.connect() as conn:
        for role in roles.values():
            conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN SUPERUSER'))
    try:
        yield roles
    finally:
        # Runs after pg_state dropped the database (requested after this fixture), so the
        # roles own nothing any more.
        with admin.connect() as conn:
            for role in roles.values():
                conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_a_leader_cut_off_from_the_database_stops_acting_before_the_standby_takes_over(
    tmp_path: Path,
    short_dirs: list[str],
    listeners: dict[str, NotifyListener],
    postgres_url: str,
    login_roles: dict[str, str],
    pg_state: str,
) -> None:
    name = sa.engine.make_url(pg_state).database
    assert name is not None
    urls = {n: database_url(postgres_url, name, user=role) for n, role in login_roles.items()}
    # A propagation window long enough to cut the leader off between staging and promoting.
    configs = _configs(tmp_path, short_dirs, urls, {'propagation = "10s"': 'propagation = "5s"'})
    _seed(configs["a"])
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    a = DaemonProcess(configs["a"], tmp_path / "a.log", listeners["a"])
    b: DaemonProcess | None = None
    try:
        a.wait_ready()
        _wait_role(listeners["a"], "leader a")
        b = DaemonProcess(configs["b"], tmp_path / "b.log", listeners["b"])
        b.wait_ready()
        _wait_role(listeners["b"], "standby b (leader: a)")
        started = cli(configs["a"], "rotate", SECRET)
        assert started.returncode == 0, started.stderr
        assert _rows(pg_state)[-1] == (2, "staged", "active")

        with admin.connect() as conn:  # a loses its database: no new session, the open ones killed
            conn.execute(sa.text(f'ALTER ROLE "{login_roles["a"]}" NOLOGIN'))
            killed = conn.execute(
                sa.text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE :p"),
                {"p": "rotatord a %"},
            ).scalar()
        assert killed, "a's sessions are named after it in pg_stat_activity"
        _wait_role(listeners["b"], "leader b (epoch 2)", timeout=TTL + 10)
        wait_until(lambda: _rows(pg_state)[-1] == (2, "retired", "done"), timeout=30, interval=0.05, what="rotation 2")
        stopped = _log_time(tmp_path / "a.log", "stopped acting: no longer the leader; scheduler paused")
        took_over = _log_time(tmp_path / "b.log", "leader lease acquired: this instance leads")
        assert stopped < took_over, "the old leader must stop acting before its lease can be taken over"

        with admin.connect() as conn:  # a comes back: it finds b leading and stands by
            conn.execute(sa.text(f'ALTER ROLE "{login_roles["a"]}" LOGIN'))
        wait_until(lambda: _status(listeners["a"]).startswith("standby a (leader: b)"), timeout=20, what="a standby")
        assert _daemon_info(configs["a"])["role"] == "standby"
        assert b.stop() == 0
        assert a.stop() == 0
    finally:
        a.kill()
        if b is not None:
            b.kill()
        admin.dispose()
    _assert_rotated_once(pg_state, configs)
    a_log, b_log = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert "rotation promoted" not in a_log and "rotation retired" not in a_log, "the cut-off leader acted"
    assert "rotation promoted" in b_log and "rotation retired" in b_log
    assert "Fenced" not in b_log


def test_a_paused_leader_wakes_up_as_a_standby_and_never_acts_again(
    tmp_path: Path, short_dirs: list[str], listeners: dict[str, NotifyListener], pg_state: str
) -> None:
    """SIGSTOP stands for a VM freeze or a long GC pause: the lease lapses while the process
    cannot notice.  After SIGCONT its monotonic clock says its tenure is over: it must not run
    the promotion its scheduler still holds, and it stands by."""
    configs = _configs(
        tmp_path, short_dirs, {"a": pg_state, "b": pg_state}, {'propagation = "10s"': 'propagation = "6s"'}
    )
    _seed(configs["a"])
    a = DaemonProcess(configs["a"], tmp_path / "a.log", listeners["a"])
    b: DaemonProcess | None = None
    try:
        a.wait_ready()
        _wait_role(listeners["a"], "leader a")
        b = DaemonProcess(configs["b"], tmp_path / "b.log", listeners["b"])
        b.wait_ready()
        _wait_role(listeners["b"], "standby b (leader: a)")
        started = cli(configs["a"], "rotate", SECRET)
        assert started.returncode == 0, started.stderr
        a.signal(signal.SIGSTOP)
        try:
            _wait_role(listeners["b"], "leader b (epoch 2)", timeout=TTL + 10)
        finally:
            a.signal(signal.SIGCONT)
        assert _rows(pg_state)[-1] == (2, "staged", "active"), "the promotion is still ahead (propagation 6s)"
        wait_until(lambda: _status(listeners["a"]).startswith("standby a (leader: b)"), timeout=20, what="a standby")
        wait_until(lambda: _rows(pg_state)[-1] == (2, "retired", "done"), timeout=30, interval=0.05, what="rotation 2")
        assert _daemon_info(configs["a"])["role"] == "standby"
        assert b.stop() == 0
        assert a.stop() == 0
    finally:
        a.kill()
        if b is not None:
            b.kill()
    _assert_rotated_once(pg_state, configs)
    a_log = (tmp_path / "a.log").read_text()
    assert "stopped acting: no longer the leader" in a_log
    assert "rotation promoted" not in a_log and "rotation retired" not in a_log, "the paused leader acted"
