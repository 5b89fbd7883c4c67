"""Example bot: a bare ASGI app (no framework) that receives rotatord's webhooks.

The same bot as ``wsgi_bot.py`` for asyncio services: it verifies each request with its signing
secret, re-reads its key ring in a worker thread (``asyncio.to_thread``: the backend read is
blocking I/O and must not stall the event loop), and only then answers 2xx, the
acknowledgement rotatord waits for before promoting a staged key.

``make_app(handler)`` is the ASGI callable: mount it in any ASGI server or framework.  Run
standalone it serves with uvicorn (``pip install uvicorn``)::

    python examples/asgi_bot.py --port 8080 \\
        --directory /var/lib/rotatord/secrets --master-key-file /etc/rotatord/master.key \\
        --signing-secret bots/support-bot/webhook --keyring support-bot-db=bots/support-bot/db-key
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from rotatord.client import (
    WebhookHandler,
)
from rotatord.errors import RotatordError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # wsgi_bot.py, next to this file
import wsgi_bot

#: rotatord's payloads are a few hundred bytes; anything past this is not one of them.
MAX_BODY = 64 * 1024

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]


def make_app(handler: WebhookHandler, *, max_body: int = MAX_BODY) -> ASGIApp:
    """An ASGI app answering each POST with ``handler.handle(body, headers)``'s status."""

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not ours; the server closes the connection
        if scope.get("method") != "POST":
            await _answer(send, 405)
            return
        # Header names arrive lower-cased as bytes; a repeated header keeps its first value.
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", []):
            headers.setdefault(bytes(raw_name).decode("latin-1").lower(), bytes(raw_value).decode("latin-1"))
        announced = headers.get("content-length", "")
        if announced and (not announced.isdigit() or int(announced) > max_body):
            await _answer(send, 413 if announced.isdigit() else 400)
            return
        try:
            body = await _read_body(receive, max_body)
        except _Disconnected:
            return  # the client went away: there is no one to answer
        if body is None:
            await _answer(send, 413)
            return
        status = await asyncio.to_thread(handler.handle, body, headers)
        await _answer(send, status)

    return app


async def _read_body(receive: Receive, max_body: int) -> bytes | None:
    """The exact body bytes, or None past ``max_body``.  Raises ``_Disconnected``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > max_body:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before sending its whole body."""


async def _answer(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- the command line: the same arguments and handler as wsgi_bot.py --------------------------------


def parser() -> argparse.ArgumentParser:
    return wsgi_bot.parser(prog="asgi_bot.py", description=__doc__)


def build_handler(args: argparse.Namespace) -> WebhookHandler:
    return wsgi_bot.build_handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import uvicorn  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("asgi_bot.py: serving needs an ASGI server: pip install uvicorn", file=sys.stderr)
        return 69  # EX_UNAVAILABLE
    try:
        handler = build_handler(args)
    except RotatordError as exc:
        print(f"asgi_bot.py: {exc}", file=sys.stderr)
        return exc.exit_code
    uvicorn.run(make_app(handler), host=args.host, port=args.port, lifespan="on")
    return 0


if __name__ == "__main__":
    sys.exit(main())
