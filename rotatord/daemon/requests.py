"""The daemon's answers to control-socket requests (rotatord.daemon.protocol): status and
history for anyone with access to the socket; rotate, rollback, adopt, reencrypt, census and
replay only on the instance that may act (a standby refuses them, naming the leader)."""

from __future__ import annotations

import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..engine.report import census_report, history_report, secret_status
from ..errors import UnknownSecret, UsageError
from ..timeutil import format_ts, parse_ts
from .protocol import Request
from .reports import RevokedUseRecorder

if TYPE_CHECKING:
    from .service import Daemon

__all__ = ["LEADER_OPS", "ControlRequests"]

#: Control ops a standby refuses (naming the leader): they change state or act on stores.
LEADER_OPS = frozenset({"rotate", "rollback", "reencrypt", "census", "webhooks.replay"})


class ControlRequests:
    """Answers one daemon's control requests; blocking work runs on the loop's executor."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def handle(self, request: Request, actor: str) -> Any:
        assert self._daemon._loop is not None
        if request.op == "ping":
            lead = self._daemon.leadership
            return {
                "pid": os.getpid(),
                "secrets": len(self._daemon.runtime.engine.secrets),
                "role": self._daemon.role(),
                "instance": lead.instance if lead is not None else None,
                "leader": lead.leader_name() if lead is not None else None,
            }
        if request.op in LEADER_OPS and self._daemon.leadership is not None:
            self._daemon.leadership.require_leader(request.op)
        if request.op == "reload":
            await self._daemon._reload()
            return {"reloaded": True}
        if request.op in ("webhooks.list", "webhooks.replay"):
            return await self._daemon._loop.run_in_executor(None, self._webhooks_guarded, request)
        if request.op == "report.revoked_use":
            recorder = self.revoked_use_recorder()
            assert recorder is not None  # the control socket serves only while the runtime exists
            return await recorder.submit(request.report, actor)
        return await self._daemon._loop.run_in_executor(None, self._handle_blocking, request, actor)

    def _handle_blocking(self, request: Request, actor: str) -> Any:
        if request.op not in LEADER_OPS:
            return self._handle_working(request, actor)
        with self._daemon._working():
            if self._daemon.leadership is not None:
                self._daemon.leadership.require_leader(request.op)  # again: the role may have changed meanwhile
            return self._handle_working(request, actor)

    def _handle_working(self, request: Request, actor: str) -> Any:
        engine = self._daemon.runtime.engine
        now = self._daemon.clock.now()
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
            self._daemon._tick(request.name)
            return result
        if request.op == "rotate":
            rot = engine.rotate(
                request.name, trigger=actor, emergency=request.emergency, reason=request.reason, now=now
            )
        elif request.op == "rollback":
            rot = engine.rollback(request.name, trigger=actor, reason=request.reason, now=now)
        elif request.op == "adopt":
            adopted = engine.adopt(request.name, actor=actor, reason=request.reason, now=now)
            self._daemon._arm(request.name, now)  # a rotation the drift paused resumes now
            return {**adopted, "status": self._status_of(request.name, self._daemon.clock.now())}
        else:  # parse_request admits no other op
            raise AssertionError(request.op)
        self._daemon._arm(request.name, engine.next_due(request.name, now) if not rot.active else now)
        self._daemon._tick(request.name)
        return self._status_of(request.name, self._daemon.clock.now())

    def _webhooks_guarded(self, request: Request) -> Any:
        if request.op not in LEADER_OPS:
            return self._webhooks(request)
        with self._daemon._working():
            if self._daemon.leadership is not None:
                self._daemon.leadership.require_leader(request.op)
            return self._webhooks(request)

    def _webhooks(self, request: Request) -> Any:
        notifier = self._daemon.runtime.notifier
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
        self._daemon._changed_threadsafe("")
        return {"replayed": count}

    def revoked_use_recorder(self) -> RevokedUseRecorder | None:
        """A recorder over the current runtime (so a reload applies at once); None before it exists.
        Reports are still taken while stopping: the runtime stays open until every server closed."""
        if self._daemon._runtime is None:
            return None
        from ..document import Document
        from ..engine.revoked_use import RevokedUseStore

        runtime = self._daemon.runtime
        engine = runtime.engine

        def read_document(name: str) -> Document | None:
            secret = engine.setting(name)
            current = engine.backends[secret.backend].read(secret.path)
            return None if current is None else current.document

        return RevokedUseRecorder(
            RevokedUseStore(runtime.journal), runtime.audit, engine.secrets,
            runtime.settings.notify.security_consumers, self._daemon.clock,
            lambda: self._daemon._changed_threadsafe(""), read_document,
        )  # fmt: skip

    def _status_of(self, name: str, now: datetime) -> dict[str, Any]:
        status = secret_status(self._daemon.runtime.engine, name, now)
        status["scheduled_at"] = format_ts(self._daemon.scheduler.next_run(name))
        return status
