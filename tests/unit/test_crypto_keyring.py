"""Key-ring helpers: MultiFernet order, the census primitive, rotation and decryption.

Key material lives only in Sensitive wrappers and Fernet objects; assertions compare key ids,
plaintexts and booleans, so a failing test prints no key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.fernet import Fernet

from rotatord.crypto.keyring import KeyIdentifier, decrypt, decrypt_at_time, multifernet, rotator
from rotatord.document import FernetKey, FernetRing
from rotatord.errors import DecryptError
from rotatord.sensitive import Sensitive

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def new_key() -> Sensitive:
    return Sensitive(Fernet.generate_key().decode())


def fernet(key: Sensitive) -> Fernet:
    return Fernet(key.reveal().encode())


@pytest.fixture
def keys() -> dict[str, Sensitive]:
    return {"v1": new_key(), "v2": new_key(), "v3": new_key()}


@pytest.fixture
def ring(keys: dict[str, Sensitive]) -> FernetRing:
    # v3 is primary; the decrypt-only keys are listed oldest first to prove ordering is by age.
    return FernetRing(
        name="support-bot-db",
        version=3,
        primary="v3",
        keys=(
            FernetKey("v1", keys["v1"], "decrypt_only", T0),
            FernetKey("v3", keys["v3"], "primary", T0 + timedelta(days=60)),
            FernetKey("v2", keys["v2"], "decrypt_only", T0 + timedelta(days=30)),
        ),
        updated_at=T0 + timedelta(days=60),
    )


def resign(key: Sensitive, data: bytes) -> bytes:
    """A token whose body is ``data`` with a valid HMAC under ``key``."""
    signing = base64.urlsafe_b64decode(key.reveal())[:16]
    return base64.urlsafe_b64encode(data + hmac.new(signing, data, hashlib.sha256).digest())


def test_multifernet_encrypts_under_primary_and_decrypts_every_key(
    ring: FernetRing, keys: dict[str, Sensitive]
) -> None:
    ring_fernet = multifernet(ring)
    identifier = KeyIdentifier(ring)
    assert identifier.identify(ring_fernet.encrypt(b"new")) == "v3"
    for key in keys.values():
        assert ring_fernet.decrypt(fernet(key).encrypt(b"old")) == b"old"


def test_identify_names_the_signing_key(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    identifier = KeyIdentifier(ring)
    assert identifier.key_ids == ("v3", "v2", "v1")  # primary first, then newest first
    for key_id, key in keys.items():
        for plaintext in (b"", b"x", b"y" * 16, os.urandom(1000)):
            token = fernet(key).encrypt(plaintext)
            assert identifier.identify(token) == key_id
            assert identifier(token) == key_id
            assert identifier.identify(bytearray(token)) == key_id
            assert identifier.identify(memoryview(token)) == key_id


def test_identify_from_pairs(keys: dict[str, Sensitive]) -> None:
    identifier = KeyIdentifier([("a", keys["v1"]), ("b", keys["v2"])])
    assert identifier.key_ids == ("a", "b")
    assert identifier.identify(fernet(keys["v2"]).encrypt(b"m")) == "b"
    assert identifier.identify(fernet(keys["v3"]).encrypt(b"m")) is None
    assert KeyIdentifier([]).identify(fernet(keys["v1"]).encrypt(b"m")) is None


def test_identify_many(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    tokens = [fernet(keys["v1"]).encrypt(b"a"), b"junk", fernet(keys["v3"]).encrypt(b"b"), b""]
    assert KeyIdentifier(ring).identify_many(tokens) == ["v1", None, "v3", None]


def test_identify_returns_none_unless_signed_by_the_ring(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    identifier = KeyIdentifier(ring)
    token = fernet(keys["v2"]).encrypt(b"hello, world")
    raw = base64.urlsafe_b64decode(token)
    tampered = bytearray(raw)
    tampered[30] ^= 0x01
    not_none = {
        "foreign key": fernet(new_key()).encrypt(b"hello"),
        "truncated by one char": token[:-1],
        "truncated by four chars": token[:-4],
        "truncated to the header": base64.urlsafe_b64encode(raw[:25]),
        "half a token": token[: len(token) // 2],
        "tampered ciphertext": base64.urlsafe_b64encode(bytes(tampered)),
        "mac dropped": base64.urlsafe_b64encode(raw[:-32]),
        "garbage": b"this is not a fernet token at all",
        "binary garbage": os.urandom(120),
        "invalid base64": b"gAAAA!!!",
        "padding dropped": token.rstrip(b"="),
        "empty": b"",
        # Valid HMAC under a ring key, but not a Fernet token: wrong version, or a ciphertext
        # that is not whole blocks.  Fernet would not decrypt these either.
        "wrong version": resign(keys["v2"], b"\x81" + raw[1:-32]),
        "partial block": resign(keys["v2"], raw[:-32] + b"\x00"),
        "no ciphertext": resign(keys["v2"], raw[:25]),
    }
    identified = {name: identifier.identify(value) for name, value in not_none.items()}
    assert identified == dict.fromkeys(not_none)


def test_identify_accepts_what_fernet_accepts(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    # Fernet's base64 decoding skips stray characters such as a trailing newline from a file;
    # the census must count such a token under its key, because Fernet still decrypts it.
    identifier = KeyIdentifier(ring)
    token = fernet(keys["v1"]).encrypt(b"data") + b"\n"
    assert fernet(keys["v1"]).decrypt(token) == b"data"
    assert identifier.identify(token) == "v1"


def test_identify_type_checks(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    identifier = KeyIdentifier(ring)
    with pytest.raises(TypeError):
        identifier.identify(fernet(keys["v1"]).encrypt(b"x").decode())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        identifier.identify(None)  # type: ignore[arg-type]


def test_key_identifier_refuses_bad_keys_without_echoing_them(keys: dict[str, Sensitive]) -> None:
    short = Sensitive(base64.urlsafe_b64encode(b"k" * 31).decode())
    with pytest.raises(ValueError, match="'bad'") as excinfo:
        KeyIdentifier([("bad", short)])
    assert short.reveal() not in str(excinfo.value)
    with pytest.raises(ValueError, match="appears twice"):
        KeyIdentifier([("a", keys["v1"]), ("a", keys["v2"])])
    with pytest.raises(TypeError):
        KeyIdentifier([("a", keys["v1"].reveal())])  # type: ignore[list-item]


def test_key_identifier_repr_shows_ids_only(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    text = repr(KeyIdentifier(ring))
    assert "v1" in text
    leaked = any(k.reveal() in text for k in keys.values())
    assert not leaked


def test_rotator_moves_old_tokens_to_the_primary(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    rotate = rotator(ring)
    identifier = KeyIdentifier(ring)
    for old in ("v1", "v2"):
        token = fernet(keys[old]).encrypt_at_time(b"stored datum", int(T0.timestamp()))
        assert identifier.identify(token) == old
        rotated = rotate(token)
        assert identifier.identify(rotated) == "v3"
        assert fernet(keys["v3"]).decrypt(rotated) == b"stored datum"
        # Rotation keeps the original timestamp, so TTL checks mean the same afterwards.
        assert fernet(keys["v3"]).extract_timestamp(rotated) == int(T0.timestamp())


def test_rotator_refuses_foreign_and_garbage_tokens(ring: FernetRing) -> None:
    rotate = rotator(ring)
    for token in (fernet(new_key()).encrypt(b"not ours"), b"garbage", b""):
        with pytest.raises(DecryptError) as excinfo:
            rotate(token)
        assert str(excinfo.value) == "cannot decrypt"
        # cryptography's InvalidToken must not ride along in the chain.
        assert excinfo.value.__cause__ is None
        assert excinfo.value.__suppress_context__
    with pytest.raises(TypeError):
        rotate("text")  # type: ignore[arg-type]


def test_decrypt(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    assert decrypt(ring, fernet(keys["v1"]).encrypt(b"one")) == b"one"
    assert decrypt(ring, fernet(keys["v3"]).encrypt(b"three"), ttl=3600) == b"three"
    with pytest.raises(DecryptError, match=r"^cannot decrypt$") as excinfo:
        decrypt(ring, fernet(new_key()).encrypt(b"foreign"))
    assert excinfo.value.__cause__ is None
    with pytest.raises(DecryptError, match=r"^cannot decrypt$"):
        decrypt(ring, b"garbage")


def test_decrypt_at_time_applies_the_ttl(ring: FernetRing, keys: dict[str, Sensitive]) -> None:
    made = T0 + timedelta(days=1)
    token = fernet(keys["v2"]).encrypt_at_time(b"fresh", int(made.timestamp()))
    assert decrypt_at_time(ring, token, ttl=60, now=made + timedelta(seconds=60)) == b"fresh"
    with pytest.raises(DecryptError, match=r"^cannot decrypt$"):
        decrypt_at_time(ring, token, ttl=60, now=made + timedelta(seconds=61))
    with pytest.raises(ValueError, match="timezone"):
        decrypt_at_time(ring, token, ttl=60, now=made.replace(tzinfo=None))
