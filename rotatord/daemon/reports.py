"""Reports from bots that a revoked credential was presented to them (``credential.revoked_use``).

Two ways in, one logic: ``POST /v1/revoked-use`` on the daemon's loopback HTTP listener
(:func:`handle_revoked_use`, for the route table) and the control-socket op
``report.revoked_use`` (:meth:`RevokedUseRecorder.submit`).  A report is JSON::

    {"secret": "support-bot-api", "fingerprint": "3fa2c1d4e5f6", "state": "revoked",
     "credential": "v3", "source": "10.0.0.5 (billing-bot)", "at": "2025-01-01T03:00:00Z"}

``secret``, ``fingerprint`` (12 lowercase hex digits of the token's SHA-256) and ``state``
(``revoked`` | ``retired``) are required.  It is validated strictly: at most
:data:`MAX_BODY` bytes, no unknown field, a configured secret, and nothing that looks like key
material (a report names a credential by fingerprint, never carries it).  Each accepted report
is counted per secret and fingerprint, written to the audit log with the source the bot gave,
and raised to ``notify.security_consumers`` as a ``credential.revoked_use`` webhook, at most
once per fingerprint per ten minutes (:data:`rotatord.engine.revoked_use.NOTIFY_EVERY`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..audit import AuditLog
from ..client.reports import MAX_SOURCE
from ..config.model import SecretSettings
from ..crypto.tokens import FINGERPRINT_RE, fingerprint
from ..document import Document, FernetRing
from ..engine.revoked_use import EVENT_TYPE, RevokedUseStore, Sighting
from ..errors import RotatordError, UnknownSecret, UsageError
from ..logs import redact_text
from ..timeutil import Clock, parse_ts
from .protocol import NAME_RE, TS_RE

__all__ = [
    "MAX_BODY",
    "ReportRejected",
    "RevokedUseRecorder",
    "RevokedUseReport",
    "credential_of",
    "handle_revoked_use",
    "install",
    "parse_report",
]

log = logging.getLogger("rotatord.reports")

MAX_BODY = 4096
_JSON = "application/json"
_FIELDS = {"secret", "fingerprint", "state", "source", "credential", "at"}
_REQUIRED = ("secret", "fingerprint", "state")
_STATES = ("revoked", "retired")
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9._-]{1,32}")


class ReportRejected(Exception):
    """A report refused, with the HTTP status it deserves and a message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RevokedUseReport:
    """A validated report: names and a fingerprint, no material."""

    secret: str
    fingerprint: str
    state: str
    source: str | None
    credential: str | None
    at: str | None


