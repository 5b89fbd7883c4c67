"""``rotatord run``: lock -> resume -> schedule -> serve -> wait for a signal.

The asyncio loop owns the control socket, signals and the watchdog; rotation steps run on the
scheduler's worker threads (they block on backends and databases), so a slow backend never
delays a watchdog ping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..config import Settings, check_references, load_settings
from ..engine.policy import next_rotation_due
from ..engine.report import census_report, history_report, secret_status
from ..errors import ConfigError, RotatordError, UnknownSecret, UsageError
from ..logs import setup_logging
from ..schedule import JobScheduler
from ..timeutil import Clock, SystemClock, format_ts, parse_ts
from .control import ControlServer
from .endpoint import HttpEndpoint, open_endpoint
from .lock import StateLock
from .protocol import Request
from .reports import RevokedUseRecorder, handle_revoked_use, install
from .runtime import Runtime, build_runtime
from .systemd import Notifier, listen_fds, watchdog_period

__all__ = ["Daemon"]

log = logging.getLogger("rotatord.daemon")
ERROR_RETRY = timedelta(minutes=1)
STATUS_INTERVAL = 1.0
#: How often the daemon re-checks the schedule: wall-clock jumps, secrets left with nothing armed.
SWEEP_INTERVAL = 10.0
#: A difference between wall-clock and monotonic progress above this is logged as a clock jump.
CLOCK_JUMP_SECONDS = 2.0
#: The scheduler key of the periodic drift check (":" cannot start a secret name).
DRIFT_JOB = ":drift-check"
DRIFT_FIRST_DELAY = timedelta(seconds=30)
#: Where bots POST their reports of revoked credentials (on the metrics listener, loopback by default).
REVOKED_USE_PATH = "/v1/revoked-use"


class Daemon:
    def __init__(
        self,
        config_path: Path,
        settings: Settings,
        clock: Clock | None = None,
        role: Callable[[], str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.clock = clock or SystemClock()
        self.notifier = Notifier()
        self.scheduler = JobScheduler()
        self.control = ControlServer(self._handle)
        self._locks: dict[str, threading.RLock] = {}
        self._ticking: set[str] = set()
        self._ticking_lock = threading.Lock()
        self._runtime: Runtime | None = None
        self._stopping = False
        self._last_status = ""
        self._status_pending = False
        self._notify_wake = asyncio.Event()
        self._notify_stop = asyncio.Event()
        self._notify_task: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        #: "single", or "leader" / "standby" with several instances (shown by metrics and /healthz).
        self.role: Callable[[], str] = role or (lambda: "single")
        self.http: HttpEndpoint | None = None
        self._ready = False

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
        try:
            # Bound first: an address in use stops the start before anything has been done.
            # self.role is read at each call, so a role provider set after construction counts.
            role = lambda: self.role()  # noqa: E731, PLW0108
            self.http = await open_endpoint(daemon, runtime=lambda: self._runtime, role=role, phase=self._phase)
            self._runtime = build_runtime(self.settings, locks=self._locks, should_stop=lambda: self._stopping)
            self._observe()
            install(self._revoked_use_recorder)
            if self.http is not None:
                # Bots report a revoked or retired credential still presented to them (rotatord.client).
                self.http.server.add_route("POST", REVOKED_USE_PATH, handle_revoked_use)
            self.notifier.status("resuming unfinished rotations")
            resumed = await self._loop.run_in_executor(None, self._resume)
            fds = listen_fds()
            await self.control.start(
                path=daemon.socket_path,
                mode=daemon.socket_mode_int,
                group=daemon.socket_group,
                inherited_fd=fds.get("control"),
            )
            # Every job is armed before the scheduler starts: with 1,000 secrets due at once, the
            # first runs would otherwise compete with the arming of the rest for the GIL.
            self._arm_all(startup=True)
            # The first sweep waits a little: reading every secret competes with the start-up
            # (each step checks its own secret for drift before acting anyway).
            self._arm_drift(self.clock.now() + min(self.settings.daemon.drift_check_interval, DRIFT_FIRST_DELAY))
            self.scheduler.start()
            for sig, handler in ((signal.SIGTERM, self._stop.set), (signal.SIGINT, self._stop.set)):
                self._loop.add_signal_handler(sig, handler)
            self._loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
            self.notifier.ready(self._status_line())
            self._ready = True
            log.info(
                "rotatord ready",
                extra={"secrets": len(self.settings.secrets), "resumed": resumed, "socket": str(daemon.socket_path)},
            )
            watchdog = asyncio.ensure_future(self._watchdog())
            sweep = asyncio.ensure_future(self._sweep())
            self._start_notifier()
            await self._stop.wait()
            self._stopping = True
            self.notifier.stopping("stopping: finishing the steps in flight")
            log.info("stopping: waiting for steps in flight")
            watchdog.cancel()
            sweep.cancel()
            await self._stop_notifier()
            await self.control.close()
            await self._close_http()
            await self._loop.run_in_executor(None, self.scheduler.shutdown)
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
        if not self._stopping:
            self.scheduler.arm(name, when, lambda: self._tick(name))

    def _arm_drift(self, when: datetime) -> None:
        if not self._stopping:
            self.scheduler.arm(DRIFT_JOB, when, self._drift_sweep)

    def _drift_sweep(self) -> None:
        """Compare every managed secret with its baseline; one failing backend does not stop the rest."""
        engine = self.runtime.engine
        for name in list(engine.secrets):
            if self._stopping:
                return
            try:
                engine.check_drift(name, self.clock.now())
            except RotatordError as exc:
                log.warning("drift check failed; tried again next time", extra={"secret": name, "error": str(exc)})
            except Exception:
                log.exception("drift check failed", extra={"secret": name})
        self._changed_threadsafe("")
        self._arm_drift(self.clock.now() + self.settings.daemon.drift_check_interval)

    def _tick(self, name: str, rearm: bool = True) -> None:
        engine = self.runtime.engine
        if name not in engine.secrets:
            return
        with self._ticking_lock:
            self._ticking.add(name)
        try:
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
        finally:
            with self._ticking_lock:
                self._ticking.discard(name)
        self._changed_threadsafe(name)

    async def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: log a jump of the wall clock, re-arm any secret that has no job
        and no run in progress (the schedule must never silently lose a secret), and wake the
        scheduler so that what a jump made due runs now."""
        assert self._loop is not None
        wall, mono = time.time(), time.monotonic()
        while not self._stopping:
            await asyncio.sleep(SWEEP_INTERVAL)
            now_wall, now_mono = time.time(), time.monotonic()
            jump = (now_wall - wall) - (now_mono - mono)
            wall, mono = now_wall, now_mono
            if abs(jump) >= CLOCK_JUMP_SECONDS:
                log.warning("wall clock jumped; re-checking what is due", extra={"jump_seconds": round(jump, 1)})
            if self._stopping:
                return
            await self._loop.run_in_executor(None, self._rearm_missing)
            self.scheduler.wakeup()

    def _rearm_missing(self) -> None:
        engine = self.runtime.engine
        armed = set(self.scheduler.job_ids())
        with self._ticking_lock:
            busy = set(self._ticking)
        missing = [name for name in engine.secrets if name not in armed and name not in busy]
        if not missing:
            return
        latest = engine.journal.latest_all()
        now = self.clock.now()
        for name in missing:
            rot = latest.get(name)
            log.warning("secret had nothing scheduled; re-armed", extra={"secret": name})
            if rot is not None and rot.active:
                self._arm(name, now)
            else:
                self._arm(name, max(now, next_rotation_due(engine.secrets[name], rot.started_at if rot else None, now)))

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
        if notifier is None:
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
        active = [r for r in engine.journal.all_active() if r.secret in engine.secrets]
        failing = [r for r in active if r.error]
        runs = self.scheduler.next_runs()
        upcoming = sorted((runs.get(n) or now, n) for n in engine.secrets)
        parts = [f"{len(engine.secrets)} secrets", f"{len(active)} rotating"]
        drifted = sorted({d.secret for d in engine.journal.drift_all() if d.secret in engine.secrets})
        if drifted:
            parts.append(f"{len(drifted)} drifted, paused ({', '.join(drifted[:3])})")
        if failing:
            parts.append(f"{len(failing)} failing ({failing[0].secret}: {failing[0].error})")
        if upcoming:
            when, name = upcoming[0]
            parts.append(f"next: {name} at {format_ts(when)}")
        return "; ".join(parts)

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
            assert self._loop is not None
            runtime = await self._loop.run_in_executor(
                None,
                lambda: build_runtime(
                    new, journal=self.runtime.journal, locks=self._locks, should_stop=lambda: self._stopping
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

    # -- control requests ------------------------------------------------------------------

    async def _handle(self, request: Request, actor: str) -> Any:
        assert self._loop is not None
        if request.op == "ping":
            return {"pid": os.getpid(), "secrets": len(self.runtime.engine.secrets)}
        if request.op == "reload":
            await self._reload()
            return {"reloaded": True}
        if request.op in ("webhooks.list", "webhooks.replay"):
            return await self._loop.run_in_executor(None, self._webhooks, request)
        if request.op == "report.revoked_use":
            recorder = self._revoked_use_recorder()
            assert recorder is not None  # the control socket serves only while the runtime exists
            return await recorder.submit(request.report, actor)
        return await self._loop.run_in_executor(None, self._handle_blocking, request, actor)

    def _handle_blocking(self, request: Request, actor: str) -> Any:
        engine = self.runtime.engine
        now = self.clock.now()
        if request.op == "status":
            names = [request.name] if request.name else list(engine.secrets)
            return [self._status_of(n, now) for n in names]
        assert request.name is not None
        if request.name not in engine.secrets:
            raise UnknownSecret(request.name)
        if request.op == "history":
            return history_report(engine, request.name)
        if request.op == "census":
            return census_report(engine, request.name, now)
        if request.op == "reencrypt":
            result = engine.reencrypt(request.name, trigger=actor, now=now)
            self._tick(request.name)
            return result
        if request.op == "rotate":
            rot = engine.rotate(
                request.name, trigger=actor, emergency=request.emergency, reason=request.reason, now=now
            )
        elif request.op == "rollback":
            rot = engine.rollback(request.name, trigger=actor, reason=request.reason, now=now)
        elif request.op == "adopt":
            adopted = engine.adopt(request.name, actor=actor, reason=request.reason, now=now)
            self._arm(request.name, now)  # a rotation the drift paused resumes now
            return {**adopted, "status": self._status_of(request.name, self.clock.now())}
        else:  # parse_request admits no other op
            raise AssertionError(request.op)
        self._arm(request.name, engine.next_due(request.name, now) if not rot.active else now)
        self._tick(request.name)
        return self._status_of(request.name, self.clock.now())

    def _webhooks(self, request: Request) -> Any:
        notifier = self.runtime.notifier
        if notifier is None:
            raise UsageError("no consumers are configured, so there are no webhooks")
        from ..notify.outbox import DeliveryFilter

        if request.op == "webhooks.list":
            flt = DeliveryFilter(consumer=request.consumer, status=request.status, webhook_id=request.webhook_id)
            return {
                "deliveries": notifier.list_deliveries(flt),
                "endpoints": notifier.endpoints(),
                "pending": notifier.pending_count(),
            }
        if (request.webhook_id is None) == (request.consumer is None):
            raise UsageError("webhooks replay needs exactly one of --id and --consumer")
        since = parse_ts(request.since) if request.since else None
        count = notifier.replay(request.webhook_id, consumer=request.consumer, since=since)
        self._changed_threadsafe("")
        return {"replayed": count}

    def _revoked_use_recorder(self) -> RevokedUseRecorder | None:
        """A recorder over the current runtime (so a reload applies at once); None before it exists.
        Reports are still taken while stopping: the runtime stays open until every server closed."""
        if self._runtime is None:
            return None
        from ..document import Document
        from ..engine.revoked_use import RevokedUseStore

        runtime = self.runtime
        engine = runtime.engine

        def read_document(name: str) -> Document | None:
            secret = engine.setting(name)
            current = engine.backends[secret.backend].read(secret.path)
            return None if current is None else current.document

        return RevokedUseRecorder(
            RevokedUseStore(runtime.journal), runtime.audit, engine.secrets,
            runtime.settings.notify.security_consumers, self.clock, lambda: self._changed_threadsafe(""),
            read_document,
        )  # fmt: skip

    def _status_of(self, name: str, now: datetime) -> dict[str, Any]:
        status = secret_status(self.runtime.engine, name, now)
        status["scheduled_at"] = format_ts(self.scheduler.next_run(name))
        return status
