"""The real daemon tells a real bot by signed webhook, and the bot's 2xx gates promotion.

Every request is verified on arrival by the ``standardwebhooks`` library with the signing
secret rotatord generated (a managed ``webhook_secret``), never by rotatord's own code.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from rotatord.document import CredentialSet
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
from tests.servers.receivers import Behaviour, ReceiverServer

HOOKS = """
[consumers.bot]
url = "{url}"
signing_secret = "bot-hooks"
required = true
timeout = "2s"

[[secrets]]
name = "bot-hooks"
kind = "webhook_secret"
backend = "local"
path = "bots/demo-bot/webhook"
every = "1h"
grace = "1h"
"""


def _config(
    tmp_path: Path, socket_dir: str, receivers: ReceiverServer, propagation: str = "1h", policy: str = "promote"
) -> Path:
    config = write_config(
        tmp_path,
        socket_dir,
        {
            'propagation = "1s"': f'propagation = "{propagation}"',
            'on_unacknowledged = "promote"': f'on_unacknowledged = "{policy}"',
            "consumers = []": 'consumers = ["bot"]',
            "allow = []": 'allow = ["127.0.0.1/32"]',
            'retry_schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]': (
                'retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]'
            ),
        },
        extra=HOOKS.format(url=receivers.url("bot")),
    )
    assert cli(config, "init").returncode == 0
    return config


def _outbox(config: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(config.parent / "var" / "state.db") as conn:
        return conn.execute("SELECT webhook_id, event_type, status FROM outbox ORDER BY id").fetchall()


def test_required_ack_promotes_and_every_request_verifies(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers)
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    seen: set[str] = set()
    try:
        daemon.wait_ready()
        wait_until(lambda: all(s["state"] == "done" for s in status_json(config).values()), what="all created")
        hooks = read_doc(config, "local", "bots/demo-bot/webhook")
        assert isinstance(hooks, CredentialSet)
        whsec = hooks.current.value.reveal()
        assert whsec.startswith("whsec_")
        seen |= materials(hooks) | materials(read_doc(config, "local", "bots/demo-bot/db-key"))
        receivers.endpoint("bot", secrets=[whsec])

        assert cli(config, "rotate", "demo-bot-db").returncode == 0
        # The propagation window is an hour: only the bot's 2xx on key.staged can promote now.
        wait_until(
            lambda: status_json(config)["demo-bot-db"]["phase"] in ("promoted", "reencrypted", "retired"),
            timeout=30,
            what="promotion on acknowledgement",
        )
        wait_until(
            lambda: {"key.staged", "key.promoted"} <= {json.loads(r.body)["type"] for r in receivers.requests("bot")},
            what="staged and promoted events",
        )
        listing = cli(config, "webhooks", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        status = json.loads(cli(config, "status", "--json").stdout)
        assert [e["consumer"] for e in status["webhooks"]["endpoints"]] == ["bot"]
        seen |= materials(read_doc(config, "local", "bots/demo-bot/db-key"))
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    requests = [r for r in receivers.requests("bot") if r.verified]
    assert requests, "no request was verified"
    for r in requests:
        assert r.verified == [True], r.errors
        assert r.webhook_id.startswith("msg_")
        payload = json.loads(r.body)
        assert payload["data"]["secret"] in ("demo-bot-db", "bot-hooks")
        assert set(payload) == {"type", "timestamp", "data"}
    staged = [json.loads(r.body) for r in requests if json.loads(r.body)["type"] == "key.staged"]
    assert any(p["data"]["version"] == 2 and p["data"]["path"] == "bots/demo-bot/db-key" for p in staged)
    delivered = json.loads(listing.stdout)["deliveries"]
    assert any(d["event_type"] == "key.staged" and d["status"] == "delivered" for d in delivered)
    assert_no_material(seen, files=[tmp_path / "daemon.log"], texts=[r.body.decode() for r in receivers.all_requests()])


def test_pending_deliveries_survive_sigkill_with_their_ids(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers)
    receivers.endpoint("bot", behaviour=Behaviour(then=503))  # the bot is down
    first = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        first.wait_ready()
        wait_until(lambda: any(row[2] == "pending" for row in _outbox(config)), what="a pending delivery")
        wait_until(lambda: len(receivers.requests("bot")) >= 2, what="failed attempts")
    finally:
        first.kill()
    pending = {row[0] for row in _outbox(config) if row[2] == "pending"}
    assert pending
    hooks = read_doc(config, "local", "bots/demo-bot/webhook")
    assert isinstance(hooks, CredentialSet)
    receivers.endpoint("bot", secrets=[hooks.current.value.reveal()])  # the bot is back (2xx)
    second = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        second.wait_ready()
        wait_until(
            lambda: pending <= {r.webhook_id for r in receivers.requests("bot") if r.verified == [True]},
            timeout=30,
            what="every pending delivery delivered after the restart",
        )
        wait_until(
            lambda: all(row[2] == "delivered" for row in _outbox(config) if row[0] in pending), what="rows settled"
        )
        assert second.stop() == 0
    finally:
        second.kill()
    # Same id on every attempt, before and after the crash.
    by_id: dict[str, set[str]] = {}
    for r in receivers.requests("bot"):
        by_id.setdefault(r.webhook_id, set()).add(json.loads(r.body)["type"])
    assert all(len(types) == 1 for types in by_id.values())


def test_hold_policy_keeps_the_key_staged_until_the_bot_acknowledges(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers, propagation="1s", policy="hold")
    receivers.endpoint("bot", behaviour=Behaviour(then=503))  # the bot does not acknowledge
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        daemon.wait_ready()
        wait_until(lambda: all(s["state"] == "done" for s in status_json(config).values()), what="all created")
        assert cli(config, "rotate", "demo-bot-db").returncode == 0
        held = wait_until(
            lambda: (s := status_json(config)["demo-bot-db"])["error"] and "holding at staged" in s["error"] and s,
            timeout=30,
            what="the rotation to hold at staged",
        )
        assert held["phase"] == "staged"
        ring = read_doc(config, "local", "bots/demo-bot/db-key")
        assert ring is not None and getattr(ring, "primary", None) == "v1"  # the old primary stays in force
        hooks = read_doc(config, "local", "bots/demo-bot/webhook")
        assert isinstance(hooks, CredentialSet)
        receivers.endpoint("bot", secrets=[hooks.current.value.reveal()])  # now it acknowledges
        wait_until(
            lambda: status_json(config)["demo-bot-db"]["phase"] != "staged", timeout=30, what="promotion after the ack"
        )
        assert daemon.stop() == 0
    finally:
        daemon.kill()
