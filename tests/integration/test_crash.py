"""SIGKILL at every named step of an api_token rotation, restart: it completes exactly once.

(The fernet steps, with data in a store and a consumer taking webhooks, are in the chaos suite:
tests/chaos/test_chaos.py::test_sigkill_at_every_step.)

The daemon kills itself (SIGKILL, no clean-up of any kind) when it reaches the point named in
ROTATORD_TEST_CRASH_AT; the test then restarts it without that variable and checks the journal,
the backend and the audit log agree, and that data encrypted before the rotation still decrypts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from rotatord.audit import verify_file
from rotatord.backends.file import FileBackend
from rotatord.config import load_settings
from rotatord.crypto.keyring import multifernet
from rotatord.daemon.runtime import build_runtime
from rotatord.document import CredentialSet, FernetRing
from rotatord.engine.journal import Journal
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

POINTS = ("intent", "acted", "done")
TOKEN_CASES = [f"{step}.{point}" for step in ("issue", "revoke") for point in POINTS]
SECRETS = {"fernet": ("demo-bot-db", "bots/demo-bot/db-key"), "api_token": ("demo-bot-api", "bots/demo-bot/api-token")}


def _rows(config: Path, secret: str) -> list[tuple[int, str, str]]:
    db = config.parent / "var" / "state.db"
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT version, phase, status FROM rotations WHERE secret = ? ORDER BY version", (secret,)
        ).fetchall()


def _crash_and_resume(config: Path, notify: NotifyListener, tmp_path: Path, kind: str, point: str) -> None:
    name, path = SECRETS[kind]
    seen: set[str] = set()
    # Version 1 is created in this process (the same engine the daemon runs), saving a daemon start.
    runtime = build_runtime(load_settings(config))
    try:
        runtime.engine.tick(name, utcnow())
    finally:
        runtime.close()
    assert _rows(config, name) == [(1, *_final(kind))]
    before = read_doc(config, "local", path)
    seen |= materials(before)
    data = multifernet(before).encrypt(b"record before the rotation") if isinstance(before, FernetRing) else None

    crashing = DaemonProcess(config, tmp_path / "daemon.log", notify, env={CRASH_ENV: point})
    try:
        crashing.wait_ready()
        cli(config, "rotate", name, timeout=30)  # may lose its reply when the daemon dies mid-request
        code = crashing.wait(30)
    finally:
        crashing.kill()
    assert code == -9, f"the daemon should have been SIGKILLed at {point}, exit status {code}"
    mid = read_doc(config, "local", path)
    seen |= materials(mid)
    # Until the retire step removes v1, the published ring must decrypt data written before the rotation.
    # (Retiring is right here only because no data store is configured, so the census is empty; the
    # re-encryption issue puts this datum into real stores, where the census keeps v1 until it moved.)
    if (data is not None and not point.startswith("retire.")) or point == "retire.intent":
        assert isinstance(mid, FernetRing)
        assert multifernet(mid).decrypt(data) == b"record before the rotation", f"ring lost a key at {point}"

    resumed = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        resumed.wait_ready()
        wait_until(
            lambda: len(_rows(config, name)) == 2 and _rows(config, name)[1][2] == "done",
            timeout=40,
            what=f"rotation 2 to complete after a crash at {point}",
        )
        final_status = status_json(config)[name]
        assert resumed.stop() == 0
    finally:
        resumed.kill()

    # Exactly once: versions 1 and 2, each recorded once, both done; no version skipped.
    assert _rows(config, name) == [(1, *_final(kind)), (2, *_final(kind))]
    assert final_status["phase"] == _final(kind)[0]
    after = read_doc(config, "local", path)
    seen |= materials(after)
    settings = load_settings(config)
    history = FileBackend("local", settings.backends["local"]).history(path)
    if kind == "fernet":
        assert isinstance(after, FernetRing)
        assert after.primary == "v2" and [k.id for k in after.keys] == ["v2"]
        # v1: created; v2: staged; v3: promoted; v4: retired.  A duplicate write would add a version.
        assert [h.version for h in history] == ["1", "2", "3", "4"]
    else:
        assert isinstance(after, CredentialSet)
        assert after.current.id == "v2" and after.previous is None
        assert [r.id for r in after.revoked] == ["v1"]
        assert [h.version for h in history] == ["1", "2", "3"]
    settings = load_settings(config)
    journal = Journal(settings.daemon.database_url)
    report = verify_file(settings.daemon.audit_path, journal)
    journal.close()
    assert report.ok, report.problems
    var = config.parent / "var"
    assert_no_material(seen, files=[tmp_path / "daemon.log", var / "state.db", var / "state.db-wal", var / "audit.log"])


def _final(kind: str) -> tuple[str, str]:
    return ("retired", "done") if kind == "fernet" else ("revoked", "done")


@pytest.mark.parametrize("point", TOKEN_CASES)
def test_api_token_crash_at_step(config: Path, notify: NotifyListener, tmp_path: Path, point: str) -> None:
    _crash_and_resume(config, notify, tmp_path, "api_token", point)
