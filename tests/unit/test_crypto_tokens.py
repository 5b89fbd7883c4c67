"""The API token format: round trip, checksum, scanning, hashing, constant-time verification.

Token values are kept inside Sensitive or in locals that assertions do not display, so a
failing test does not print key material.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterator

import pytest

from rotatord.crypto.tokens import (
    BODY_WIDTH,
    CHECKSUM_WIDTH,
    TOKEN_RE,
    _base62,
    _checksum,
    make_token,
    parse_token,
    token_sha256,
    verify_token,
)
from rotatord.document import sha256_hex
from rotatord.sensitive import Sensitive

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def test_make_token_round_trips_through_parse_token() -> None:
    for prefix in ("rtd", "ab", "bot7", "a" * 16):
        token = make_token(prefix)
        assert isinstance(token, Sensitive)
        text = token.reveal()
        parts = parse_token(text)
        assert parts is not None
        assert parts.prefix == prefix
        same = f"{parts.prefix}_{parts.body}{parts.checksum}" == text
        assert same
        assert len(parts.body) == BODY_WIDTH
        assert len(parts.checksum) == CHECKSUM_WIDTH
        assert len(token) == len(prefix) + 1 + BODY_WIDTH + CHECKSUM_WIDTH


def test_tokens_are_distinct_and_never_shown_in_reprs() -> None:
    tokens = [make_token("rtd") for _ in range(200)]
    assert len({t.reveal() for t in tokens}) == 200
    token = tokens[0]
    leaked = token.reveal() in repr(token) or token.reveal() in f"{token}"
    assert not leaked
    parts = parse_token(token.reveal())
    assert parts is not None
    body_in_repr = parts.body in repr(parts)
    assert not body_in_repr


def test_body_uses_the_whole_256_bit_range() -> None:
    # Left padding must keep the width fixed for small values and the largest value must fit.
    assert _base62(0, BODY_WIDTH) == "0" * BODY_WIDTH
    assert len(_base62(2**256 - 1, BODY_WIDTH)) == BODY_WIDTH
    assert len(_base62(2**32 - 1, CHECKSUM_WIDTH)) == CHECKSUM_WIDTH
    with pytest.raises(ValueError):
        _base62(62**BODY_WIDTH, BODY_WIDTH)


@pytest.mark.parametrize("prefix", ["", "a", "Rtd", "1ab", "a_b", "a-b", "rtd ", "a" * 17, "rtd\n"])
def test_make_token_rejects_bad_prefixes(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        make_token(prefix)


def test_checksum_catches_every_one_character_change() -> None:
    text = make_token("rtd").reveal()
    for position in range(len(text)):
        if text[position] == "_":
            continue
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" if position < 3 else BASE62
        for replacement in alphabet:
            if replacement == text[position]:
                continue
            changed = text[:position] + replacement + text[position + 1 :]
            accepted = parse_token(changed) is not None
            assert not accepted, f"a change at position {position} was not caught"


def test_parse_token_rejects_wrong_shapes() -> None:
    text = make_token("rtd").reveal()
    bad = [
        "",
        text[:-1],
        text + "a",
        " " + text,
        text + "\n",
        text.replace("_", "-", 1),
        "RTD" + text[3:],
        text[:4] + "+" + text[5:],
    ]
    for candidate in bad:
        accepted = parse_token(candidate) is not None
        assert not accepted


def test_parse_token_rejects_a_body_wider_than_256_bits_even_with_a_valid_checksum() -> None:
    head = "rtd_" + "z" * BODY_WIDTH
    look_alike = head + _checksum(head)
    assert TOKEN_RE.fullmatch(look_alike) is not None
    assert parse_token(look_alike) is None


def test_parse_token_rejects_random_text_of_the_same_shape_and_length() -> None:
    length = len(make_token("rtd"))
    for _ in range(2000):
        # Same shape as a token (prefix, underscore, 49 base62 characters), random checksum.
        same_shape = "rtd_" + "".join(secrets.choice(BASE62) for _ in range(BODY_WIDTH + CHECKSUM_WIDTH))
        # Random urlsafe base64 of the same total length.
        random_b64 = base64.urlsafe_b64encode(secrets.token_bytes(length)).decode()[:length]
        assert len(same_shape) == len(random_b64) == length
        assert parse_token(same_shape) is None
        assert parse_token(random_b64) is None


def test_parse_token_type_checks() -> None:
    with pytest.raises(TypeError):
        parse_token(b"rtd_abc")  # type: ignore[arg-type]


def test_token_re_finds_planted_tokens_in_text() -> None:
    planted = [make_token("rtd").reveal(), make_token("ghbot").reveal(), make_token("x9").reveal()]
    decoys = [
        "rtd_" + "A" * (BODY_WIDTH + CHECKSUM_WIDTH),  # right shape, wrong checksum
        "rtd_" + "A" * (BODY_WIDTH + CHECKSUM_WIDTH - 1),  # too short
    ]
    text = (
        f"GET /v1/items?token={planted[0]}&page=2 HTTP/1.1\n"
        f'{{"auth": "{planted[1]}", "note": "{decoys[0]}"}}\n'
        f"Authorization: Bearer {planted[2]}\n"
        f"glued: {planted[0]}X and {decoys[1]}.\n"
    )
    candidates = [m.group(0) for m in TOKEN_RE.finditer(text)]
    confirmed = [c for c in candidates if parse_token(c) is not None]
    # The glued copy of planted[0] is no candidate; the first decoy is a candidate the checksum rejects.
    found_planted = confirmed == planted
    assert found_planted
    assert len(candidates) == len(planted) + 1
    # The groups split prefix, body and checksum.
    first = TOKEN_RE.search(text)
    assert first is not None
    assert first.group(1) == "rtd"
    assert len(first.group(2)) == BODY_WIDTH
    assert len(first.group(3)) == CHECKSUM_WIDTH


def test_token_re_is_word_boundary_anchored() -> None:
    text = make_token("rtd").reveal()
    assert TOKEN_RE.search(f"({text})") is not None
    assert TOKEN_RE.search(f"{text}0") is None
    # A letter glued in front makes a longer prefix, which the checksum then rejects.
    match = TOKEN_RE.search(f"q{text}")
    assert match is None or parse_token(match.group(0)) is None


def test_token_sha256_is_what_documents_store() -> None:
    text = make_token("rtd").reveal()
    digest = token_sha256(text)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert digest == sha256_hex(text)


def test_verify_token_accepts_only_a_listed_hash() -> None:
    current, previous, other = (make_token("rtd").reveal() for _ in range(3))
    stored = [token_sha256(current), token_sha256(previous)]
    assert verify_token(current, stored)
    assert verify_token(previous, stored)
    assert verify_token(previous, [h.upper() for h in stored])
    assert not verify_token(other, stored)
    assert not verify_token(current, [])
    assert not verify_token(current, ["", "not hex", "é" * 64])
    changed = current[:-1] + ("a" if current[-1] != "a" else "b")
    assert not verify_token(changed, stored)


def test_verify_token_consumes_every_candidate() -> None:
    # No early exit: the candidates after the match are still read.
    text = make_token("rtd").reveal()
    consumed: list[str] = []

    def candidates() -> Iterator[str]:
        for digest in (token_sha256(text), "0" * 64, "1" * 64):
            consumed.append(digest)
            yield digest

    assert verify_token(text, candidates())
    assert len(consumed) == 3
