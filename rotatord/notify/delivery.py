"""HTTP delivery of signed webhooks with aiohttp: the only module that imports it.

One :class:`Sender` holds one ``ClientSession`` for many deliveries.  Its connector resolves
names through :class:`CheckingResolver`, which returns only the addresses the
:class:`~rotatord.notify.ssrf.TargetPolicy` admits, so the socket connects to a checked address
(a name re-bound after the check cannot redirect it) while TLS still verifies the certificate
against the host name.  Literal addresses skip aiohttp's resolver, so :meth:`Sender.post` checks
them itself first.

Each response is classified without keeping it: 2xx delivered; 410 disables the endpoint; 429,
502, 503 and 504 are throttling (``retry-after`` honoured up to :data:`RETRY_AFTER_CAP`); every
other status, a redirect (never followed), a timeout or a connection error is a failure to
retry.  At most :data:`READ_CAP` bytes of a body are read (to let the connection be reused) and
then dropped: a body is never stored, logged or echoed, so a receiver cannot use rotatord as an
oracle for what it fetched.  aiohttp's exceptions stop here, turned into a short summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from .ssrf import TargetPolicy, TargetRefused

__all__ = ["READ_CAP", "RETRY_AFTER_CAP", "CheckingResolver", "Outcome", "Sender", "classify", "tls_context"]

#: Bytes of a response body read (then discarded) so a keep-alive connection can be reused.
READ_CAP = 4096
#: The longest ``retry-after`` honoured, in seconds; a receiver cannot park a delivery for days.
RETRY_AFTER_CAP = 3600.0
THROTTLE_STATUSES = frozenset({429, 502, 503, 504})
USER_AGENT = "rotatord-webhooks/1"
Verdict = Literal["delivered", "retry", "disabled"]


@dataclass(frozen=True)
class Outcome:
    """How one attempt went.  ``summary`` is short, fixed-form text (status or error class),
    never a response body; ``retry_after`` is in seconds, already capped."""

    verdict: Verdict
    summary: str
    status: int | None = None
    retry_after: float | None = None


class CheckingResolver(AbstractResolver):
    """An aiohttp resolver that returns only addresses :class:`TargetPolicy` admits.

    Raises :class:`TargetRefused` (an ``OSError``, which aiohttp wraps in
    ``ClientConnectorDNSError``) when none is; the caller sees it as a refused attempt.
    """

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        checked = await self.policy.resolve(host, port, family)
        return [
            ResolveResult(
                hostname=host,
                host=item.address,
                port=item.port,
                family=item.family,
                proto=socket.IPPROTO_TCP,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for item in checked
        ]

    async def close(self) -> None:
        return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``retry-after`` header (delta-seconds or an HTTP date), capped; else None."""
    if not value:
        return None
    text = value.strip()
    seconds: float
    if text.isdigit():
        seconds = float(text)
    else:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


def classify(status: int, retry_after: str | None) -> Outcome:
    """The verdict for an HTTP status (exposed for tests and the bench)."""
    if 200 <= status < 300:
        return Outcome("delivered", f"HTTP {status}", status)
    if status == 410:
        return Outcome("disabled", "HTTP 410 Gone: endpoint disabled until replayed", status)
    if 300 <= status < 400:
        return Outcome("retry", f"HTTP {status}: redirects are not followed (update the URL)", status)
    if status in THROTTLE_STATUSES:
        return Outcome("retry", f"HTTP {status}", status, _retry_after(retry_after))
    return Outcome("retry", f"HTTP {status}", status)


def _failure(exc: BaseException, timeout: float) -> Outcome:
    """A short, fixed-form description of a failed attempt (no URL parts, no body)."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Outcome("retry", f"timed out after {timeout:g}s")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return Outcome("retry", "TLS certificate verification failed")
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, TargetRefused):
            return Outcome("retry", str(cause))
        if isinstance(cause, socket.gaierror) or isinstance(exc, aiohttp.ClientConnectorDNSError):
            return Outcome("retry", "DNS lookup failed")
        if isinstance(exc, aiohttp.ClientSSLError):
            return Outcome("retry", "TLS handshake failed")
        reason = cause.strerror if cause is not None and cause.strerror else type(cause).__name__
        return Outcome("retry", f"connection failed: {reason}")
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return Outcome("retry", "TLS handshake failed")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Outcome("retry", "server closed the connection without a response")
    if isinstance(exc, aiohttp.InvalidURL):
        return Outcome("retry", "invalid URL")
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return Outcome("retry", "invalid HTTP response")
    return Outcome("retry", f"request failed: {type(exc).__name__}")


def tls_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Certificate and host name verification on, against ``ca_bundle`` or the system store.
    Building one reads the whole store, so a worker builds it once and reuses it."""
    return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)


class Sender:
    """One session for many webhook POSTs.  Use ``async with Sender(...) as sender`` inside the
    event loop that sends; it is not shared between loops.

    ``concurrency`` bounds open connections (the connector's limit); callers bound requests in
    flight themselves.  TLS verification is always on (see :func:`tls_context`).
    Environment proxies are ignored (``trust_env=False``): a proxy would make the address check
    meaningless.
    """

    def __init__(self, policy: TargetPolicy, *, concurrency: int, tls: ssl.SSLContext | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.policy = policy
        self.concurrency = concurrency
        self.tls = tls or tls_context(None)
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def __aenter__(self) -> Sender:
        connector = aiohttp.TCPConnector(
            limit=self.concurrency,
            limit_per_host=0,
            resolver=CheckingResolver(self.policy),
            ssl=self.tls,
            ttl_dns_cache=10,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            headers={"user-agent": USER_AGENT},
            skip_auto_headers=("accept-encoding",),
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def post(self, url: str, headers: Mapping[str, str], body: bytes, timeout: float) -> Outcome:
        """POST ``body`` to ``url`` once; never raises for anything the target or network does."""
        if self._session is None:
            raise RuntimeError("Sender used outside 'async with'")
        problem = self.policy.target_problem(url)
        if problem is not None:
            return Outcome("retry", f"refused by notify.allow: {problem}")
        try:
            async with self._session.post(
                url,
                data=body,
                headers=headers,  # aiohttp copies them into its own multidict
                allow_redirects=False,
                timeout=self._timeout(timeout),
            ) as response:
                # The status line decided; an unfinished body changes nothing.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await response.content.read(READ_CAP)
                return classify(response.status, response.headers.get("retry-after"))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return _failure(exc, timeout)
