"""Incident drill against the real daemon: a key leaked.

``rotate --emergency`` promotes at once, re-encrypts a real SQLite store (rate-limited, so the
run lasts a few seconds and ``status`` can be watched live), retires the compromised key although
the grace period is 7 days, and reports the blast radius (items still under the compromised key
per store, consumers that did not acknowledge) on stdout, in ``status`` and in the audit log.
API tokens: the old token is revoked at once.  ``rollback`` puts the previous primary back,
notifies by signed webhook and records why.  Bad input changes nothing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from rotatord.crypto.keyring import multifernet
from rotatord.document import CredentialSet, FernetRing
from tests.helpers import (
    ROTATORD,
    DaemonProcess,
    NotifyListener,
    assert_no_material,
    cli,
    materials,
    read_doc,
    status_json,
    unwritable,
    wait_until,
)
from tests.integration.conftest import write_config
from tests.servers.receivers import Behaviour, ReceiverServer

DB_PATH = "bots/demo-bot/db-key"
API_PATH = "bots/demo-bot/api-token"
HOOKS_PATH = "bots/demo-bot/webhook"
ROWS = 400
EXTRA = """
[consumers.good]
url = "{good}"
signing_secret = "bot-hooks"
required = false
timeout = "2s"

[consumers.bad]
url = "{bad}"
signing_secret = "bot-hooks"
required = false
timeout = "2s"

