"""What every benchmark shares: a private workspace, a generated config, the real daemon, /proc readings.

Everything a benchmark writes lives in one temporary directory (plus a short directory under
/tmp for the control socket, because ``sun_path`` holds 107 bytes); both are removed at the end.
Every process started here is stopped by its PID.  No output ever includes key material: the
benchmarks print counts and timings only.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import ROTATORD, DaemonProcess, NotifyListener, cli

__all__ = [
    "ROTATORD",
    "SecretSpec",
    "TimedNotifyListener",
    "Workspace",
    "count_between",
    "cpu_seconds",
    "done_rotations",
    "mixed_secrets",
    "rotation_total",
    "rss_mb",
    "running",
    "summary",
    "wait_for_rotations",
    "watchdog_gaps",
    "workspace",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass(frozen=True)
class SecretSpec:
    """One ``[[secrets]]`` entry; durations in the config's own syntax."""

    name: str
    kind: str  # fernet | api_token
    every: str = "30d"
    grace: str = "7d"
    propagation: str = "10m"

    def toml(self) -> str:
        lines = [
            "[[secrets]]",
            f'name = "{self.name}"',
            f'kind = "{self.kind}"',
            'backend = "local"',
            f'path = "bench/{self.name}"',
            f'every = "{self.every}"',
            f'grace = "{self.grace}"',
        ]
        if self.kind == "fernet":
            lines += [f'propagation = "{self.propagation}"', "keep = 0", "consumers = []"]
        else:
            lines += ['token_prefix = "bench"', 'token_ttl = "7d"']
        return "\n".join(lines) + "\n"


def mixed_secrets(count: int, **timings: str) -> list[SecretSpec]:
    """``count`` secrets, alternately fernet and api_token (so half and half)."""
    kinds = (("fernet", "fernet"), ("token", "api_token"))
    return [SecretSpec(f"bench-{kinds[i % 2][0]}-{i:04d}", kinds[i % 2][1], **timings) for i in range(count)]


@dataclass
class Workspace:
    """A temporary directory holding one configuration, its state and its file backend."""

    root: Path
    socket_dir: Path
    config: Path = field(init=False)

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "state.db"

    def write_config(self, secrets: Sequence[SecretSpec], *, log_level: str = "info") -> Path:
        """The shape of config.example.toml with every path inside the workspace; mode 0600."""
        text = (
            "[daemon]\n"
            f'state_dir = "{self.root / "state"}"\n'
            f'control_socket = "{self.socket_dir / "control.sock"}"\n'
            'socket_mode = "0600"\n'
            f'log_level = "{log_level}"\n'
            'startup_jitter = "0s"\n'
            'step_retry_initial = "5s"\n'
            'step_retry_max = "10m"\n'
            # The shipped default serves metrics; a free loopback port keeps runs apart.
            f'metrics = "127.0.0.1:{_free_port()}"\n\n'
            "[backends.local]\n"
            'kind = "file"\n'
            f'directory = "{self.root / "secrets"}"\n'
            f'master_key_file = "{self.root / "state" / "master.key"}"\n'
            "max_versions = 20\n\n"
        ) + "\n".join(s.toml() for s in secrets)
        self.config = self.root / "config.toml"
        self.config.write_text(text)
        os.chmod(self.config, 0o600)
        return self.config

    def init(self) -> None:
        result = cli(self.config, "init")
        if result.returncode != 0:
            raise RuntimeError(f"rotatord init failed ({result.returncode}): {result.stderr.strip()}")

    def start(self, listener: NotifyListener, env: dict[str, str] | None = None) -> tuple[DaemonProcess, float]:
        """Start ``rotatord run``; returns the process and the monotonic time just before the spawn."""
        t0 = time.monotonic()
        return DaemonProcess(self.config, self.root / "daemon.log", listener, env=env), t0


@contextmanager
def workspace(prefix: str) -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix=f"rotatord-bench-{prefix}-"))
    socket_dir = Path(tempfile.mkdtemp(prefix="rtd-b-", dir="/tmp"))
    try:
        yield Workspace(root, socket_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)


