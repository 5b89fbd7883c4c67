"""``handle_revoked_use`` in process against a real SQLite journal and a real audit log.

This is the HTTP endpoint's logic (``POST /v1/revoked-use``) without the HTTP server: status,
body, counts per secret and fingerprint, the audit record with the bot's source, the rate-limited
``credential.revoked_use`` outbox rows for the security consumers, and bad input changing nothing.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.audit import AuditLog
from rotatord.crypto.tokens import fingerprint, make_token
from rotatord.daemon.reports import RevokedUseRecorder, handle_revoked_use, install
from rotatord.document import Credential, CredentialSet, Revoked, sha256_hex
from rotatord.engine.journal import Journal
from rotatord.engine.report import secret_status
from rotatord.engine.revoked_use import NOTIFY_EVERY, RevokedUseStore
from rotatord.errors import BackendUnavailable, UnknownSecret, UsageError
from rotatord.sensitive import Sensitive
from tests.engine.conftest import HarnessFactory, token_secret
from tests.helpers import assert_no_material, unwritable

T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def now(self) -> datetime:
        return self.at


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "state.db"
        self.journal = Journal(f"sqlite:///{self.db}")
        self.journal.create()
        self.audit_path = tmp_path / "audit.log"
        self.audit = AuditLog(self.audit_path, self.journal)
        self.clock = Clock()
        self.woken = 0
        secret = token_secret()
        self.secrets = {secret.name: secret}
        self.recorder = RevokedUseRecorder(
            RevokedUseStore(self.journal), self.audit, self.secrets, ["secops"], self.clock, self._wake
        )

    def _wake(self) -> None:
        self.woken += 1

    def post(self, body: bytes | dict[str, Any], peer: str = "127.0.0.1:50000") -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, reply, ctype = asyncio.run(handle_revoked_use(raw, peer))
        assert ctype == "application/json"
        return status, json.loads(reply)

    def outbox(self) -> list[tuple[str, str, dict[str, Any]]]:
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT consumer, event_type, payload FROM outbox ORDER BY id").fetchall()
        return [(c, e, json.loads(p)) for c, e, p in rows]

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    install(lambda: e.recorder)
    yield e
    install(None)
    e.journal.close()


def test_reports_are_counted_audited_and_raised_once_per_window(env: Env) -> None:
    token = make_token("rtd").reveal()
    report = {"secret": "bot-api", "fingerprint": fingerprint(token), "state": "revoked", "credential": "v1",
              "source": "10.0.0.5 (billing-bot)", "at": "2025-01-06T02:59:59Z"}  # fmt: skip
    status, body = env.post(report)
    assert status == 202
    assert body == {"secret": "bot-api", "fingerprint": fingerprint(token), "credential": "v1", "known_as": None,
                    "count": 1, "secret_total": 1, "notified": ["secops"]}  # fmt: skip
    env.clock.at += timedelta(minutes=1)
    status, body = env.post(report)
    assert (status, body["count"], body["notified"]) == (202, 2, [])  # inside the window: counted, not raised
    other = {**report, "fingerprint": fingerprint(make_token("rtd").reveal()), "source": "10.0.0.6"}
    status, body = env.post(other)
    assert (body["count"], body["secret_total"], body["notified"]) == (1, 3, ["secops"])  # another fingerprint
    env.clock.at += NOTIFY_EVERY
    status, body = env.post(report)
    assert (body["count"], body["notified"]) == (3, ["secops"])  # a new window: raised again

    events = env.outbox()
    assert [(c, e) for c, e, _ in events] == [("secops", "credential.revoked_use")] * 3
    data = events[0][2]["data"]
    assert data == {"secret": "bot-api", "backend": "local", "path": "bots/bot/api-token",
                    "fingerprint": fingerprint(token), "credential": "v1", "state": "revoked", "known_as": None,
                    "source": "10.0.0.5 (billing-bot)", "count": 1,
                    "reported_at": "2025-01-06T02:59:59.000Z"}  # fmt: skip
    assert env.woken == 3

    records = [r for r in env.audit_records() if r["event"] == "credential.revoked_use"]
    assert [(r["count"], r["source"], r["actor"]) for r in records] == [
        (1, "10.0.0.5 (billing-bot)", "http:127.0.0.1:50000"),
        (2, "10.0.0.5 (billing-bot)", "http:127.0.0.1:50000"),
        (1, "10.0.0.6", "http:127.0.0.1:50000"),
        (3, "10.0.0.5 (billing-bot)", "http:127.0.0.1:50000"),
    ]
    assert env.audit.verify().ok

    summary = RevokedUseStore(env.journal).summary("bot-api")
    assert (summary["count"], summary["fingerprints"], summary["last_source"]) == (4, 2, "10.0.0.5 (billing-bot)")
    assert RevokedUseStore(env.journal).summary("other")["count"] == 0
    assert_no_material([token], files=[env.audit_path, env.db], texts=[json.dumps(events)])


def test_status_shows_the_count(make_harness: HarnessFactory) -> None:
    harness = make_harness(token_secret(), consumers=())
    runtime = harness.build()
    recorder = RevokedUseRecorder(RevokedUseStore(runtime.journal), runtime.audit, runtime.engine.secrets, [], Clock())
    install(lambda: recorder)
    try:
        report = {"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked"}
        assert asyncio.run(handle_revoked_use(json.dumps(report).encode(), "peer"))[0] == 202
        status = secret_status(runtime.engine, "bot-api", T0)
        assert status["revoked_use"]["count"] == 1 and status["revoked_use"]["last_source"] is None
    finally:
        install(None)


BAD: list[tuple[bytes | dict[str, Any], int, str]] = [
    (b"x" * 5000, 413, "at most 4096 bytes"),
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 400, "JSON object"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab"}, 400, "'state' is required"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked", "token": "x"}, 400, "unknown field"),
    ({"secret": "nope", "fingerprint": "0123456789ab", "state": "revoked"}, 404, "no managed secret"),
    ({"secret": "Bad Name!", "fingerprint": "0123456789ab", "state": "revoked"}, 400, "not a secret name"),
    ({"secret": "bot-api", "fingerprint": "0123456789AB", "state": "revoked"}, 400, "'fingerprint'"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "valid"}, 400, "'state'"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked", "source": "a\nb"}, 400, "'source'"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked", "source": 7}, 400, "a string"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked", "at": "yesterday"}, 400, "'at'"),
    ({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked", "credential": "v 1"}, 400, "credential"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_reports_are_refused_and_change_nothing(
    env: Env, body: bytes | dict[str, Any], status: int, message: str
) -> None:
    got, reply = env.post(body)
    assert (got, message in reply["error"]) == (status, True), reply
    assert env.outbox() == [] and env.audit_records() == []
    assert RevokedUseStore(env.journal).summary("bot-api")["count"] == 0


def test_a_report_carrying_material_is_refused_without_echoing_it(env: Env) -> None:
    token = make_token("rtd").reveal()
    for report in (
        {"secret": "bot-api", "fingerprint": token, "state": "revoked"},
        {"secret": "bot-api", "fingerprint": fingerprint(token), "state": "revoked", "source": f"Bearer {token}"},
        {"secret": token, "fingerprint": fingerprint(token), "state": "revoked"},
    ):
        status, reply = env.post(report)
        assert status == 400
        assert_no_material([token], texts=[json.dumps(reply)])
    assert env.outbox() == [] and env.audit_records() == []


def test_the_control_op_path_raises_cli_errors(env: Env) -> None:
    async def submit(data: object) -> Any:
        return await env.recorder.submit(data, "cli:uid=0,pid=1")

    with pytest.raises(UnknownSecret, match="'nope'"):
        asyncio.run(submit({"secret": "nope", "fingerprint": "0123456789ab", "state": "revoked"}))
    with pytest.raises(UsageError, match="'fingerprint'"):
        asyncio.run(submit({"secret": "bot-api", "fingerprint": "short", "state": "revoked"}))
    result = asyncio.run(submit({"secret": "bot-api", "fingerprint": "0123456789ab", "state": "retired"}))
    assert result["count"] == 1
    assert env.audit_records()[-1]["actor"] == "cli:uid=0,pid=1"


def test_no_recorder_installed_answers_503(tmp_path: Path) -> None:
    install(None)
    status, body, _ctype = asyncio.run(handle_revoked_use(b"{}", "peer"))
    assert status == 503 and b"not ready" in body


def test_an_audit_failure_answers_503_and_says_nothing_more(env: Env, log_stream: io.StringIO) -> None:
    env.audit_path.touch(mode=0o600)
    report = {"secret": "bot-api", "fingerprint": "0123456789ab", "state": "revoked"}
    with unwritable(env.audit_path):
        status, body = env.post(report)
    assert status == 503 and body == {"error": "the report could not be recorded; see the daemon's log"}
    assert "revoked-use report not recorded" in log_stream.getvalue()
    # The count was committed before the audit append failed; the next report is audited.
    status, body = env.post(report)
    assert (status, body["count"]) == (202, 2)
    assert env.audit.verify().ok


def test_the_daemon_places_the_fingerprint_in_the_current_document(env: Env, tmp_path: Path) -> None:
    tokens = {n: make_token("bot").reveal() for n in (1, 2, 3)}
    doc = CredentialSet(
        "bot-api", "api_token", 3, _cred(3, tokens[3]), T0, previous=_cred(2, tokens[2]),
        revoked=(Revoked("v1", sha256_hex(tokens[1]), T0),),
    )  # fmt: skip
    reads: list[str] = []

    def read_document(name: str) -> CredentialSet:
        reads.append(name)
        if len(reads) == 3:
            raise BackendUnavailable("backend 'local': down for a moment")
        return doc

    recorder = RevokedUseRecorder(
        RevokedUseStore(env.journal), env.audit, env.secrets, [], env.clock, None, read_document
    )
    install(lambda: recorder)
    first = env.post({"secret": "bot-api", "fingerprint": fingerprint(tokens[1]), "state": "revoked"})[1]
    assert (first["credential"], first["known_as"]) == ("v1", "revoked")  # the bot did not say which
    odd = env.post({"secret": "bot-api", "fingerprint": fingerprint(tokens[3]), "state": "revoked"})[1]
    assert (odd["credential"], odd["known_as"]) == ("v3", "current")  # worth a look: the current one
    down = env.post({"secret": "bot-api", "fingerprint": fingerprint(tokens[1]), "state": "revoked"})[1]
    assert (down["credential"], down["known_as"], down["count"]) == (None, None, 2)  # counted all the same
    assert [r["known_as"] for r in env.audit_records()] == ["revoked", "current", None]
    assert_no_material(tokens.values(), files=[env.audit_path, env.db])


def _cred(n: int, token: str) -> Credential:
    return Credential(f"v{n}", Sensitive(token), sha256_hex(token), T0)
