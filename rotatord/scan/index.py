"""What every managed secret holds and held: the reference a scan compares findings with.

For each configured secret the index reads the current document and every older version the
backend still keeps (:meth:`~rotatord.interfaces.Backend.read_version`), and records, per piece
of material, which secret and key/credential id it is and its state now:

``valid``     the primary key / current credential
``accepted``  still accepted: a decrypt-only key, or a previous credential inside its grace
``expired``   a current API token past its ``expires_at``
``revoked``   a credential revoked, superseded past its grace, or only in older versions
``retired``   a Fernet key no longer in the ring (only older versions hold it)

The index keeps no material: entries are keyed by HMAC-SHA256, under a key drawn for this run,
of the material's SHA-256 (the form in which documents keep revoked credentials).  A lookup is
a dict probe on that keyed digest: its timing says nothing about the material to anyone without
the run's key, which never leaves the process.  A secret whose backend cannot be read is recorded
as a problem and the others are indexed anyway (a batch survives its members).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from ..config.model import SecretSettings
from ..document import CredentialSet, Document, FernetRing, sha256_hex
from ..errors import RotatordError
from ..interfaces import Backend

__all__ = ["STATE_RANK", "Known", "KnownIndex", "State", "build_index"]

State = Literal["valid", "accepted", "expired", "revoked", "retired"]
#: When several documents know one piece of material, the state of the newest wins; within one
#: document, the strongest statement wins.
STATE_RANK: dict[str, int] = {"valid": 5, "accepted": 4, "expired": 3, "revoked": 2, "retired": 1}


@dataclass(frozen=True)
class Known:
    """One piece of managed material, by name: never the material itself."""

    secret: str
    kind: str
    #: The key id (fernet) or credential id (api_token, webhook_secret), e.g. ``v7``.
    credential: str
    state: State
    #: The backend version of the newest document that holds it (None: only as a revoked hash).
    backend_version: str | None


@dataclass
class KnownIndex:
    """Keyed digests of managed material -> :class:`Known`; ``problems`` name unreadable secrets."""

    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _entries: dict[bytes, Known] = field(default_factory=dict, repr=False)
    problems: list[str] = field(default_factory=list)
    secrets_indexed: int = 0

    def _digest(self, sha256_hex: str) -> bytes:
        return hmac.new(self._key, sha256_hex.lower().encode("ascii", "replace"), hashlib.sha256).digest()

    def add(self, sha256_hex: str, known: Known, *, newest: bool) -> None:
        """Record ``known`` unless a newer document (``newest`` False here) already stated one."""
        digest = self._digest(sha256_hex)
        old = self._entries.get(digest)
        if old is None or (newest and STATE_RANK[known.state] > STATE_RANK[old.state]):
            self._entries[digest] = known

    def lookup(self, material: str) -> Known | None:
        # The probe hashes a digest keyed for this run only: how long it takes tells nothing
        # about the material to anyone without the run's key, and no material is kept to compare.
        return self._entries.get(self._digest(sha256_hex(material)))

    def __len__(self) -> int:
        return len(self._entries)


def _passed(deadline: datetime | None, now: datetime) -> bool:
    return deadline is not None and now >= deadline


def _index_current(index: KnownIndex, doc: Document, backend_version: str, now: datetime) -> None:
    if isinstance(doc, FernetRing):
        for key in doc.keys:
            state: State = "valid" if key.id == doc.primary else "accepted"
            known = Known(doc.name, "fernet", key.id, state, backend_version)
            index.add(sha256_hex(key.material.reveal()), known, newest=True)
        return
    cs: CredentialSet = doc
    current: State = "expired" if _passed(cs.current.expires_at, now) else "valid"
    index.add(cs.current.sha256, Known(cs.name, cs.kind, cs.current.id, current, backend_version), newest=True)
    if cs.previous is not None:
        prev: State = "revoked" if _passed(cs.previous.valid_until, now) else "accepted"
        if prev == "accepted" and _passed(cs.previous.expires_at, now):
            prev = "expired"
        index.add(cs.previous.sha256, Known(cs.name, cs.kind, cs.previous.id, prev, backend_version), newest=True)
    for gone in cs.revoked:
        index.add(gone.sha256, Known(cs.name, cs.kind, gone.id, "revoked", None), newest=True)


def _index_older(index: KnownIndex, doc: Document, backend_version: str) -> None:
    """Material only an older version holds is retired (keys) or revoked (credentials)."""
    if isinstance(doc, FernetRing):
        for key in doc.keys:
            index.add(
                sha256_hex(key.material.reveal()),
                Known(doc.name, "fernet", key.id, "retired", backend_version),
                newest=False,
            )
        return
    for cred in (doc.current, doc.previous):
        if cred is not None:
            index.add(cred.sha256, Known(doc.name, doc.kind, cred.id, "revoked", backend_version), newest=False)
    for gone in doc.revoked:
        index.add(gone.sha256, Known(doc.name, doc.kind, gone.id, "revoked", None), newest=False)


def _index_secret(index: KnownIndex, secret: SecretSettings, backend: Backend, now: datetime) -> None:
    current = backend.read(secret.path)
    if current is None:
        return
    _index_current(index, current.document, current.version, now)
    # Newest first, so an older version never overrides what a newer one says.
    for info in reversed(backend.history(secret.path)):
        if info.current or info.version == current.version:
            continue
        older = backend.read_version(secret.path, info.version)
        if older is not None:
            _index_older(index, older.document, older.version)


def build_index(secrets_: Iterable[SecretSettings], backend_for: Callable[[str], Backend], now: datetime) -> KnownIndex:
    """Index every secret; a secret that fails is a problem line, and the rest go on.

    ``backend_for(name)`` opens (or reuses) the configured backend ``name``; it may raise a
    RotatordError, which also becomes a problem of the secrets on that backend.
    """
    index = KnownIndex()
    for secret in secrets_:
        try:
            _index_secret(index, secret, backend_for(secret.backend), now)
            index.secrets_indexed += 1
        except RotatordError as exc:
            index.problems.append(f"secret {secret.name!r} (backend {secret.backend!r}): not checked: {exc}")
    return index
