"""The engine end to end on the ``aws`` backend, against a real moto server.

Settings come from a real TOML file through ``load_settings`` and are wired by ``build_runtime``,
as the daemon does.  Time is a parameter: every tick gets the ``now`` the test picks.  Crashes
are real: a child process runs the same tick with ROTATORD_TEST_CRASH_AT set and SIGKILLs itself
at the named point (``aws.pending``: after the put, before the label move), then a fresh runtime
on the same state resumes.  The moto server is paused with SIGSTOP by PID to stand for an AWS
outage in the middle of a rotation.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.backends.aws import request_id_of, version_id_for
from rotatord.client.aws import AwsReader
from rotatord.config import load_settings
from rotatord.config.model import Settings
from rotatord.crypto.keyring import decrypt, multifernet
from rotatord.daemon.runtime import Runtime, build_runtime
from rotatord.document import CredentialSet, FernetRing, digest
from rotatord.engine.runner import CRASH_ENV
from tests.servers.moto import REGION, MotoServer, assert_sane_labels, describe_stages, write_credentials

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
EVERY = timedelta(days=30)
GRACE = timedelta(days=7)
PROPAGATION = timedelta(minutes=10)
SECOND = timedelta(seconds=1)
T1 = T0 + EVERY
PROMOTE_AT = T1 + PROPAGATION
RETIRE_AT = PROMOTE_AT + GRACE
FERNET, TOKEN = "bot-db", "bot-api"
PATHS = {FERNET: "bots/bot/db-key", TOKEN: "bots/bot/api-token"}

CONFIG = """
[daemon]
state_dir = "state"
startup_jitter = "0s"
step_retry_initial = "5s"
step_retry_max = "10m"

[backends.aws]
kind = "aws"
region = "{region}"
endpoint_url = "{url}"
credentials_file = "aws-credentials"
path_prefix = "{prefix}"
timeout = "1s"
transient_retries = 1

[[secrets]]
name = "bot-db"
kind = "fernet"
backend = "aws"
path = "bots/bot/db-key"
every = "30d"
grace = "7d"
propagation = "10m"

[[secrets]]
name = "bot-api"
kind = "api_token"
backend = "aws"
path = "bots/bot/api-token"
every = "30d"
grace = "7d"
token_prefix = "bot"
"""

# What a daemon process does on one tick; killed by ROTATORD_TEST_CRASH_AT where the test says.
_TICK = """
import sys
from datetime import datetime
from pathlib import Path
from rotatord.config import load_settings
from rotatord.daemon.runtime import build_runtime

