"""The real daemon: READY on a real NOTIFY_SOCKET, forced rotation, SIGHUP, SIGTERM, secrecy."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from rotatord.crypto.keyring import multifernet
from rotatord.document import CredentialSet, FernetRing
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

DB = ("local", "bots/demo-bot/db-key")
API = ("local", "bots/demo-bot/api-token")


def _ring(config: Path) -> FernetRing:
    doc = read_doc(config, *DB)
    assert isinstance(doc, FernetRing)
    return doc


def _both_created(config: Path) -> bool:
    st = status_json(config)
    return st["demo-bot-db"]["state"] == "done" and st["demo-bot-api"]["state"] == "done"


def test_ready_status_rotate_and_clean_stop(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    seen: set[str] = set()
    outputs: list[str] = []
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        fields = daemon.wait_ready()
        assert "STATUS" in fields and "secrets" in fields["STATUS"]
        wait_until(lambda: _both_created(config), what="both demo secrets created")
        before = _ring(config)
        assert [k.id for k in before.keys] == ["v1"] and before.primary == "v1"
        seen |= materials(before) | materials(read_doc(config, *API))
        token = multifernet(before).encrypt(b"customer record written before the rotation")

        result = cli(config, "rotate", "demo-bot-db", "--reason", "test", "--json")
        outputs += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        assert reply["version"] == 2 and reply["phase"] in ("staged", "promoted", "reencrypted", "retired")

        staged = _ring(config)
        seen |= materials(staged)
        assert {k.id for k in staged.keys} >= {"v1", "v2"}
        assert multifernet(staged).decrypt(token) == b"customer record written before the rotation"

        done = wait_until(
            lambda: (s := status_json(config)["demo-bot-db"])["phase"] == "retired" and s, what="rotation 2 retired"
        )
        assert done["version"] == 2 and done["state"] == "done"
        final = _ring(config)
        seen |= materials(final)
        assert final.primary == "v2" and [k.id for k in final.keys] == ["v2"]
        for args in (
            ("status",),
            ("history", "demo-bot-db"),
            ("status", "--json"),
            ("history", "demo-bot-db", "--json"),
        ):
            r = cli(config, *args)
            assert r.returncode == 0, r.stderr
            outputs += [r.stdout, r.stderr]
        history = json.loads(cli(config, "history", "demo-bot-db", "--json").stdout)
        assert [h["version"] for h in history] == [2, 1]
        assert [s["name"] for s in history[0]["steps"]] == ["stage", "promote", "reencrypt", "retire"]

        mark = len(notify.messages)
        daemon.signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1", since=mark)
        assert daemon.wait() == 0
    finally:
        daemon.kill()
    assert "stopped cleanly" in daemon.log_text()
    offline = cli(config, "status")  # works with the daemon stopped: read from the state database
    assert "daemon: not running" in offline.stdout
    verify = cli(config, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    outputs += [offline.stdout, verify.stdout]
    var = config.parent / "var"
    assert_no_material(
        seen,
        files=[tmp_path / "daemon.log", var / "state.db", var / "state.db-wal", var / "audit.log"],
        texts=outputs,
    )


def test_sighup_reloads_valid_and_refuses_invalid(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        daemon.wait_ready()
        original = config.read_text()
        added = original + (
            '\n[[secrets]]\nname = "added-later"\nkind = "webhook_secret"\nbackend = "local"\n'
            'path = "bots/demo-bot/webhook"\nevery = "1h"\ngrace = "1s"\n'
        )
        config.write_text(added)
        mark = len(notify.messages)
        daemon.signal(signal.SIGHUP)
        _pid, reloading = notify.wait_for("RELOADING", "1", since=mark)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", "1", since=mark)
        wait_until(lambda: status_json(config)["added-later"]["version"] == 1, what="the added secret to be created")
        doc = read_doc(config, "local", "bots/demo-bot/webhook")
        assert isinstance(doc, CredentialSet) and doc.current.value.reveal().startswith("whsec_")

        config.write_text("this is [not valid toml\n")
        mark = len(notify.messages)
        daemon.signal(signal.SIGHUP)
        notify.wait_for("READY", "1", since=mark)
        wait_until(lambda: "reload refused" in daemon.log_text(), what="the refusal to be logged")
        config.write_text(added)
        # The old configuration stays in force: the daemon still serves and still knows the added secret.
        st = status_json(config)
        assert set(st) == {"demo-bot-db", "demo-bot-api", "added-later"}
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_second_daemon_on_same_state_is_refused(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    first = DaemonProcess(config, tmp_path / "first.log", notify)
    try:
        first.wait_ready()
        second = cli(config, "run", timeout=30)
        assert second.returncode == 75
        assert "daemon is running" in second.stderr
        assert first.proc.poll() is None
    finally:
        first.stop()
        first.kill()


def test_watchdog_pings_at_half_the_interval(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify, env={"WATCHDOG_USEC": "400000"})
    try:
        daemon.wait_ready()
        first = len(notify.messages)
        wait_until(
            lambda: sum(1 for _pid, f in notify.messages[first:] if f.get("WATCHDOG") == "1") >= 4,
            timeout=10,
            what="four watchdog pings",
        )
        pids = {pid for pid, f in notify.messages if f.get("WATCHDOG") == "1"}
        assert pids == {daemon.pid}
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_audit_verify_detects_edits_and_truncation(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        daemon.wait_ready()
        wait_until(lambda: _both_created(config), what="both demo secrets created")
        assert cli(config, "rotate", "demo-bot-api").returncode == 0
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    audit = config.parent / "var" / "audit.log"
    assert cli(config, "audit", "verify").returncode == 0
    original = audit.read_bytes()
    lines = original.splitlines(keepends=True)
    assert len(lines) >= 6

    edited = json.loads(lines[2])
    edited["actor"] = "someone-else"
    audit.write_bytes(b"".join([*lines[:2], json.dumps(edited, sort_keys=True).encode() + b"\n", *lines[3:]]))
    result = cli(config, "audit", "verify")
    assert result.returncode == 65 and "line" in result.stderr

    audit.write_bytes(b"".join(lines[:3] + lines[4:]))  # one record deleted
    assert cli(config, "audit", "verify").returncode == 65

    audit.write_bytes(b"".join(lines[:-2]))  # the tail cut off
    result = cli(config, "audit", "verify", "--json")
    assert result.returncode == 65 and json.loads(result.stdout)["ok"] is False

    audit.write_bytes(original)
    assert cli(config, "audit", "verify").returncode == 0
