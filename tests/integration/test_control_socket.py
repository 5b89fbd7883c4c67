"""Garbage on the control socket gets an error reply and never disturbs the daemon."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from pathlib import Path

from rotatord.config import load_settings
from rotatord.daemon.protocol import MAX_REQUEST
from tests.helpers import DaemonProcess, NotifyListener, status_json, wait_until


def _exchange(path: str, payload: bytes, shutdown: bool = True) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(15)
        sock.connect(path)
        # The daemon may close early on an oversized request; its reply is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)


def test_malformed_requests_are_answered_and_harmless(config: Path, notify: NotifyListener, tmp_path: Path) -> None:
    daemon = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        daemon.wait_ready()
        wait_until(lambda: all(s["version"] == 1 for s in status_json(config).values()), what="both secrets created")
        path = str(load_settings(config).daemon.socket_path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o660, f"control socket mode {mode:o}"
        cases = {
            b"\x00\xff\xfe garbage\n": "not valid JSON",
            b"[1, 2, 3]\n": "must be a JSON object",
            b'{"op": "format-disk"}\n': "unknown op",
            b'{"op": "rotate"}\n': "'name' is required",
            b'{"op": "rotate", "name": 7}\n': "must be str",
            b'{"op": "rotate", "name": "../../etc"}\n': "not a valid secret name",
            b'{"op": "rotate", "name": "demo-bot-db", "emergency": "yes"}\n': "must be bool",
            b'{"op": "status", "extra": 1}\n': "unknown field",
            b'{"op": "rotate", "name": "nope"}\n': "unknown secret 'nope'",
            b'{"op": "rotate", "name": "demo-bot-db", "reason": "two\\nlines"}\n': "one line",
            b"": None,  # connect and hang up: no reply expected, no harm
        }
        for payload, expected in cases.items():
            if expected is None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(path)
                continue
            reply = _exchange(path, payload)
            assert reply["ok"] is False, payload
            error = reply["error"]
            assert isinstance(error, dict) and expected in str(error["message"]), (payload, error)
        oversized = _exchange(path, b'{"op": "status", "name": "' + b"a" * (MAX_REQUEST + 10) + b'"}\n')
        assert oversized["ok"] is False and "larger than" in str(oversized["error"])
        # No rotation was started by any of that, and the daemon still answers.
        assert daemon.proc.poll() is None
        assert _exchange(path, b'{"op": "ping"}\n')["ok"] is True
        st = status_json(config)
        assert st["demo-bot-db"]["version"] == 1 and st["demo-bot-api"]["version"] == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
