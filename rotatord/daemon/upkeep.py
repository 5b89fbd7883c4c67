"""The daemon's upkeep of its schedule, off the rotation path.

- Every SWEEP_INTERVAL: log a jump of the wall clock, re-arm any secret left with nothing armed
  and no run in progress, and wake the scheduler (APScheduler sleeps until the run time it
  computed from the wall clock, so it would sleep through a jump forward).
- The drift check (rotatord.engine.drift): a pass over every secret per ``drift_check_interval``,
  spread in slices every DRIFT_SLICE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ..engine.policy import next_rotation_due
from ..errors import RotatordError

if TYPE_CHECKING:
    from .service import Daemon

__all__ = ["DRIFT_JOB", "Upkeep"]

log = logging.getLogger("rotatord.daemon")

#: How often the daemon re-checks the schedule: wall-clock jumps, secrets left with nothing armed.
SWEEP_INTERVAL = 10.0
#: A difference between wall-clock and monotonic progress above this is logged as a clock jump.
CLOCK_JUMP_SECONDS = 2.0
#: The scheduler key of the periodic drift check (":" cannot start a secret name).
DRIFT_JOB = ":drift-check"
DRIFT_FIRST_DELAY = timedelta(seconds=30)
#: The drift check reads a slice of the secrets this often (a whole pass per drift_check_interval).
DRIFT_SLICE = timedelta(seconds=5)


class Upkeep:
    """One daemon's periodic sweep and drift check."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self.drift_cursor = 0

    def arm_drift_first(self) -> None:
        """The first sweep waits a little: reading every secret competes with the start-up (and
        each step checks its own secret for drift before acting anyway)."""
        self.arm_drift(
            self._daemon.clock.now() + min(self._daemon.settings.daemon.drift_check_interval, DRIFT_FIRST_DELAY)
        )

    def arm_drift(self, when: datetime) -> None:
        if not self._daemon._stopping and self._daemon._may_act():
            self._daemon.scheduler.arm(DRIFT_JOB, when, self.drift_sweep)

    def drift_sweep(self) -> None:
        """Compare the next slice of managed secrets with their baselines.

        A pass over every secret takes about ``drift_check_interval``, in slices every
        DRIFT_SLICE: 1,000 secrets are not read in one burst of CPU (the first pass after a
        start decrypts every document), and a slow backend delays one slice, not the daemon.
        One failing backend does not stop the rest.
        """
        engine = self._daemon.runtime.engine
        names = sorted(engine.secrets)
        interval = self._daemon.settings.daemon.drift_check_interval
        slices = max(1, int(interval / DRIFT_SLICE))
        size = max(1, -(-len(names) // slices))
        start = self.drift_cursor if self.drift_cursor < len(names) else 0
        batch = names[start : start + size]
        self.drift_cursor = start + size
        try:
            snapshot = engine.drift.snapshot()
        except RotatordError as exc:
            log.warning("drift sweep skipped: the state database cannot be read", extra={"error": str(exc)})
            snapshot = None
        found = False
        for name in batch:
            if self._daemon._stopping:
                return
            try:
                found = engine.check_drift(name, self._daemon.clock.now(), snapshot) is not None or found
            except RotatordError as exc:
                log.warning("drift check failed; tried again next time", extra={"secret": name, "error": str(exc)})
            except Exception:
                log.exception("drift check failed", extra={"secret": name})
        if found:
            self._daemon._changed_threadsafe("")
        self.arm_drift(self._daemon.clock.now() + interval / slices)

    async def sweep(self) -> None:
        """Every SWEEP_INTERVAL: log a jump of the wall clock, re-arm any secret that has no job
        and no run in progress (the schedule must never silently lose a secret), and wake the
        scheduler so that what a jump made due runs now."""
        assert self._daemon._loop is not None
        wall, mono = time.time(), time.monotonic()
        while not self._daemon._stopping:
            await asyncio.sleep(SWEEP_INTERVAL)
            now_wall, now_mono = time.time(), time.monotonic()
            jump = (now_wall - wall) - (now_mono - mono)
            wall, mono = now_wall, now_mono
            if abs(jump) >= CLOCK_JUMP_SECONDS:
                log.warning("wall clock jumped; re-checking what is due", extra={"jump_seconds": round(jump, 1)})
            if self._daemon._stopping:
                return
            await self._daemon._loop.run_in_executor(None, self.rearm_missing)
            self._daemon.scheduler.wakeup()

    def rearm_missing(self) -> None:
        if self._daemon.leadership is None or not self._daemon.leadership.may_act():
            return  # a standby schedules nothing; a new leader arms everything when it takes over
        engine = self._daemon.runtime.engine
        armed = set(self._daemon.scheduler.job_ids())
        busy = self._daemon.busy_secrets()
        missing = [name for name in engine.secrets if name not in armed and name not in busy]
        if not missing:
            return
        latest = engine.journal.latest_all()
        now = self._daemon.clock.now()
        for name in missing:
            rot = latest.get(name)
            log.warning("secret had nothing scheduled; re-armed", extra={"secret": name})
            if rot is not None and rot.active:
                self._daemon._arm(name, now)
            else:
                self._daemon._arm(
                    name, max(now, next_rotation_due(engine.secrets[name], rot.started_at if rot else None, now))
                )
