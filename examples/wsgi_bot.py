"""Example bot: a plain WSGI app (stdlib ``wsgiref``) that receives rotatord's webhooks.

rotatord tells the bot, by signed webhook, that a key was staged, promoted or retired (or a
token issued or revoked), and where to read it.  The bot verifies the request with its signing
secret, re-reads its key ring, and only then answers 2xx: that answer is the acknowledgement
rotatord waits for before it promotes a staged key.  No secret travels in the webhook.

Run it against a file backend (the daemon's default)::

    python examples/wsgi_bot.py --port 8080 \\
        --directory /var/lib/rotatord/secrets --master-key-file /etc/rotatord/master.key \\
        --signing-secret bots/support-bot/webhook --signing-secret-name support-bot-webhook \\
        --keyring support-bot-db=bots/support-bot/db-key

or against OpenBao / Vault (``--backend vault --address ... --token-file ...``), and point the
consumer's ``url`` in rotatord's configuration at ``http://HOST:PORT/``.  ``make_app(handler)``
is the WSGI callable; serve it with any WSGI server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.simple_server import make_server as _wsgiref_server

from rotatord.client import (
    DocumentReader,
    FileReader,
    Keyring,
    SigningSecrets,
    TokenSet,
    WebhookEvent,
    WebhookHandler,
)
from rotatord.errors import RotatordError

#: rotatord's payloads are a few hundred bytes; anything past this is not one of them.
MAX_BODY = 64 * 1024

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(handler: WebhookHandler, *, max_body: int = MAX_BODY) -> WSGIApp:
    """A WSGI app answering each POST with ``handler.handle(body, headers)``'s status."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def answer(status: int) -> list[bytes]:
            start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Length", "0")])
            return []

        if environ.get("REQUEST_METHOD") != "POST":
            return answer(405)
        length_text = environ.get("CONTENT_LENGTH") or ""
        if not length_text:
            return answer(411)  # chunked bodies are not something rotatord sends
        if not (length_text.isascii() and length_text.isdigit()):
            return answer(400)
        length = int(length_text)
        if length > max_body:
            return answer(413)
        body = _read_exactly(environ["wsgi.input"], length)
        if body is None:
            return answer(400)  # the client sent less than it announced
        # The exact bytes received: the signature covers them, not any re-encoding of them.
        return answer(handler.handle(body, _headers(environ)))

    return app


def _read_exactly(stream: Any, length: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = length
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    """Request headers from the WSGI environ (``HTTP_WEBHOOK_ID`` -> ``webhook-id``)."""
    headers = {
        key[5:].replace("_", "-").lower(): str(value) for key, value in environ.items() if key.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = str(environ["CONTENT_TYPE"])
    return headers


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow backend read for one request must not hold up the next one.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the app's own log lines say what happened; skip one access line per request


def make_server(app: WSGIApp, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = False) -> WSGIServer:
    """A threading wsgiref server for ``app`` (``port`` 0 picks a free one: ``server.server_port``)."""
    handler_class = _QuietHandler if quiet else WSGIRequestHandler
    return _wsgiref_server(host, port, app, server_class=_ThreadingServer, handler_class=handler_class)


# -- the command line --------------------------------------------------------------------------


def _pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parser(prog: str = "wsgi_bot.py", description: str | None = __doc__) -> argparse.ArgumentParser:
    """The bot's arguments; asgi_bot.py uses the same ones."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument("--backend", choices=("file", "vault"), default="file", help="where rotatord publishes")
    files = p.add_argument_group("file backend")
    files.add_argument("--directory", help="the file backend's directory")
    files.add_argument("--master-key-file", help="the file backend's master key")
    files.add_argument("--master-key-credential", help="or: its name under $CREDENTIALS_DIRECTORY")
    vault = p.add_argument_group("vault backend (OpenBao / HashiCorp Vault, KV v2)")
    vault.add_argument("--address", default=os.environ.get("VAULT_ADDR", "http://127.0.0.1:8200"))
    vault.add_argument("--mount", default="secret")
    vault.add_argument("--token-file", help="a file holding the bot's token (default: $VAULT_TOKEN)")
    names = p.add_argument_group("secrets")
    names.add_argument("--signing-secret", required=True, metavar="PATH", help="path of the bot's webhook_secret")
    names.add_argument("--signing-secret-name", metavar="NAME", help="its managed-secret name (re-read on token.*)")
    names.add_argument("--keyring", type=_pair, action="append", default=[], metavar="NAME=PATH", help="repeatable")
    names.add_argument("--token-set", type=_pair, action="append", default=[], metavar="NAME=PATH", help="repeatable")
    names.add_argument("--ttl", type=float, default=60.0, help="seconds a read document is used (default: 60)")
    return p


def reader_factory(args: argparse.Namespace) -> Callable[[str], DocumentReader]:
    """A function making a reader for a backend path, from the backend arguments."""
    if args.backend == "vault":
        from rotatord.client import VaultReader  # imports hvac: only bots on Vault need it

        return lambda path: VaultReader(args.address, path, mount=args.mount, token_file=args.token_file)
    if not args.directory:
        raise SystemExit("--directory is required with --backend file")
    return lambda path: FileReader(
        args.directory, path, master_key_file=args.master_key_file, master_key_credential=args.master_key_credential
    )


def build_handler(args: argparse.Namespace) -> WebhookHandler:
    read = reader_factory(args)
    keyrings = {name: Keyring(read(path), ttl=args.ttl) for name, path in args.keyring}
    token_sets = {name: TokenSet(read(path), ttl=args.ttl) for name, path in args.token_set}

    def on_event(event: WebhookEvent) -> None:
        ring = keyrings.get(event.secret)
        held = f"; keys {','.join(ring.key_ids)}" if ring is not None else ""
        print(f"{event.type} {event.secret} version {event.version}{held}", flush=True)

    return WebhookHandler(
        SigningSecrets(read(args.signing_secret), ttl=args.ttl),
        keyrings,
        token_sets,
        on_event=on_event,
        signing_secret=args.signing_secret_name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        handler = build_handler(args)
    except RotatordError as exc:
        print(f"wsgi_bot.py: {exc}", file=sys.stderr)
        return exc.exit_code
    with make_server(make_app(handler), args.host, args.port) as server:
        print(f"listening on http://{args.host}:{server.server_port}/", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
