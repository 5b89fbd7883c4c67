"""What the daemon serves over HTTP (``daemon.metrics``): ``/metrics``, ``/healthz``, ``/healthz/live``.

``/healthz`` is readiness: 200 once the daemon has resumed its rotations and serves requests
and the state database answers; 503 while starting, while stopping, or when the database does
not answer.  ``/healthz/live`` is liveness: 200 whenever the event loop answers at all (a wedged
loop answers nothing, which is what a liveness probe must see).  Both reply with JSON:
``{"status": ..., "role": "single" | "leader" | "standby", ...}``.  A standby is ready: it is
healthy and able to take over.

The listener is bound before the daemon does anything else, so an address already in use
stops the start with nothing changed (ListenError, exit 69).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select

from ..config.model import DaemonSettings
from ..errors import ListenError

if TYPE_CHECKING:
    from ..metrics import Metrics, RoleProvider, RuntimeProvider
    from .http import HttpServer
    from .runtime import Runtime

__all__ = ["DB_CHECK_TIMEOUT", "HttpEndpoint", "open_endpoint"]

log = logging.getLogger("rotatord.http")

#: The readiness probe waits this long (seconds) for the state database.
DB_CHECK_TIMEOUT = 5.0
#: Daemon phase as /healthz reports it: starting -> ready -> stopping.
PhaseProvider = Callable[[], str]


class HttpEndpoint:
    """The running listener and the metrics registry it serves."""

    def __init__(self, server: HttpServer, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics

    def observe(self, runtime: Runtime) -> None:
        """Count failed steps and webhook attempts (call again for the runtime a reload builds)."""
        runtime.engine.on_failure = self.metrics.record_failure
        if runtime.notifier is not None:
            runtime.notifier.on_attempt = self.metrics.record_attempt

    async def close(self) -> None:
        await self.server.close()


async def open_endpoint(
    daemon: DaemonSettings, *, runtime: RuntimeProvider, role: RoleProvider, phase: PhaseProvider
) -> HttpEndpoint | None:
    """Bind ``daemon.metrics`` and serve the routes above; None when it is "off".

    Raises ListenError (naming ``daemon.metrics``) when the address cannot be bound.
    """
    address = daemon.metrics_address
    if address is None:
        return None
    # prometheus_client and aiohttp's server are loaded only when the endpoint is on.
    from ..metrics import Metrics
    from .http import HttpServer, json_response

    metrics = Metrics(runtime, role=role, ready=lambda: phase() == "ready")
    server = HttpServer()
    loop = asyncio.get_running_loop()

    async def scrape(_body: bytes, _peer: str) -> tuple[int, bytes, str]:
        text, content_type = await loop.run_in_executor(None, metrics.render)
        return 200, text, content_type

    async def live(_body: bytes, _peer: str) -> tuple[int, bytes, str]:
        return json_response(200, {"status": "alive", "role": role()})

    async def ready(_body: bytes, _peer: str) -> tuple[int, bytes, str]:
        state = phase()
        if state != "ready":
            return json_response(503, {"status": state, "role": role(), "ready": False})
        problem = await _database_problem(loop, runtime)
        if problem is not None:
            return json_response(503, {"status": "unavailable", "role": role(), "ready": False, "state_db": problem})
        return json_response(200, {"status": "ok", "role": role(), "ready": True, "state_db": "ok"})

    server.add_route("GET", "/metrics", scrape)
    server.add_route("GET", "/healthz", ready)
    server.add_route("GET", "/healthz/live", live)
    host, port = address
    try:
        await server.start(host, port, setting="daemon.metrics")
    except ListenError as exc:
        raise ListenError(f'{exc}; free it, or set daemon.metrics to another address or "off"') from None
    if not ipaddress.ip_address(host).is_loopback:
        log.warning(
            "metrics and health are served beyond this host, without authentication",
            extra={"address": daemon.metrics},
        )
    log.info("serving metrics and health", extra={"address": daemon.metrics})
    return HttpEndpoint(server, metrics)


async def _database_problem(loop: asyncio.AbstractEventLoop, runtime: RuntimeProvider) -> str | None:
    """None when the state database answers a trivial query in time, else what went wrong."""
    current = runtime()
    if current is None:
        return "not open"
    journal = current.journal

    def ping() -> None:
        with journal.transaction() as conn:
            conn.execute(select(1))

    try:
        await asyncio.wait_for(loop.run_in_executor(None, ping), DB_CHECK_TIMEOUT)
    except TimeoutError:
        return f"no answer within {DB_CHECK_TIMEOUT:g}s"
    except Exception as exc:  # the probe reports any failure; the details go to the log only
        log.warning("readiness: the state database does not answer", extra={"error": str(exc)})
        return "error"
    return None
