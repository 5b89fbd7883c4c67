"""The pure document transitions: each step's effect, its idempotence, and its guards."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet

from rotatord.crypto.generators import generator_for
from rotatord.document import CredentialSet, Document, FernetRing, dump_document, parse_document
from rotatord.engine import transitions as t
from rotatord.errors import RollbackImpossible, RotationError
from rotatord.sensitive import Sensitive
from tests.engine.conftest import T0

NAME = "bot-db"
HOUR = timedelta(hours=1)


def fernet_key() -> Sensitive:
    return Sensitive(Fernet.generate_key().decode())


def api_token() -> Sensitive:
    return generator_for("api_token", token_prefix="bot").generate()


def round_trips(doc: Document) -> None:
    """A transition's result is a document the backends and bots accept, unchanged."""
    again = parse_document(dump_document(doc))
    assert dump_document(again) == dump_document(doc)


def staged(version: int = 2) -> FernetRing:
    """v1 primary, then v2..v<version> staged one after another (all decrypt-only)."""
    ring = t.stage_ring(None, NAME, 1, fernet_key, T0)
    assert ring is not None
    for v in range(2, version + 1):
        nxt = t.stage_ring(ring, NAME, v, fernet_key, T0 + v * HOUR)
        assert nxt is not None
        ring = nxt
    return ring


def rotated(versions: int) -> FernetRing:
    """A ring after ``versions - 1`` promotions, each old primary given retire_after = promotion + 1h."""
    ring = t.stage_ring(None, NAME, 1, fernet_key, T0)
    assert ring is not None
    for v in range(2, versions + 1):
        at = T0 + v * HOUR
        staged_ring = t.stage_ring(ring, NAME, v, fernet_key, at)
        assert staged_ring is not None
        promoted = t.promote_ring(staged_ring, v, at, at + HOUR)
        assert promoted is not None
        ring = promoted
    return ring


# -- fernet rings ------------------------------------------------------------------------------


def test_stage_on_empty_ring_makes_v1_primary() -> None:
    ring = t.stage_ring(None, NAME, 1, fernet_key, T0)
    assert ring is not None
    assert ring.primary == "v1"
    assert ring.version == 1
    assert [(k.id, k.state) for k in ring.keys] == [("v1", "primary")]
    assert ring.keys[0].retire_after is None
    round_trips(ring)


def test_stage_adds_the_new_key_decrypt_only_and_keeps_the_primary() -> None:
    first = staged(1)
    ring = t.stage_ring(first, NAME, 2, fernet_key, T0 + HOUR)
    assert ring is not None
    assert ring.primary == "v1"
    assert ring.version == 2
    assert ring.updated_at == T0 + HOUR
    assert [(k.id, k.state) for k in ring.keys] == [("v1", "primary"), ("v2", "decrypt_only")]
    assert ring.key("v1") == first.key("v1")  # the old key is untouched, material included
    round_trips(ring)


def test_stage_again_with_the_same_version_is_a_no_op_and_generates_nothing() -> None:
    ring = staged(2)
    calls: list[int] = []

    def counting() -> Sensitive:
        calls.append(1)
        return fernet_key()

    assert t.stage_ring(ring, NAME, 2, counting, T0 + 5 * HOUR) is None
    assert t.stage_ring(ring, NAME, 1, counting, T0 + 5 * HOUR) is None
    assert calls == []  # a resumed step must never draw a second key for the same version


def test_promote_swaps_primary_and_sets_retire_after_on_the_old_key() -> None:
    ring = staged(2)
    at, deadline = T0 + 2 * HOUR, T0 + 9 * HOUR
    promoted = t.promote_ring(ring, 2, at, deadline)
    assert promoted is not None
    assert promoted.primary == "v2"
    states = {k.id: (k.state, k.retire_after) for k in promoted.keys}
    assert states == {"v1": ("decrypt_only", deadline), "v2": ("primary", None)}
    assert promoted.updated_at == at
    round_trips(promoted)
    # Promoting again changes nothing: the step is idempotent.
    assert t.promote_ring(promoted, 2, at + HOUR, deadline + HOUR) is None


def test_promote_leaves_other_decrypt_only_keys_alone() -> None:
    ring = rotated(2)  # v1 decrypt-only with retire_after T0+3h, v2 primary
    ring = t.stage_ring(ring, NAME, 3, fernet_key, T0 + 4 * HOUR) or ring
    promoted = t.promote_ring(ring, 3, T0 + 5 * HOUR, T0 + 20 * HOUR)
    assert promoted is not None
    by_id = {k.id: k for k in promoted.keys}
    assert by_id["v1"].retire_after == T0 + 3 * HOUR  # its own deadline, not the new one
    assert by_id["v2"].retire_after == T0 + 20 * HOUR
    assert by_id["v3"].state == "primary"


