"""Verify a rotatord webhook in a bot, and act on it: re-read what changed, then acknowledge.

rotatord signs every notification the Standard Webhooks way: ``webhook-id``,
``webhook-timestamp`` (integer Unix seconds) and ``webhook-signature``, a space-separated list
of ``v1,<base64 HMAC-SHA256>`` entries over ``f"{id}.{timestamp}."`` + the exact body bytes,
keyed with the base64-decoded part of a ``whsec_`` secret.  While the bot's signing secret
rotates, rotatord signs with both secrets, so a bot holding either one verifies the request::

    from rotatord.client import FileReader, Keyring, SigningSecrets, WebhookHandler

    handler = WebhookHandler(SigningSecrets(FileReader(..., "bots/support-bot/webhook")),
                             keyrings={"support-bot-db": Keyring(FileReader(..., "bots/support-bot/db-key"))})
    status = handler.handle(raw_body, request_headers)   # answer the request with this status

A 2xx answer means "I re-read the secret": rotatord promotes a staged key only after every
required consumer acknowledged it.  So :class:`WebhookHandler` answers 2xx only once the key
ring (or token set) it holds shows the event's version, and 503 when it could not read it, so
rotatord retries.  Nothing here logs or raises with a secret or a signature in it.

This module uses the stdlib only (and rotatord's stdlib-only modules).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

from ..crypto.generators import whsec_key
from ..errors import RotatordError
from ..sensitive import Sensitive
from .tokens import SigningSecrets

if TYPE_CHECKING:
    from .keyring import Keyring
    from .tokens import TokenSet

__all__ = ["WebhookEvent", "WebhookHandler", "WebhookVerificationError", "verify_webhook"]

log = logging.getLogger("rotatord.client")

#: Headers rotatord sends, in lower case (the lookup ignores case).
ID_HEADER: Final = "webhook-id"
TIMESTAMP_HEADER: Final = "webhook-timestamp"
SIGNATURE_HEADER: Final = "webhook-signature"
#: A timestamp at or past this is milliseconds (in seconds it would be the year 5138).
_MILLISECONDS_FROM: Final = 10**11
#: More entries than this is not a sender rotating its secret; refuse before hashing.
_MAX_ENTRIES: Final = 32
_DIGEST_SIZE: Final = hashlib.sha256().digest_size

Reason = Literal[
    "missing_headers",
    "malformed_timestamp",
    "timestamp_outside_tolerance",
    "malformed_signature",
    "no_matching_signature",
    "malformed_payload",
]


class WebhookVerificationError(RotatordError):
    """The request is not a rotatord webhook the bot can trust: answer 401 (400 for a payload
    that verified but is not a rotatord event).

    ``reason`` says which check failed, for code; the message says it for people, in general
    terms.  Neither ever contains a secret, a signature or the body.
    """

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason: Reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class WebhookEvent:
    """One verified rotatord notification.  It says where to read the secret, never the secret.

    ``timestamp`` is when the event happened (the payload's ``timestamp``, timezone-aware UTC),
    not when this attempt was sent.  ``data`` is the payload's whole ``data`` object, read-only.
    """

    id: str
    type: str
    timestamp: datetime
    secret: str
    rotation_id: int
    version: int
    phase: str
    backend: str
    path: str
    backend_version: str | None
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)


def _timestamp(text: str, now: float, tolerance: int) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise WebhookVerificationError("malformed_timestamp", "malformed webhook-timestamp header: not Unix seconds")
    sent = int(text)
    if sent >= _MILLISECONDS_FROM:
        raise WebhookVerificationError(
            "malformed_timestamp", "webhook-timestamp looks like milliseconds; it must be Unix seconds"
        )
    if now - sent > tolerance:
        raise WebhookVerificationError("timestamp_outside_tolerance", "timestamp outside tolerance: too old")
    if sent - now > tolerance:
        raise WebhookVerificationError("timestamp_outside_tolerance", "timestamp outside tolerance: too new")
    return sent


def _v1_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` entries of a signature list; other schemes (``v1a``, ...) are skipped.

    The list is exactly what the spec allows: entries ``scheme,value`` separated by one space.
    Anything else (an entry without a comma, two spaces, a v1 value that is not a base64
    SHA-256) makes the whole header malformed: better refused than half-understood.
    """
    entries = header.strip().split(" ")
    if len(entries) > _MAX_ENTRIES:
        raise WebhookVerificationError("malformed_signature", "malformed signature header: too many entries")
    found = []
    for entry in entries:
        scheme, comma, value = entry.partition(",")
        if not comma or not scheme or not value:
            raise WebhookVerificationError("malformed_signature", "malformed signature header")
        if scheme != "v1":
            continue
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise WebhookVerificationError("malformed_signature", "malformed signature header") from None
        if len(raw) != _DIGEST_SIZE:
            raise WebhookVerificationError("malformed_signature", "malformed signature header")
        found.append(raw)
    if not found:
        raise WebhookVerificationError("no_matching_signature", "no matching signature: the header has no v1 entry")
    return found


def verify_webhook(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Sequence[str | Sensitive],
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> WebhookEvent:
    """The event in ``body``, once the request proved it comes from rotatord.

    ``body`` is the exact bytes received (verified before any JSON parsing: re-serialised JSON
    does not verify).  ``headers`` are looked up without regard to case.  ``secrets`` are the
    bot's ``whsec_`` signing secrets (``SigningSecrets.secrets()``): the request is accepted when
    any ``v1`` entry matches any secret; every pair is compared in constant time, without an
    early exit.  The timestamp must be within ``tolerance`` seconds of ``now`` (Unix seconds,
    default the wall clock) either way.

    Raises :class:`WebhookVerificationError` for a request that fails (its ``reason`` says
    which check); ``TypeError``/``ValueError`` for misuse (a body that is not bytes, no secret,
    a secret that is not ``whsec_`` + base64).
    """
    if not isinstance(body, bytes):
        raise TypeError("body is the exact bytes received")
    if isinstance(secrets, str | Sensitive):
        raise TypeError("secrets is a sequence of secrets, not one secret")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError("tolerance is a number of seconds >= 0")
    keys = [whsec_key(s) for s in secrets]
    if not keys:
        raise ValueError("at least one signing secret is needed")

    lowered = {k.lower(): v for k, v in headers.items()}
    wanted = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    missing = [name for name in wanted if not lowered.get(name, "").strip()]
    if missing:
        raise WebhookVerificationError("missing_headers", f"missing headers: {', '.join(missing)}")
    msg_id = lowered[ID_HEADER].strip()
    sent = _timestamp(lowered[TIMESTAMP_HEADER], time.time() if now is None else now, tolerance)
    given = _v1_signatures(lowered[SIGNATURE_HEADER])

    content = f"{msg_id}.{sent}.".encode() + body
    matched = False
    for key in keys:
        expected = hmac.new(key, content, hashlib.sha256).digest()
        for signature in given:
            # `|=` rather than `or`: every pair is compared, whichever matches.
            matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise WebhookVerificationError("no_matching_signature", "no matching signature")
    return _parse(msg_id, body)


def _parse(msg_id: str, body: bytes) -> WebhookEvent:
    """The verified body as an event; WebhookVerificationError("malformed_payload") naming the field."""

    def bad(what: str) -> WebhookVerificationError:
        return WebhookVerificationError("malformed_payload", f"malformed payload: {what}")

    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not UTF-8 JSON") from None
    if not isinstance(payload, dict):
        raise bad("not a JSON object")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise bad("'data' is not an object")

    def text(source: dict[str, Any], name: str) -> str:
        value = source.get(name)
        if not isinstance(value, str) or not value:
            raise bad(f"{name!r} is not a non-empty string")
        return value

    def number(name: str) -> int:
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"{name!r} is not an integer")
        return value

    try:
        occurred = datetime.fromisoformat(text(payload, "timestamp"))
    except ValueError:
        raise bad("'timestamp' is not an ISO 8601 time") from None
    if occurred.tzinfo is None:
        raise bad("'timestamp' has no time zone")
    backend_version = data.get("backend_version")
    if isinstance(backend_version, int) and not isinstance(backend_version, bool):
        backend_version = str(backend_version)  # a backend's version numbers, e.g. Vault's, as text
    if backend_version is not None and not isinstance(backend_version, str):
        raise bad("'backend_version' is not a string")
    return WebhookEvent(
        id=msg_id,
        type=text(payload, "type"),
        timestamp=occurred,
        secret=text(data, "secret"),
        rotation_id=number("rotation_id"),
        version=number("version"),
        phase=text(data, "phase"),
        backend=text(data, "backend"),
        path=text(data, "path"),
        backend_version=backend_version,
        data=MappingProxyType(data),
    )


# -- acting on a verified event ------------------------------------------------------------------

#: Events after which a bot must re-read the secret they name (its key ring, tokens or signing
#: secrets) before acknowledging; other events (rotation.failed, ...) only reach ``on_event``.
REREAD_EVENTS: Final = frozenset(
    {"key.staged", "key.promoted", "key.retired", "token.issued", "token.revoked", "rotation.rolled_back"}
)

OK: Final = 204
DUPLICATE: Final = 200
BAD_PAYLOAD: Final = 400
UNAUTHORIZED: Final = 401
IN_PROGRESS: Final = 409
HANDLER_FAILED: Final = 500
RETRY_LATER: Final = 503

SecretSource = SigningSecrets | Callable[[], Sequence[str]]
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class _Stale(Exception):
    """The backend still shows an older version than the event announced."""


class _Unreadable(Exception):
    """A view could not be read; logged already."""


def _warn_unreadable(what: str, exc: BaseException) -> None:
    # rotatord errors carry locators only; any other exception might carry anything.
    why = str(exc) if isinstance(exc, RotatordError) else type(exc).__name__
    log.warning("cannot read %s (%s); answering 503 so rotatord retries", what, why)


class WebhookHandler:
    """Verifies rotatord webhooks, re-reads what they announce, and says what to answer.

    ``secrets``: the bot's signing secrets, a :class:`SigningSecrets` (re-read once when a
    request fails to verify, at most every ``refresh_interval`` seconds, since the signing
    secret itself may have rotated) or a callable returning the ``whsec_`` strings.
    ``keyrings`` / ``token_sets``: the views the bot holds, by managed-secret name.
    ``signing_secret``: the managed-secret name of the signing secret, so that its own
    ``token.*`` events re-read ``secrets`` too.  ``on_event(event)`` runs after the re-read, for
    every verified event that is not a duplicate.  ``seen``: how many webhook ids are remembered
    to answer a redelivery without acting again.  ``now``: the wall clock (Unix seconds);
    ``clock``: a monotonic clock.  Thread-safe.
    """

    def __init__(
        self,
        secrets: SecretSource,
        keyrings: Mapping[str, Keyring] = _EMPTY,
        token_sets: Mapping[str, TokenSet] = _EMPTY,
        *,
        on_event: Callable[[WebhookEvent], object] | None = None,
        seen: int = 10_000,
        signing_secret: str | None = None,
        tolerance: int = 300,
        refresh_interval: float = 5.0,
        now: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 1:
            raise ValueError("seen must be a positive number of webhook ids")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
            raise ValueError("tolerance is a number of seconds >= 0")
        if not refresh_interval >= 0:
            raise ValueError("refresh_interval is a number of seconds >= 0")
        if not (isinstance(secrets, SigningSecrets) or callable(secrets)):
            raise TypeError("secrets is a SigningSecrets or a callable returning whsec_ strings")
        self._secrets = secrets
        self._keyrings = dict(keyrings)
        self._token_sets = dict(token_sets)
        self._on_event = on_event
        self._seen_max = seen
        self._signing_secret = signing_secret
        self._tolerance = tolerance
        self._refresh_interval = float(refresh_interval)
        self._now = now
        self._clock = clock
        self._lock = threading.Lock()
        # Ids acknowledged, oldest first; ids being handled now (a concurrent redelivery waits).
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._in_flight: set[str] = set()
        self._last_secret_refresh = -float("inf")

    def handle(self, body: bytes, headers: Mapping[str, str]) -> int:
        """The HTTP status to answer a request with ``body`` (exact bytes) and ``headers``.

        204 acted on (re-read done); 200 a redelivery of an id already acknowledged (nothing done
        again); 401 not verified; 400 verified but not a rotatord event; 503 the secret could not
        be re-read, or the backend does not show the event's version yet (rotatord retries);
        409 the same id is being handled right now; 500 ``on_event`` raised.  Never raises for a
        bad request or a failing backend; raises ValueError when the signing secrets themselves
        are not ``whsec_`` secrets (the bot is misconfigured: its server answers 500).
        """
        try:
            event = self._verify(body, headers)
        except WebhookVerificationError as exc:
            log.warning("webhook refused: %s", exc)
            return BAD_PAYLOAD if exc.reason == "malformed_payload" else UNAUTHORIZED
        except _Unreadable:
            return RETRY_LATER

        with self._lock:
            if event.id in self._seen:
                self._seen.move_to_end(event.id)
                return DUPLICATE
            if event.id in self._in_flight:
                return IN_PROGRESS
            self._in_flight.add(event.id)
        done = False
        try:
            status = self._act(event)
            done = status == OK
            return status
        finally:
            with self._lock:
                self._in_flight.discard(event.id)
                if done:
                    self._seen[event.id] = None
                    while len(self._seen) > self._seen_max:
                        self._seen.popitem(last=False)

    # -- verification ------------------------------------------------------------------------

    def _current_secrets(self) -> Sequence[str]:
        try:
            if isinstance(self._secrets, SigningSecrets):
                return self._secrets.secrets()
            return self._secrets()
        except Exception as exc:
            _warn_unreadable("the signing secrets", exc)
            raise _Unreadable from None

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        try:
            return verify_webhook(body, headers, self._current_secrets(), tolerance=self._tolerance, now=self._now())
        except WebhookVerificationError as exc:
            if exc.reason != "no_matching_signature" or not self._may_refresh_secrets():
                raise
        # The signing secret may have rotated since it was read: read it again and retry once.
        assert isinstance(self._secrets, SigningSecrets)
        try:
            self._secrets.refresh()
        except Exception as exc:
            _warn_unreadable("the signing secrets", exc)
            raise _Unreadable from None
        return verify_webhook(body, headers, self._current_secrets(), tolerance=self._tolerance, now=self._now())

    def _may_refresh_secrets(self) -> bool:
        """Rate-limited, so a stream of forged requests cannot become a stream of backend reads."""
        if not isinstance(self._secrets, SigningSecrets):
            return False
        with self._lock:
            now = self._clock()
            if now - self._last_secret_refresh < self._refresh_interval:
                return False
            self._last_secret_refresh = now
            return True

    # -- acting --------------------------------------------------------------------------------

    def _act(self, event: WebhookEvent) -> int:
        try:
            self._reread(event)
        except _Stale as exc:
            log.warning("webhook %s (%s of %r): %s; not acknowledged", event.id, event.type, event.secret, exc)
            return RETRY_LATER
        except _Unreadable:
            return RETRY_LATER
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("webhook %s (%s of %r): on_event failed", event.id, event.type, event.secret)
                return HANDLER_FAILED
        log.info("webhook %s acknowledged: %s of %r version %d", event.id, event.type, event.secret, event.version)
        return OK

    def _reread(self, event: WebhookEvent) -> None:
        """Re-read the view the event is about and check it shows the event's version."""
        if event.type not in REREAD_EVENTS:
            return
        # Secret names are unique, so one lookup across the views is unambiguous.
        view: Keyring | TokenSet | SigningSecrets | None = self._keyrings.get(event.secret)
        if view is None:
            view = self._token_sets.get(event.secret)
        if view is None and event.secret == self._signing_secret and isinstance(self._secrets, SigningSecrets):
            view = self._secrets
        if view is None:
            return
        try:
            version = view.refresh()
        except Exception as exc:
            _warn_unreadable(f"secret {event.secret!r}", exc)
            raise _Unreadable from None
        # Never acknowledge a key we have not read: a replica or cache behind the primary may
        # still serve the document from before the event.  A rollback keeps the document's
        # version (and one before staging never wrote it), so it has no version to wait for.
        if event.type != "rotation.rolled_back" and version < event.version:
            raise _Stale(f"the backend still shows version {version}")
