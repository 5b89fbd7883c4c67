"""Pure document transitions, one per step.  Each returns None when its effect already exists.

That check is what makes every step idempotent: a step resumed after a crash reads the
document, finds its key or token already there, and records the result without writing again.
Key ids derive from the rotation version (``v7``), so a resumed step recognises its own work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta

from ..document import (
    Credential,
    CredentialKind,
    CredentialSet,
    FernetKey,
    FernetRing,
    Revoked,
    key_id_for,
    sha256_hex,
)
from ..errors import RollbackImpossible, RotationError
from ..sensitive import Sensitive

__all__ = [
    "issue_credential",
    "promote_ring",
    "retire_candidates",
    "retire_ring",
    "revoke_credential",
    "rollback_credentials",
    "rollback_ring",
    "stage_ring",
]

REVOKED_KEPT = 16


def stage_ring(
    ring: FernetRing | None, name: str, version: int, generate: Callable[[], Sensitive], now: datetime
) -> FernetRing | None:
    """Add key ``v<version>`` decrypt-only (primary at once when the ring is new)."""
    kid = key_id_for(version)
    if ring is not None and ring.key(kid) is not None:
        return None
    if ring is None:
        return FernetRing(name, version, kid, (FernetKey(kid, generate(), "primary", now),), now)
    key = FernetKey(kid, generate(), "decrypt_only", now)
    return replace(ring, version=version, keys=(*ring.keys, key), updated_at=now)


def promote_ring(ring: FernetRing, version: int, now: datetime, retire_after: datetime) -> FernetRing | None:
    """Make ``v<version>`` primary; the old primary becomes decrypt-only until ``retire_after``."""
    kid = key_id_for(version)
    if ring.key(kid) is None:
        raise RotationError(
            f"staged key {kid} is missing from the ring of {ring.name!r}; it was changed outside rotatord"
        )
    if ring.primary == kid:
        return None
    keys = tuple(
        replace(k, state="primary", retire_after=None)
        if k.id == kid
        else replace(k, state="decrypt_only", retire_after=retire_after)
        if k.id == ring.primary
        else k
        for k in ring.keys
    )
    return replace(ring, primary=kid, keys=keys, updated_at=now)


def retire_candidates(
    ring: FernetRing, now: datetime, keep: int, deadlines: Mapping[str, datetime] | None = None
) -> list[FernetKey]:
    """Decrypt-only keys whose grace has passed, minus the newest ``keep`` kept as a rollback reserve.

    ``deadlines`` may bring a key's ``retire_after`` forward (an emergency declared after the
    promotion wrote it into the ring); it never postpones one.
    """
    overrides = deadlines or {}

    def deadline(key: FernetKey) -> datetime | None:
        dates = [d for d in (key.retire_after, overrides.get(key.id)) if d is not None]
        return min(dates) if dates else None

    decrypt_only = sorted((k for k in ring.keys if k.id != ring.primary), key=lambda k: k.created_at, reverse=True)
    reserve = {k.id for k in decrypt_only[:keep]}
    return [k for k in decrypt_only if k.id not in reserve and (d := deadline(k)) is not None and d <= now]


def retire_ring(ring: FernetRing, remove: set[str], now: datetime) -> FernetRing | None:
    if ring.primary in remove:
        raise ValueError("the primary key is never retired")
    if not remove & {k.id for k in ring.keys}:
        return None
    return replace(ring, keys=tuple(k for k in ring.keys if k.id not in remove), updated_at=now)


def rollback_ring(ring: FernetRing, restore: str, now: datetime, retire_after: datetime) -> FernetRing | None:
    """Put ``restore`` back as primary; the current primary becomes decrypt-only (data may use it)."""
    if ring.key(restore) is None:
        raise RollbackImpossible(f"the previous primary {restore} of {ring.name!r} is no longer in the ring")
    if ring.primary == restore:
        return None
    keys = tuple(
        replace(k, state="primary", retire_after=None)
        if k.id == restore
        else replace(k, state="decrypt_only", retire_after=retire_after)
        if k.id == ring.primary
        else k
        for k in ring.keys
    )
    return replace(ring, primary=restore, keys=keys, updated_at=now)


def issue_credential(
    cs: CredentialSet | None,
    *,
    name: str,
    kind: CredentialKind,
    version: int,
    generate: Callable[[], Sensitive],
    now: datetime,
    valid_until: datetime,
    ttl: timedelta | None,
) -> CredentialSet | None:
    """Make ``v<version>`` current; the old current stays valid as ``previous`` until ``valid_until``."""
    kid = key_id_for(version)
    if cs is not None and cs.current.id == kid:
        return None
    value = generate()
    cred = Credential(kid, value, sha256_hex(value.reveal()), now, now + ttl if ttl else None)
    if cs is None:
        return CredentialSet(name, kind, version, cred, now)
    revoked = cs.revoked
    if cs.previous is not None:  # only after an interrupted cycle: the older one goes for good
        revoked = (*revoked, Revoked(cs.previous.id, cs.previous.sha256, now))
    previous = replace(cs.current, valid_until=valid_until)
    return replace(
        cs, version=version, current=cred, previous=previous, revoked=revoked[-REVOKED_KEPT:], updated_at=now
    )


def revoke_credential(cs: CredentialSet, now: datetime) -> CredentialSet | None:
    if cs.previous is None:
        return None
    revoked = (*cs.revoked, Revoked(cs.previous.id, cs.previous.sha256, now))
    return replace(cs, previous=None, revoked=revoked[-REVOKED_KEPT:], updated_at=now)


def rollback_credentials(cs: CredentialSet, restore: str, now: datetime, valid_until: datetime) -> CredentialSet | None:
    if cs.current.id == restore:
        return None
    if cs.previous is None or cs.previous.id != restore:
        raise RollbackImpossible(f"the previous credential {restore} of {cs.name!r} is no longer valid")
    return replace(
        cs,
        current=replace(cs.previous, valid_until=None),
        previous=replace(cs.current, valid_until=valid_until),
        updated_at=now,
    )
