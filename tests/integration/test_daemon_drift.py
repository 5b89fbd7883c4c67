"""Drift through the real daemon: its periodic check finds a secret changed out of band, says
so by log, audit record, ``status`` and a signed ``secret.drift_detected`` webhook to the
secret's consumer and to the security consumer (real receivers, verified with the
``standardwebhooks`` library); ``adopt`` refuses a tampered document, then accepts a valid one;
``rotate --emergency`` clears a second drift."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from rotatord.backends.file import FileBackend
from rotatord.config import load_settings
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
from tests.servers.receivers import ReceiverServer

DB = "demo-bot-db"
DB_PATH = "bots/demo-bot/db-key"
EXTRA = """
[consumers.bot]
url = "{bot}"
signing_secret = "bot-hooks"
timeout = "2s"

[consumers.sec]
url = "{sec}"
signing_secret = "bot-hooks"
events = ["secret.drift_detected"]
timeout = "2s"

[[secrets]]
name = "bot-hooks"
kind = "webhook_secret"
backend = "local"
path = "bots/demo-bot/webhook"
every = "1h"
grace = "1h"
"""


def drift_hooks(receivers: ReceiverServer, name: str) -> list[dict[str, object]]:
    bodies = [json.loads(r.body) for r in receivers.requests(name) if r.verified == [True]]
    return [b for b in bodies if b["type"] == "secret.drift_detected"]


def test_drift_reported_by_every_channel_then_adopt_and_emergency_clear_it(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = write_config(
        tmp_path,
        socket_dir,
        {
            "consumers = []": 'consumers = ["bot"]',
            "allow = []": 'allow = ["127.0.0.1/32"]',
            '# security_consumers = ["secops"]': 'security_consumers = ["sec"]',
            'drift_check_interval = "5m"': 'drift_check_interval = "1s"',
            'retry_schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]': (
                'retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]'
            ),
        },
        extra=EXTRA.format(bot=receivers.url("bot"), sec=receivers.url("sec")),
    )
    assert cli(config, "init").returncode == 0
    backend = FileBackend("local", load_settings(config).backends["local"])  # type: ignore[arg-type]
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    outputs: list[str] = []
    seen: set[str] = set()
    try:
        daemon.wait_ready()
        wait_until(lambda: all(s["state"] == "done" for s in status_json(config).values()), what="all created")
        hooks = read_doc(config, "local", "bots/demo-bot/webhook")
        assert isinstance(hooks, CredentialSet)
        for name in ("bot", "sec"):
            receivers.endpoint(name, secrets=[hooks.current.value.reveal()])
        seen |= materials(hooks) | materials(read_doc(config, "local", DB_PATH))

        # 1. A tampered version file: drift, and adopt refuses it without changing anything.
        current = backend.read(DB_PATH)
        assert current is not None
        blob = tmp_path / "var" / "secrets" / DB_PATH / f"v{int(current.version):08d}.enc"
        good = blob.read_bytes()
        blob.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        drift = wait_until(lambda: status_json(config)[DB]["drift"], what="drift in status")
        assert drift["reason"] == "document_invalid"
        assert status_json(config)[DB]["state"] == "paused (drift)"
        refused = cli(config, "adopt", DB)
        outputs += [refused.stdout, refused.stderr]
        assert refused.returncode == 65
        assert "cannot be accepted" in refused.stderr and "nothing was changed" in refused.stderr
        assert status_json(config)[DB]["drift"]["id"] == drift["id"]
        text = cli(config, "status")
        outputs.append(text.stdout)
        assert f"{DB}: DRIFT (document_invalid)" in text.stdout and f"rotatord adopt {DB}" in text.stdout
        plain = cli(config, "rotate", DB)
        outputs.append(plain.stderr)
        assert plain.returncode != 0 and "drift detected" in plain.stderr

        # 2. The file restored: adopt accepts it and the drift clears.
        blob.write_bytes(good)
        adopted = cli(config, "adopt", DB, "--reason", "restored from backup", "--json")
        outputs.append(adopted.stdout)
        assert adopted.returncode == 0, adopted.stderr
        assert json.loads(adopted.stdout)["drift_cleared"] is True
        assert status_json(config)[DB]["drift"] is None

        # 3. A version written by hand: a new drift, cleared by an emergency rotation.
        mine = backend.read(DB_PATH)
        assert mine is not None
        changed = replace(mine.document, updated_at=mine.document.updated_at + timedelta(seconds=1))
        backend.write(DB_PATH, changed, expected=mine.version, request_id="by-hand")
        second = wait_until(lambda: status_json(config)[DB]["drift"], what="second drift")
        assert second["reason"] == "version_changed" and second["id"] != drift["id"]
        wait_until(lambda: len(drift_hooks(receivers, "sec")) >= 2, what="drift webhooks to the security consumer")
        wait_until(lambda: len(drift_hooks(receivers, "bot")) >= 2, what="drift webhooks to the consumer")
        emergency = cli(config, "rotate", DB, "--emergency", "--reason", "tampering")
        outputs += [emergency.stdout, emergency.stderr]
        assert emergency.returncode == 0, emergency.stderr
        assert status_json(config)[DB]["drift"] is None
        seen |= materials(read_doc(config, "local", DB_PATH))
        assert daemon.stop() == 0

        # 4. With the daemon down, adopt --offline takes its lock and works in process.
        mine = backend.read(DB_PATH)
        assert mine is not None
        written = backend.write(DB_PATH, mine.document, expected=mine.version, request_id="by-hand-2")
        offline = cli(config, "adopt", DB, "--offline", "--json")
        outputs.append(offline.stdout)
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout)["backend_version"] == written
    finally:
        daemon.kill()
        backend.close()

    for name in ("bot", "sec"):
        reasons = [h["data"]["reason"] for h in drift_hooks(receivers, name)]  # type: ignore[index]
        assert reasons[:2] == ["document_invalid", "version_changed"], name
    assert {json.loads(r.body)["type"] for r in receivers.requests("sec")} == {"secret.drift_detected"}
    log = (tmp_path / "daemon.log").read_text()
    warnings = [json.loads(line) for line in log.splitlines() if '"level":"warning"' in line]
    assert any(w.get("reason") == "version_changed" and w.get("secret") == DB for w in warnings)
    audit = [json.loads(line) for line in (tmp_path / "var" / "audit.log").read_text().splitlines()]
    events = [(a["event"], a.get("resolution")) for a in audit if str(a["event"]).startswith("secret.")]
    assert events == [
        ("secret.drift_detected", None),
        ("secret.drift_resolved", "adopt"),
        ("secret.drift_detected", None),
        ("secret.drift_resolved", "emergency"),
        ("secret.adopted", "adopt"),  # offline, no drift was open: a plain re-basing
    ]
    assert_no_material(
        seen, files=[tmp_path / "daemon.log", tmp_path / "var" / "audit.log"],
        texts=[*outputs, *(r.body.decode() for r in receivers.all_requests())],
    )  # fmt: skip
