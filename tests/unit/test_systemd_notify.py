"""sd_notify, watchdog and socket activation against real sockets (no systemd needed).

A real AF_UNIX datagram socket plays systemd's notify socket; SO_PASSCRED lets us check the
sender pid the way systemd does for NotifyAccess=main.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rotatord.daemon.systemd import STATUS_MAX_CHARS, Notifier, listen_fds, watchdog_period

Receive = Callable[[], bytes]


def _receiver(sock: socket.socket) -> Receive:
    """Read one datagram; assert it came from this process (SCM_CREDENTIALS) and return it."""

    def receive() -> bytes:
        sock.settimeout(5)
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        creds = [d for level, kind, d in ancillary if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        assert len(creds) == 1
        pid, _uid, _gid = struct.unpack("3i", creds[0])
        assert pid == os.getpid()
        return data

    return receive


def _bound_dgram(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receive]:
    """A file-system notify socket, announced in $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = _bound_dgram(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield _receiver(sock)
    finally:
        sock.close()


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode("utf-8").splitlines())


def test_ready_with_status_is_one_datagram(notify_socket: Receive) -> None:
    notifier = Notifier()
    assert notifier.enabled
    assert notifier.ready("serving 3 secrets")
    assert notify_socket() == b"READY=1\nSTATUS=serving 3 secrets"
    assert notifier.ready()
    assert notify_socket() == b"READY=1"
    notifier.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"rotatord-test-{uuid.uuid4().hex}"
    sock = _bound_dgram("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier()
        assert notifier.watchdog()
        assert _receiver(sock)() == b"WATCHDOG=1"
    finally:
        sock.close()


def test_reloading_carries_monotonic_usec(notify_socket: Receive) -> None:
    notifier = Notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data = notify_socket()
    assert data.startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    fields = _fields(data)
    assert set(fields) == {"RELOADING", "MONOTONIC_USEC"}
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_stopping_watchdog_and_extend_timeout(notify_socket: Receive) -> None:
    notifier = Notifier()
    notifier.stopping()
    assert notify_socket() == b"STOPPING=1"
    notifier.stopping("draining: 1 step in flight")
    assert notify_socket() == b"STOPPING=1\nSTATUS=draining: 1 step in flight"
    notifier.watchdog()
    assert notify_socket() == b"WATCHDOG=1"
    notifier.extend_timeout(2.5)
    assert notify_socket() == b"EXTEND_TIMEOUT_USEC=2500000"
    with pytest.raises(ValueError, match="positive"):
        notifier.extend_timeout(0)


def test_non_latin1_status_arrives_intact(notify_socket: Receive) -> None:
    # sdnotify 0.3.2 encodes Latin-1 and would silently drop this datagram.
    Notifier().status("✓ 3 secrets")
    assert notify_socket() == "STATUS=✓ 3 secrets".encode()


def test_status_is_one_line_and_bounded(notify_socket: Receive) -> None:
    notifier = Notifier()
    notifier.status("rotating support-bot-db\nstep: promote\r\n\tconsumer  acks: 2/3")
    assert notify_socket() == b"STATUS=rotating support-bot-db step: promote consumer acks: 2/3"
    notifier.status("é" * 1000)
    value = notify_socket().decode()[len("STATUS=") :]
    assert len(value) == STATUS_MAX_CHARS
    assert value == "é" * (STATUS_MAX_CHARS - 1) + "…"


def test_send_rejects_malformed_fields(notify_socket: Receive) -> None:
    notifier = Notifier()
    with pytest.raises(ValueError, match="newline"):
        notifier.send(STATUS="two\nlines")
    with pytest.raises(ValueError, match="upper-case"):
        notifier.send(ready="1")
    assert notifier.send(READY="1", X_ROTATORD_PHASE="staged")
    assert notify_socket() == b"READY=1\nX_ROTATORD_PHASE=staged"


def test_unset_notify_socket_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_send_failure_never_raises_logs_once_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "late.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    with caplog.at_level(logging.DEBUG, logger="rotatord.daemon.systemd"):
        assert notifier.ready() is False  # nobody listens yet
        assert notifier.watchdog() is False
    assert len([r for r in caplog.records if "sd_notify failed" in r.getMessage()]) == 1
    sock = _bound_dgram(str(path))  # systemd came back
    try:
        assert notifier.watchdog() is True
        assert _receiver(sock)() == b"WATCHDOG=1"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<own>"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<foreign>"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({}, None),
    ],
)
def test_watchdog_period(environ: dict[str, str], expected: float | None) -> None:
    pids = {"<own>": str(os.getpid()), "<foreign>": str(os.getpid() + 1)}
    env = {k: pids.get(v, v) for k, v in environ.items()}
    assert watchdog_period(env) == expected


def test_watchdog_period_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_period() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_period() is None


def test_listen_fds_for_another_pid_is_empty_and_unsets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Returns before touching any fd, so it is safe in the test process itself.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "control")
    assert listen_fds() == {}
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert listen_fds() == {}


# The child gets the sockets at fds 3 and 4 and LISTEN_PID=<its own pid> the way systemd
# starts a service: a launcher dup2()s them into place, sets LISTEN_PID to its own pid and
# execs the service (exec keeps the pid), so the variables exist from interpreter start-up.
# Doing this in a child keeps the test process's own fd 3 untouched.
_LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    # Move both out of the way first, in case one of them already sits at fd 3 or 4.
    a, b = (fcntl.fcntl(int(os.environ.pop(k)), fcntl.F_DUPFD, 10) for k in ("A", "B"))
    os.dup2(a, 3, inheritable=True)
    os.dup2(b, 4, inheritable=True)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """
)
_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, socket
    from rotatord.daemon.systemd import listen_fds
    fds = listen_fds()
    report = {
        "fds": fds,
        "cloexec": {n: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for n, fd in fds.items()},
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "second_call": listen_fds(),
    }
    if "control" in fds:
        server = socket.socket(fileno=fds["control"])
        conn, _ = server.accept()
        conn.sendall(b"served on fd %d" % server.fileno())
        conn.close()
    print(json.dumps(report))
    """
)


def _run_activated(tmp_path: Path, fdnames: str | None) -> tuple[dict[str, object], bytes]:
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(tmp_path / "control.sock"))
    control.listen(1)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(tmp_path / "control.sock"))  # queued in the backlog until the child accepts
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.update(LISTEN_FDS="2", A=str(control.fileno()), B=str(other.fileno()))
        if fdnames is not None:
            env["LISTEN_FDNAMES"] = fdnames
        result = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, _CHILD],
            pass_fds=(control.fileno(), other.fileno()),
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        client.settimeout(5)
        reply = client.recv(100) if fdnames is not None and "control" in fdnames else b""
        return json.loads(result.stdout), reply
    finally:
        client.close()
        other.close()
        control.close()


def test_listen_fds_in_an_activated_child(tmp_path: Path) -> None:
    report, reply = _run_activated(tmp_path, "control:metrics")
    assert report["fds"] == {"control": 3, "metrics": 4}
    assert report["cloexec"] == {"control": True, "metrics": True}
    assert report["env_left"] == []
    assert report["second_call"] == {}
    assert reply == b"served on fd 3"


def test_listen_fds_without_names_are_unknown(tmp_path: Path) -> None:
    report, _ = _run_activated(tmp_path, None)
    # Both are "unknown"; the first keeps the name.
    assert report["fds"] == {"unknown": 3}
    assert report["cloexec"] == {"unknown": True}
    assert report["env_left"] == []
