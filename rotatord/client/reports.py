"""Reports of a revoked credential still being presented, and a reporter that sends them.

An old token still in use means a forgotten consumer or a thief.  :class:`~rotatord.client.TokenSet`
calls its ``on_revoked_use`` callback with a :class:`RevokedUse` for every revoked token it
refuses; :class:`RevokedUseReporter` is a ready-made callback that POSTs the report as JSON to
the rotatord daemon (``POST /v1/revoked-use`` on its loopback HTTP listener) or to any webhook.

A report carries the secret's name, the credential id when known, the token's fingerprint (the
first hex digits of its SHA-256: enough for the daemon to tell which credential, useless to
anyone else), what the bot says about the caller, and the time; never the token.

The reporter never slows or breaks the bot's request path: reports go to a small bounded queue
(full: the report is dropped and counted) and one daemon thread sends them with a short
timeout, without following redirects; every failure is counted and logged without the body.
Standard library only (urllib), so bots need no HTTP client library.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from ..timeutil import format_ts

__all__ = ["MAX_SOURCE", "RevokedUse", "RevokedUseReporter"]

log = logging.getLogger("rotatord.client")

#: Longest ``source`` a report carries (longer ones are cut).
MAX_SOURCE = 200


@dataclass(frozen=True)
class RevokedUse:
    """One presentation of a revoked credential.  Holds no material: safe to log and to send."""

    secret: str
    fingerprint: str
    state: Literal["revoked", "retired"]
    at: datetime
    #: Who presented it, as the bot knows it: a remote address, a consumer name...
    source: str | None = None
    #: The credential id (``v3``) when the document still names it, else None.
    credential: str | None = None

    def to_json(self) -> dict[str, str]:
        """The report as the daemon's ``/v1/revoked-use`` endpoint accepts it."""
        body = {"secret": self.secret, "fingerprint": self.fingerprint, "state": self.state}
        body["at"] = format_ts(self.at) or ""
        if self.source:
            body["source"] = _clean_source(self.source)
        if self.credential:
            body["credential"] = self.credential
        return body


def _clean_source(source: str) -> str:
    """One printable line of at most MAX_SOURCE characters (it lands in audit records)."""
    return "".join(c if c.isprintable() else "?" for c in source)[:MAX_SOURCE]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        # A redirect could carry the report somewhere the operator did not choose.
        return None


class RevokedUseReporter:
    """A callable for ``TokenSet(on_revoked_use=...)`` that POSTs each report as JSON to ``url``.

    ``url`` is http(s); for the daemon, ``http://127.0.0.1:<port>/v1/revoked-use``.  ``headers``
    are added to every request (e.g. an ``Authorization`` a webhook receiver wants).  At most
    ``queue_size`` reports wait; each request may take ``timeout`` seconds.  ``sent``,
    ``failed`` and ``dropped`` count outcomes.  Calling it never blocks and never raises.
    Raises ValueError at construction for a URL that is not http(s).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        queue_size: int = 100,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the report URL must be http:// or https:// with a host")
        if timeout <= 0 or queue_size < 1:
            raise ValueError("timeout must be positive and queue_size at least 1")
        self.url = url
        self._timeout = timeout
        self._headers = {"content-type": "application/json", **(headers or {})}
        self._queue: queue.Queue[RevokedUse | None] = queue.Queue(maxsize=queue_size)
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def __repr__(self) -> str:
        # The URL's query or userinfo may hold a bot's own credential: show the host only.
        return f"RevokedUseReporter(host={urlsplit(self.url).hostname!r})"

    def __call__(self, report: RevokedUse) -> None:
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="rotatord-revoked-use", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(report)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            log.warning("revoked-use report dropped: the reporter's queue is full", extra={"secret": report.secret})

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds), then stop the thread.  Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)

    def _run(self) -> None:
        while (report := self._queue.get()) is not None:
            ok = self._send(report)
            with self._lock:
                if ok:
                    self.sent += 1
                else:
                    self.failed += 1

    def _send(self, report: RevokedUse) -> bool:
        body = json.dumps(report.to_json(), separators=(",", ":")).encode()
        # The scheme was checked (http/https only) in __init__.
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")  # noqa: S310
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (OSError, ValueError) as exc:
            log.warning(
                "revoked-use report not delivered",
                extra={"secret": report.secret, "error": type(exc).__name__},
            )
            return False
        except Exception:  # the bot's thread must survive whatever urllib raises
            log.exception("revoked-use report failed", extra={"secret": report.secret})
            return False
        if 200 <= status < 300:
            return True
        log.warning("revoked-use report refused", extra={"secret": report.secret, "status": status})
        return False