def test_promote_of_a_missing_key_raises_rotation_error() -> None:
    with pytest.raises(RotationError, match="v3 is missing"):
        t.promote_ring(staged(2), 3, T0, T0)


def test_retire_candidates_honour_retire_after() -> None:
    ring = rotated(3)  # v1 retire_after T0+3h, v2 retire_after T0+4h, v3 primary
    assert t.retire_candidates(ring, T0 + 3 * HOUR - timedelta(microseconds=1), keep=0) == []
    assert [k.id for k in t.retire_candidates(ring, T0 + 3 * HOUR, keep=0)] == ["v1"]
    assert sorted(k.id for k in t.retire_candidates(ring, T0 + 4 * HOUR, keep=0)) == ["v1", "v2"]


def test_retire_candidates_keep_the_newest_decrypt_only_keys_in_reserve() -> None:
    ring = rotated(3)
    late = T0 + 100 * HOUR
    assert [k.id for k in t.retire_candidates(ring, late, keep=1)] == ["v1"]
    assert t.retire_candidates(ring, late, keep=2) == []


def test_retire_candidates_deadlines_only_bring_retirement_forward() -> None:
    ring = rotated(3)  # v1 retire_after T0+3h, v2 retire_after T0+4h
    at = T0 + 3 * HOUR
    # An emergency declared after the promotion: the journal's earlier deadline wins for v2.
    assert sorted(k.id for k in t.retire_candidates(ring, at, keep=0, deadlines={"v2": T0})) == ["v1", "v2"]
    # A later deadline never postpones the one written in the ring.
    assert [k.id for k in t.retire_candidates(ring, at, keep=0, deadlines={"v1": T0 + 50 * HOUR})] == ["v1"]
    # The primary and the rollback reserve stay whatever the deadlines say.
    assert t.retire_candidates(ring, at, keep=2, deadlines={"v1": T0, "v2": T0, "v3": T0}) == []


def test_staged_keys_without_a_deadline_are_never_retire_candidates() -> None:
    ring = staged(2)  # v2 decrypt-only but never primary: no retire_after
    assert t.retire_candidates(ring, T0 + 1000 * HOUR, keep=0) == []


def test_retire_never_removes_the_primary() -> None:
    ring = rotated(2)
    # Even a primary that carries an expired deadline (written outside rotatord) is no candidate.
    odd = replace(ring, keys=tuple(replace(k, retire_after=T0) for k in ring.keys))
    assert "v2" not in {k.id for k in t.retire_candidates(odd, T0 + 100 * HOUR, keep=0)}
    with pytest.raises(ValueError, match="primary"):
        t.retire_ring(ring, {"v2"}, T0 + 100 * HOUR)


def test_retire_removes_exactly_the_named_keys_and_is_idempotent() -> None:
    ring = rotated(3)
    retired = t.retire_ring(ring, {"v1"}, T0 + 10 * HOUR)
    assert retired is not None
    assert [k.id for k in retired.keys] == ["v2", "v3"]
    assert retired.primary == "v3"
    round_trips(retired)
    assert t.retire_ring(retired, {"v1"}, T0 + 11 * HOUR) is None
    assert t.retire_ring(retired, set(), T0 + 11 * HOUR) is None


def test_rollback_ring_puts_the_previous_primary_back_and_keeps_the_new_key() -> None:
    ring = rotated(2)
    at, deadline = T0 + 5 * HOUR, T0 + 50 * HOUR
    back = t.rollback_ring(ring, "v1", at, deadline)
    assert back is not None
    states = {k.id: (k.state, k.retire_after) for k in back.keys}
    # The new key stays decrypt-only: data may already have been written under it.
    assert states == {"v1": ("primary", None), "v2": ("decrypt_only", deadline)}
    assert back.key("v2").material == ring.key("v2").material  # type: ignore[union-attr]
    round_trips(back)
    assert t.rollback_ring(back, "v1", at, deadline) is None


def test_rollback_ring_to_a_key_no_longer_in_the_ring_is_impossible() -> None:
    ring = t.retire_ring(rotated(2), {"v1"}, T0 + 10 * HOUR)
    assert ring is not None
    with pytest.raises(RollbackImpossible, match="v1"):
        t.rollback_ring(ring, "v1", T0, T0)


# -- credentials -------------------------------------------------------------------------------


