"""``TokenSet(on_revoked_use=...)`` and ``RevokedUseReporter`` against a real HTTP receiver.

Documents are written with the real file backend and read back through ``FileReader``; reports
are POSTed by the reporter's own thread to a real aiohttp receiver (tests/servers/receivers.py).
"""

from __future__ import annotations

import io
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from rotatord.backends.file import FileBackend, init_master_key
from rotatord.client import FileReader, RevokedUse, RevokedUseReporter, TokenCheck, TokenSet
from rotatord.config.model import FileBackendSettings
from rotatord.crypto.generators import ApiTokenGenerator
from rotatord.crypto.tokens import FINGERPRINT_RE, fingerprint, make_token
from rotatord.document import CredentialSet
from rotatord.engine.transitions import issue_credential, revoke_credential
from tests.helpers import assert_no_material, wait_until
from tests.servers.receivers import Behaviour, ReceiverServer

T0 = datetime(2025, 3, 3, 3, 0, tzinfo=UTC)
PATH = "bots/api"


class Docs:
    """The daemon's side: publishes an api_token document as three rotations leave it."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings = FileBackendSettings(kind="file", directory=tmp_path / "store", master_key_file=tmp_path / "mk")
        assert init_master_key(self.settings)
        self.backend = FileBackend("daemon", self.settings)

    def publish(self, doc: CredentialSet) -> CredentialSet:
        current = self.backend.read(PATH)
        self.backend.write(PATH, doc, expected=current.version if current else None, request_id=uuid.uuid4().hex)
        return doc

    def reader(self) -> FileReader:
        assert self.settings.master_key_file is not None
        return FileReader(self.settings.directory, PATH, master_key_file=self.settings.master_key_file)


def _issue(cs: CredentialSet | None, version: int, at: datetime) -> CredentialSet:
    out = issue_credential(
        cs, name="bot-api", kind="api_token", version=version, generate=ApiTokenGenerator().generate,
        now=at, valid_until=at + timedelta(days=1), ttl=None,
    )  # fmt: skip
    assert out is not None
    return out


def _rotated_twice(docs: Docs) -> tuple[CredentialSet, CredentialSet]:
    """v1 issued, v2 issued (v1 previous), v1 revoked: returns (v1 document, final document)."""
    v1 = docs.publish(_issue(None, 1, T0))
    v2 = _issue(v1, 2, T0 + timedelta(hours=1))
    final = revoke_credential(v2, T0 + timedelta(hours=2))
    assert final is not None
    docs.publish(final)
    return v1, final


def test_a_revoked_token_is_reported_with_its_fingerprint_and_source(tmp_path: Path) -> None:
    docs = Docs(tmp_path)
    v1, final = _rotated_twice(docs)
    reports: list[RevokedUse] = []
    tokens = TokenSet(docs.reader(), now=lambda: T0 + timedelta(hours=3), on_revoked_use=reports.append)
    old, new = v1.current.value.reveal(), final.current.value.reveal()

    assert tokens.verify(old, source="10.1.2.3 (billing-bot)") is TokenCheck.REVOKED
    assert tokens.verify(new, source="10.1.2.3") is TokenCheck.VALID
    assert tokens.verify(make_token("rtd").reveal()) is TokenCheck.UNKNOWN
    assert len(reports) == 1
    report = reports[0]
    assert (report.secret, report.credential, report.state) == ("bot-api", "v1", "revoked")
    assert report.fingerprint == fingerprint(old) and FINGERPRINT_RE.fullmatch(report.fingerprint)
    assert report.source == "10.1.2.3 (billing-bot)" and report.at == T0 + timedelta(hours=3)
    body = report.to_json()
    assert set(body) == {"secret", "fingerprint", "state", "at", "source", "credential"}
    assert_no_material([old, new], texts=[json.dumps(body), repr(report)])


def test_a_previous_token_past_its_grace_is_reported_too(tmp_path: Path) -> None:
    docs = Docs(tmp_path)
    v1 = docs.publish(_issue(None, 1, T0))
    docs.publish(_issue(v1, 2, T0 + timedelta(hours=1)))  # v1 previous, valid for a day
    reports: list[RevokedUse] = []
    wall = [T0 + timedelta(hours=2)]
    tokens = TokenSet(docs.reader(), now=lambda: wall[0], on_revoked_use=reports.append)
    assert tokens.verify(v1.current.value.reveal()) is TokenCheck.VALID
    wall[0] = T0 + timedelta(days=2)
    assert tokens.verify(v1.current.value.reveal()) is TokenCheck.REVOKED
    assert [(r.credential, r.source) for r in reports] == [("v1", None)]


def test_a_failing_callback_never_breaks_verification(tmp_path: Path, log_stream: io.StringIO) -> None:
    docs = Docs(tmp_path)
    v1, _final = _rotated_twice(docs)

    def broken(report: RevokedUse) -> None:
        raise RuntimeError("reporting backend down")

    tokens = TokenSet(docs.reader(), now=lambda: T0 + timedelta(hours=3), on_revoked_use=broken)
    assert tokens.verify(v1.current.value.reveal()) is TokenCheck.REVOKED
    assert "on_revoked_use callback failed" in log_stream.getvalue()
    assert_no_material([v1.current.value.reveal()], texts=[log_stream.getvalue()])


def test_the_reporter_posts_json_to_a_real_receiver(tmp_path: Path, receivers: ReceiverServer) -> None:
    docs = Docs(tmp_path)
    v1, _final = _rotated_twice(docs)
    url = receivers.endpoint("v1/revoked-use", behaviour=Behaviour(then=202))
    reporter = RevokedUseReporter(url, headers={"x-bot": "billing"})
    tokens = TokenSet(docs.reader(), now=lambda: T0 + timedelta(hours=3), on_revoked_use=reporter)
    assert tokens.verify(v1.current.value.reveal(), source="203.0.113.9") is TokenCheck.REVOKED
    reporter.close()
    assert (reporter.sent, reporter.failed, reporter.dropped) == (1, 0, 0)
    [received] = receivers.requests("v1/revoked-use")
    assert received.headers["content-type"] == "application/json" and received.headers["x-bot"] == "billing"
    body = json.loads(received.body)
    assert body == {
        "secret": "bot-api",
        "credential": "v1",
        "fingerprint": fingerprint(v1.current.value.reveal()),
        "state": "revoked",
        "source": "203.0.113.9",
        "at": "2025-03-03T06:00:00.000Z",
    }
    assert_no_material([v1.current.value.reveal()], texts=[received.body.decode(), repr(reporter)])


def _report(n: int = 0) -> RevokedUse:
    return RevokedUse("bot-api", f"{n:012x}", "revoked", T0, source="bot\nwith a newline")


def test_the_reporter_counts_failures_and_never_raises(receivers: ReceiverServer) -> None:
    refused = RevokedUseReporter(receivers.endpoint("refuses", behaviour=Behaviour(then=500)), timeout=1)
    target = receivers.endpoint("elsewhere")
    redirected = RevokedUseReporter(
        receivers.endpoint("moved", behaviour=Behaviour(then=307, location=target)), timeout=1
    )
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = RevokedUseReporter(f"http://127.0.0.1:{probe.getsockname()[1]}/x", timeout=1)
    for reporter in (refused, redirected, dead):
        reporter(_report())
        reporter.close()
        assert (reporter.sent, reporter.failed) == (0, 1)
    assert receivers.requests("elsewhere") == []  # redirects are not followed
    assert json.loads(receivers.requests("refuses")[0].body)["source"] == "bot?with a newline"


def test_a_full_queue_drops_reports_instead_of_blocking(receivers: ReceiverServer) -> None:
    reporter = RevokedUseReporter(receivers.endpoint("slow", behaviour=Behaviour(hang=True)), timeout=1, queue_size=1)
    reporter(_report(1))  # taken by the thread, which then waits for the hanging receiver
    wait_until(lambda: receivers.requests("slow"), what="the first report in flight")
    reporter(_report(2))  # queued
    reporter(_report(3))  # dropped: the queue holds one
    assert reporter.dropped == 1
    receivers.release()
    reporter.close()
    reporter(_report(4))  # after close: dropped, no thread restarted
    assert reporter.dropped == 2 and reporter.sent + reporter.failed == 2


def test_the_reporter_refuses_other_schemes() -> None:
    for url in ("file:///etc/passwd", "ftp://host/x", "http:///nohost", "localhost:8080"):
        with pytest.raises(ValueError, match="http"):
            RevokedUseReporter(url)
    with pytest.raises(ValueError, match="timeout"):
        RevokedUseReporter("http://127.0.0.1:1/x", timeout=0)