runtime = build_runtime(load_settings(Path(sys.argv[1])))
runtime.engine.tick(sys.argv[2], datetime.fromisoformat(sys.argv[3]))
runtime.close()
"""


class Setup:
    """One config file and state directory on the shared moto server."""

    def __init__(self, moto: MotoServer, root: Path) -> None:
        self.moto = moto
        self.prefix = f"it-{uuid.uuid4().hex[:10]}"
        write_credentials(root / "aws-credentials")
        self.config = root / "config.toml"
        self.config.write_text(CONFIG.format(region=REGION, url=moto.url, prefix=self.prefix))
        os.chmod(self.config, 0o600)
        self.settings: Settings = load_settings(self.config)
        self.runtimes: list[Runtime] = []
        self.sm: Any = moto.client()

    def build(self) -> Runtime:
        runtime = build_runtime(self.settings)
        self.runtimes.append(runtime)
        return runtime

    def name(self, secret: str) -> str:
        return f"{self.prefix}/{PATHS[secret]}"

    def stages(self, secret: str) -> dict[str, list[str]]:
        return describe_stages(self.moto, self.name(secret))

    def current(self, secret: str) -> str:
        return next(v for v, labels in self.stages(secret).items() if "AWSCURRENT" in labels)

    def versions(self, secret: str) -> list[str]:
        listed = self.sm.list_secret_version_ids(SecretId=self.name(secret), IncludeDeprecated=True)["Versions"]
        return [v["VersionId"] for v in listed]

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.settings.daemon.state_dir / "state.db") as conn:
            return conn.execute(statement, params).fetchall()

    def journal_versions(self, secret: str) -> list[str]:
        """The backend versions the journal recorded, step by step, repeats folded."""
        rows = self.sql(
            "SELECT s.result FROM steps s JOIN rotations r ON r.id = s.rotation_id "
            "WHERE r.secret = ? AND s.state = 'done' ORDER BY r.version, s.started_at, s.finished_at",
            secret,
        )
        out: list[str] = []
        for (result,) in rows:
            version = json.loads(result or "{}").get("backend_version")
            if version and version not in out:
                out.append(version)
        return out

    def step(self, secret: str, version: int, step: str) -> tuple[str, str, dict[str, Any]]:
        (row,) = self.sql(
            "SELECT s.request_id, s.state, s.result FROM steps s JOIN rotations r ON r.id = s.rotation_id "
            "WHERE r.secret = ? AND r.version = ? AND s.name = ?",
            secret,
            version,
            step,
        )
        return row[0], row[1], json.loads(row[2] or "{}")

    def row(self, secret: str) -> dict[str, Any]:
        rows = self.sql(
            "SELECT version, phase, status, backend_version, error, attempts FROM rotations "
            "WHERE secret = ? ORDER BY version DESC LIMIT 1",
            secret,
        )
        keys = ("version", "phase", "status", "backend_version", "error", "attempts")
        return dict(zip(keys, rows[0], strict=True))

    def crash_tick(self, secret: str, now: datetime, point: str) -> None:
        """Run one tick in a child process that SIGKILLs itself at ``point``."""
        result = subprocess.run(
            [sys.executable, "-c", _TICK, str(self.config), secret, now.isoformat()],
            cwd=REPO, env={**os.environ, CRASH_ENV: point}, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == -9, result.stderr[-2000:]

    def assert_consistent(self, secret: str) -> None:
        """No AWS version the journal does not know, none it knows missing, labels sane, and the
        journal's backend_version is the AWSCURRENT VersionId."""
        assert_sane_labels(self.moto, self.name(secret))
        assert self.versions(secret) == self.journal_versions(secret)
        assert self.row(secret)["backend_version"] == self.current(secret)
        assert not any("AWSPENDING" in labels for labels in self.stages(secret).values())

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.close()


