"""The real ``rotatord`` console script given bad input: a clear line naming the field, the right
exit code, and nothing changed on disk (invariant 6).

Every command runs as a subprocess in its own temporary directory, with a copy of
``config.example.toml`` whose relative paths therefore land inside that directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import assert_no_material, materials, read_doc

REPO = Path(__file__).resolve().parents[2]
ROTATORD = Path(sys.executable).parent / "rotatord"
EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 64, 69, 75, 78
PREFIX = "rotatord: config error: "


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without anything that would change what rotatord loads."""
    drop = ("ROTATORD_", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)}
    env.update(extra or {})
    return env


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROTATORD), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(env),
        check=False,
    )


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every path under ``root`` with its mode and a digest of its content (never the content)."""
    tree: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else "-"
        tree[str(path.relative_to(root))] = (st.st_mode, digest)
    return tree


def rotation_rows(state_db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{state_db}?mode=ro", uri=True) as db:
        return db.execute("SELECT secret, version, status, emergency, trigger FROM rotations ORDER BY id").fetchall()


def write_config(directory: Path, replacements: dict[str, str] | None = None, mode: int = 0o600) -> Path:
    text = (REPO / "config.example.toml").read_text()
    for old, new in (replacements or {}).items():
        assert text.count(old) == 1, f"config.example.toml no longer contains {old!r} exactly once"
        text = text.replace(old, new)
    path = directory / "config.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """An uninitialised copy of the example (no state directory, no master key)."""
    return write_config(tmp_path)


@pytest.fixture
def ready(fresh: Path) -> Path:
    """The example after ``rotatord init``."""
    result = run(fresh.parent, "init", "-c", "config.toml")
    assert result.returncode == 0, result.stderr
    return fresh


def config_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(PREFIX) for line in lines), result.stderr
    return [line[len(PREFIX) :] for line in lines]


DB_EVERY = 'every = "1m"\n# How long the old key'
BROKEN: dict[str, tuple[dict[str, str], int, dict[str, str], list[str]]] = {
    # id: (replacements, file mode, environment, the start of each expected stderr line)
    "unknown-key": (
        {"keep = 0\n": "keep = 0\nkep = 1\n"},
        0o600,
        {},
        ["secrets[0].kep (secret 'demo-bot-db'): unknown key"],
    ),
    "bad-duration": (
        {'grace = "30s"': 'grace = "30x"'},
        0o600,
        {},
        ["secrets[0].grace (secret 'demo-bot-db'): invalid duration"],
    ),
    "bad-cron": (
        {DB_EVERY: DB_EVERY.replace('every = "1m"', 'cron = "61 * * * *"')},
        0o600,
        {},
        ["secrets[0].cron (secret 'demo-bot-db'): invalid cron expression '61 * * * *'"],
    ),
    "every-and-cron": (
        {DB_EVERY: 'cron = "0 3 * * 1"\n' + DB_EVERY},
        0o600,
        {},
        ["secrets[0].cron (secret 'demo-bot-db'): 'every' is set too"],
    ),
    "duplicate-name": (
        {'name = "demo-bot-api"': 'name = "demo-bot-db"'},
        0o600,
        {},
        ["secrets[1].name (secret 'demo-bot-db'): duplicate secret name"],
    ),
    "unknown-backend": (
        {'backend = "local"\npath = "bots/demo-bot/api-token"': 'backend = "vault"\npath = "bots/demo-bot/api-token"'},
        0o600,
        {},
        ["secrets[1].backend (secret 'demo-bot-api'): unknown backend 'vault'"],
    ),
    "backend-kind": ({'kind = "file"': 'kind = "s3"'}, 0o600, {}, ["backends.local.kind: unknown kind 's3'"]),
    "malformed-toml": ({"keep = 0\n": "keep = \n"}, 0o600, {}, ["config.toml: invalid TOML: Invalid value (at line"]),
    "two-problems": (
        {'log_level = "info"': 'log_level = "loud"', "max_versions = 20": "max_versions = 0"},
        0o600,
        {},
        ["daemon.log_level: ", "backends.local.max_versions: "],
    ),
    "bad-environment": (
        {},
        0o600,
        {"ROTATORD_DAEMON__STARTUP_JITTER": "oops"},
        ["daemon.startup_jitter (from $ROTATORD_DAEMON__STARTUP_JITTER): invalid duration 'oops'"],
    ),
    # A valid file whose references are wrong: here nothing has been initialised yet.
    "missing-master-key": ({}, 0o600, {}, ["backends.local.master_key_file: "]),
    "config-0644": (
        {},
        0o644,
        {},
        ["config.toml: readable by group or others (mode 0644)", "backends.local.master_key_file: "],
    ),
    "config-group-writable": (
        {},
        0o620,
        {},
        ["config.toml: writable by group or others (mode 0620)", "backends.local.master_key_file: "],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_config_on_broken_files(tmp_path: Path, case: str) -> None:
    replacements, mode, env, expected = BROKEN[case]
    write_config(tmp_path, replacements, mode)
    before = snapshot(tmp_path)

    result = run(tmp_path, "check-config", "-c", "config.toml", env=env)

    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    lines = config_errors(result)
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), (line, start)
    if case == "missing-master-key":
        assert "does not exist (run 'rotatord init')" in lines[0]
    # Bad input changes nothing: no state directory, no database, no key.
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "var").exists()


def test_check_config_on_a_valid_initialised_file(ready: Path) -> None:
    result = run(ready.parent, "check-config", "-c", "config.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config.toml: ok (2 secrets, 1 backends)\n"
    assert result.stderr == ""


def test_config_option_before_the_command(ready: Path) -> None:
    result = run(ready.parent, "-c", "config.toml", "check-config")
    assert result.returncode == 0, result.stderr
    # After the command wins over before it.
    result = run(ready.parent, "-c", "absent.toml", "check-config", "-c", "config.toml")
    assert result.returncode == 0, result.stderr
    result = run(ready.parent, "-c", "absent.toml", "check-config")
    assert result.returncode == EX_CONFIG
    assert config_errors(result) == ["absent.toml: configuration file not found"]


def test_config_from_environment_variable(ready: Path) -> None:
    result = run(ready.parent, "check-config", env={"ROTATORD_CONFIG": str(ready)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{ready}: ok")


def test_init_twice_keeps_the_master_key(fresh: Path) -> None:
    key = fresh.parent / "var" / "master.key"
    first = run(fresh.parent, "init", "-c", "config.toml")
    assert first.returncode == 0, first.stderr
    assert f"{key} (created)" in first.stdout
    digest = hashlib.sha256(key.read_bytes()).digest()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700

    second = run(fresh.parent, "init", "-c", "config.toml")

    assert second.returncode == 0, second.stderr
    assert f"{key} (exists, kept)" in second.stdout
    assert hashlib.sha256(key.read_bytes()).digest() == digest, "the second init replaced the master key"
    assert (fresh.parent / "var" / "state.db").is_file()


def test_init_refuses_a_broken_file_and_creates_nothing(tmp_path: Path) -> None:
    write_config(tmp_path, {'grace = "30s"': 'grace = "soon"'})
    before = snapshot(tmp_path)
    result = run(tmp_path, "init", "-c", "config.toml")
    assert result.returncode == EX_CONFIG
    assert config_errors(result)[0].startswith("secrets[0].grace (secret 'demo-bot-db'): invalid duration 'soon'")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["status", "rotate", "rollback", "history", "adopt"])
def test_unknown_secret(ready: Path, command: str) -> None:
    before = snapshot(ready.parent)
    result = run(ready.parent, command, "nope", "-c", "config.toml")
    assert result.returncode == EX_USAGE, result.stderr
    assert result.stderr == "rotatord: error: unknown secret 'nope': not in the configuration\n"
    assert result.stdout == ""
    assert snapshot(ready.parent) == before


def test_rotate_without_a_daemon(ready: Path) -> None:
    state_db = ready.parent / "var" / "state.db"
    before = snapshot(ready.parent)

    result = run(ready.parent, "rotate", "demo-bot-db", "-c", "config.toml")

    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert "no rotatord daemon is running" in result.stderr
    assert str(ready.parent / "var" / "control.sock") in result.stderr
    assert "--offline" in result.stderr
    assert snapshot(ready.parent) == before
    assert rotation_rows(state_db) == []


def test_offline_emergency_rotation_runs_in_process(ready: Path) -> None:
    result = run(
        ready.parent, "rotate", "--offline", "demo-bot-db", "--emergency", "--reason", "test", "-c", "config.toml"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("demo-bot-db: rotation 1 ")

    status = run(ready.parent, "status", "--json", "-c", "config.toml")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["daemon"] == {"running": False}
    by_name = {s["name"]: s for s in report["secrets"]}
    assert by_name["demo-bot-db"]["version"] >= 1
    assert by_name["demo-bot-db"]["emergency"] is True
    assert by_name["demo-bot-api"]["version"] == 0  # only the named secret rotated
    rows = rotation_rows(ready.parent / "var" / "state.db")
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("demo-bot-db", 1, 1, "cli:offline")]
    # The new key is in the backend and nowhere in what the CLI printed or the state DB holds.
    secrets = materials(read_doc(ready, "local", "bots/demo-bot/db-key"))
    assert_no_material(
        secrets,
        files=[ready.parent / "var" / "state.db", ready.parent / "var" / "audit.log"],
        texts=[result.stdout, result.stderr, status.stdout, status.stderr],
    )


@pytest.fixture
def daemon(ready: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``rotatord run`` in the background, answering on its control socket; stopped by PID."""
    sock_path = ready.parent / "var" / "control.sock"
    assert len(str(sock_path)) < 100, "the control socket path is too long for AF_UNIX"
    log = ready.parent / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROTATORD), "run", "-c", "config.toml"],
            cwd=ready.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not _pings(sock_path):
            assert proc.poll() is None, f"the daemon exited with {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the daemon's control socket did not answer within 30 s"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _pings(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b'{"op": "ping"}\n')
            reply = sock.makefile("rb").readline()
    except OSError:
        return False
    return bool(json.loads(reply).get("ok"))


