"""The watchdog under load: do 100 rotations falling due at once delay a WATCHDOG=1 ping?

systemd kills a ``Type=notify`` service whose pings stop for ``WatchdogSec``; the daemon pings
every ``WATCHDOG_USEC / 2`` from its asyncio loop, so anything that holds the loop (or the GIL)
shows up as a longer gap.  With ``WATCHDOG_USEC=2000000`` the pings come every 1 s and the
bound is 2 s.  The NOTIFY_SOCKET is drained by a thread of this process, which stamps each
datagram on arrival.

Run 1 creates the secrets (every ``30d``; creation is a wave of its own and is measured too).
Run 2 restarts the daemon with ``every = "10s"`` once more than 10 s have passed since the
creations started, so that every secret is due at start and all rotations (propagation and
grace 0s, so each one runs to its end) are scheduled at the same instant.  The window
measured is READY -> the last of those rotations recorded ``done``.
"""

from __future__ import annotations

import time

from .harness import (
    TimedNotifyListener,
    Workspace,
    mixed_secrets,
    rotation_total,
    running,
    wait_for_rotations,
    watchdog_gaps,
    workspace,
)
from .results import Result

__all__ = ["run"]

BENCH = "watchdog"
WATCHDOG_USEC = "2000000"
GAP_LIMIT_S = 2.0


def _wave(ws: Workspace, listener: TimedNotifyListener, secrets: int, version: int) -> tuple[list[float], float]:
    """Start the daemon, wait for ``secrets`` rotations to ``version`` to finish, stop it.
    Returns the watchdog gaps in READY -> done and the duration of that window."""
    daemon, t0 = ws.start(listener, env={"WATCHDOG_USEC": WATCHDOG_USEC})
    with running(daemon):
        daemon.wait_ready(timeout=60)
        t_ready = listener.first("READY", "1", daemon.pid, t0)
        assert t_ready is not None
        t_done = wait_for_rotations(ws.state_db, secrets, min_version=version, timeout=300)
        gaps = watchdog_gaps(listener, daemon.pid, t_ready, t_done)
    return gaps, t_done - t_ready


def run(secrets: int = 100) -> list[Result]:
    results = []
    timings = {"grace": "0s", "propagation": "0s"}
    with workspace("watchdog") as ws:
        listener = TimedNotifyListener()
        try:
            ws.write_config(mixed_secrets(secrets, every="30d", **timings))
            ws.init()
            created_at = time.monotonic()
            gaps, window = _wave(ws, listener, secrets, version=1)
            results.append(
                Result(
                    BENCH,
                    f"max gap between WATCHDOG=1 while {secrets} secrets are created",
                    max(gaps),
                    "s",
                    GAP_LIMIT_S,
                    strict=True,
                    note=f"{len(gaps) - 1} pings in {window:.1f} s",
                ),
            )

            ws.write_config(mixed_secrets(secrets, every="10s", **timings))
            time.sleep(max(0.0, created_at + 10.5 - time.monotonic()))
            gaps, window = _wave(ws, listener, secrets, version=2)
            # Exactly one rotation per secret: the wave, and nothing of a next one.
            total = rotation_total(ws.state_db)
            assert secrets * 2 <= total < secrets * 3, f"{total} rotations in the journal"
            assert len(gaps) - 1 >= int(window) - 1, f"only {len(gaps) - 1} pings in {window:.1f} s"
            results += [
                Result(
                    BENCH,
                    f"max gap between WATCHDOG=1 while {secrets} due rotations run",
                    max(gaps),
                    "s",
                    GAP_LIMIT_S,
                    strict=True,
                    note=f"{len(gaps) - 1} pings; half fernet (4 steps), half api_token (2 steps)",
                ),
                Result(
                    BENCH,
                    f"{secrets} due rotations: READY -> all done",
                    window,
                    "s",
                    note=f"{secrets / window:.0f} rotations/s through the scheduler",
                ),
            ]
        finally:
            listener.close()
    return results