def _string(data: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise ReportRejected(400, f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise ReportRejected(400, f"field {name!r} must be a string")
    return value


def parse_report(data: object, secrets: Mapping[str, SecretSettings]) -> RevokedUseReport:
    """Validate one decoded report; raise :class:`ReportRejected` naming the field at fault."""
    if not isinstance(data, dict):
        raise ReportRejected(400, "a report is a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        # Counted, not echoed: a field name is the caller's text and could be anything, a token too.
        raise ReportRejected(400, f"{len(unknown)} unknown field(s); known: {', '.join(sorted(_FIELDS))}")
    secret, fp, state = (_string(data, name, required=True) for name in _REQUIRED)
    assert secret is not None and fp is not None and state is not None
    if not NAME_RE.match(secret):
        raise ReportRejected(400, "field 'secret' is not a secret name")
    if secret not in secrets:
        raise ReportRejected(404, "field 'secret' names no managed secret")
    if not FINGERPRINT_RE.fullmatch(fp):
        raise ReportRejected(400, "field 'fingerprint' must be 12 lowercase hex digits (never the token itself)")
    if state not in _STATES:
        raise ReportRejected(400, "field 'state' must be 'revoked' or 'retired'")
    source = _string(data, "source")
    if source is not None:
        if len(source) > MAX_SOURCE or not source.isprintable():
            raise ReportRejected(400, f"field 'source' must be one printable line of at most {MAX_SOURCE} characters")
        if redact_text(source) != source:
            raise ReportRejected(400, "field 'source' looks like key material: a report carries fingerprints only")
    credential = _string(data, "credential")
    if credential is not None and not _CREDENTIAL_RE.fullmatch(credential):
        raise ReportRejected(400, "field 'credential' must be a credential id such as 'v3'")
    at = _string(data, "at")
    if at is not None and not TS_RE.match(at):
        raise ReportRejected(400, "field 'at' must be an ISO 8601 timestamp with a timezone")
    return RevokedUseReport(secret, fp, state, source or None, credential, at)


def credential_of(doc: Document, fp: str) -> tuple[str, str] | None:
    """(credential or key id, what the document says of it) for fingerprint ``fp``, or None.

    What it says: ``current`` / ``previous`` / ``revoked`` for credentials (the document keeps
    the SHA-256 of the last revoked ones), ``primary`` / ``decrypt_only`` for Fernet keys.
    """
    found: tuple[str, str] | None = None
    if isinstance(doc, FernetRing):
        for key in doc.keys:
            if hmac.compare_digest(fingerprint(key.material.reveal()), fp):
                found = (key.id, key.state)
        return found
    listed = [(doc.current.sha256, doc.current.id, "current")]
    if doc.previous is not None:
        listed.append((doc.previous.sha256, doc.previous.id, "previous"))
    listed += [(gone.sha256, gone.id, "revoked") for gone in doc.revoked]
    for sha, credential, where in listed:
        if hmac.compare_digest(sha[: len(fp)].lower().encode(), fp.encode()):
            found = (credential, where)
    return found


class RevokedUseRecorder:
    """Counts, audits and raises revoked-use reports against one runtime's journal and audit log.

    ``on_queued`` is called (from a worker thread) after an event was queued, so the daemon can
    wake its webhook worker.  ``read_document(name)`` (optional) reads the secret's current
    document so each report says what the daemon knows of the fingerprint (``known_as``: e.g.
    ``revoked``, or None when no credential the document keeps has it); a failing read only
    leaves that unknown.  Cheap to build: the daemon makes one per request from the current
    runtime, so a reload's new settings apply at once.
    """

    def __init__(
        self,
        store: RevokedUseStore,
        audit: AuditLog,
        secrets: Mapping[str, SecretSettings],
        security_consumers: Sequence[str],
        clock: Clock,
        on_queued: Callable[[], None] | None = None,
        read_document: Callable[[str], Document | None] | None = None,
    ) -> None:
        self._read_document = read_document
        self._store = store
        self._audit = audit
        self._secrets = secrets
        self._consumers = list(security_consumers)
        self._clock = clock
        self._on_queued = on_queued

    def record(self, report: RevokedUseReport, actor: str) -> dict[str, Any]:
        """Count, audit and (rate-limited) raise one validated report; the reply's body.

        The count and the event are committed first, then the audit record is appended (the audit
        head lives in the same database, so it cannot be written inside that transaction).  Raises
        StateError or AuditError; after an AuditError the report stays counted.
        """
        now = self._clock.now()
        secret = self._secrets[report.secret]
        known = self._known(report)
        credential = report.credential or (known[0] if known else None)
        sighting = Sighting(
            report.secret, report.fingerprint, report.state, report.source, credential,
            parse_ts(report.at) if report.at else None, secret.backend, secret.path,
            known[1] if known else None,
        )  # fmt: skip
        counted = self._store.record(sighting, self._consumers, now)
        self._audit.append(
            EVENT_TYPE, actor=actor, secret=report.secret, fingerprint=report.fingerprint, state=report.state,
            credential=credential, known_as=sighting.known_as, source=report.source, reported_at=report.at,
            count=counted.count, notified=counted.notified,
        )  # fmt: skip
        log.warning(
            "a revoked credential was presented to a bot: a forgotten consumer or a thief",
            extra={"secret": report.secret, "fingerprint": report.fingerprint, "source": report.source,
                   "count": counted.count},
        )  # fmt: skip
        if counted.webhook_ids and self._on_queued is not None:
            self._on_queued()
        return {
            "secret": report.secret,
            "fingerprint": report.fingerprint,
            "credential": credential,
            "known_as": sighting.known_as,
            "count": counted.count,
            "secret_total": counted.secret_total,
            "notified": counted.notified,
        }

    def _known(self, report: RevokedUseReport) -> tuple[str, str] | None:
        if self._read_document is None:
            return None
        try:
            doc = self._read_document(report.secret)
        except RotatordError as exc:
            log.warning("cannot read the secret to place a report", extra={"secret": report.secret, "error": str(exc)})
            return None
        return None if doc is None else credential_of(doc, report.fingerprint)

    async def submit(self, data: object, actor: str) -> dict[str, Any]:
        """The control-socket op: raise UnknownSecret / UsageError instead of an HTTP status."""
        try:
            report = parse_report(data, self._secrets)
        except ReportRejected as exc:
            if exc.status == 404 and isinstance(data, dict):
                raise UnknownSecret(str(data["secret"])) from None  # a valid name, checked above
            raise UsageError(f"report.revoked_use: {exc}") from None
        return await asyncio.get_running_loop().run_in_executor(None, self.record, report, actor)

    async def handle(self, body: bytes, peer: str) -> tuple[int, bytes, str]:
        """The HTTP endpoint: (status, JSON body, content type).  Never raises for bad input."""
        if len(body) > MAX_BODY:
            return _reply(413, {"error": f"a report is at most {MAX_BODY} bytes"})
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _reply(400, {"error": "the body is not valid JSON"})
        try:
            report = parse_report(data, self._secrets)
        except ReportRejected as exc:
            return _reply(exc.status, {"error": str(exc)})
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, self.record, report, f"http:{peer}")
        except RotatordError as exc:
            # The state database or the audit log failed: the bot may retry; the operator reads the log.
            log.error("revoked-use report not recorded", extra={"secret": report.secret, "error": str(exc)})
            return _reply(503, {"error": "the report could not be recorded; see the daemon's log"})
        return _reply(202, result)


def _reply(status: int, body: Mapping[str, Any]) -> tuple[int, bytes, str]:
    return status, json.dumps(body, separators=(",", ":")).encode(), _JSON


# One slot, set by the daemon: the route table takes plain functions, not bound methods.
_provider: list[Callable[[], RevokedUseRecorder | None]] = []


def install(provider: Callable[[], RevokedUseRecorder | None] | None) -> None:
    """Set where :func:`handle_revoked_use` gets its recorder (the daemon, at start-up; None
    when it stops)."""
    _provider[:] = [] if provider is None else [provider]


async def handle_revoked_use(body: bytes, peer: str) -> tuple[int, bytes, str]:
    """``POST /v1/revoked-use``: validate, count, audit and raise one report.

    Returns (status, body, content type): 202 with the counts; 400 / 404 / 413 naming what is
    wrong (nothing is counted then); 503 while the daemon is starting or stopping, or when the
    state database or audit log fails.
    """
    recorder = _provider[0]() if _provider else None
    if recorder is None:
        return _reply(503, {"error": "the daemon is not ready to take reports"})
    return await recorder.handle(body, peer)
