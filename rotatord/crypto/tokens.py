"""The API token format: ``<prefix>_<body><checksum>``, recognisable when it leaks.

Like GitHub's ``ghp_`` tokens, a rotatord token names its issuer in a lowercase prefix and ends
in a checksum, so a secret scanner can find candidates with :data:`TOKEN_RE` and confirm them
offline with :func:`parse_token` without false positives from random base62 text::

    rtd_0uYc...(43 chars of body)...Xk2Q9a
    ^^^ prefix, 2-16 chars [a-z][a-z0-9]*
        ^^^^ body: 32 CSPRNG bytes as base62, left-padded with "0" to 43 chars
                                       ^^^^^^ checksum: base62 of CRC-32 over "<prefix>_<body>", 6 chars

The body and checksum have fixed widths, so the split needs no separator.  The checksum only
catches typos and random look-alikes; it is no authentication.  Verifiers store
:func:`token_sha256` of a token, never the token, and compare with :func:`verify_token`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from ..sensitive import Sensitive

__all__ = [
    "BODY_BYTES",
    "BODY_WIDTH",
    "CHECKSUM_WIDTH",
    "PREFIX_RE",
    "TOKEN_RE",
    "FINGERPRINT_HEX",
    "TokenParts",
    "fingerprint",
    "make_token",
    "parse_token",
    "token_sha256",
    "verify_token",
]

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
BODY_BYTES = 32
#: ceil(256 / log2(62)): the widest base62 rendering of 32 bytes.
BODY_WIDTH = 43
#: ceil(32 / log2(62)): the widest base62 rendering of a CRC-32.
CHECKSUM_WIDTH = 6

PREFIX_RE = re.compile(r"[a-z][a-z0-9]{1,15}")
_SHAPE = rf"([a-z][a-z0-9]{{1,15}})_([0-9A-Za-z]{{{BODY_WIDTH}}})([0-9A-Za-z]{{{CHECKSUM_WIDTH}}})"
_SHAPE_RE = re.compile(_SHAPE)
#: Candidate tokens in arbitrary text.  Word-boundary anchored, so a token glued to more
#: letters or digits is not a candidate; confirm every match with :func:`parse_token`.
TOKEN_RE = re.compile(rf"\b{_SHAPE}\b")


@dataclass(frozen=True)
class TokenParts:
    """The parts of a well-formed token.  ``body`` is secret: never log a TokenParts."""

    prefix: str
    body: str
    checksum: str

    def __repr__(self) -> str:
        # The body is the token's entropy; keep it out of reprs like every other secret.
        return f"TokenParts(prefix={self.prefix!r}, body='***', checksum={self.checksum!r})"


def _base62(value: int, width: int) -> str:
    """``value`` in base62, left-padded with ``"0"`` to exactly ``width`` characters."""
    digits = []
    while value:
        value, rem = divmod(value, 62)
        digits.append(_ALPHABET[rem])
    text = "".join(reversed(digits))
    if len(text) > width:
        raise ValueError("value does not fit the fixed width")
    return text.rjust(width, "0")


def _from_base62(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + _INDEX[char]
    return value


def _checksum(head: str) -> str:
    return _base62(zlib.crc32(head.encode("ascii")), CHECKSUM_WIDTH)


def make_token(prefix: str) -> Sensitive:
    """A fresh token with ``prefix``; 256 bits from :func:`secrets.token_bytes`.

    Raises ValueError unless ``prefix`` matches ``^[a-z][a-z0-9]{1,15}$``.
    """
    if not isinstance(prefix, str) or PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError("token prefix must match ^[a-z][a-z0-9]{1,15}$")
    body = _base62(int.from_bytes(secrets.token_bytes(BODY_BYTES), "big"), BODY_WIDTH)
    head = f"{prefix}_{body}"
    return Sensitive(head + _checksum(head))


def parse_token(text: str) -> TokenParts | None:
    """The parts of ``text`` if it is exactly one well-formed token, else ``None``.

    Well-formed means the shape, a body that encodes at most 32 bytes, and the checksum all
    hold.  Raises TypeError only when ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError("parse_token expects str")
    match = _SHAPE_RE.fullmatch(text)
    if match is None:
        return None
    prefix, body, checksum = match.groups()
    # 43 base62 digits can exceed 2**256; no token we make does, so such a body is a look-alike.
    if _from_base62(body) >> (8 * BODY_BYTES):
        return None
    # The checksum is public (it is part of the token), so a plain comparison leaks nothing.
    if _checksum(f"{prefix}_{body}") != checksum:
        return None
    return TokenParts(prefix, body, checksum)


def token_sha256(token: str) -> str:
    """Hex SHA-256 of the token's UTF-8 bytes: what verifiers store instead of the token."""
    if not isinstance(token, str):
        raise TypeError("token_sha256 expects str")
    return hashlib.sha256(token.encode()).hexdigest()


#: Hex digits of a fingerprint: 48 bits tell credentials apart in reports and reveal nothing usable.
FINGERPRINT_HEX = 12
FINGERPRINT_RE = re.compile(rf"[0-9a-f]{{{FINGERPRINT_HEX}}}")


def fingerprint(material: str) -> str:
    """A short public name for a token or key: the first hex digits of its SHA-256.

    What scan output, revoked-use reports and audit records show instead of the material; the
    daemon matches it against the SHA-256 a document keeps for each (also revoked) credential.
    """
    return token_sha256(material)[:FINGERPRINT_HEX]


def verify_token(presented: str, sha256_hexes: Iterable[str]) -> bool:
    """Whether ``presented`` hashes to one of ``sha256_hexes``, in constant time.

    Every candidate is compared with :func:`hmac.compare_digest` and there is no early exit,
    so the time taken does not say which candidate (current or previous) matched, or how far a
    guess got.  Hex digests are compared case-insensitively.
    """
    wanted = token_sha256(presented).encode("ascii")
    found = False
    for candidate in sha256_hexes:
        # Non-ASCII text cannot be a hex digest; compare it as bytes so it simply fails to match.
        found |= hmac.compare_digest(wanted, candidate.lower().encode("utf-8"))
    return found
