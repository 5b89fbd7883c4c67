"""``TokenSet`` verifies presented API tokens; ``SigningSecrets`` gives webhook signing secrets.

Both read a credential document (current + previous) through a reader and cache it like
:class:`~rotatord.client.Keyring`.  An ``api_token`` rotation makes a new token current and keeps
the old one valid as ``previous`` until its ``valid_until``, so clients can switch over; then the
old one is revoked and only its SHA-256 is kept, so a verifier can say "revoked" instead of
"unknown".  Verification compares SHA-256 digests with :func:`hmac.compare_digest`, against
every candidate, without an early exit.
"""

from __future__ import annotations

import enum
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ..crypto.tokens import fingerprint, token_sha256
from ..document import Credential, CredentialSet, Document
from ..errors import DocumentInvalid
from ..timeutil import utcnow
from .core import CachedDocument, CachedView, DocumentReader, MonotonicClock
from .reports import RevokedUse

__all__ = ["RevokedUseCallback", "SigningSecrets", "TokenCheck", "TokenSet"]

log = logging.getLogger("rotatord.client")

WallClock = Callable[[], datetime]
#: Called with every refused revoked token; see :class:`~rotatord.client.RevokedUseReporter`.
RevokedUseCallback = Callable[[RevokedUse], None]


class TokenCheck(enum.Enum):
    """The outcome of :meth:`TokenSet.verify`.  Only ``VALID`` is truthy."""

    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    UNKNOWN = "unknown"

    def __bool__(self) -> bool:
        # Enum members are truthy by default, which would make `if tokens.verify(t):` accept
        # expired and revoked tokens.
        return self is TokenCheck.VALID


def _credentials(kind: str) -> Callable[[Document], CredentialSet]:
    def build(document: Document) -> CredentialSet:
        if not isinstance(document, CredentialSet) or document.kind != kind:
            raise DocumentInvalid(f"secret {document.name!r} is a {document.kind} document, not {kind}")
        return document

    return build


def _passed(deadline: datetime | None, now: datetime) -> bool:
    return deadline is not None and now >= deadline


def _aware(now: datetime) -> datetime:
    if not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("the wall clock must return timezone-aware datetimes")
    return now


@dataclass(frozen=True)
class _Match:
    current: bool
    previous: bool
    revoked: bool
    revoked_id: str | None


def _match(presented: str, cs: CredentialSet) -> _Match:
    """Compare against every stored digest: no early exit, so timing shows nothing."""
    wanted = token_sha256(presented).encode("ascii")
    # A placeholder keeps the number of comparisons the same whether or not there is a previous
    # token.  Digests are compared as UTF-8 so a malformed stored one simply fails to match.
    previous = cs.previous.sha256 if cs.previous is not None else "0" * 64
    current_hit = hmac.compare_digest(wanted, cs.current.sha256.lower().encode("utf-8"))
    previous_hit = hmac.compare_digest(wanted, previous.lower().encode("utf-8")) and cs.previous is not None
    revoked_hit = False
    revoked_id = None
    for entry in cs.revoked:
        hit = hmac.compare_digest(wanted, entry.sha256.lower().encode("utf-8"))
        revoked_hit |= hit
        revoked_id = entry.id if hit else revoked_id
    return _Match(current_hit, previous_hit, revoked_hit, revoked_id)


def _status(credential: Credential, now: datetime, *, previous: bool) -> TokenCheck:
    # A previous token past its valid_until was superseded on purpose: report it as revoked.
    if previous and _passed(credential.valid_until, now):
        return TokenCheck.REVOKED
    if _passed(credential.expires_at, now) or _passed(credential.valid_until, now):
        return TokenCheck.EXPIRED
    return TokenCheck.VALID


