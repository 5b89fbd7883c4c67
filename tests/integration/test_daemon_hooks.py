"""Hooks in the real daemon: refused at start when they cannot run, and run exactly once per phase
across a SIGKILL right after a phase committed (its hooks recorded, none run yet)."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from rotatord.config import load_settings
from rotatord.daemon.runtime import build_runtime
from rotatord.engine.runner import CRASH_ENV
from rotatord.timeutil import utcnow
from tests.engine.test_hooks import RECORD, records
from tests.helpers import DaemonProcess, NotifyListener, assert_no_material, cli, materials, read_doc, wait_until
from tests.integration.conftest import write_config

EX_CONFIG = 78
FERNET, FERNET_PATH = "demo-bot-db", "bots/demo-bot/db-key"
TOKEN, TOKEN_PATH = "demo-bot-api", "bots/demo-bot/api-token"
SECRET_HOOK_AT = '#   hash_fields = ["payload"]             # empty: the keys are strings\n'


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_check_config_and_run_refuse_hooks_that_cannot_run_and_change_nothing(tmp_path: Path, socket_dir: str) -> None:
    not_executable = tmp_path / "reload.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    missing = tmp_path / "bin" / "post_to_chat.py"
    config = write_config(
        tmp_path,
        socket_dir,
        replacements={
            SECRET_HOOK_AT: SECRET_HOOK_AT
            + f'[[secrets.hooks]]\ncommand = ["{not_executable}"]\nphases = ["promoted"]\n'
        },
        extra=f'\n[[hooks]]\ncommand = ["{missing}", "--channel", "ops"]\nphases = ["failed"]\n',
    )
    before = tree(tmp_path)
    for command in ("check-config", "run"):
        result = cli(config, command, timeout=30)
        assert result.returncode == EX_CONFIG, (command, result.stderr)
        assert f"secrets[0].hooks[0].command (secret '{FERNET}'): {not_executable} is not executable" in result.stderr
        assert f"hooks[0].command: {missing} does not exist" in result.stderr
        assert result.stdout == ""
    assert tree(tmp_path) == before  # no state directory, database or socket was created


def _versions(config: Path, secret: str) -> list[tuple[int, str]]:
    with sqlite3.connect(config.parent / "var" / "state.db") as conn:
        rows = conn.execute("SELECT version, status FROM rotations WHERE secret = ? ORDER BY version", (secret,))
        return [(int(v), str(s)) for v, s in rows.fetchall()]


def test_hooks_run_once_per_phase_when_the_daemon_is_killed_right_after_a_phase(
    tmp_path: Path, socket_dir: str, notify: NotifyListener
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    program = tmp_path / "record.py"
    program.write_text(f"#!{sys.executable}\n{RECORD}")
    program.chmod(0o755)
    phases = '["staged", "promoted", "reencrypted", "retired"]'
    config = write_config(
        tmp_path,
        socket_dir,
        extra=f'\n[[hooks]]\ncommand = ["{program}"]\nphases = {phases}\nenv = {{ HOOK_OUT = "{out}" }}\n',
    )
    assert cli(config, "init").returncode == 0
    log = tmp_path / "daemon.log"

    # Version 1 is created in this process (the engine the daemon runs, hooks included).
    runtime = build_runtime(load_settings(config))
    try:
        runtime.engine.tick(FERNET, utcnow())
    finally:
        runtime.close()
    assert _versions(config, FERNET) == [(1, "done")]

    crashing = DaemonProcess(config, log, notify, env={CRASH_ENV: "stage.done"})
    try:
        crashing.wait_ready()
        # The token's first rotation runs at start; its hooks finish before the crash is provoked.
        token_runs = {f"{TOKEN}-issued-1", f"{TOKEN}-revoked-1"}
        wait_until(lambda: token_runs <= {p.name.split(".")[0] for p in out.iterdir()}, what="the token's hooks")
        cli(config, "rotate", FERNET, timeout=30)  # its reply may be lost: the daemon dies mid-request
        assert crashing.wait(30) == -9
    finally:
        crashing.kill()
    assert _versions(config, FERNET) == [(1, "done"), (2, "active")]
    assert not any(path.name.startswith(f"{FERNET}-staged-2.") for path in out.iterdir())
    # The staged hook was recorded in the phase's own transaction, so the restart knows it is owed.
    with sqlite3.connect(tmp_path / "var" / "state.db") as conn:
        owed = conn.execute(
            "SELECT h.phase, h.state FROM hook_runs h JOIN rotations r ON r.id = h.rotation_id "
            "WHERE r.secret = ? AND r.version = 2",
            (FERNET,),
        ).fetchall()
    assert owed == [("staged", "pending")]
    seen = materials(read_doc(config, "local", FERNET_PATH))

    resumed = DaemonProcess(config, log, notify)
    try:
        resumed.wait_ready()
        wait_until(lambda: _versions(config, FERNET) == [(1, "done"), (2, "done")], timeout=40, what="rotation 2")
        wait_until(lambda: f"{FERNET}-retired-2" in records(out), what="the retired hooks of rotation 2")
        seen |= materials(read_doc(config, "local", FERNET_PATH)) | materials(read_doc(config, "local", TOKEN_PATH))
        assert resumed.stop() == 0
    finally:
        resumed.kill()

    got = records(out)  # raises if any (secret, phase, version) ran twice
    fernet_runs = sorted(k for k in got if k.startswith(FERNET))
    assert fernet_runs == sorted(f"{FERNET}-{p}-{v}" for p in json.loads(phases) for v in (1, 2))
    assert {k for k in got if k.startswith(TOKEN)} == token_runs
    assert json.loads(got[f"{FERNET}-staged-2"]["stdin"])["key_id"] == "v2"
    texts = [json.dumps(r) for r in got.values()]
    assert_no_material(seen, files=[log, tmp_path / "var" / "audit.log"], texts=texts)


# Counts every run; the first run of rotation 2's "promoted" hook SIGKILLs the daemon (its parent)
# while it is still running, as a crash in the middle of a hook would.
KILL_PARENT_ONCE = """
import json, os, signal, sys
event = json.load(sys.stdin)
out = os.environ["HOOK_OUT"]
key = "{}-{}-{}".format(event["secret"], event["phase"], event["version"])
with open(os.path.join(out, "runs"), "a") as f:
    f.write(key + "\\n")
