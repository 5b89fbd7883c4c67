"""Real webhook receivers for tests: an aiohttp.web server on 127.0.0.1 in a thread of its own.

Each endpoint (a path) has a behaviour (answer these statuses in turn, then this one; wait
before answering; hang until the server stops; redirect) and the signing secrets a bot would
hold.  Every request is recorded and verified on arrival with the ``standardwebhooks`` PyPI
library (not rotatord's code), once per secret, so a test can assert that each request verifies
with each secret the bot holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web
from standardwebhooks import Webhook

__all__ = ["Behaviour", "Received", "ReceiverServer", "receiver_server"]


@dataclass(frozen=True)
class Behaviour:
    """How an endpoint answers.  ``statuses`` are used in order, then ``then`` for ever."""

    statuses: Sequence[int] = ()
    then: int = 204
    delay: float = 0.0
    hang: bool = False
    location: str | None = None
    retry_after: str | None = None
    body: bytes = b""


@dataclass
class Received:
    """One request as it arrived, with the verification result per configured secret."""

    path: str
    headers: dict[str, str]
    body: bytes
    verified: list[bool]
    errors: list[str]
    status: int | None = None
    at: float = field(default_factory=time.monotonic)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def timestamp(self) -> int:
        return int(self.headers.get("webhook-timestamp", "0"))


@dataclass
class _Endpoint:
    behaviour: Behaviour
    secrets: list[str]
    answered: int = 0
    received: list[Received] = field(default_factory=list)


class ReceiverServer:
    """Start with :func:`receiver_server`; add endpoints with :meth:`endpoint`."""

    def __init__(self, port: int = 0) -> None:
        self._endpoints: dict[str, _Endpoint] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receivers", daemon=True)
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        #: 0: any free port; a fixed one lets a test take the receivers down and bring them back.
        self.port = port
        self._active = 0
        #: The most requests any moment saw being handled at once (across endpoints).
        self.max_in_flight = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        async def _stop() -> None:
            assert self._release is not None and self._runner is not None
            self._release.set()
            await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    # -- endpoints -----------------------------------------------------------------------------

    def endpoint(self, name: str, secrets: Sequence[str] = (), behaviour: Behaviour | None = None) -> str:
        """Register ``/name`` and return its URL on 127.0.0.1."""
        with self._lock:
            self._endpoints[f"/{name}"] = _Endpoint(behaviour or Behaviour(), list(secrets))
        return self.url(name)

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{name}"

    def behave(self, name: str, behaviour: Behaviour) -> None:
        with self._lock:
            ep = self._endpoints[f"/{name}"]
            ep.behaviour = behaviour
            ep.answered = 0

    def requests(self, name: str) -> list[Received]:
        with self._lock:
            ep = self._endpoints.get(f"/{name}")
            return list(ep.received) if ep else []

    def all_requests(self) -> list[Received]:
        with self._lock:
            return [r for ep in self._endpoints.values() for r in ep.received]

    def release(self) -> None:
        """Let every hanging handler answer now."""
        assert self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    # -- the handler ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            ep = self._endpoints.get(request.path)
            if ep is None:
                self._endpoints[request.path] = ep = _Endpoint(Behaviour(then=404), [])
            verified, errors = [], []
            for secret in ep.secrets:
                try:
                    Webhook(secret).verify(body, headers)
                    verified.append(True)
                    errors.append("")
                except Exception as exc:  # the library raises ValueError too, for malformed lists
                    verified.append(False)
                    errors.append(f"{type(exc).__name__}: {exc}")
            record = Received(request.path, headers, body, verified, errors)
            ep.received.append(record)
            behaviour = ep.behaviour
            status = behaviour.statuses[ep.answered] if ep.answered < len(behaviour.statuses) else behaviour.then
            ep.answered += 1
            self._active += 1
            self.max_in_flight = max(self.max_in_flight, self._active)
        try:
            if behaviour.hang:
                assert self._release is not None
                await self._release.wait()
            elif behaviour.delay:
                await asyncio.sleep(behaviour.delay)
        finally:
            with self._lock:
                self._active -= 1
        record.status = status
        out_headers = {}
        if behaviour.location and 300 <= status < 400:
            out_headers["location"] = behaviour.location
        if behaviour.retry_after:
            out_headers["retry-after"] = behaviour.retry_after
        return web.Response(status=status, body=behaviour.body, headers=out_headers)


@contextmanager
def receiver_server(port: int = 0) -> Iterator[ReceiverServer]:
    server = ReceiverServer(port)
    server.start()
    try:
        yield server
    finally:
        server.stop()