def test_offline_rotation_refused_while_the_daemon_runs(ready: Path, daemon: subprocess.Popen[bytes]) -> None:
    result = run(
        ready.parent, "rotate", "--offline", "demo-bot-db", "--emergency", "--reason", "drill", "-c", "config.toml"
    )

    assert result.returncode == EX_TEMPFAIL, result.stderr
    assert "the daemon is running" in result.stderr
    assert f"(pid {daemon.pid})" in result.stderr
    assert daemon.poll() is None, "the refused offline rotation disturbed the daemon"

    os.kill(daemon.pid, signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert not (ready.parent / "var" / "control.sock").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    for args in (
        ["check-config", "-c", "absent.toml"],
        ["status", "-c", "absent.toml"],
        ["rotate", "x", "-c", "absent.toml"],
    ):
        result = run(tmp_path, *args)
        assert result.returncode == EX_CONFIG, (args, result.stderr)
        assert config_errors(result) == ["absent.toml: configuration file not found"]
    assert list(tmp_path.iterdir()) == []


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    result = run(tmp_path, "check-config", "-c", str(tmp_path))
    assert result.returncode == EX_CONFIG
    assert config_errors(result) == [f"{tmp_path}: cannot read configuration (Is a directory)"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (["status", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["rotate"], "the following arguments are required: name"),
        ([], "the following arguments are required: COMMAND"),
        (["audit"], "the following arguments are required: ACTION"),
        (["rotate", "demo-bot-db", "--emergency=yes"], "argument --emergency: ignored explicit argument 'yes'"),
    ],
    ids=["unknown-command", "unknown-flag", "missing-name", "no-command", "audit-no-action", "flag-with-value"],
)
def test_usage_errors(tmp_path: Path, args: list[str], complaint: str) -> None:
    write_config(tmp_path)
    before = snapshot(tmp_path)
    result = run(tmp_path, *args, "-c", "config.toml") if args else run(tmp_path)
    assert result.returncode == EX_USAGE, result.stderr
    assert result.stderr.startswith("usage: rotatord")
    assert f"rotatord: error: {complaint}" in result.stderr
    assert snapshot(tmp_path) == before
