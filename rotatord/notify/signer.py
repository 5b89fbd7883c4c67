"""Standard Webhooks signatures: ``webhook-signature: v1,<base64 HMAC-SHA256>[ v1,<...>]``.

The signed content is ``f"{msg_id}.{timestamp}."`` followed by the exact body bytes; the key of a
``whsec_<base64>`` secret is the base64-decoded part after the prefix (not the UTF-8 text, which
is Stripe's convention and would verify nowhere else).  While a consumer's signing secret
rotates, the request carries one entry per secret, separated by exactly one space, so a bot
holding either secret verifies it.  Nothing here logs, and no error message quotes a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence

from ..crypto.generators import WHSEC_PREFIX
from ..crypto.generators import whsec_key as secret_key
from ..sensitive import Sensitive

__all__ = ["SIGNATURE_VERSION", "WHSEC_PREFIX", "SigningKeys", "secret_key", "sign", "webhook_headers"]

SIGNATURE_VERSION = "v1"

SigningSecret = str | Sensitive
_SPACE = re.compile(r"\s")


def _check_id(msg_id: str) -> None:
    # The signed content is split on ".", so an id containing one would be ambiguous.
    if not msg_id or "." in msg_id or _SPACE.search(msg_id):
        raise ValueError("a webhook id must be non-empty, without '.' or whitespace")


class SigningKeys:
    """A consumer's secrets, decoded and keyed once (HMAC-SHA256 states, in the given order), to
    sign many requests: a fan-out signs each row with these, not by decoding each secret again.

    Raises ValueError when there is no secret or one is malformed.  The repr names only how many
    keys it holds.
    """

    __slots__ = ("_macs",)

    def __init__(self, secrets: Sequence[SigningSecret]) -> None:
        if isinstance(secrets, str | Sensitive):
            raise TypeError("secrets is a sequence of secrets, not one secret")
        if not secrets:
            raise ValueError("at least one signing secret is needed")
        self._macs = tuple(hmac.new(secret_key(secret), digestmod=hashlib.sha256) for secret in secrets)

    def __repr__(self) -> str:
        return f"SigningKeys(<{len(self._macs)} keys>)"

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` value: one ``v1,<base64>`` entry per secret (see :func:`sign`)."""
        if isinstance(timestamp, bool) or not isinstance(timestamp, int):
            raise TypeError("timestamp is integer Unix seconds")
        if not isinstance(body, bytes):
            raise TypeError("body is the exact bytes sent")
        _check_id(msg_id)
        content = f"{msg_id}.{timestamp}.".encode() + body
        entries = []
        for keyed in self._macs:
            mac = keyed.copy()  # the keyed state is reused; each request hashes its own copy
            mac.update(content)
            entries.append(f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode('ascii')}")
        return " ".join(entries)

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """Every header of one attempt (see :func:`webhook_headers`)."""
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.sign(msg_id, timestamp, body),
            "content-type": "application/json",
        }


def sign(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[SigningSecret]) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` entry per secret, in the given order.

    ``timestamp`` is integer Unix seconds (the ``webhook-timestamp`` header sent with it).
    Raises ValueError when there is no secret, a secret is malformed, or the id is unusable.
    """
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp is integer Unix seconds")
    if not isinstance(body, bytes):
        raise TypeError("body is the exact bytes sent")
    return SigningKeys(secrets).sign(msg_id, timestamp, body)


def webhook_headers(msg_id: str, timestamp: int, body: bytes, secrets: Sequence[SigningSecret]) -> dict[str, str]:
    """Every header of one attempt: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
    and ``content-type``.  The id stays the same across retries; the timestamp is per attempt."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp is integer Unix seconds")
    if not isinstance(body, bytes):
        raise TypeError("body is the exact bytes sent")
    return SigningKeys(secrets).headers(msg_id, timestamp, body)
