"""The real daemon's HTTP endpoint: /metrics and /healthz, an address in use, and the off switch.

tests/conftest.py sets ROTATORD_DAEMON__METRICS=off for every test; these tests give each
daemon its own free port through the same environment override.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import DaemonProcess, NotifyListener, assert_no_material, cli, materials, read_doc, wait_until
from tests.servers import free_port

DB = ("local", "bots/demo-bot/db-key")
API = ("local", "bots/demo-bot/api-token")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - http://127.0.0.1 only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def completed(base: str, secret: str) -> float:
    status, text = get(base + "/metrics")
    assert status == 200
    key = ("rotatord_rotations_total", frozenset({("secret", secret), ("result", "completed")}))
    return samples(text).get(key, 0)


def refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def test_metrics_and_health_of_a_running_daemon(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    texts: list[str] = []
    daemon = DaemonProcess(
        config, tmp_path / "daemon.log", notify, env={"ROTATORD_DAEMON__METRICS": f"127.0.0.1:{port}"}
    )
    try:
        daemon.wait_ready()
        status, body = get(base + "/healthz")
        assert status == 200, body
        assert json.loads(body) == {"status": "ok", "role": "single", "ready": True, "state_db": "ok"}
        status, body = get(base + "/healthz/live")
        assert (status, json.loads(body)) == (200, {"status": "alive", "role": "single"})
        wait_until(lambda: completed(base, "demo-bot-db") == 1 and completed(base, "demo-bot-api") == 1,
                   what="both demo secrets created, as /metrics shows")  # fmt: skip

        result = cli(config, "rotate", "demo-bot-db", "--reason", "metrics test", "--json")
        assert result.returncode == 0, result.stderr
        texts += [result.stdout, result.stderr]
        wait_until(lambda: completed(base, "demo-bot-db") == 2, what="rotation 2 completed, as /metrics shows")
        status, text = get(base + "/metrics")
        texts += [text, get(base + "/healthz")[1]]
        found = samples(text)
        assert found[("rotatord_rotation_version", frozenset({("secret", "demo-bot-db")}))] == 2
        assert found[("rotatord_leader", frozenset())] == 1
        assert found[("rotatord_ready", frozenset())] == 1
        assert found[("rotatord_state_db_up", frozenset())] == 1
        assert any(name == "process_resident_memory_bytes" for name, _ in found)
        seen = materials(read_doc(config, *DB)) | materials(read_doc(config, *API))
        assert daemon.stop() == 0
        assert refused(port), "the endpoint must close with the daemon"
    finally:
        daemon.kill()
    assert "serving metrics and health" in daemon.log_text()
    assert_no_material(seen, files=[tmp_path / "daemon.log"], texts=texts)


def test_an_address_in_use_stops_the_start_with_nothing_changed(config: Path, socket_dir: str) -> None:
    port = free_port()
    var = config.parent / "var"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = cli(config, "run", env={"ROTATORD_DAEMON__METRICS": f"127.0.0.1:{port}"}, timeout=60)
    assert result.returncode == 69, result.stderr
    assert result.stderr == (
        f"rotatord: error: daemon.metrics: cannot listen on 127.0.0.1:{port}: address already in use "
        '(another process listens there); free it, or set daemon.metrics to another address or "off"\n'
    )
    # Nothing was done: no rotation started, no secret written, no control socket left behind.
    with sqlite3.connect(var / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM rotations").fetchone() == (0,)
    assert read_doc(config, *DB) is None and read_doc(config, *API) is None
    assert not (Path(socket_dir) / "control.sock").exists()
    assert not (var / "audit.log").exists() or (var / "audit.log").stat().st_size == 0


def test_metrics_off_serves_nothing(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    port = free_port()
    # The file asks for a port; the environment (set by tests/conftest.py) switches it off.
    text = config.read_text().replace('metrics = "127.0.0.1:9464"', f'metrics = "127.0.0.1:{port}"')
    config.write_text(text)
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify, env={"ROTATORD_DAEMON__METRICS": "off"})
    try:
        daemon.wait_ready()
        assert refused(port)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert "serving metrics" not in daemon.log_text()


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_a_bad_address_is_a_config_error(config: Path, command: str) -> None:
    result = cli(config, command, env={"ROTATORD_DAEMON__METRICS": "127.0.0.1:99999"}, timeout=60)
    assert result.returncode == 78
    assert result.stderr.startswith(
        'rotatord: config error: daemon.metrics (from $ROTATORD_DAEMON__METRICS): must be "host:port"'
    )


def test_the_address_comes_from_the_file_and_cannot_change_on_reload(
    config: Path, notify: NotifyListener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROTATORD_DAEMON__METRICS")  # the file decides, as in production
    port, other = free_port(), free_port()
    shipped = 'metrics = "127.0.0.1:9464"'
    config.write_text(config.read_text().replace(shipped, f'metrics = "127.0.0.1:{port}"'))
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        daemon.wait_ready()
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        config.write_text(config.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}"))
        mark = len(notify.messages)
        daemon.signal(signal.SIGHUP)
        notify.wait_for("READY", "1", since=mark)
        wait_until(lambda: "daemon.metrics cannot change on reload" in daemon.log_text(), what="the refusal")
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        assert refused(other)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
