"""The shipped JSON Schema of the secret document agrees with ``rotatord.document``.

Every document the engine's transitions produce validates against the schema and parses back
to the same document; broken documents fail both the schema and ``parse_document``.  Only
verdicts and field names are asserted, so a failure prints no key material.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import jsonschema
import pytest

from rotatord.crypto.generators import ApiTokenGenerator, FernetGenerator, WebhookSecretGenerator
from rotatord.document import (
    CredentialKind,
    CredentialSet,
    Document,
    FernetRing,
    digest,
    dump_document,
    parse_document,
    to_dict,
)
from rotatord.engine.transitions import (
    issue_credential,
    promote_ring,
    retire_ring,
    revoke_credential,
    rollback_credentials,
    rollback_ring,
    stage_ring,
)
from rotatord.errors import DocumentInvalid
from tests.helpers import materials

T0 = datetime(2025, 1, 6, 3, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = resources.files("rotatord.schema").joinpath("document-v1.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def _ring_step(ring: FernetRing | None) -> FernetRing:
    assert ring is not None, "the transition had nothing to do"
    return ring


def ring_lifecycle() -> Iterator[tuple[str, FernetRing]]:
    fernet = FernetGenerator().generate
    ring = _ring_step(stage_ring(None, "support-bot-db", 1, fernet, T0))
    yield "created", ring
    ring = _ring_step(stage_ring(ring, ring.name, 2, fernet, T0 + 30 * DAY))
    yield "staged", ring
    ring = _ring_step(promote_ring(ring, 2, T0 + 30 * DAY, T0 + 37 * DAY))
    yield "promoted", ring
    yield "rolled back", _ring_step(rollback_ring(ring, "v1", T0 + 31 * DAY, T0 + 38 * DAY))
    ring = _ring_step(stage_ring(ring, ring.name, 3, fernet, T0 + 60 * DAY))
    yield "staged with two decrypt-only keys", ring
    yield "retired", _ring_step(retire_ring(ring, {"v1"}, T0 + 61 * DAY))


def credential_lifecycle(kind: CredentialKind) -> Iterator[tuple[str, CredentialSet]]:
    generate = ApiTokenGenerator().generate if kind == "api_token" else WebhookSecretGenerator().generate

    def issue(cs: CredentialSet | None, version: int, at: datetime, ttl: timedelta | None) -> CredentialSet:
        out = issue_credential(
            cs, name=f"bot-{kind}", kind=kind, version=version, generate=generate, now=at, valid_until=at + DAY, ttl=ttl
        )
        assert out is not None
        return out

    cs = issue(None, 1, T0, None)
    yield "issued", cs
    cs = issue(cs, 2, T0 + 30 * DAY, 90 * DAY)
    yield "rotated, previous still valid", cs
    rolled = rollback_credentials(cs, "v1", T0 + 30 * DAY, T0 + 31 * DAY)
    assert rolled is not None
    yield "rolled back", rolled
    cs = issue(cs, 3, T0 + 60 * DAY, 90 * DAY)
    yield "rotated before the previous was revoked", cs
    revoked = revoke_credential(cs, T0 + 61 * DAY)
    assert revoked is not None
    yield "revoked", revoked


def all_documents() -> list[tuple[str, Document]]:
    out: list[tuple[str, Document]] = [(f"fernet {n}", d) for n, d in ring_lifecycle()]
    kinds: tuple[CredentialKind, ...] = ("api_token", "webhook_secret")
    for kind in kinds:
        out += [(f"{kind} {n}", d) for n, d in credential_lifecycle(kind)]
    return out


DOCUMENTS = all_documents()


@pytest.mark.parametrize("doc", [d for _, d in DOCUMENTS], ids=[n for n, _ in DOCUMENTS])
def test_every_document_the_transitions_produce_validates(
    doc: Document, validator: jsonschema.Draft202012Validator
) -> None:
    as_json = json.loads(dump_document(doc))
    problems = [f"{list(e.absolute_path)}: {e.validator}" for e in validator.iter_errors(as_json)]
    assert problems == []
    assert digest(parse_document(dump_document(doc))) == digest(doc)


def test_the_lifecycles_cover_every_optional_shape() -> None:
    """The documents above include each nullable field both set and null, so the schema's
    alternatives are all exercised."""
    seen: set[str] = set()
    for _, doc in DOCUMENTS:
        data = to_dict(doc)
        if isinstance(doc, FernetRing):
            seen |= {f"retire_after={k['retire_after'] is not None}" for k in data["keys"]}
            seen.add(f"keys={min(len(data['keys']), 3)}")
            continue
        seen.add(f"{doc.kind} previous={data['previous'] is not None}")
        seen.add(f"{doc.kind} revoked={bool(data['revoked'])}")
        if doc.kind == "api_token":
            seen.add(f"expires_at={data['current']['expires_at'] is not None}")
    expected = {"retire_after=True", "retire_after=False", "keys=1", "keys=3", "expires_at=True", "expires_at=False"}
    for kind in ("api_token", "webhook_secret"):
        expected |= {f"{kind} {field}={flag}" for field in ("previous", "revoked") for flag in (True, False)}
    assert expected <= seen


def _ring() -> dict[str, Any]:
    return to_dict(next(d for n, d in DOCUMENTS if n == "fernet promoted"))


def _tokens() -> dict[str, Any]:
    return to_dict(next(d for n, d in DOCUMENTS if n == "api_token rotated, previous still valid"))


def _without(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def _first_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["keys"][0].__setitem__(key, value)


BROKEN: list[tuple[str, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]] = [
    ("missing primary", _ring, _without("primary")),
    ("missing keys", _ring, _without("keys")),
    ("wrong kind: a ring labelled api_token", _ring, _set("kind", "api_token")),
    ("wrong kind: tokens labelled fernet", _tokens, _set("kind", "fernet")),
    ("future schema version", _ring, _set("schema", "rotatord/v9")),
    ("future schema version on tokens", _tokens, _set("schema", "rotatord/v9")),
    ("unknown kind", _ring, _set("kind", "rsa_keypair")),
    ("version 0", _ring, _set("version", 0)),
    ("version as a string", _ring, _set("version", "2")),
    ("version as a boolean", _tokens, _set("version", True)),
    ("timestamp without a timezone", _ring, _set("updated_at", "2025-01-06T03:00:00")),
    ("malformed key material", _ring, _first_key("material", "not-a-fernet-key")),
    ("unknown key state", _ring, _first_key("state", "retired")),
    ("missing current token", _tokens, _without("current")),
    ("an array, not an object", _ring, lambda d: d.__setitem__("wrap", [d.copy()])),
]


@pytest.mark.parametrize(("make", "breaks"), [(m, b) for _, m, b in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_documents_fail_the_schema_and_the_parser(
    make: Callable[[], dict[str, Any]],
    breaks: Callable[[dict[str, Any]], None],
    validator: jsonschema.Draft202012Validator,
) -> None:
    data = copy.deepcopy(make())
    breaks(data)
    payload: Any = data.get("wrap", data)
    assert not validator.is_valid(payload)
    with pytest.raises(DocumentInvalid) as info:
        parse_document(json.dumps(payload))
    secrets = materials(parse_document(json.dumps(make())))
    leaked = any(s in str(info.value) for s in secrets)
    assert not leaked


def test_the_schema_is_checked_on_every_parse(validator: jsonschema.Draft202012Validator) -> None:
    """Fields rotatord never writes are refused by the schema, and parse_document applies it."""
    ring = _ring()
    ring["comment"] = "hand-edited"
    assert not validator.is_valid(ring)
    with pytest.raises(DocumentInvalid, match="does not match the document schema"):
        parse_document(json.dumps(ring))
    two_primaries = _ring()
    for key in two_primaries["keys"]:
        key["state"] = "primary"
    assert not validator.is_valid(two_primaries)
    with pytest.raises(DocumentInvalid, match="document schema") as info:
        parse_document(json.dumps(two_primaries))
    assert all(k["material"] not in str(info.value) for k in two_primaries["keys"])
