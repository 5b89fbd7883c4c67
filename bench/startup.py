"""Start-up, memory and idle cost of one daemon managing many secrets on the file backend.

Measured on the real ``rotatord run`` (a child process) with a real datagram NOTIFY_SOCKET:

1. **first start**: a fresh state where every secret must be created.  READY=1 comes before
   the creations (they are scheduled, not run inline), so two numbers: spawn -> READY, and
   spawn -> every secret created (all first rotations ``done`` in the journal).  The largest gap
   between WATCHDOG=1 pings while the creations run, CPU seconds spent and RSS once they settle.
2. **warm start** (repeated): the same state, every secret existing and none due: spawn -> READY
   and RSS right after READY.
3. **idle**: on the last warm start, utime+stime over ``idle_seconds`` (every thread) and RSS
   after.  The watchdog is on as in the shipped unit (WatchdogSec=30s).
4. **CLI round trips** against that daemon (see :mod:`bench.cli_latency`).
"""

from __future__ import annotations

import time

from tests.helpers import DaemonProcess

from .cli_latency import measure_cli
from .harness import (
    TimedNotifyListener,
    Workspace,
    count_between,
    cpu_seconds,
    mixed_secrets,
    rotation_total,
    rss_mb,
    running,
    summary,
    wait_for_rotations,
    watchdog_gaps,
    workspace,
)
from .results import Result

__all__ = ["run"]

BENCH = "startup"
READY_LIMIT_S = 1.5
IDLE_CPU_LIMIT_PCT = 1.0
RSS_LIMIT_MB = 120.0
#: The fast ping of the watchdog benchmark, so the creation wave is judged by the same bound.
FAST_WATCHDOG_USEC = "2000000"
#: The shipped unit's WatchdogSec=30s.
UNIT_WATCHDOG_USEC = "30000000"


def run(secrets: int = 1000, warm_runs: int = 3, idle_seconds: float = 30, cli_samples: int = 10) -> list[Result]:
    results: list[Result] = []
    label = f"{secrets} secrets"
    with workspace("startup") as ws:
        ws.write_config(mixed_secrets(secrets))
        ws.init()
        listener = TimedNotifyListener()
        try:
            # -- 1. first start: create everything ----------------------------------------------------
            daemon, t0 = ws.start(listener, env={"WATCHDOG_USEC": FAST_WATCHDOG_USEC})
            with running(daemon):
                daemon.wait_ready(timeout=120)
                t_ready = listener.first("READY", "1", daemon.pid, t0)
                assert t_ready is not None
                rss_ready = rss_mb(daemon.pid)
                t_done = wait_for_rotations(ws.state_db, secrets, min_version=1, timeout=900)
                cpu_create = cpu_seconds(daemon.pid)
                time.sleep(2)  # let the last status updates and garbage settle before reading memory
                rss_settled, rss_peak = rss_mb(daemon.pid), rss_mb(daemon.pid, "VmHWM")
                gaps = watchdog_gaps(listener, daemon.pid, t_ready, t_done)
                statuses = count_between(listener, "STATUS", daemon.pid, t_ready, t_done)
            results += [
                Result(BENCH, f"first start: spawn -> READY ({label} to create)", t_ready - t0, "s", READY_LIMIT_S),
                Result(
                    BENCH,
                    f"first start: spawn -> all {secrets} created",
                    t_done - t0,
                    "s",
                    note=f"{secrets / (t_done - t_ready):.0f} per s after READY; {statuses} STATUS= sent meanwhile",
                ),
                Result(
                    BENCH,
                    "first start: max watchdog gap while creating",
                    max(gaps),
                    "s",
                    2.0,
                    strict=True,
                    note="WATCHDOG_USEC=2s: pings every 1 s",
                ),
                Result(BENCH, "first start: CPU time spent until created", cpu_create, "s"),
                Result(BENCH, "first start: RSS after READY", rss_ready, "MiB", RSS_LIMIT_MB),
                Result(
                    BENCH,
                    "first start: RSS after creations settle",
                    rss_settled,
                    "MiB",
                    RSS_LIMIT_MB,
                    note=f"peak (VmHWM) {rss_peak:.0f} MiB",
                ),
            ]

            # -- 2. warm starts; 3. idle and 4. CLI on the last one -----------------------------------
            ready_times: list[float] = []
            for _ in range(warm_runs - 1):
                ready_times.append(_warm_start(ws, listener)[1])
            daemon, ready = _warm_start(ws, listener, keep=True)
            ready_times.append(ready)
            with running(daemon):
                rss_ready = rss_mb(daemon.pid)
                time.sleep(1)  # the start-up work (scheduler arming, first STATUS) is over
                cpu_before, wall_before = cpu_seconds(daemon.pid), time.monotonic()
                time.sleep(idle_seconds)
                cpu_used, wall = cpu_seconds(daemon.pid) - cpu_before, time.monotonic() - wall_before
                rss_idle = rss_mb(daemon.pid)
                # Only the creations: nothing was started by the warm starts or while idle.
                total = rotation_total(ws.state_db)
                assert total == secrets, f"{total} rotations in the journal, not {secrets}"
                cli_results = measure_cli(ws.config, secrets, cli_samples)
                rss_after_cli = rss_mb(daemon.pid)
            stats = summary(ready_times)
            results += [
                Result(
                    BENCH,
                    f"warm start: spawn -> READY ({label}, none due)",
                    stats["median"],
                    "s",
                    READY_LIMIT_S,
                    note=f"median of {warm_runs}; max {stats['max']:.2f} s",
                ),
                Result(BENCH, "warm start: RSS after READY", rss_ready, "MiB", RSS_LIMIT_MB),
                Result(
                    BENCH,
                    f"idle: CPU over {wall:.0f} s",
                    100 * cpu_used / wall,
                    "% of one core",
                    IDLE_CPU_LIMIT_PCT,
                    note=f"{cpu_used:.2f} s utime+stime; WATCHDOG_USEC=30s",
                ),
                Result(BENCH, "idle: RSS after the idle period", rss_idle, "MiB", RSS_LIMIT_MB),
                *cli_results,
                Result(BENCH, f"RSS after {4 * cli_samples} CLI round trips", rss_after_cli, "MiB", RSS_LIMIT_MB),
            ]
        finally:
            listener.close()
    return results


def _warm_start(ws: Workspace, listener: TimedNotifyListener, keep: bool = False) -> tuple[DaemonProcess, float]:
    """Start the daemon on the existing state; spawn -> READY in seconds.  Stopped unless ``keep``
    (then the caller stops it, with :func:`bench.harness.running`)."""
    daemon, t0 = ws.start(listener, env={"WATCHDOG_USEC": UNIT_WATCHDOG_USEC})
    try:
        daemon.wait_ready(timeout=120)
        t_ready = listener.first("READY", "1", daemon.pid, t0)
        assert t_ready is not None
    except BaseException:
        daemon.kill()
        raise
    if not keep:
        code = daemon.stop(timeout=60)
        assert code == 0, f"the daemon exited {code} on SIGTERM"
    return daemon, t_ready - t0
