"""Generators: fresh, well-shaped, full-entropy material; strict recognisers; the registry.

Generated values stay in Sensitive or in locals that assertions do not display.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from cryptography.fernet import Fernet
from standardwebhooks import Webhook

from rotatord.crypto.generators import (
    GENERATORS,
    ApiTokenGenerator,
    FernetGenerator,
    WebhookSecretGenerator,
    generator_for,
)
from rotatord.crypto.tokens import BODY_WIDTH, CHECKSUM_WIDTH, parse_token
from rotatord.interfaces import Generator
from rotatord.sensitive import Sensitive

ALL: list[Generator] = [FernetGenerator(), ApiTokenGenerator(), WebhookSecretGenerator()]


@pytest.mark.parametrize("generator", ALL, ids=lambda g: g.kind)
def test_generate_gives_distinct_sensitive_values_it_recognises(generator: Generator) -> None:
    values = [generator.generate() for _ in range(100)]
    assert all(isinstance(v, Sensitive) for v in values)
    assert len({v.reveal() for v in values}) == 100
    recognised = all(generator.recognises(v.reveal()) for v in values)
    assert recognised
    shown = any(v.reveal() in repr(v) for v in values)
    assert not shown


@pytest.mark.parametrize("generator", ALL, ids=lambda g: g.kind)
def test_recognisers_do_not_cross_kinds(generator: Generator) -> None:
    for other in ALL:
        if other.kind == generator.kind:
            continue
        value = other.generate().reveal()
        confused = generator.recognises(value)
        assert not confused, f"{generator.kind} recognised a {other.kind}"
    for text in ("", "hello world", "=" * 44, "whsec_", "rtd_"):
        assert not generator.recognises(text)


def test_fernet_key_shape_entropy_and_use() -> None:
    key = FernetGenerator().generate()
    assert len(key) == 44
    raw = base64.urlsafe_b64decode(key.reveal())
    assert len(raw) == 32
    fernet = Fernet(key.reveal().encode())
    assert fernet.decrypt(fernet.encrypt(b"payload")) == b"payload"


def test_fernet_recogniser_is_strict() -> None:
    generator = FernetGenerator()
    text = generator.generate().reveal()
    raw = base64.urlsafe_b64decode(text)
    standard = base64.b64encode(b"\xfb" * 32).decode()  # uses "+" and "/", not urlsafe
    near_misses = [
        text[:-1],  # no padding
        text + "=",
        text[:43],
        text[:-2] + "+=",
        text[:-2] + "/=",
        standard,
        base64.urlsafe_b64encode(raw + b"x").decode(),  # 33 bytes
        base64.urlsafe_b64encode(raw[:31]).decode(),  # 31 bytes
        text[:42] + "B=",  # "B" leaves stray low bits in the last digit: not canonical
    ]
    for candidate in near_misses:
        accepted = generator.recognises(candidate)
        assert not accepted
    assert generator.recognises(base64.urlsafe_b64encode(b"\xff" * 32).decode())


def test_api_token_shape_and_prefix() -> None:
    generator = ApiTokenGenerator("bot")
    text = generator.generate().reveal()
    parts = parse_token(text)
    assert parts is not None
    assert parts.prefix == "bot"
    assert (len(parts.body), len(parts.checksum)) == (BODY_WIDTH, CHECKSUM_WIDTH)
    # Its own prefix only: a valid token of another issuer is not "ours".
    foreign = ApiTokenGenerator("rtd").generate().reveal()
    assert parse_token(foreign) is not None
    assert not generator.recognises(foreign)
    tampered = text[:-1] + ("0" if text[-1] != "0" else "1")
    assert not generator.recognises(tampered)
    assert "bot" in repr(generator)


@pytest.mark.parametrize("prefix", ["", "B", "1x", "x" * 17, "a_b"])
def test_api_token_generator_rejects_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        ApiTokenGenerator(prefix)


def test_webhook_secret_shape_entropy_and_standard_webhooks_use() -> None:
    secret = WebhookSecretGenerator().generate()
    text = secret.reveal()
    assert text.startswith("whsec_")
    raw = base64.b64decode(text[len("whsec_") :], validate=True)
    assert len(raw) == 32
    # The real Standard Webhooks library accepts it, and signatures verify with it.
    hook = Webhook(text)
    now = datetime.now(UTC)
    signature = hook.sign("msg_1", now, '{"a":1}')
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert hook.verify('{"a":1}', headers) == {"a": 1}


def test_webhook_secret_recogniser_is_strict() -> None:
    generator = WebhookSecretGenerator()

    def whsec(raw: bytes) -> str:
        return "whsec_" + base64.b64encode(raw).decode()

    assert generator.recognises(whsec(b"\x01" * 24))
    assert generator.recognises(whsec(b"\x01" * 64))
    text = generator.generate().reveal()
    near_misses = [
        whsec(b"\x01" * 23),
        whsec(b"\x01" * 65),
        text.replace("whsec_", "whsec-", 1),
        text[len("whsec_") :],
        text.rstrip("="),  # unpadded
        "whsec_" + base64.urlsafe_b64encode(b"\xfb" * 32).decode(),  # urlsafe alphabet
        text + " ",
        text[:-4] + "====",
    ]
    for candidate in near_misses:
        accepted = generator.recognises(candidate)
        assert not accepted


def test_registry_and_generator_for() -> None:
    assert set(GENERATORS) == {"fernet", "api_token", "webhook_secret"}
    for kind, cls in GENERATORS.items():
        assert cls.kind == kind
        assert isinstance(generator_for(kind), cls)
    token_generator = generator_for("api_token", token_prefix="acme")
    assert token_generator.generate().reveal().startswith("acme_")
    assert generator_for("api_token").generate().reveal().startswith("rtd_")
    # The prefix is ignored for kinds that have none.
    assert isinstance(generator_for("fernet", token_prefix="acme"), FernetGenerator)
    with pytest.raises(ValueError, match="unknown secret kind 'rsa'"):
        generator_for("rsa")
    with pytest.raises(ValueError, match="prefix"):
        generator_for("api_token", token_prefix="Nope")
