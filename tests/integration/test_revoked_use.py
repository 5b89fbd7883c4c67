"""End to end: a bot refuses a revoked token, reports it, the real daemon counts and raises it.

The daemon issues and revokes a real API token; the bot verifies it with ``rotatord.client``
(``TokenSet`` over the file backend) and forwards the report over the control socket
(``report.revoked_use``: the same logic as ``POST /v1/revoked-use``).  The security consumer is
a real HTTP receiver verifying every request with the ``standardwebhooks`` library.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from rotatord.cli.client import call_daemon
from rotatord.client import FileReader, RevokedUse, RevokedUseReporter, TokenCheck, TokenSet
from rotatord.config import load_settings
from rotatord.crypto.tokens import fingerprint
from rotatord.document import CredentialSet
from rotatord.errors import ControlError, UnknownSecret, UsageError
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
from tests.servers import free_port
from tests.servers.receivers import ReceiverServer

API = ("local", "bots/demo-bot/api-token")
SECOPS = """
[consumers.secops]
url = "{url}"
signing_secret = "secops-hooks"
timeout = "2s"

[[secrets]]
name = "secops-hooks"
kind = "webhook_secret"
backend = "local"
path = "security/secops/webhook"
every = "1h"
grace = "1h"
"""


def _tokens(config: Path, on_revoked_use: Callable[[RevokedUse], None]) -> TokenSet:
    """The bot's verifier, reading the document the daemon publishes."""
    settings = load_settings(config)
    local = settings.backends["local"]
    assert local.kind == "file" and local.master_key_file is not None
    reader = FileReader(local.directory, API[1], master_key_file=local.master_key_file)
    return TokenSet(reader, ttl=0.0, min_interval=0.0, on_revoked_use=on_revoked_use)


def _events(config: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(config.parent / "var" / "state.db") as conn:
        return conn.execute(
            "SELECT consumer, event_type, rotation_id FROM outbox WHERE event_type = 'credential.revoked_use'"
        ).fetchall()


def test_a_retired_token_presented_to_a_bot_is_counted_audited_and_raised(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = write_config(
        tmp_path,
        socket_dir,
        {
            '# security_consumers = ["secops"]': 'security_consumers = ["secops"]',
            "allow = []": 'allow = ["127.0.0.1/32"]',
        },
        extra=SECOPS.format(url=receivers.url("secops")),
    )
    assert cli(config, "init").returncode == 0
    socket_path = load_settings(config).daemon.socket_path
    port = free_port()
    # The daemon's HTTP listener (metrics, health, bots' reports) on a free loopback port.
    daemon = DaemonProcess(
        config, tmp_path / "daemon.log", notify, env={"ROTATORD_DAEMON__METRICS": f"127.0.0.1:{port}"}
    )
    seen: set[str] = set()
    outputs: list[str] = []
    try:
        daemon.wait_ready()
        wait_until(lambda: all(s["state"] == "done" for s in status_json(config).values()), what="all created")
        hooks = read_doc(config, "local", "security/secops/webhook")
        first = read_doc(config, *API)
        assert isinstance(hooks, CredentialSet) and isinstance(first, CredentialSet)
        seen |= materials(hooks) | materials(first)
        receivers.endpoint("secops", secrets=[hooks.current.value.reveal()])
        old = first.current.value.reveal()

        # Rotate: the old token is previous for a 2 s grace, then revoked.
        assert cli(config, "rotate", "demo-bot-api").returncode == 0
        wait_until(
            lambda: (s := status_json(config)["demo-bot-api"])["phase"] == "revoked" and s["state"] == "done",
            what="the old token revoked",
        )
        final = read_doc(config, *API)
        assert isinstance(final, CredentialSet)
        seen |= materials(final)

        reports: list[RevokedUse] = []
        tokens = _tokens(config, reports.append)
        assert tokens.verify(final.current.value.reveal()) is TokenCheck.VALID
        assert tokens.verify(old, source="10.9.8.7 (old-billing)") is TokenCheck.REVOKED
        assert tokens.verify(old, source="10.9.8.7 (old-billing)") is TokenCheck.REVOKED
        expected = ("demo-bot-api", "v1", fingerprint(old))
        assert [(r.secret, r.credential, r.fingerprint) for r in reports] == [expected] * 2

        replies = [call_daemon(socket_path, {"op": "report.revoked_use", "report": r.to_json()}) for r in reports]
        assert [(r["count"], r["notified"], r["known_as"]) for r in replies] == [
            (1, ["secops"], "revoked"),
            (2, [], "revoked"),
        ]
        assert _events(config) == [("secops", "credential.revoked_use", None)]  # one alert per window

        # Bad reports are refused by name and change nothing.
        body = reports[0].to_json()
        with pytest.raises(UnknownSecret):
            call_daemon(socket_path, {"op": "report.revoked_use", "report": {**body, "secret": "nope"}})
        with pytest.raises(UsageError, match="fingerprint"):
            call_daemon(socket_path, {"op": "report.revoked_use", "report": {**body, "fingerprint": old}})
        with pytest.raises(ControlError, match="'report' must be dict"):
            call_daemon(socket_path, {"op": "report.revoked_use", "report": "text"})

        delivered = wait_until(lambda: receivers.requests("secops"), what="the security alert delivered")
        assert delivered[0].verified == [True], delivered[0].errors
        alert = json.loads(delivered[0].body)
        assert alert["type"] == "credential.revoked_use"
        assert alert["data"]["secret"] == "demo-bot-api" and alert["data"]["fingerprint"] == fingerprint(old)
        assert alert["data"]["source"] == "10.9.8.7 (old-billing)" and alert["data"]["credential"] == "v1"
        assert alert["data"]["known_as"] == "revoked"

        # A bot reporting over HTTP, as the README shows: the reporter POSTs to /v1/revoked-use.
        reporter = RevokedUseReporter(f"http://127.0.0.1:{port}/v1/revoked-use")
        try:
            assert _tokens(config, reporter).verify(old, source="10.9.8.7 (old-billing)") is TokenCheck.REVOKED
        finally:
            reporter.close()
        assert (reporter.sent, reporter.failed, reporter.dropped) == (1, 0, 0)

        st = json.loads((as_json := cli(config, "status", "demo-bot-api", "--json")).stdout)
        used = st["secrets"][0]["revoked_use"]
        assert (used["count"], used["fingerprints"], used["last_source"]) == (3, 1, "10.9.8.7 (old-billing)")
        human = cli(config, "status")
        assert "demo-bot-api: a revoked credential was presented 3 time(s)" in human.stdout
        listing = cli(config, "webhooks", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        assert any(d["event_type"] == "credential.revoked_use" for d in json.loads(listing.stdout)["deliveries"])
        outputs += [as_json.stdout, human.stdout, listing.stdout]
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    verify = cli(config, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    audit = config.parent / "var" / "audit.log"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    used_records = [r for r in records if r["event"] == "credential.revoked_use"]
    assert [(r["count"], r["source"], r["fingerprint"]) for r in used_records] == [
        (1, "10.9.8.7 (old-billing)", fingerprint(old)),
        (2, "10.9.8.7 (old-billing)", fingerprint(old)),
        (3, "10.9.8.7 (old-billing)", fingerprint(old)),
    ]
    assert [r["actor"].split(":")[0] for r in used_records] == ["cli", "cli", "http"]
    assert_no_material(
        seen | {old},
        files=[tmp_path / "daemon.log", audit, config.parent / "var" / "state.db"],
        texts=[*outputs, *(r.body.decode() for r in receivers.all_requests())],
    )