@contextmanager
def running(daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    """Stop the daemon by PID on the way out (SIGTERM; SIGKILL if that fails or on an error).

    A daemon that does not exit 0 after SIGTERM makes the benchmark fail: its numbers would
    describe a daemon that was not working.
    """
    try:
        yield daemon
    except BaseException:
        daemon.kill()
        raise
    try:
        code = daemon.stop(timeout=60)
    except Exception:
        daemon.kill()
        raise
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} on SIGTERM; see {daemon.log_path}")


class TimedNotifyListener(NotifyListener):
    """The tests' NOTIFY_SOCKET stand-in, also recording when each datagram arrived (monotonic).

    ``timed`` is appended by the drain thread right after ``messages``, so entry ``i`` of each
    describes the same datagram; the stamp is taken microseconds after ``recvmsg`` returned.
    """

    def __init__(self) -> None:
        self.timed: list[tuple[float, int, dict[str, str]]] = []
        super().__init__()

    def _receive(self) -> bool:
        received = super()._receive()
        if received:
            pid, fields = self.messages[-1]
            self.timed.append((time.monotonic(), pid, fields))
        return received

    def first(self, key: str, value: str, pid: int, since: float) -> float | None:
        """Arrival time of the first ``key=value`` from ``pid`` at or after ``since``."""
        for stamp, sender, fields in list(self.timed):
            if stamp >= since and sender == pid and fields.get(key) == value:
                return stamp
        return None


def count_between(listener: TimedNotifyListener, key: str, pid: int, start: float, end: float) -> int:
    """How many datagrams from ``pid`` carrying ``key`` arrived within [start, end]."""
    return sum(1 for t, sender, f in list(listener.timed) if sender == pid and key in f and start <= t <= end)


def watchdog_gaps(listener: TimedNotifyListener, pid: int, start: float, end: float) -> list[float]:
    """Seconds between consecutive WATCHDOG=1 datagrams from ``pid`` within [start, end].

    The window's edges count as pings, so a daemon that stopped pinging shows a gap that
    reaches ``end`` rather than no gap at all.
    """
    stamps = [t for t, sender, f in list(listener.timed) if sender == pid and f.get("WATCHDOG") == "1"]
    inside = [start, *(t for t in stamps if start <= t <= end), end]
    return [b - a for a, b in itertools.pairwise(inside)]


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` so far (/proc/<pid>/stat fields 14 and 15)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, the peak) of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def done_rotations(state_db: Path, min_version: int = 1) -> tuple[int, int]:
    """(rotations done, rotations failed or erroring) with ``version >= min_version``.

    Read straight from the daemon's SQLite journal (WAL allows a concurrent reader); the
    ``rotations`` table holds versions and phases only, never key material.
    """
    conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5)
    try:
        done = conn.execute(
            "SELECT COUNT(*) FROM rotations WHERE status = 'done' AND version >= ?", (min_version,)
        ).fetchone()[0]
        bad = conn.execute(
            "SELECT COUNT(*) FROM rotations"
            " WHERE version >= ? AND (error IS NOT NULL OR status NOT IN ('done', 'active'))",
            (min_version,),
        ).fetchone()[0]
    finally:
        conn.close()
    return int(done), int(bad)


def rotation_total(state_db: Path) -> int:
    """How many rotations the journal holds, in any state."""
    conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM rotations").fetchone()[0])
    finally:
        conn.close()


def wait_for_rotations(state_db: Path, count: int, min_version: int, timeout: float) -> float:
    """Poll the journal until ``count`` rotations of at least ``min_version`` are done; returns
    the monotonic time it saw them.  Raises if any failed or if ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        done, bad = done_rotations(state_db, min_version)
        now = time.monotonic()
        if bad:
            raise RuntimeError(f"{bad} rotation(s) failed or recorded an error; see the daemon log")
        if done >= count:
            return now
        if now > deadline:
            raise RuntimeError(f"only {done}/{count} rotations done after {timeout:.0f}s")
        time.sleep(0.05)


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / p95 / max of a sample (p95 is the max below 20 values)."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}
