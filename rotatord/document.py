"""The secret document: what a bot reads, identical on every backend.

A document is JSON with ``"schema": "rotatord/v1"``.  For ``fernet`` it is a key ring (one
primary, decrypt-only others); for ``api_token`` and ``webhook_secret`` a current and an optional
previous credential.  One read gives a consistent view.  This module is stdlib-only so that
``rotatord.client`` can use it without importing the daemon.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from .errors import DocumentInvalid
from .sensitive import Sensitive
from .timeutil import format_ts, parse_ts

__all__ = [
    "SCHEMA",
    "Credential",
    "CredentialSet",
    "Document",
    "FernetKey",
    "FernetRing",
    "Revoked",
    "digest",
    "dump_document",
    "key_id_for",
    "parse_document",
    "sha256_hex",
    "to_dict",
]

SCHEMA = "rotatord/v1"
KeyState = Literal["primary", "decrypt_only"]
CredentialKind = Literal["api_token", "webhook_secret"]
_MATERIAL_FIELD = {"api_token": "token", "webhook_secret": "secret"}


def key_id_for(version: int) -> str:
    """Key ids derive from the rotation version, so a resumed step recognises its own key."""
    return f"v{version}"


@dataclass(frozen=True)
class FernetKey:
    id: str
    material: Sensitive
    state: KeyState
    created_at: datetime
    retire_after: datetime | None = None


@dataclass(frozen=True)
class FernetRing:
    name: str
    version: int
    primary: str
    keys: tuple[FernetKey, ...]
    updated_at: datetime
    kind: Literal["fernet"] = "fernet"

    def key(self, key_id: str) -> FernetKey | None:
        return next((k for k in self.keys if k.id == key_id), None)

    @property
    def primary_key(self) -> FernetKey:
        key = self.key(self.primary)
        assert key is not None  # guaranteed by parse/validation
        return key

    def ordered(self) -> tuple[FernetKey, ...]:
        """Primary first, then decrypt-only keys newest first: the MultiFernet order."""
        rest = sorted((k for k in self.keys if k.id != self.primary), key=lambda k: k.created_at, reverse=True)
        return (self.primary_key, *rest)


@dataclass(frozen=True)
class Credential:
    id: str
    value: Sensitive
    sha256: str
    created_at: datetime
    expires_at: datetime | None = None
    valid_until: datetime | None = None  # set when it became ``previous``


@dataclass(frozen=True)
class Revoked:
    """A revoked credential, kept by hash only so verifiers can tell revoked from unknown."""

    id: str
    sha256: str
    revoked_at: datetime


@dataclass(frozen=True)
class CredentialSet:
    name: str
    kind: CredentialKind
    version: int
    current: Credential
    updated_at: datetime
    previous: Credential | None = None
    revoked: tuple[Revoked, ...] = field(default_factory=tuple)


Document = FernetRing | CredentialSet


def _is_fernet_key(text: str) -> bool:
    """44 chars of urlsafe base64 that decode to 32 bytes and re-encode to the same text."""
    if len(text) != 44:
        return False
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return False
    return len(raw) == 32 and base64.urlsafe_b64encode(raw).decode() == text


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _ts(value: datetime | None) -> str | None:
    return format_ts(value)


def to_dict(doc: Document) -> dict[str, Any]:
    """The JSON-ready form of a document.  It holds key material: never log it."""
    if isinstance(doc, FernetRing):
        return {
            "schema": SCHEMA,
            "kind": "fernet",
            "name": doc.name,
            "version": doc.version,
            "primary": doc.primary,
            "keys": [
                {
                    "id": k.id,
                    "material": k.material.reveal(),
                    "state": k.state,
                    "created_at": _ts(k.created_at),
                    "retire_after": _ts(k.retire_after),
                }
                for k in doc.keys
            ],
            "updated_at": _ts(doc.updated_at),
        }
    field_name = _MATERIAL_FIELD[doc.kind]

    def cred(c: Credential) -> dict[str, Any]:
        out: dict[str, Any] = {"id": c.id, field_name: c.value.reveal(), "created_at": _ts(c.created_at)}
        if doc.kind == "api_token":
            out["sha256"] = c.sha256
            out["expires_at"] = _ts(c.expires_at)
        if c.valid_until is not None:
            out["valid_until"] = _ts(c.valid_until)
        return out

    return {
        "schema": SCHEMA,
        "kind": doc.kind,
        "name": doc.name,
        "version": doc.version,
        "current": cred(doc.current),
        "previous": cred(doc.previous) if doc.previous else None,
        "revoked": [{"id": r.id, "sha256": r.sha256, "revoked_at": _ts(r.revoked_at)} for r in doc.revoked],
        "updated_at": _ts(doc.updated_at),
    }


def dump_document(doc: Document) -> bytes:
    """Canonical JSON bytes (sorted keys, compact): equal documents give equal bytes."""
    return json.dumps(to_dict(doc), sort_keys=True, separators=(",", ":")).encode()


def digest(doc: Document) -> str:
    """SHA-256 of the canonical form: safe to store and log, reveals nothing usable."""
    return hashlib.sha256(dump_document(doc)).hexdigest()


class _Reader:
    """Field access that raises DocumentInvalid naming the field, never echoing its value."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_name: str, why: str) -> DocumentInvalid:
        return DocumentInvalid(f"{self.where}: field {field_name!r} {why}")

    def get(self, obj: Any, key: str, typ: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(key, "is inside something that is not an object")
        if key not in obj or obj[key] is None:
            if optional:
                return None
            raise self.fail(key, "is missing")
        value = obj[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is int):
            raise self.fail(key, "has the wrong type")
        return value

    def ts(self, obj: Any, key: str, *, optional: bool = False) -> datetime | None:
        raw = self.get(obj, key, str, optional=optional)
        if raw is None:
            return None
        try:
            return parse_ts(raw)
        except ValueError:
            raise self.fail(key, "is not an ISO 8601 timestamp with a timezone") from None


def parse_document(raw: bytes | str | dict[str, Any], where: str = "document") -> Document:
    """Parse and validate a document; raise :class:`DocumentInvalid` naming what is wrong.

    A document of a future schema version is refused rather than half-understood.
    """
    if isinstance(raw, bytes | str):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise DocumentInvalid(f"{where}: not valid JSON") from None
    else:
        data = raw
    r = _Reader(where)
    if not isinstance(data, dict):
        raise DocumentInvalid(f"{where}: not a JSON object")
    schema = r.get(data, "schema", str)
    if schema != SCHEMA:
        raise DocumentInvalid(f"{where}: schema {schema!r} is not supported (expected {SCHEMA!r})")
    from .schema import schema_problem  # stdlib + optional jsonschema; imported on first parse

    problem = schema_problem(data)
    if problem is not None:
        raise DocumentInvalid(f"{where}: {problem}")
    kind = r.get(data, "kind", str)
    name = r.get(data, "name", str)
    version = r.get(data, "version", int)
    updated_at = r.ts(data, "updated_at")
    assert updated_at is not None
    if version < 1:
        raise r.fail("version", "must be >= 1")
    if kind == "fernet":
        return _parse_ring(data, r, name, version, updated_at)
    if kind in _MATERIAL_FIELD:
        return _parse_credentials(data, r, kind, name, version, updated_at)
    raise r.fail("kind", "is not one of fernet, api_token, webhook_secret")


def _parse_ring(data: dict[str, Any], r: _Reader, name: str, version: int, updated_at: datetime) -> FernetRing:
    primary = r.get(data, "primary", str)
    keys = []
    seen: set[str] = set()
    for item in r.get(data, "keys", list):
        key_id = r.get(item, "id", str)
        if key_id in seen:
            raise r.fail("keys", f"repeats key id {key_id!r}")
        seen.add(key_id)
        material = r.get(item, "material", str)
        if not _is_fernet_key(material):
            raise r.fail("keys", f"holds a malformed key for id {key_id!r}")
        state = r.get(item, "state", str)
        if state not in ("primary", "decrypt_only"):
            raise r.fail("keys", f"has an unknown state for id {key_id!r}")
        created = r.ts(item, "created_at")
        assert created is not None
        keys.append(FernetKey(key_id, Sensitive(material), state, created, r.ts(item, "retire_after", optional=True)))
    if primary not in seen:
        raise r.fail("primary", "names no key of the ring")
    for k in keys:
        if (k.state == "primary") != (k.id == primary):
            raise r.fail("keys", "disagree with 'primary' about which key is primary")
    return FernetRing(name, version, primary, tuple(keys), updated_at)


def _parse_credentials(
    data: dict[str, Any], r: _Reader, kind: CredentialKind, name: str, version: int, updated_at: datetime
) -> CredentialSet:
    field_name = _MATERIAL_FIELD[kind]

    def cred(obj: Any) -> Credential:
        value = r.get(obj, field_name, str)
        sha = r.get(obj, "sha256", str, optional=True) or sha256_hex(value)
        if sha != sha256_hex(value):
            raise r.fail("sha256", "does not match its credential")
        created = r.ts(obj, "created_at")
        assert created is not None
        return Credential(
            r.get(obj, "id", str),
            Sensitive(value),
            sha,
            created,
            r.ts(obj, "expires_at", optional=True),
            r.ts(obj, "valid_until", optional=True),
        )

    current = cred(r.get(data, "current", dict))
    prev_raw = data.get("previous")
    previous = cred(prev_raw) if prev_raw is not None else None
    revoked = tuple(
        Revoked(r.get(x, "id", str), r.get(x, "sha256", str), r.ts(x, "revoked_at") or updated_at)
        for x in (r.get(data, "revoked", list, optional=True) or [])
    )
    return CredentialSet(name, kind, version, current, updated_at, previous, revoked)


def with_updates(doc: Document, **changes: Any) -> Document:
    return replace(doc, **changes)
