"""A small HTTP/1.1 server inside the daemon's event loop, with a route table.

It serves what rotatord exposes over HTTP (``/metrics``, ``/healthz``; see
:mod:`rotatord.daemon.endpoint`); other parts add routes with :meth:`HttpServer.add_route`, at
any time, including after :meth:`HttpServer.start`.  A handler receives the request body (at
most ``max_body`` bytes; larger requests are answered 413 before the handler runs) and the
peer address, and returns (status, body, content type).  Handlers run on the event loop: one
that blocks (a database, a backend) must hand the work to a thread.

aiohttp's server side is used here only; its client is imported only by notify.delivery.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ListenError

__all__ = ["MAX_BODY", "Handler", "HttpServer", "json_response"]

log = logging.getLogger("rotatord.http")

#: (body, peer address) -> (status, body, content type).
Handler = Callable[[bytes, str], Awaitable[tuple[int, bytes, str]]]
#: Request bodies above this are refused with 413 (no route here needs more).
MAX_BODY = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def json_response(status: int, payload: dict[str, Any]) -> tuple[int, bytes, str]:
    """A handler's reply carrying ``payload`` as JSON."""
    return status, json.dumps(payload, sort_keys=True).encode() + b"\n", "application/json"


class HttpServer:
    """Routes by exact (method, path); answers 404 / 405 / 413 / 500 itself."""

    def __init__(self, *, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._routes: dict[str, dict[str, Handler]] = {}
        self._runner: web.AppRunner | None = None
        self._address: tuple[str, int] | None = None

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method`` (GET, POST, ...) on ``path`` (exact, no query) with ``handler``.

        Raises ValueError if the route is already taken or the path does not start with '/'.
        """
        method = method.upper()
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        methods = self._routes.setdefault(path, {})
        if method in methods:
            raise ValueError(f"route {method} {path} is already served")
        methods[method] = handler

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) listened on once started (the real port when 0 was asked for)."""
        return self._address

    async def start(self, host: str, port: int, *, setting: str = "address") -> None:
        """Listen on ``host:port``.  Raises ListenError naming ``setting`` when the address is in
        use, not local, or not permitted; nothing is left listening then."""
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=64)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(f"{setting}: cannot listen on {_join(host, port)}: {_why(exc)}") from None
        self._runner = runner
        bound = runner.addresses
        self._address = (str(bound[0][0]), int(bound[0][1])) if bound else (host, port)

    async def close(self) -> None:
        """Stop listening and close open connections.  Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        methods = self._routes.get(request.path)
        if methods is None:
            return _plain(404, "not found")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            return _plain(405, "method not allowed", headers={"Allow": ", ".join(sorted(methods))})
        body = b""
        if request.method in _BODY_METHODS:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                return _plain(413, f"request body larger than {self.max_body} bytes")
        peer = request.remote or "unknown"
        try:
            status, payload, content_type = await handler(body, peer)
        except Exception:  # a handler's bug answers 500 and is logged; the server goes on
            log.exception("HTTP handler failed", extra={"method": request.method, "path": request.path})
            return _plain(500, "internal error")
        response = web.Response(status=status, body=payload)
        response.headers["Content-Type"] = content_type
        response.headers["Cache-Control"] = "no-store"
        return response


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available (not an address of this host)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (ports below 1024 need privileges rotatord does not have)"
    return exc.strerror or type(exc).__name__