class TokenSet(CachedView[CredentialSet]):
    """Verifies API tokens against an ``api_token`` document (current, previous, revoked).

    ``ttl``, ``clock`` and ``min_interval`` as for :class:`~rotatord.client.Keyring`; an
    unknown token under a document read more than ``min_interval`` ago triggers one re-read
    (it may have been issued since).  ``now`` is the wall clock used for expiry (timezone-aware
    UTC by default).  Nothing here logs or raises with the presented token in it.  Thread-safe.

    ``on_revoked_use`` is called (in the verifying thread) with a :class:`RevokedUse` for each
    REVOKED result: an old token still presented means a forgotten consumer or a thief.  It gets
    the token's fingerprint, never the token; an exception it raises is logged and swallowed, so
    reporting never breaks verification.  Pass a :class:`~rotatord.client.RevokedUseReporter` to
    tell the daemon.
    """

    def __init__(
        self,
        reader: DocumentReader,
        *,
        ttl: float = 60.0,
        clock: MonotonicClock = time.monotonic,
        now: WallClock | None = None,
        min_interval: float = 5.0,
        on_revoked_use: RevokedUseCallback | None = None,
    ) -> None:
        self._cache = CachedDocument(reader, _credentials("api_token"), ttl=ttl, clock=clock, min_interval=min_interval)
        self._now: WallClock = now or utcnow
        self._on_revoked_use = on_revoked_use

    def verify(self, presented: str, *, source: str | None = None) -> TokenCheck:
        """VALID, EXPIRED (past its ``expires_at``), REVOKED (in the revoked list, or a previous
        token past its ``valid_until``) or UNKNOWN.  ``source`` (the caller's address, a consumer
        name...) goes into the revoked-use report.  Raises TypeError unless ``presented`` is a str."""
        if not isinstance(presented, str):
            raise TypeError("verify expects the presented token as str")
        loaded = self._cache.get()
        result, cs, credential = self._check(presented, loaded.value)
        if result is TokenCheck.UNKNOWN:
            newer = self._cache.refresh_after_miss(loaded)
            if newer is not None:
                result, cs, credential = self._check(presented, newer.value)
        if result is TokenCheck.REVOKED and self._on_revoked_use is not None:
            self._report(presented, cs, credential, source)
        return result

    def _report(self, presented: str, cs: CredentialSet, credential: str | None, source: str | None) -> None:
        report = RevokedUse(cs.name, fingerprint(presented), "revoked", _aware(self._now()), source, credential)
        assert self._on_revoked_use is not None
        try:
            self._on_revoked_use(report)
        except Exception:  # a reporting failure must never turn into a failed request
            log.exception("on_revoked_use callback failed", extra={"secret": cs.name})

    def is_valid(self, presented: str) -> bool:
        """Whether ``presented`` is a token a client may use right now."""
        return self.verify(presented) is TokenCheck.VALID

    def _check(self, presented: str, cs: CredentialSet) -> tuple[TokenCheck, CredentialSet, str | None]:
        """The result, the document it came from and the id of the credential matched."""
        match = _match(presented, cs)
        now = _aware(self._now())
        if match.revoked:
            return TokenCheck.REVOKED, cs, match.revoked_id
        if match.current:
            return _status(cs.current, now, previous=False), cs, cs.current.id
        if match.previous and cs.previous is not None:
            return _status(cs.previous, now, previous=True), cs, cs.previous.id
        return TokenCheck.UNKNOWN, cs, None


class SigningSecrets(CachedView[CredentialSet]):
    """The Standard Webhooks (``whsec_``) secrets of a ``webhook_secret`` document.

    During a rotation a sender signs with both the new and the old secret, so a receiver
    accepts a signature made with any secret :meth:`secrets` returns.
    """

    def __init__(
        self,
        reader: DocumentReader,
        *,
        ttl: float = 60.0,
        clock: MonotonicClock = time.monotonic,
        now: WallClock | None = None,
        min_interval: float = 5.0,
    ) -> None:
        self._cache = CachedDocument(
            reader, _credentials("webhook_secret"), ttl=ttl, clock=clock, min_interval=min_interval
        )
        self._now: WallClock = now or utcnow

    def secrets(self) -> list[str]:
        """The current secret, then the previous one while it is still valid.  Secret material:
        hand it to the verifier, never to a log."""
        cs = self._cache.get().value
        now = _aware(self._now())
        out = [cs.current.value.reveal()]
        if cs.previous is not None and not _passed(cs.previous.valid_until, now):
            out.append(cs.previous.value.reveal())
        return out