def issued(version: int, cs: CredentialSet | None, at: timedelta, grace: timedelta = HOUR) -> CredentialSet:
    now = T0 + at
    out = t.issue_credential(
        cs, name="bot-api", kind="api_token", version=version, generate=api_token, now=now,
        valid_until=now + grace, ttl=timedelta(days=7),
    )  # fmt: skip
    assert out is not None
    return out


def test_issue_first_credential_has_no_previous() -> None:
    cs = issued(1, None, timedelta(0))
    assert cs.current.id == "v1"
    assert cs.previous is None
    assert cs.current.sha256 == hashlib.sha256(cs.current.value.reveal().encode()).hexdigest()
    assert cs.current.expires_at == T0 + timedelta(days=7)
    round_trips(cs)


def test_issue_keeps_the_previous_valid_until_the_grace_deadline() -> None:
    first = issued(1, None, timedelta(0))
    second = issued(2, first, HOUR, grace=2 * HOUR)
    assert second.current.id == "v2"
    assert second.version == 2
    assert second.previous is not None
    assert second.previous.id == "v1"
    assert second.previous.value == first.current.value
    assert second.previous.valid_until == T0 + 3 * HOUR
    assert second.revoked == ()
    round_trips(second)


def test_issue_again_with_the_same_version_is_a_no_op() -> None:
    cs = issued(2, issued(1, None, timedelta(0)), HOUR)
    calls: list[int] = []

    def counting() -> Sensitive:
        calls.append(1)
        return api_token()

    again = t.issue_credential(
        cs, name="bot-api", kind="api_token", version=2, generate=counting, now=T0 + 5 * HOUR,
        valid_until=T0 + 6 * HOUR, ttl=None,
    )  # fmt: skip
    assert again is None
    assert calls == []


def test_revoke_moves_the_previous_to_revoked_keeping_only_its_hash() -> None:
    first = issued(1, None, timedelta(0))
    second = issued(2, first, HOUR)
    revoked = t.revoke_credential(second, T0 + 2 * HOUR)
    assert revoked is not None
    assert revoked.previous is None
    assert [(r.id, r.sha256, r.revoked_at) for r in revoked.revoked] == [
        ("v1", hashlib.sha256(first.current.value.reveal().encode()).hexdigest(), T0 + 2 * HOUR)
    ]
    assert first.current.value.reveal().encode() not in dump_document(revoked)
    round_trips(revoked)
    assert t.revoke_credential(revoked, T0 + 3 * HOUR) is None


def test_issue_over_an_unrevoked_previous_revokes_it_for_good() -> None:
    first = issued(1, None, timedelta(0))
    second = issued(2, first, HOUR)
    third = issued(3, second, 2 * HOUR)  # an interrupted cycle: v1 was never revoked
    assert third.previous is not None
    assert third.previous.id == "v2"
    assert [r.id for r in third.revoked] == ["v1"]
    assert third.revoked[0].sha256 == first.current.sha256
    assert first.current.value.reveal().encode() not in dump_document(third)
    round_trips(third)


def test_revoked_list_is_bounded_to_the_newest_entries() -> None:
    cs = issued(1, None, timedelta(0))
    for v in range(2, t.REVOKED_KEPT + 5):
        cs = issued(v, cs, v * HOUR)
        out = t.revoke_credential(cs, T0 + v * HOUR)
        assert out is not None
        cs = out
    assert len(cs.revoked) == t.REVOKED_KEPT
    assert cs.revoked[-1].id == f"v{t.REVOKED_KEPT + 3}"
    round_trips(cs)


def test_rollback_credentials_swaps_current_and_previous() -> None:
    first = issued(1, None, timedelta(0))
    second = issued(2, first, HOUR)
    back = t.rollback_credentials(second, "v1", T0 + 2 * HOUR, T0 + 9 * HOUR)
    assert back is not None
    assert back.current.id == "v1"
    assert back.current.value == first.current.value
    assert back.current.valid_until is None
    assert back.previous is not None
    assert back.previous.id == "v2"
    assert back.previous.valid_until == T0 + 9 * HOUR
    round_trips(back)
    assert t.rollback_credentials(back, "v1", T0 + 3 * HOUR, T0 + 9 * HOUR) is None


def test_rollback_credentials_after_revocation_is_impossible() -> None:
    second = issued(2, issued(1, None, timedelta(0)), HOUR)
    revoked = t.revoke_credential(second, T0 + 2 * HOUR)
    assert revoked is not None
    with pytest.raises(RollbackImpossible, match="v1"):
        t.rollback_credentials(revoked, "v1", T0 + 3 * HOUR, T0 + 4 * HOUR)
