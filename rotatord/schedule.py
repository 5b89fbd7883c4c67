"""The one module that imports APScheduler (3.x): cron parsing and the daemon's job scheduler.

Each managed secret has one job whose single next run time is the next moment something is
due for that secret (a rotation, a promotion, a retirement).  After each run the job is
re-armed from the journal, so the schedule survives restarts and the clock is never reset.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger

__all__ = ["JobScheduler", "next_cron_time", "validate_cron"]


_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DOW_NUMBERS = {name: i for i, name in enumerate(_DOW_NAMES[:7])}


def _dow_number(text: str) -> int:
    value = _DOW_NUMBERS.get(text.lower()) if text.isalpha() else int(text) if text.isdigit() else None
    if value is None or not 0 <= value <= 7:
        raise ValueError(f"day-of-week {text!r} is out of range (0-7 or a day name)")
    return value


def _dow_field(field: str) -> str:
    """Crontab counts weekdays from Sunday = 0 (7 too); APScheduler 3 from Monday = 0.

    Every part (numbers, names, ranges, steps, ``*/n``) is expanded to a list of day names,
    which both understand the same way.
    """
    if field == "*":
        return "*"
    out: list[str] = []
    for part in field.split(","):
        body, _, step_text = part.partition("/")
        if body == "*":
            lo, hi = 0, 6
        else:
            lo_text, dash, hi_text = body.partition("-")
            lo = _dow_number(lo_text)
            hi = _dow_number(hi_text) if dash else (7 if step_text else lo)
        if hi == 0 and lo > 0:  # "sat-sun" style ranges end on Sunday = 7
            hi = 7
        step = int(step_text) if step_text.isdigit() else 0 if step_text else 1
        if lo > hi or step < 1:
            raise ValueError(f"day-of-week {part!r} is not a valid range or step")
        out.extend(_DOW_NAMES[n] for n in range(lo, hi + 1, step))
    return ",".join(dict.fromkeys(out))


def _cron(expr: str) -> list[CronTrigger]:
    """The triggers whose earliest firing is the crontab's: one, or two when crontab's rule applies
    that a restricted day-of-month and a restricted day-of-week match EITHER (APScheduler ANDs them)."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields (minute hour day month weekday)")
    minute, hour, day, month, dow = fields
    try:
        dow_names = _dow_field(dow)
        if day != "*" and dow != "*":
            return [
                CronTrigger(minute=minute, hour=hour, day=day, month=month, timezone=UTC),
                CronTrigger(minute=minute, hour=hour, month=month, day_of_week=dow_names, timezone=UTC),
            ]
        return [CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=dow_names, timezone=UTC)]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None


def validate_cron(expr: str) -> None:
    """Raise ValueError with a readable reason if ``expr`` is not a 5-field crontab expression."""
    _cron(expr)


def next_cron_time(expr: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that matches ``expr`` (UTC, crontab semantics)."""
    start = after.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
    times = [t for trigger in _cron(expr) if (t := trigger.get_next_fire_time(None, start)) is not None]
    if not times:
        raise ValueError(f"cron expression {expr!r} never fires again")
    result: datetime = min(times).astimezone(UTC)
    return result


class JobScheduler:
    """One job per key, each armed for one run at a time; thread pool executor."""

    def __init__(self, workers: int = 4) -> None:
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            # Two instances: a run armed while the previous one is still finishing must wait for
            # the engine's per-secret lock, not be skipped (APScheduler drops a skipped date job,
            # which would leave the secret with nothing armed).
            job_defaults={"coalesce": True, "max_instances": 2, "misfire_grace_time": None},
        )
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        # Runs submitted to the executor but not finished, per key: APScheduler has removed a
        # date job from its store by then, yet the key is not unscheduled (see job_ids).
        self._running: dict[str, int] = {}
        self._running_lock = threading.Lock()
        self._scheduler.add_listener(self._submitted, EVENT_JOB_SUBMITTED)

    def _submitted(self, event: JobSubmissionEvent) -> None:
        with self._running_lock:
            self._running[event.job_id] = self._running.get(event.job_id, 0) + 1

    def _finished(self, key: str) -> None:
        with self._running_lock:
            left = self._running.get(key, 0) - 1
            if left > 0:
                self._running[key] = left
            else:
                self._running.pop(key, None)

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    def arm(self, key: str, when: datetime, func: Callable[[], None]) -> None:
        """Run ``func`` once at ``when`` (replacing any earlier arming of ``key``)."""

        def run() -> None:
            try:
                func()
            finally:
                self._finished(key)

        self._scheduler.add_job(run, trigger=DateTrigger(run_date=when, timezone=UTC), id=key, replace_existing=True)

    def wakeup(self) -> None:
        """Re-check what is due now.  APScheduler sleeps until the next run time it computed from
        the wall clock, so it would sleep through a jump of the clock forward."""
        if self._scheduler.running:
            self._scheduler.wakeup()

    def disarm(self, key: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(key)

    def next_run(self, key: str) -> datetime | None:
        job = self._scheduler.get_job(key)
        # A job armed before start() is pending and has no next run time yet.
        return None if job is None else getattr(job, "next_run_time", None)

    def next_runs(self) -> dict[str, datetime]:
        """Every armed key's next run, in one pass over the job store."""
        runs = ((job.id, getattr(job, "next_run_time", None)) for job in self._scheduler.get_jobs())
        return {key: when for key, when in runs if when is not None}

    def job_ids(self) -> list[str]:
        """Keys armed for a future run, and keys whose run is queued or running now."""
        with self._running_lock:
            running = set(self._running)
        return list(dict.fromkeys([*(job.id for job in self._scheduler.get_jobs()), *running]))