if key == "demo-bot-db-promoted-2" and not os.path.exists(os.path.join(out, "killed")):
    open(os.path.join(out, "killed"), "w").close()
    os.kill(os.getppid(), signal.SIGKILL)
"""


def test_a_hook_cut_short_by_a_daemon_crash_runs_again_once_after_the_restart(
    tmp_path: Path, socket_dir: str, notify: NotifyListener
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    program = tmp_path / "kill_parent_once.py"
    program.write_text(f"#!{sys.executable}\n{KILL_PARENT_ONCE}")
    program.chmod(0o755)
    hook = (
        f'[[secrets.hooks]]\ncommand = ["{program}"]\nphases = ["staged", "promoted", "reencrypted", "retired"]\n'
        f'env = {{ HOOK_OUT = "{out}" }}\n'
    )
    config = write_config(tmp_path, socket_dir, replacements={SECRET_HOOK_AT: SECRET_HOOK_AT + hook})
    assert cli(config, "init").returncode == 0
    runtime = build_runtime(load_settings(config))
    try:
        runtime.engine.tick(FERNET, utcnow())
    finally:
        runtime.close()
    log = tmp_path / "daemon.log"

    first = DaemonProcess(config, log, notify)
    try:
        first.wait_ready()
        cli(config, "rotate", FERNET, timeout=30)  # its reply may be lost: the hook kills the daemon
        assert first.wait(30) == -9
    finally:
        first.kill()
    assert _versions(config, FERNET) == [(1, "done"), (2, "active")]

    second = DaemonProcess(config, log, notify)
    try:
        second.wait_ready()
        wait_until(lambda: _versions(config, FERNET)[-1] == (2, "done"), timeout=40, what="rotation 2")
        # The retired hooks run just after the phase commits; a stop before that would defer them.
        wait_until(lambda: f"{FERNET}-retired-2" in (out / "runs").read_text(), what="the retired hook")
        assert second.stop() == 0
    finally:
        second.kill()
    runs = (out / "runs").read_text().splitlines()
    phases = ("staged", "promoted", "reencrypted", "retired")
    assert sorted(runs) == sorted([f"{FERNET}-{p}-{v}" for p in phases for v in (1, 2)] + [f"{FERNET}-promoted-2"])
