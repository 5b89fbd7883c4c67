"""Helpers over a :class:`~rotatord.document.FernetRing`: MultiFernet, census, rotation.

The census needs to know which key each stored token is under, and Fernet tokens carry no key
id.  They do carry an HMAC-SHA256 over everything before it, keyed with the first half of the
key that made them, so :class:`KeyIdentifier` finds the signing key without decrypting::

    0x80 | timestamp (8) | IV (16) | ciphertext (n * 16, n >= 1) | HMAC (32)

Every decryption failure here raises :class:`~rotatord.errors.DecryptError` with one fixed
message, never cryptography's ``InvalidToken``, so no caller can tell which check failed.
This module imports only the stdlib, ``cryptography`` and rotatord's stdlib-only modules:
bots import it through ``rotatord.client``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Iterable
from datetime import datetime

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..document import FernetRing
from ..errors import DecryptError
from ..sensitive import Sensitive

__all__ = ["KeyIdentifier", "decrypt", "decrypt_at_time", "multifernet", "rotator"]

_VERSION = 0x80
_HEADER = 1 + 8 + 16  # version, timestamp, IV
_MAC = 32
_BLOCK = 16
_MIN_TOKEN = _HEADER + _BLOCK + _MAC  # PKCS7 always adds at least one block of ciphertext


def multifernet(ring: FernetRing) -> MultiFernet:
    """A MultiFernet over ``ring``: the primary first (it encrypts), then decrypt-only keys
    newest first, so the most likely key is tried first."""
    return MultiFernet(Fernet(k.material.reveal().encode("ascii")) for k in ring.ordered())


def _signing_key(key_id: str, material: Sensitive) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(material.reveal().encode("ascii"))
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 32:
        # Name the key, never echo its material.
        raise ValueError(f"key {key_id!r} is not a Fernet key (32 url-safe base64-encoded bytes)")
    return raw[:16]


class KeyIdentifier:
    """Maps a Fernet token to the id of the key that signed it, without decrypting.

    Built from a ring (keys tried primary first, then newest first) or from ``(key_id,
    material)`` pairs (tried in the given order: put the most likely key first).  Usable
    directly as the ``identify`` callable of :class:`rotatord.interfaces.DataStore`.
    Raises ValueError for a malformed key or a repeated key id.
    """

    __slots__ = ("_macs",)

    def __init__(self, keys: FernetRing | Iterable[tuple[str, Sensitive]]) -> None:
        pairs = [(k.id, k.material) for k in keys.ordered()] if isinstance(keys, FernetRing) else list(keys)
        macs: list[tuple[str, hmac.HMAC]] = []
        seen: set[str] = set()
        for key_id, material in pairs:
            if not isinstance(material, Sensitive):
                raise TypeError("key material must be wrapped in Sensitive")
            if key_id in seen:
                raise ValueError(f"key id {key_id!r} appears twice")
            seen.add(key_id)
            # One keyed HMAC per key, copied per token: the key schedule is paid once, not per row.
            macs.append((key_id, hmac.new(_signing_key(key_id, material), digestmod=hashlib.sha256)))
        self._macs = tuple(macs)

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The key ids, in the order they are tried."""
        return tuple(key_id for key_id, _ in self._macs)

    def identify(self, token: bytes | bytearray | memoryview) -> str | None:
        """The id of the key whose HMAC the token carries, or ``None``.

        ``None`` for anything that is not a well-formed Fernet token of one of these keys:
        garbage, truncated or tampered tokens, foreign keys, empty input.  Base64 is decoded
        the way Fernet decodes it, so this accepts exactly the tokens a key of the ring would
        authenticate.  Raises TypeError only when ``token`` is not bytes-like.
        """
        if not isinstance(token, bytes | bytearray | memoryview):
            raise TypeError("identify expects bytes")
        try:
            data = base64.urlsafe_b64decode(token)
        except (binascii.Error, ValueError):
            return None
        size = len(data)
        if size < _MIN_TOKEN or (size - _HEADER - _MAC) % _BLOCK or data[0] != _VERSION:
            return None
        signed = memoryview(data)[:-_MAC]
        mac = data[-_MAC:]
        for key_id, keyed in self._macs:
            candidate = keyed.copy()
            candidate.update(signed)
            if hmac.compare_digest(candidate.digest(), mac):
                return key_id
        return None

    __call__ = identify

    def identify_many(self, tokens: Iterable[bytes | bytearray | memoryview]) -> list[str | None]:
        """:meth:`identify` for each token, in order."""
        identify = self.identify
        return [identify(token) for token in tokens]

    def __repr__(self) -> str:
        return f"KeyIdentifier(key_ids={self.key_ids!r})"


def rotator(ring: FernetRing) -> Callable[[bytes], bytes]:
    """A function re-encrypting a token under the ring's primary, keeping its timestamp.

    The function raises DecryptError when no key of the ring can decrypt the token, and
    TypeError when the token is not bytes.
    """
    ring_fernet = multifernet(ring)

    def rotate(token: bytes) -> bytes:
        if not isinstance(token, bytes):
            raise TypeError("rotate expects bytes")
        try:
            return ring_fernet.rotate(token)
        except InvalidToken:
            # `from None`: the traceback must not show which of cryptography's checks failed.
            raise DecryptError() from None

    return rotate


def decrypt(ring: FernetRing, token: bytes, ttl: int | None = None) -> bytes:
    """The plaintext of ``token`` under any key of the ring, optionally no older than ``ttl``
    seconds (by the system clock).  Raises DecryptError for every failure alike."""
    if not isinstance(token, bytes):
        raise TypeError("decrypt expects bytes")
    try:
        return multifernet(ring).decrypt(token, ttl)
    except InvalidToken:
        raise DecryptError() from None


def decrypt_at_time(ring: FernetRing, token: bytes, *, ttl: int, now: datetime) -> bytes:
    """:func:`decrypt` with the clock as a parameter: ``token`` must be at most ``ttl`` seconds
    older than ``now`` (an aware datetime).  Raises DecryptError for every failure alike."""
    if not isinstance(token, bytes):
        raise TypeError("decrypt expects bytes")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        return multifernet(ring).decrypt_at_time(token, ttl, int(now.timestamp()))
    except InvalidToken:
        raise DecryptError() from None
