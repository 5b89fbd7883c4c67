"""``Keyring``: a bot's Fernet key ring, read from the backend and kept current.

Rotation publishes a new key decrypt-only first, then makes it primary, then retires the old
one.  A bot holding a :class:`Keyring` follows without a restart: the ring is re-read every
``ttl`` seconds, on :meth:`Keyring.refresh`, and once when a token does not decrypt under a ring
read more than ``min_interval`` seconds ago (the token may be under a key staged since).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..crypto.keyring import multifernet
from ..document import Document, FernetRing
from ..errors import DecryptError, DocumentInvalid
from .core import CachedDocument, CachedView, DocumentReader, Loaded, MonotonicClock

__all__ = ["Keyring"]


@dataclass(frozen=True)
class _Ring:
    fernet: MultiFernet
    primary: Fernet
    primary_id: str
    key_ids: tuple[str, ...]

    def __repr__(self) -> str:
        return f"_Ring(primary_id={self.primary_id!r}, key_ids={self.key_ids!r})"


def _build(document: Document) -> _Ring:
    if not isinstance(document, FernetRing):
        raise DocumentInvalid(f"secret {document.name!r} is a {document.kind} document, not a fernet key ring")
    ordered = document.ordered()
    return _Ring(
        fernet=multifernet(document),
        primary=Fernet(document.primary_key.material.reveal().encode("ascii")),
        primary_id=document.primary,
        key_ids=tuple(k.id for k in ordered),
    )


def _as_bytes(token: bytes | str) -> bytes:
    if isinstance(token, bytes):
        return token
    if not isinstance(token, str):
        raise TypeError("a Fernet token is bytes or str")
    if not token.isascii():
        raise DecryptError()  # cannot be a Fernet token; the same error as every other failure
    return token.encode("ascii")


class Keyring(CachedView[_Ring]):
    """A MultiFernet over the ring at ``reader``: the primary encrypts, every key decrypts.

    ``ttl``: seconds a read ring is used before it is re-read.  ``min_interval``: seconds
    between automatic re-reads after a failure or a decrypt miss.  ``clock``: a monotonic clock
    in seconds.  The first use reads the ring and raises the reader's error if that fails; later
    failed re-reads keep the ring already read (with a warning in the log).  Thread-safe.
    """

    def __init__(
        self,
        reader: DocumentReader,
        *,
        ttl: float = 60.0,
        clock: MonotonicClock = time.monotonic,
        min_interval: float = 5.0,
    ) -> None:
        self._cache = CachedDocument(reader, _build, ttl=ttl, clock=clock, min_interval=min_interval)

    @property
    def fernet(self) -> MultiFernet:
        """A MultiFernet of the current ring: the primary first, then decrypt-only keys newest first.

        It does not follow later rotations; keep the Keyring, not this object.
        """
        return self._cache.get().value.fernet

    @property
    def primary_id(self) -> str:
        """The id of the key new tokens are encrypted under (``v7``)."""
        return self._cache.get().value.primary_id

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every key id of the ring, in the order keys are tried (the primary first)."""
        return self._cache.get().value.key_ids

    def encrypt(self, data: bytes) -> bytes:
        """A Fernet token of ``data`` under the primary key."""
        if not isinstance(data, bytes):
            raise TypeError("encrypt expects bytes")
        return self._cache.get().value.primary.encrypt(data)

    def decrypt(self, token: bytes | str, ttl: int | None = None) -> bytes:
        """The plaintext of ``token`` under any key of the ring, optionally at most ``ttl``
        seconds old.  Raises :class:`~rotatord.errors.DecryptError` for every failure alike."""
        raw = _as_bytes(token)
        return self._decrypt(lambda ring: ring.fernet.decrypt(raw, ttl))

    def decrypt_at_time(self, token: bytes | str, *, ttl: int, now: datetime) -> bytes:
        """:meth:`decrypt` with the wall clock as a parameter: ``token`` must be at most ``ttl``
        seconds older than ``now`` (timezone-aware).  Raises DecryptError for every failure alike."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        raw = _as_bytes(token)
        at = int(now.timestamp())
        return self._decrypt(lambda ring: ring.fernet.decrypt_at_time(raw, ttl, at))

    def _decrypt(self, attempt: Callable[[_Ring], bytes]) -> bytes:
        loaded: Loaded[_Ring] | None = self._cache.get()
        retried = False
        while loaded is not None:
            try:
                return attempt(loaded.value)
            except InvalidToken:
                if retried:
                    break
                retried = True
                # The token may be under a key staged after our read: re-read once, rate-limited.
                loaded = self._cache.refresh_after_miss(loaded)
        # Raised outside the except block, so no traceback shows which of cryptography's checks failed.
        raise DecryptError()
