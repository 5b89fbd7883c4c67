"""Signatures checked by the ``standardwebhooks`` PyPI library, not by rotatord's own code."""

from __future__ import annotations

import base64
import secrets
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from rotatord.crypto.generators import WebhookSecretGenerator
from rotatord.notify.signer import secret_key, sign, webhook_headers
from rotatord.sensitive import Sensitive

BODY = b'{"type":"key.staged","timestamp":"2025-01-06T03:00:00.000Z","data":{"secret":"bot-db","version":2}}'
MSG = "msg_0123456789abcdef"


def whsec() -> str:
    return WebhookSecretGenerator().generate().reveal()


def test_one_secret_verifies_with_the_reference_library() -> None:
    secret = whsec()
    now = int(time.time())
    headers = webhook_headers(MSG, now, BODY, [secret])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["webhook-timestamp"] == str(now)
    assert headers["content-type"] == "application/json"
    assert Webhook(secret).verify(BODY, headers)["data"]["version"] == 2
    # The same bytes with another secret, another body or another id do not verify.
    for secret_, body, msg in ((whsec(), BODY, MSG), (secret, BODY + b" ", MSG), (secret, BODY, MSG + "0")):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret_).verify(body, {**headers, "webhook-id": msg})


def test_two_secrets_give_two_entries_each_verifying_alone() -> None:
    new, old = whsec(), whsec()
    now = int(time.time())
    headers = webhook_headers(MSG, now, BODY, [new, old])
    value = headers["webhook-signature"]
    assert "  " not in value and value.count(" ") == 1  # the library raises on a double space
    first, second = value.split(" ")
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, {**headers, "webhook-signature": first})
    Webhook(old).verify(BODY, {**headers, "webhook-signature": second})
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(old).verify(BODY, {**headers, "webhook-signature": first})


def test_the_signature_equals_the_reference_librarys_own() -> None:
    secret = whsec()
    ts = 1_736_132_400
    expected = Webhook(secret).sign(MSG, datetime.fromtimestamp(ts, UTC), BODY.decode())
    assert sign(MSG, ts, BODY, [secret]) == expected


def test_the_key_is_the_base64_decoded_secret_not_its_text() -> None:
    raw = secrets.token_bytes(32)
    secret = "whsec_" + base64.b64encode(raw).decode()
    assert secret_key(secret) == raw
    assert secret_key(Sensitive(secret)) == raw
    # Unpadded secrets are accepted, as the reference library accepts them.
    unpadded = "whsec_" + base64.b64encode(secrets.token_bytes(31)).decode().rstrip("=")
    headers = webhook_headers(MSG, int(time.time()), BODY, [unpadded])
    Webhook(unpadded).verify(BODY, headers)


@pytest.mark.parametrize(
    "bad",
    ["", "whsec_", "not-a-whsec-secret", "whsec_!!!notbase64!!!", "sk_live_" + "A" * 40],
)
def test_malformed_secrets_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        sign(MSG, 1, BODY, [bad])
    if len(bad) > len("whsec_"):
        assert bad not in str(info.value)


def test_misuse_is_refused() -> None:
    secret = whsec()
    with pytest.raises(ValueError):
        sign(MSG, 1, BODY, [])
    with pytest.raises(TypeError):
        sign(MSG, 1, BODY, secret)  # one secret where a list is expected
    with pytest.raises(TypeError):
        sign(MSG, 1.5, BODY, [secret])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sign(MSG, 1, BODY.decode(), [secret])  # type: ignore[arg-type]
    for msg_id in ("", "msg.with.dots", "msg with space"):
        with pytest.raises(ValueError):
            sign(msg_id, 1, BODY, [secret])