[[secrets]]
name = "bot-hooks"
kind = "webhook_secret"
backend = "local"
path = "bots/demo-bot/webhook"
every = "1h"
grace = "1h"
"""


def _config(tmp_path: Path, socket_dir: str, receivers: ReceiverServer, *, store: bool) -> Path:
    replacements = {
        'grace = "30s"': 'grace = "7d"',
        'grace = "20s"': 'grace = "7d"',
        "consumers = []": 'consumers = ["good", "bad"]',
        "allow = []": 'allow = ["127.0.0.1/32"]',
        'retry_schedule = ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]': (
            'retry_schedule = ["0s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]'
        ),
    }
    if store:
        url = tmp_path / "bot-db.url"
        url.write_text(f"sqlite:///{tmp_path / 'bot.db'}")
        url.chmod(0o600)
        # Slow on purpose (100 items/s, batches of 20): the run lasts seconds, so status can watch it.
        replacements['[[secrets]]\nname = "demo-bot-api"'] = (
            f'[[secrets.stores]]\nkind = "sql"\nurl_file = "{url}"\ntable = "msgs"\nkey = ["id"]\n'
            'columns = ["body"]\nbatch_size = 20\nrate_limit = 100\n\n[[secrets]]\nname = "demo-bot-api"'
        )
    extra = EXTRA.format(good=receivers.url("good"), bad=receivers.url("bad"))
    config = write_config(tmp_path, socket_dir, replacements, extra=extra)
    assert cli(config, "init").returncode == 0
    return config


def _snapshot(config: Path) -> tuple[Any, ...]:
    """What a refused command must leave alone: journal, backend documents, audit log."""
    var = config.parent / "var"
    with sqlite3.connect(var / "state.db") as conn:
        rotations = conn.execute("SELECT * FROM rotations ORDER BY id").fetchall()
        steps = conn.execute("SELECT * FROM steps ORDER BY rotation_id, name").fetchall()
    docs = [read_doc(config, "local", p) for p in (DB_PATH, API_PATH)]
    return rotations, steps, [d.updated_at if d else None for d in docs], (var / "audit.log").read_bytes()


def _audit(config: Path, event: str) -> list[dict[str, Any]]:
    lines = (config.parent / "var" / "audit.log").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _blast(config: Path, name: str) -> dict[str, Any] | None:
    result = cli(config, "status", name, "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] | None = json.loads(result.stdout)["secrets"][0].get("blast_radius")
    return report


def _start(config: Path, tmp_path: Path, notify: NotifyListener, receivers: ReceiverServer) -> DaemonProcess:
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    daemon.wait_ready()
    wait_until(lambda: all(s["state"] == "done" for s in status_json(config).values()), what="v1 of everything")
    hooks = read_doc(config, "local", HOOKS_PATH)
    assert isinstance(hooks, CredentialSet)
    receivers.endpoint("good", secrets=[hooks.current.value.reveal()])
    receivers.endpoint("bad", secrets=[hooks.current.value.reveal()], behaviour=Behaviour(then=500))
    return daemon


def test_emergency_fernet_rotation_reports_its_blast_radius_live_and_retires_the_leaked_key(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers, store=True)
    db = tmp_path / "bot.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE msgs (id INTEGER PRIMARY KEY, body TEXT)")
    texts: list[str] = []
    daemon = _start(config, tmp_path, notify, receivers)
    try:
        v1 = read_doc(config, "local", DB_PATH)
        assert isinstance(v1, FernetRing) and v1.primary == "v1"
        seen = materials(v1) | materials(read_doc(config, "local", API_PATH))
        old = multifernet(v1)
        with sqlite3.connect(db) as conn:
            rows = [(i, old.encrypt(b"m%d" % i).decode()) for i in range(ROWS)]
            conn.executemany("INSERT INTO msgs VALUES (?, ?)", rows)

        rotate = subprocess.Popen(
            [ROTATORD, "rotate", "demo-bot-db", "--emergency", "--reason", "leak", "--json", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # While the daemon works, status shows the live report: exposed and not yet all moved.
            live = wait_until(
                lambda: (b := _blast(config, "demo-bot-db")) and b["state"] == "in progress" and b["remaining"] and b,
                timeout=60,
                interval=0.2,
                what="a live blast-radius report in status",
            )
            stdout, stderr = rotate.communicate(timeout=120)
        finally:
            if rotate.poll() is None:
                rotate.kill()
                rotate.wait(10)
        texts += [stdout, stderr, json.dumps(live)]
        assert rotate.returncode == 0, stderr
        assert live["compromised_key"] == "v1" and live["reason"] == "leak"
        assert 0 < live["remaining"] <= ROWS

        report = json.loads(stdout)["blast_radius"]
        assert (report["state"], report["phase"], report["compromised_key"], report["new_key"]) == (
            "done", "retired", "v1", "v2",
        )  # fmt: skip
        [store] = report["stores"]
        assert (store["exposed"], store["remaining"], store["rewritten"]) == (ROWS, 0, ROWS)
        assert report["remaining"] == 0 and report["retired_at"] is not None
        # Retired for real after the census that found the exposed rows (not at the request's time).
        assert report["retired_at"] >= report["exposure_taken_at"] > report["opened_at"]
        assert "bad" in report["unacknowledged"]

        # The leaked key is gone although the grace period is 7 days; every row reads with v2 alone.
        ring = read_doc(config, "local", DB_PATH)
        assert isinstance(ring, FernetRing) and [k.id for k in ring.keys] == ["v2"]
        seen |= materials(ring)
        only_v2 = Fernet(ring.primary_key.material.reveal())
        with sqlite3.connect(db) as conn:
            bodies = dict(conn.execute("SELECT id, body FROM msgs").fetchall())
        assert all(only_v2.decrypt(bodies[i].encode()) == b"m%d" % i for i in range(ROWS))

        # The bot that answers 2xx acknowledges the new key; the one answering 500 never does.
        final = wait_until(
            lambda: (b := _blast(config, "demo-bot-db")) and b["unacknowledged"] == ["bad"] and b,
            what="the good consumer's acknowledgement",
        )
        assert {c["consumer"]: c["delivery"] for c in final["consumers"]}["good"] == "delivered"
        human = cli(config, "status", "demo-bot-db")
        assert human.returncode == 0, human.stderr
        assert "EMERGENCY rotation 2 of demo-bot-db: done" in human.stdout
        assert "v1 retired at" in human.stdout and "not acknowledged: bad" in human.stdout
        texts += [human.stdout]

        # The audit log holds the report: what was exposed at the start, and the clean end.
        records = _audit(config, "emergency.blast_radius")
        assert records[0]["stage"] == "opened" and records[0]["report"]["compromised_key"] == "v1"
        exposure = next(r["report"] for r in records if r["report"]["phase"] == "promoted")
        assert exposure["stores"][0]["exposed"] == ROWS
        assert records[-1]["stage"] == "closed" and records[-1]["report"]["remaining"] == 0
        assert records[-1]["report"]["retired_at"] == report["retired_at"]
        verify = cli(config, "audit", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr

        # Bad input now: each refused with a clear message and a non-zero exit, nothing changed.
        before = _snapshot(config)
        gone = cli(config, "rollback", "demo-bot-db", "--reason", "bots broke")
        assert gone.returncode != 0 and "v1" in gone.stderr and "no longer in the ring" in gone.stderr
        unknown = cli(config, "rotate", "nope", "--emergency", "--reason", "leak")
        assert unknown.returncode == 64 and "unknown secret 'nope'" in unknown.stderr
        offline = cli(config, "rotate", "nope", "--emergency", "--reason", "leak", "--offline")
        assert offline.returncode == 64 and "unknown secret 'nope'" in offline.stderr
        no_reason = cli(config, "rotate", "demo-bot-db", "--emergency")
        assert no_reason.returncode == 64 and "--emergency needs --reason" in no_reason.stderr
        two_lines = cli(config, "rotate", "demo-bot-db", "--emergency", "--reason", "one\ntwo", "--offline")
        assert two_lines.returncode == 64 and "--reason must be one line" in two_lines.stderr
        assert _snapshot(config) == before
        texts += [r.stdout + r.stderr for r in (gone, unknown, offline, no_reason, two_lines, verify)]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    var = config.parent / "var"
    assert_no_material(seen, files=[tmp_path / "daemon.log", var / "audit.log", var / "state.db"], texts=texts)


def test_emergency_token_revokes_at_once_and_rollback_restores_notifies_and_says_why(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers, store=False)
    texts: list[str] = []
    daemon = _start(config, tmp_path, notify, receivers)
    try:
        old = read_doc(config, "local", API_PATH)
        assert isinstance(old, CredentialSet)
        seen = materials(old) | materials(read_doc(config, "local", DB_PATH))

        # API token: the leaked token is revoked at once, not after the 7-day grace.
        result = cli(config, "rotate", "demo-bot-api", "--emergency", "--reason", "token in a log", "--json")
        assert result.returncode == 0, result.stderr
        texts += [result.stdout, result.stderr]
        report = json.loads(result.stdout)["blast_radius"]
        assert report["compromised_key"] == old.current.id and report["revoked_at"] is not None
        tokens = read_doc(config, "local", API_PATH)
        assert isinstance(tokens, CredentialSet)
        seen |= materials(tokens)
        assert tokens.previous is None
        assert old.current.sha256 in [r.sha256 for r in tokens.revoked]

        # Fernet: a routine rotation, promoted after 1 s; v1 would stay 7 days.  Roll it back.
        assert cli(config, "rotate", "demo-bot-db").returncode == 0
        wait_until(
            lambda: status_json(config)["demo-bot-db"]["phase"] in ("promoted", "reencrypted"), what="v2 primary"
        )
        seen |= materials(read_doc(config, "local", DB_PATH))
        back = cli(config, "rollback", "demo-bot-db", "--reason", "bots crash on v2")
        assert back.returncode == 0, back.stderr
        texts += [back.stdout, back.stderr]
        ring = read_doc(config, "local", DB_PATH)
        assert isinstance(ring, FernetRing) and ring.primary == "v1" and ring.key("v2") is not None

        def rolled_back_event() -> Any:
            for r in receivers.requests("good"):
                payload = json.loads(r.body)
                if payload["type"] == "rotation.rolled_back":
                    return r, payload
            return None

        request, payload = wait_until(rolled_back_event, what="rotation.rolled_back at the bot")
        assert request.verified == [True], request.errors
        assert payload["data"]["secret"] == "demo-bot-db" and payload["data"]["reason"] == "bots crash on v2"
        [audit] = _audit(config, "rotation.rolled_back")
        assert audit["reason"] == "bots crash on v2" and audit["secret"] == "demo-bot-db"
        history = json.loads(cli(config, "history", "demo-bot-db", "--json").stdout)
        assert history[0]["status"] == "rolled_back" and history[0]["rollback_reason"] == "bots crash on v2"
        human = cli(config, "history", "demo-bot-db")
        assert "rolled back: bots crash on v2" in human.stdout, human.stdout
        texts += [human.stdout]

        # A second rollback has nothing left to put back: refused, nothing changed.
        before = _snapshot(config)
        again = cli(config, "rollback", "demo-bot-db")
        assert again.returncode != 0 and "already rolled back" in again.stderr
        assert _snapshot(config) == before
        texts += [again.stdout, again.stderr]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    var = config.parent / "var"
    assert_no_material(seen, files=[tmp_path / "daemon.log", var / "audit.log", var / "state.db"], texts=texts)


def test_emergency_that_cannot_finish_exits_75_says_why_and_the_daemon_finishes_it(
    tmp_path: Path, socket_dir: str, notify: NotifyListener, receivers: ReceiverServer
) -> None:
    config = _config(tmp_path, socket_dir, receivers, store=True)
    db = tmp_path / "bot.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE msgs (id INTEGER PRIMARY KEY, body TEXT)")
    daemon = _start(config, tmp_path, notify, receivers)
    try:
        v1 = read_doc(config, "local", DB_PATH)
        assert isinstance(v1, FernetRing)
        seen = materials(v1)
        old = multifernet(v1)
        with sqlite3.connect(db) as conn:
            conn.executemany("INSERT INTO msgs VALUES (?, ?)", [(i, old.encrypt(b"x").decode()) for i in range(50)])
        with unwritable(db):  # the bot's database refuses writes: re-encryption cannot move anything
            result = cli(config, "rotate", "demo-bot-db", "--emergency", "--reason", "leak", "--json")
            ring = read_doc(config, "local", DB_PATH)
        assert isinstance(ring, FernetRing)
        seen |= materials(ring)
        assert result.returncode == 75, result.stderr
        assert "not finished" in result.stderr and "rotatord status demo-bot-db" in result.stderr
        report = json.loads(result.stdout)["blast_radius"]
        assert report["state"] == "failing" and report["error"]
        assert report["stores"][0]["exposed"] == 50 and report["remaining"] == 50
        # The compromised key stays decrypt-only while data needs it: nothing is lost meanwhile.
        assert ring.primary == "v2" and {k.id for k in ring.keys} == {"v1", "v2"}

        # Writable again: the daemon's retry moves the rows and retires v1 without anyone asking.
        final = wait_until(
            lambda: (b := _blast(config, "demo-bot-db")) and b["state"] == "done" and b,
            timeout=60,
            what="the retried emergency rotation",
        )
        assert final["remaining"] == 0 and final["retired_at"] and final["error"] is None
        ring = read_doc(config, "local", DB_PATH)
        assert isinstance(ring, FernetRing) and [k.id for k in ring.keys] == ["v2"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    var = config.parent / "var"
    assert_no_material(seen, files=[tmp_path / "daemon.log", var / "audit.log"], texts=[result.stdout, result.stderr])
