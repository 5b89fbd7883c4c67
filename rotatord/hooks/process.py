"""Run one hook command: no shell, a clean environment, bounded output, a whole-group kill.

The command gets its own session (``start_new_session``), so a timeout, a shutdown or its own
exit stops everything it started: whatever is left in its process group is killed, as systemd's
``KillMode=control-group`` would.  The exited leader is left unreaped (``WNOWAIT``) until its
group has been signalled, so the group id cannot be reused by an unrelated process meanwhile.
No descriptor of the daemon is inherited (``close_fds``); the working directory is ``/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Literal

__all__ = ["OUTPUT_LIMIT", "ProcessResult", "run_process"]

#: Bytes of stdout and of stderr kept per run; the rest is read and dropped so the hook never blocks.
OUTPUT_LIMIT = 64 * 1024
#: After SIGTERM to the group (timeout, shutdown), how long before SIGKILL.
KILL_GRACE = 2.0
_POLL_MAX = 0.1

Outcome = Literal["ok", "exit", "timeout", "stopped", "error"]


@dataclass(frozen=True)
class ProcessResult:
    """How a run ended.  ``outcome``: ok (exit 0), exit (non-zero), timeout, stopped (the daemon
    is shutting down), error (could not start).  Output is decoded text, at most OUTPUT_LIMIT each."""

    outcome: Outcome
    returncode: int | None
    #: What the hook printed (it may echo material it was given): never in a repr.
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)
    truncated: bool
    seconds: float
    error: str | None = None
    #: The timeout the run had, in seconds.
    limit: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def describe(self) -> str:
        """One line for an operator: why the run did not succeed (never the output itself)."""
        if self.outcome == "ok":
            return "succeeded"
        if self.outcome == "exit":
            code = self.returncode if self.returncode is not None else -1
            return f"exited with status {code}" if code >= 0 else f"killed by signal {-code}"
        if self.outcome == "timeout":
            return f"timed out after {self.limit:g}s and was killed"
        if self.outcome == "stopped":
            return "interrupted: the daemon is stopping"
        return self.error or "could not start"


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping the first OUTPUT_LIMIT bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.pipe = pipe
        self.kept = bytearray()
        self.dropped = False

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(self.pipe.fileno(), 65536):
                room = OUTPUT_LIMIT - len(self.kept)
                if len(chunk) > room:
                    self.dropped = True
                self.kept += chunk[: max(room, 0)]

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _feed(pipe: IO[bytes], data: bytes) -> None:
    # A hook that does not read its stdin closes the pipe early: that is its right.
    with contextlib.suppress(OSError, ValueError):
        pipe.write(data)
    with contextlib.suppress(OSError, ValueError):
        pipe.close()


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def run_process(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdin: bytes,
    timeout: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> ProcessResult:
    """Run ``argv`` with exactly ``env``, ``stdin`` on its standard input, for at most ``timeout``
    seconds.  Never raises for the command's sake: every way it can end is a ProcessResult."""
    start = time.monotonic()
    try:
        # argv comes from the validated configuration; no shell is involved.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd="/",
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        return ProcessResult("error", None, "", "", False, 0.0, f"cannot start {argv[0]}: {exc.strerror or exc}")
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    drains = [_Drain(proc.stdout), _Drain(proc.stderr)]
    for drain in drains:
        drain.start()
    feeder = threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)
    feeder.start()
    outcome: Outcome = "ok"
    pause = 0.005
    while not _exited(proc.pid):
        if time.monotonic() - start >= timeout:
            outcome = "timeout"
            break
        if should_stop():
            outcome = "stopped"
            break
        time.sleep(pause)
        pause = min(pause * 2, _POLL_MAX)
    if outcome != "ok":
        _signal_group(proc.pid, signal.SIGTERM)
        _wait_exit(proc.pid, KILL_GRACE)
    # Whatever the hook left behind in its group goes too; the leader is not reaped yet, so the
    # group id still belongs to this hook.
    _signal_group(proc.pid, signal.SIGKILL)
    returncode = proc.wait()
    seconds = time.monotonic() - start
    feeder.join(1.0)
    for drain in drains:
        drain.join(2.0)  # a grandchild that left the group may hold the pipe: do not wait for it
        if not drain.is_alive():
            drain.pipe.close()
    if outcome == "ok" and returncode != 0:
        outcome = "exit"
    return ProcessResult(
        outcome,
        returncode,
        drains[0].text(),
        drains[1].text(),
        any(d.dropped for d in drains),
        seconds,
        limit=timeout,
    )
