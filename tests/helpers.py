"""Shared test helpers: a real daemon process, a real NOTIFY_SOCKET, and the key-material scan."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rotatord.backends.file import FileBackend
from rotatord.config import load_settings
from rotatord.document import CredentialSet, Document, FernetRing

REPO = Path(__file__).resolve().parent.parent
ROTATORD = str(Path(sys.executable).parent / "rotatord")


def cli(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real ``rotatord`` console script."""
    return subprocess.run(
        [ROTATORD, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def materials(doc: Document | None) -> set[str]:
    """Every secret string a document holds (for the leak scans; never print these)."""
    if doc is None:
        return set()
    if isinstance(doc, FernetRing):
        return {k.material.reveal() for k in doc.keys}
    assert isinstance(doc, CredentialSet)
    found = {doc.current.value.reveal()}
    if doc.previous is not None:
        found.add(doc.previous.value.reveal())
    return found


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rtd-n-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, dict[str, str]]] = []
        self._arrived = threading.Condition()
        self._closed = False
        # Drain continuously, as systemd does: the daemon never blocks on a full queue, so a test
        # that reads lazily would otherwise lose datagrams.
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                self._receive()
            except OSError:
                return

    def _receive(self) -> bool:
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return False
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], sys.byteorder, signed=True)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        with self._arrived:
            self.messages.append((pid, fields))
            self._arrived.notify_all()
        return True

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 30, since: int = 0
    ) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            snapshot = list(self.messages)
            for pid, fields in snapshot[seen:]:
                if key in fields and (value is None or fields[key] == value):
                    return pid, fields
            seen = len(snapshot)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} notification within {timeout}s; got {self.messages}")
            with self._arrived:
                if len(self.messages) == seen:
                    self._arrived.wait(left)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


class DaemonProcess:
    """``rotatord run`` as a child process; always stopped by PID by its owner."""

    def __init__(self, config: Path, log_path: Path, notify: NotifyListener, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.notify = notify
        self.mark = len(notify.messages)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [ROTATORD, "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": notify.path, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30) -> dict[str, str]:
        pid, fields = self.notify.wait_for("READY", "1", timeout, since=self.mark)
        assert pid == self.pid, "READY=1 must come from the main process (NotifyAccess=main)"
        return fields

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def read_doc(config: Path, backend: str, path: str) -> Document | None:
    settings = load_settings(config)
    current = FileBackend(backend, settings.backends[backend]).read(path)
    return None if current is None else current.document


def status_json(config: Path) -> dict[str, Any]:
    result = cli(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)["secrets"]}


def wait_until(predicate: Any, timeout: float = 30, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Writes to ``path`` (a file or a directory) fail, even for root, as CI runs: chattr +i
    (root ignores modes), else a read-only mode."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True, capture_output=True)
    else:
        mode = path.stat().st_mode & 0o777
        path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield
        finally:
            path.chmod(mode)


def assert_no_material(secret_values: Iterable[str], files: Iterable[Path] = (), texts: Iterable[str] = ()) -> None:
    """Fail if any generated key or token appears in the given files or texts.

    The message names where, never what (printing the value would leak it into test output).
    """
    values = [v.encode() for v in secret_values if v]
    assert values, "nothing to scan for: the test collected no key material"
    for path in files:
        if path.exists():
            data = path.read_bytes()
            hits = sum(1 for v in values if v in data)
            assert hits == 0, f"{hits} secret value(s) found in {path}"
    for i, text in enumerate(texts):
        data = text.encode()
        hits = sum(1 for v in values if v in data)
        assert hits == 0, f"{hits} secret value(s) found in captured text #{i}"