@pytest.fixture
def setup(moto_server: MotoServer, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(moto_server, tmp_path)
    yield s
    s.close()


def test_full_fernet_and_token_rotations_on_aws(setup: Setup) -> None:
    rt = setup.build()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    assert rt.engine.tick(TOKEN, T0) == T0 + EVERY
    for secret in (FERNET, TOKEN):
        setup.assert_consistent(secret)
    old_token = multifernet(_ring(setup)).encrypt(b"written under v1")

    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    staged = _ring(setup)
    assert (staged.primary, {k.id: k.state for k in staged.keys}) == ("v1", {"v1": "primary", "v2": "decrypt_only"})
    setup.assert_consistent(FERNET)
    # The VersionId of each write starts with the request id the journal recorded before it.
    request_id, state, result = setup.step(FERNET, 2, "stage")
    assert state == "done" and request_id_of(result["backend_version"]) == request_id

    assert rt.engine.tick(FERNET, PROMOTE_AT) == RETIRE_AT
    promoted = _ring(setup)
    assert promoted.primary == "v2" and decrypt(promoted, old_token) == b"written under v1"
    setup.assert_consistent(FERNET)
    assert rt.engine.tick(FERNET, RETIRE_AT) == T1 + EVERY
    assert [k.id for k in _ring(setup).keys] == ["v2"]
    assert setup.row(FERNET)[("status")] == "done"
    setup.assert_consistent(FERNET)

    assert rt.engine.tick(TOKEN, T1) == T1 + GRACE
    issued = _tokens(setup)
    assert issued.current.id == "v2" and issued.previous is not None and issued.previous.id == "v1"
    setup.assert_consistent(TOKEN)
    assert rt.engine.tick(TOKEN, T1 + GRACE) == T1 + EVERY
    revoked = _tokens(setup)
    assert revoked.previous is None and [r.id for r in revoked.revoked] == ["v1"]
    assert setup.row(TOKEN)["status"] == "done"
    setup.assert_consistent(TOKEN)


@pytest.mark.parametrize("point", ["aws.pending", "stage.acted"])
def test_kill_during_the_stage_write_then_resume(setup: Setup, point: str) -> None:
    """No second version for the resumed step, none lost, and the journal names the current one."""
    rt = setup.build()
    rt.engine.tick(FERNET, T0)
    (v1,) = setup.versions(FERNET)
    setup.crash_tick(FERNET, T1, point)
    request_id, state, _ = setup.step(FERNET, 2, "stage")
    assert state == "intent"
    interrupted = version_id_for(request_id, v1)
    if point == "aws.pending":  # put, not moved: v1 still current, the new version pending
        assert setup.stages(FERNET) == {v1: ["AWSCURRENT"], interrupted: ["AWSPENDING"]}
    else:  # written, not recorded
        assert setup.stages(FERNET) == {v1: ["AWSPREVIOUS"], interrupted: ["AWSCURRENT"]}

    resumed = setup.build()  # a restarted daemon: fresh runtime, same state database
    assert resumed.engine.tick(FERNET, T1 + SECOND) == T1 + SECOND + PROPAGATION
    assert setup.step(FERNET, 2, "stage") == (request_id, "done", setup.step(FERNET, 2, "stage")[2])
    assert setup.versions(FERNET) == [v1, interrupted]  # the same version, not a second one
    assert setup.row(FERNET)["backend_version"] == interrupted
    setup.assert_consistent(FERNET)
    promote_at = resumed.engine.tick(FERNET, T1 + SECOND + PROPAGATION)
    resumed.engine.tick(FERNET, promote_at)
    assert setup.row(FERNET)["status"] == "done"
    setup.assert_consistent(FERNET)


def test_aws_outage_mid_rotation_fails_the_step_and_the_next_tick_completes_it(setup: Setup) -> None:
    rt = setup.build()
    rt.engine.tick(FERNET, T0)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    before = setup.versions(FERNET)
    with setup.moto.paused():
        retry_at = rt.engine.tick(FERNET, PROMOTE_AT)
    row = setup.row(FERNET)
    assert (row["phase"], row["attempts"]) == ("staged", 1)
    assert "promote" in row["error"] and "did not answer" in row["error"]
    assert PROMOTE_AT < retry_at <= PROMOTE_AT + timedelta(seconds=5)
    assert setup.versions(FERNET) == before  # nothing was written while AWS was away
    assert _ring(setup).primary == "v1"  # the previous primary stays in force

    assert rt.engine.tick(FERNET, retry_at) == retry_at + GRACE
    assert setup.row(FERNET)["phase"] == "reencrypted"
    assert _ring(setup).primary == "v2"
    assert len(setup.versions(FERNET)) == len(before) + 1
    setup.assert_consistent(FERNET)


def test_bot_reader_follows_the_rotation(setup: Setup) -> None:
    import botocore.session

    session = botocore.session.Session()
    session.set_credentials("testing", "testing")
    reader = AwsReader(setup.name(FERNET), region=REGION, endpoint_url=setup.moto.url, session=session)
    rt = setup.build()
    try:
        rt.engine.tick(FERNET, T0)
        token = multifernet(reader.read()).encrypt(b"bot data")  # type: ignore[arg-type]
        rt.engine.tick(FERNET, T1)
        rt.engine.tick(FERNET, PROMOTE_AT)
        ring = reader.read()
        assert isinstance(ring, FernetRing) and ring.primary == "v2"
        assert decrypt(ring, token) == b"bot data"
        assert digest(ring) == digest(_ring(setup))
    finally:
        reader.close()


def _ring(setup: Setup) -> FernetRing:
    backend = setup.runtimes[-1].backends["aws"]
    current = backend.read(PATHS[FERNET])
    assert current is not None and isinstance(current.document, FernetRing)
    return current.document


def _tokens(setup: Setup) -> CredentialSet:
    backend = setup.runtimes[-1].backends["aws"]
    current = backend.read(PATHS[TOKEN])
    assert current is not None and isinstance(current.document, CredentialSet)
    return current.document
