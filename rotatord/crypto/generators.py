"""Key-material generators, one per secret ``kind``, and their explicit registry.

Each generator draws from the OS CSPRNG and returns a :class:`~rotatord.sensitive.Sensitive`.
``recognises`` is deliberately strict (exact alphabet, length and decoded size), because log
scanners and redaction tests rely on it having no false positives on ordinary text.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from typing import ClassVar

from cryptography.fernet import Fernet

from ..interfaces import Generator
from ..sensitive import Sensitive
from .tokens import PREFIX_RE, make_token, parse_token

__all__ = [
    "GENERATORS",
    "WHSEC_PREFIX",
    "ApiTokenGenerator",
    "FernetGenerator",
    "WebhookSecretGenerator",
    "generator_for",
    "whsec_key",
]

# 32 bytes in base64 are 43 significant characters and one "=" of padding.
_FERNET_RE = re.compile(r"[A-Za-z0-9_-]{43}=")
_STD_B64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
WHSEC_PREFIX = "whsec_"
# The Standard Webhooks specification accepts secrets of 24 to 64 bytes.
_WHSEC_MIN_BYTES = 24
_WHSEC_MAX_BYTES = 64
_WHSEC_BYTES = 32


class FernetGenerator(Generator):
    """A Fernet key: 32 random bytes, urlsafe base64 (signing half, then encryption half)."""

    kind: ClassVar[str] = "fernet"

    def generate(self) -> Sensitive:
        return Sensitive(Fernet.generate_key().decode("ascii"))

    def recognises(self, text: str) -> bool:
        """Exactly 44 urlsafe base64 characters that decode (canonically) to 32 bytes."""
        if not isinstance(text, str) or _FERNET_RE.fullmatch(text) is None:
            return False
        raw = base64.urlsafe_b64decode(text)
        # The round trip rejects non-canonical encodings (stray low bits in the last digit).
        return len(raw) == 32 and base64.urlsafe_b64encode(raw).decode("ascii") == text


class ApiTokenGenerator(Generator):
    """API tokens in the :mod:`rotatord.crypto.tokens` format, with this generator's prefix."""

    kind: ClassVar[str] = "api_token"

    def __init__(self, prefix: str = "rtd") -> None:
        if not isinstance(prefix, str) or PREFIX_RE.fullmatch(prefix) is None:
            raise ValueError("token prefix must match ^[a-z][a-z0-9]{1,15}$")
        self.prefix = prefix

    def generate(self) -> Sensitive:
        return make_token(self.prefix)

    def recognises(self, text: str) -> bool:
        """A well-formed token (shape and checksum) carrying this generator's prefix.

        Use :func:`rotatord.crypto.tokens.parse_token` to recognise tokens of any prefix.
        """
        if not isinstance(text, str):
            return False
        parts = parse_token(text)
        return parts is not None and parts.prefix == self.prefix

    def __repr__(self) -> str:
        return f"ApiTokenGenerator(prefix={self.prefix!r})"


class WebhookSecretGenerator(Generator):
    """A Standard Webhooks signing secret: ``whsec_`` + standard base64 of 32 random bytes."""

    kind: ClassVar[str] = "webhook_secret"

    def generate(self) -> Sensitive:
        raw = secrets.token_bytes(_WHSEC_BYTES)
        return Sensitive(WHSEC_PREFIX + base64.b64encode(raw).decode("ascii"))

    def recognises(self, text: str) -> bool:
        """``whsec_`` then padded standard base64 decoding to 24..64 bytes."""
        if not isinstance(text, str) or not text.startswith(WHSEC_PREFIX):
            return False
        encoded = text[len(WHSEC_PREFIX) :]
        if len(encoded) % 4 or _STD_B64_RE.fullmatch(encoded) is None:
            return False
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            return False
        return _WHSEC_MIN_BYTES <= len(raw) <= _WHSEC_MAX_BYTES


def whsec_key(secret: str | Sensitive) -> bytes:
    """The HMAC key of a ``whsec_`` secret: base64-decode what follows the prefix.

    Raises ValueError (without quoting the value) when it is not a non-empty base64 secret.
    The one parser of the format, for the signer (rotatord.notify) and the verifier (bots).
    """
    text = secret.reveal() if isinstance(secret, Sensitive) else secret
    if not isinstance(text, str):
        raise TypeError("a signing secret is a str (or Sensitive)")
    if not text.startswith(WHSEC_PREFIX):
        raise ValueError("a signing secret must start with 'whsec_'")
    encoded = text[len(WHSEC_PREFIX) :]
    try:
        # Padding is optional in the wild (the reference library appends "=="); be as lenient
        # as the verifiers are, but refuse characters outside the base64 alphabet.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a signing secret must be 'whsec_' followed by base64") from None
    if not key:
        raise ValueError("a signing secret must not be empty")
    return key


#: The registry, keyed by the configuration's ``kind``.
GENERATORS: dict[str, type[Generator]] = {
    FernetGenerator.kind: FernetGenerator,
    ApiTokenGenerator.kind: ApiTokenGenerator,
    WebhookSecretGenerator.kind: WebhookSecretGenerator,
}


def generator_for(kind: str, *, token_prefix: str | None = None) -> Generator:
    """The generator for ``kind``.

    ``token_prefix`` configures ``api_token`` generators (default ``"rtd"``) and is ignored for
    the other kinds, so callers may pass their secret's setting unconditionally.
    Raises ValueError for an unknown kind or an invalid prefix.
    """
    cls = GENERATORS.get(kind)
    if cls is None:
        known = ", ".join(sorted(GENERATORS))
        raise ValueError(f"unknown secret kind {kind!r} (expected one of {known})")
    if cls is ApiTokenGenerator and token_prefix is not None:
        return ApiTokenGenerator(token_prefix)
    return cls()
