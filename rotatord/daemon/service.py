"""``rotatord run``: lock -> resume -> schedule -> serve -> wait for a signal.

On a PostgreSQL state database several instances run: each serves its control socket at once,
and only the one holding the leader lease (:mod:`.leader`) resumes, schedules and delivers
webhooks; it stands down as soon as it may no longer act, and a standby that takes the lease
over runs the same resume path a starting daemon does.

The asyncio loop owns the control socket, signals and the watchdog; rotation steps run on the
scheduler's worker threads (they block on backends and databases), so a slow backend never
delays a watchdog ping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from ..config import Settings, check_references, load_settings
from ..engine.lease import supports_lease
from ..engine.policy import next_rotation_due
from ..errors import ConfigError, RotatordError
from ..logs import setup_logging
from ..schedule import JobScheduler
from ..timeutil import Clock, SystemClock, format_ts
from .control import ControlServer
from .endpoint import HttpEndpoint, open_endpoint
from .leader import Leadership, Role
from .lock import StateLock
from .reports import handle_revoked_use, install
from .requests import ControlRequests
from .runtime import Runtime, build_runtime
from .systemd import Notifier, listen_fds, watchdog_period
from .upkeep import DRIFT_JOB, Upkeep

__all__ = ["Daemon"]

log = logging.getLogger("rotatord.daemon")
ERROR_RETRY = timedelta(minutes=1)
STATUS_INTERVAL = 1.0
#: Where bots POST their reports of revoked credentials (on the metrics listener, loopback by default).
REVOKED_USE_PATH = "/v1/revoked-use"
LEADERSHIP_POLL = 0.2


class Daemon:
    def __init__(
        self,
        config_path: Path,
        settings: Settings,
        clock: Clock | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.clock = clock or SystemClock()
        self.notifier = Notifier()
        self.scheduler = JobScheduler()
        self.requests = ControlRequests(self)
        self.control = ControlServer(self.requests.handle)
        self._locks: dict[str, threading.RLock] = {}
        self.upkeep = Upkeep(self)
        self._runtime: Runtime | None = None
        self._stopping = False
        self._last_status = ""
        self._status_pending = False
        self._notify_wake = asyncio.Event()
        self._notify_stop = asyncio.Event()
        self._notify_task: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self.http: HttpEndpoint | None = None
        self._ready = False
        self.leadership: Leadership | None = None
        #: Work in flight (steps, control requests), by secret ("" for work of no one secret).
        self._work: Counter[str] = Counter()
        self._work_lock = threading.Lock()

    def role(self) -> Role:
        """``single`` (SQLite state), ``leader`` or ``standby`` (PostgreSQL state); thread-safe."""
        if self.leadership is None:
            return "standby" if supports_lease(self.settings.daemon.database_url) else "single"
        return self.leadership.role()

    def _may_act(self) -> bool:
        return self.leadership is None or self.leadership.may_act()

    @contextmanager
    def _working(self, name: str = "") -> Iterator[None]:
        """Counts work in flight, so a deposed leader knows when its last step has ended and the
        upkeep knows which secrets are being ticked right now."""
        with self._work_lock:
            self._work[name] += 1
        try:
            yield
        finally:
            with self._work_lock:
                self._work[name] -= 1
                if not self._work[name]:
                    del self._work[name]

    def _in_flight(self) -> int:
        with self._work_lock:
            return sum(self._work.values())

    def busy_secrets(self) -> set[str]:
        """The secrets a step or request is working on now."""
        with self._work_lock:
            return {name for name in self._work if name}

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        daemon = self.settings.daemon
        lock = StateLock(daemon.state_dir)
        daemon.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock.acquire()
        follow: asyncio.Future[None] | None = None
        try:
            # Bound first: an address in use stops the start before anything has been done.
            self.http = await open_endpoint(daemon, runtime=lambda: self._runtime, role=self.role, phase=self._phase)
            self._runtime = build_runtime(self.settings, locks=self._locks, should_stop=self._should_stop)
            self._observe()
            install(self.requests.revoked_use_recorder)
            if self.http is not None:
                # Bots report a revoked or retired credential still presented to them (rotatord.client).
                self.http.server.add_route("POST", REVOKED_USE_PATH, handle_revoked_use)
            self.leadership = await self._loop.run_in_executor(None, Leadership.for_settings, daemon)
            resumed = 0
            if self.leadership.multi:
                self.runtime.journal.guard_writes(self.leadership.check_write)
            else:
                self.notifier.status("resuming unfinished rotations")
                resumed = await self._loop.run_in_executor(None, self._resume)
            fds = listen_fds()
            await self.control.start(
                path=daemon.socket_path,
                mode=daemon.socket_mode_int,
                group=daemon.socket_group,
                inherited_fd=fds.get("control"),
            )
            if self.leadership.multi:
                self.scheduler.start()
                self.leadership.start()
                follow = asyncio.ensure_future(self._follow_leadership())
            else:
                # Every job is armed before the scheduler starts: with 1,000 secrets due at once,
                # the first runs would otherwise compete with the arming of the rest for the GIL.
                self._arm_all(startup=True)
                self.upkeep.arm_drift_first()
                self.scheduler.start()
            for sig, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set)):
                self._loop.add_signal_handler(sig, handler)
            self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
            self.notifier.ready(self._status_line())
            self._ready = True
            log.info(
                "rotatord ready",
                extra={
                    "secrets": len(self.settings.secrets),
                    "resumed": resumed,
                    "socket": str(daemon.socket_path),
                    "role": self.role(),
                    "instance": self.leadership.instance,
                },
            )
            watchdog = asyncio.ensure_future(self._watchdog())
            sweep = asyncio.ensure_future(self.upkeep.sweep())
            self._start_notifier()
            await self._stop.wait()
            self._stopping = True
            self.notifier.stopping("stopping: finishing the steps in flight")
            log.info("stopping: waiting for steps in flight")
            watchdog.cancel()
            sweep.cancel()
            if follow is not None:
                follow.cancel()
            await self._stop_notifier()
            await self.control.close()
            await self._close_http()
            await self._loop.run_in_executor(None, self.scheduler.shutdown)
            while self._in_flight():  # a resume or a control request still running a step
                await asyncio.sleep(0.1)
            # Released only now that no step runs, so the standby taking over at once is safe.
            await self._loop.run_in_executor(None, self.leadership.stop)
            install(None)
            self.runtime.close()
            log.info("stopped cleanly")
            return 0
        finally:
            await self._close_http()
            lock.release()

    def _phase(self) -> str:
        return "stopping" if self._stopping else "ready" if self._ready else "starting"

    def _observe(self) -> None:
        self.runtime.engine.on_change = self._changed_threadsafe
        if self.http is not None:
            self.http.observe(self.runtime)

    async def _close_http(self) -> None:
        if self.http is not None:
            await self.http.close()

    # -- leadership (PostgreSQL state only) ---------------------------------------------------

    def _should_stop(self) -> bool:
        return self._stopping or not self._may_act()

    async def _follow_leadership(self) -> None:
        """Act on role changes: lead when the lease is won, stand down the moment it may not act."""
        assert self.leadership is not None
        leading: bool = False
        shown: list[str] | None = None  # the first turn publishes: READY's line may predate the lease thread
        while True:
            now_leading = self.leadership.may_act()
            try:
                if now_leading and not leading:
                    await self._lead()  # when it fails, the next turn tries again (resuming is idempotent)
                    leading = True
                elif leading and not now_leading:
                    leading = False
                    await self._stand_down()
                # Compared with what was current BEFORE publishing: a change racing the publication
                # is published on the next turn.
                current = self._role_status()
                if current != shown:  # e.g. a standby learns who leads now
                    self._publish_status()
                    shown = current
            except Exception:  # e.g. the database went away mid-resume: the next turn re-evaluates
                log.exception("leadership change failed", extra={"leading": leading})
            await asyncio.sleep(LEADERSHIP_POLL)

    async def _lead(self) -> None:
        """Took the lease: the same resume path as a starting daemon, then schedule and notify."""
        assert self._loop is not None and self.leadership is not None
        self.notifier.status(f"leader (epoch {self.leadership.epoch}): resuming unfinished rotations")
        resumed = await self._loop.run_in_executor(None, self._resume)
        self._arm_all(startup=True)
        self.upkeep.arm_drift_first()
        await self._stop_notifier()  # none, unless an earlier attempt failed after starting it
        self._start_notifier()
        log.info("leading", extra={"epoch": self.leadership.epoch, "resumed": resumed})
        self._publish_status()

    async def _stand_down(self) -> None:
        """Lost the lease (or may lose it): stop scheduling and notifying, wait for steps in flight."""
        assert self.leadership is not None
        for key in self.scheduler.job_ids():
            self.scheduler.disarm(key)
        log.warning(
            "stopped acting: no longer the leader; scheduler paused", extra={"instance": self.leadership.instance}
        )
        self._publish_status()
        try:
            await self._stop_notifier()
        except Exception:  # a delivery cut off by the fence must not stop the standing down
            log.exception("webhook worker failed while standing down")
            self._notify_task = None
        while self._in_flight():  # their journal writes are refused by the fence meanwhile
            await asyncio.sleep(0.1)
        self.leadership.drained()
        log.info("standing by: work of the last tenure drained")

    # -- scheduling ------------------------------------------------------------------------

    def _resume(self) -> int:
        engine = self.runtime.engine
        active = engine.resume(self.clock.now())
        for rot in active:
            if rot.secret not in engine.secrets:
                log.warning("active rotation of a secret no longer configured", extra={"secret": rot.secret})
                continue
            log.info("resuming rotation", extra={"secret": rot.secret, "version": rot.version, "phase": rot.phase})
            self._tick(rot.secret, rearm=False)
        return len(active)

    def _arm_all(self, startup: bool) -> None:
        if not self._may_act():
            return
        engine = self.runtime.engine
        now = self.clock.now()
        jitter = self.settings.daemon.startup_jitter.total_seconds()
        for key in self.scheduler.job_ids():
            if key not in engine.secrets and key != DRIFT_JOB:
                self.scheduler.disarm(key)
        latest = engine.journal.latest_all()  # one query, not two per secret
        for name, secret in engine.secrets.items():
            rot = latest.get(name)
            active = rot is not None and rot.active
            when = now if active else next_rotation_due(secret, rot.started_at if rot else None, now)
            if when <= now:
                # Missed while the daemon was down (or never done): run once, spread out a little.
                when = now + timedelta(seconds=random.uniform(0, jitter) if startup else 0)
            self._arm(name, when)

    def _arm(self, name: str, when: datetime) -> None:
        if not self._stopping and self._may_act():
            self.scheduler.arm(name, when, lambda: self._tick(name))

    def _tick(self, name: str, rearm: bool = True) -> None:
        with self._working(name):
            self._tick_working(name, rearm)

    def _tick_working(self, name: str, rearm: bool) -> None:
        engine = self.runtime.engine
        if name not in engine.secrets or not self._may_act():
            return
        try:
            nxt = engine.tick(name, self.clock.now())
        except RotatordError as exc:
            log.error("tick failed", extra={"secret": name, "error": str(exc)})
            nxt = self.clock.now() + ERROR_RETRY
        except Exception:
            log.exception("tick failed", extra={"secret": name})
            nxt = self.clock.now() + ERROR_RETRY
        if rearm:
            self._arm(name, nxt)
        self._changed_threadsafe(name)

    # -- status, signals, watchdog ---------------------------------------------------------

    def _changed_threadsafe(self, _name: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._status_soon)
            self._loop.call_soon_threadsafe(self._notify_wake.set)

    def _status_soon(self) -> None:
        """Coalesce STATUS= updates: a wave of 1,000 steps yields one line a second, not 5,000."""
        if not self._status_pending and self._loop is not None:
            self._status_pending = True
            self._loop.call_later(STATUS_INTERVAL, self._publish_status)

    # -- webhooks: delivered off the rotation path, woken by every phase change -------------

    def _start_notifier(self) -> None:
        notifier = self.runtime.notifier
        if notifier is None or not self._may_act():
            return
        self._notify_stop = asyncio.Event()
        self._notify_task = asyncio.ensure_future(notifier.run(self._notify_stop, self._notify_wake))

    async def _stop_notifier(self) -> None:
        if self._notify_task is not None:
            self._notify_stop.set()
            await self._notify_task
            self._notify_task = None

    def _publish_status(self) -> None:
        self._status_pending = False
        if self._stopping:
            return
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self.notifier.status(line)

    def _status_line(self) -> str:
        engine = self.runtime.engine
        now = self.clock.now()
        role = self._role_status()
        try:
            active = [r for r in engine.journal.all_active() if r.secret in engine.secrets]
        except RotatordError as exc:
            if not role:
                raise
            # With a shared database an outage is an expected state: say so, keep the role visible.
            return "; ".join([*role, f"state database unreachable ({exc})"])
        failing = [r for r in active if r.error]
        runs = self.scheduler.next_runs()
        upcoming = sorted((runs.get(n) or now, n) for n in engine.secrets)
        parts = [*role, f"{len(engine.secrets)} secrets", f"{len(active)} rotating"]
        drifted = sorted({d.secret for d in engine.journal.drift_all() if d.secret in engine.secrets})
        if drifted:
            parts.append(f"{len(drifted)} drifted, paused ({', '.join(drifted[:3])})")
        if failing:
            parts.append(f"{len(failing)} failing ({failing[0].secret}: {failing[0].error})")
        if upcoming:
            when, name = upcoming[0]
            parts.append(f"next: {name} at {format_ts(when)}")
        return "; ".join(parts)

    def _role_status(self) -> list[str]:
        lead = self.leadership
        if lead is None or not lead.multi:
            return []
        if lead.may_act():
            return [f"leader {lead.instance} (epoch {lead.epoch})"]
        return [f"standby {lead.instance} (leader: {lead.leader_name() or 'none'})"]

    async def _watchdog(self) -> None:
        period = watchdog_period()
        if period is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(period)

    async def _reload(self) -> None:
        self.notifier.reloading()
        log.info("reloading configuration", extra={"config": str(self.config_path)})
        try:
            new = load_settings(self.config_path)
            problems = check_references(new, self.config_path)
            if problems:
                raise ConfigError(problems)
            old = self.settings.daemon
            if (new.daemon.state_dir, new.daemon.database_url, new.daemon.socket_path) != (
                old.state_dir,
                old.database_url,
                old.socket_path,
            ):
                raise ConfigError("daemon.state_dir, state_url and control_socket cannot change on reload; restart")
            if new.daemon.metrics != old.metrics:
                raise ConfigError("daemon.metrics cannot change on reload; restart")
            lease = ("instance", "lease_ttl", "lease_renew_every")
            if any(getattr(new.daemon, k) != getattr(old, k) for k in lease):
                raise ConfigError("daemon.instance_name, lease_ttl and lease_renew cannot change on reload; restart")
            assert self._loop is not None
            runtime = await self._loop.run_in_executor(
                None,
                lambda: build_runtime(
                    new, journal=self.runtime.journal, locks=self._locks, should_stop=self._should_stop
                ),
            )
        except ConfigError as exc:
            log.error("reload refused: the running configuration stays in force", extra={"problems": exc.problems})
            self.notifier.ready(self._status_line())
            return
        await self._stop_notifier()
        old_runtime, self._runtime, self.settings = self.runtime, runtime, new
        self._observe()
        old_runtime.close_connections()
        self._start_notifier()
        setup_logging(new.daemon.log_level)
        self._arm_all(startup=False)
        log.info("configuration reloaded", extra={"secrets": len(new.secrets)})
        self.notifier.ready(self._status_line())
