"""The rotation engine end to end, in process: a real file backend, a real SQLite journal, and
``now`` passed to every call.  Crashes are staged in the journal itself (a step left at its
intent, a phase not yet moved on) and a fresh runtime resumes them, as a restarted daemon would.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import timedelta

import pytest

from rotatord.crypto.keyring import decrypt, multifernet
from rotatord.daemon.runtime import Runtime
from rotatord.document import CredentialSet, FernetRing
from rotatord.engine.report import history_report, secret_status
from rotatord.errors import DecryptError, RollbackImpossible, RotationInProgress
from tests.engine.conftest import (
    CONSUMER,
    EVERY,
    FERNET,
    GRACE,
    PROPAGATION,
    SECOND,
    T0,
    TOKEN,
    Harness,
    HarnessFactory,
    fernet_secret,
    materials,
)

T1 = T0 + EVERY  # the second rotation is due
PROMOTE_AT = T1 + PROPAGATION
RETIRE_AT = PROMOTE_AT + GRACE


def first_rotation(rt: Runtime, name: str = FERNET) -> None:
    """The first tick creates the secret and finishes at once; the next one is due in EVERY."""
    assert rt.engine.tick(name, T0) == T0 + EVERY


def to_staged(rt: Runtime) -> None:
    first_rotation(rt)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT


def to_promoted(rt: Runtime) -> None:
    to_staged(rt)
    assert rt.engine.tick(FERNET, PROMOTE_AT) == RETIRE_AT


def key_ids(ring: FernetRing) -> list[str]:
    return [k.id for k in ring.keys]


def states(ring: FernetRing) -> dict[str, str]:
    return {k.id: k.state for k in ring.keys}


def decrypts(ring: FernetRing, token: bytes) -> bool:
    try:
        decrypt(ring, token)
    except DecryptError:
        return False
    return True


def outbox(h: Harness, event_type: str | None = None) -> list[tuple[str, str, int]]:
    rows = h.sql("SELECT consumer, event_type, rotation_id FROM outbox ORDER BY id")
    return [(str(c), str(e), int(r)) for c, e, r in rows if event_type is None or e == event_type]


def audit_events(rt: Runtime) -> list[dict[str, object]]:
    return [json.loads(line) for line in rt.audit.path.read_text().splitlines()]


# -- fernet lifecycle ----------------------------------------------------------------------------


def test_first_tick_creates_v1_as_primary_and_completes(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt)
    ring = harness.ring()
    assert ring.primary == "v1"
    assert key_ids(ring) == ["v1"]
    assert ring.version == 1
    row = rt.journal.latest(FERNET)
    assert row is not None
    assert (row.version, row.phase, row.status) == (1, "retired", "done")
    assert (row.new_key, row.previous_key) == ("v1", None)
    assert row.backend_version == harness.versions(FERNET)[-1].version
    # Before it is due, a tick does nothing and says when it will.
    assert rt.engine.tick(FERNET, T1 - SECOND) == T1
    assert len(rt.journal.history(FERNET)) == 1
    assert len(harness.versions(FERNET)) == 1


@dataclass(frozen=True)
class Seen:
    phase: str
    primary: str
    keys: tuple[str, ...]
    old_token_decrypts: bool
    readable: bool  # every token made so far whose key is still in the ring decrypts


def test_rotation_keeps_every_datum_decryptable_at_every_phase(harness: Harness) -> None:
    """Invariant 2: decrypt before encrypt, observed after every step the engine completes."""
    rt = harness.build()
    first_rotation(rt)
    old_token = multifernet(harness.ring()).encrypt(b"written by a bot under v1")
    written: list[tuple[str, bytes]] = [("v1", old_token)]  # (primary when written, token)
    seen: list[Seen] = []

    def observe(name: str) -> None:
        # Record only: an assertion raised here would be caught by the engine as a step failure.
        if name != FERNET:
            return
        ring = harness.ring()
        row = rt.journal.latest(FERNET)
        assert row is not None
        present = set(key_ids(ring))
        readable = all(decrypts(ring, tok) for kid, tok in written if kid in present)
        seen.append(Seen(row.phase, ring.primary, tuple(key_ids(ring)), decrypts(ring, old_token), readable))
        # What a bot encrypts now (under the published primary) must stay readable while its key is.
        written.append((ring.primary, multifernet(ring).encrypt(f"written in phase {row.phase}".encode())))

    rt.engine.on_change = observe
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    ring = harness.ring()
    assert ring.primary == "v1"  # the new key is only decrypt-only: nobody encrypts with it yet
    assert states(ring) == {"v1": "primary", "v2": "decrypt_only"}

    # Promotion waits for the propagation window.
    assert rt.engine.tick(FERNET, PROMOTE_AT - SECOND) == PROMOTE_AT
    assert harness.ring().primary == "v1"

    assert rt.engine.tick(FERNET, PROMOTE_AT) == RETIRE_AT
    ring = harness.ring()
    assert states(ring) == {"v1": "decrypt_only", "v2": "primary"}
    old = ring.key("v1")
    assert old is not None
    assert old.retire_after == RETIRE_AT

    # Retirement waits for the grace period.
    assert rt.engine.tick(FERNET, RETIRE_AT - SECOND) == RETIRE_AT
    assert key_ids(harness.ring()) == ["v1", "v2"]

    assert rt.engine.tick(FERNET, RETIRE_AT) == T1 + EVERY
    ring = harness.ring()
    assert key_ids(ring) == ["v2"]
    assert ring.primary == "v2"

    phases = list(dict.fromkeys(s.phase for s in seen))
    assert phases == ["staged", "promoted", "reencrypted", "retired"]
    assert all(s.readable for s in seen)
    assert all(s.old_token_decrypts for s in seen if s.phase != "retired")
    assert {s.primary for s in seen if s.phase == "staged"} == {"v1"}
    assert any(kid == "v2" for kid, _tok in written)  # tokens under the new key were checked too
    assert not decrypts(ring, old_token)  # retired for real: v1 is gone


def test_versions_grow_by_exactly_one_per_rotation(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt)
    for n in range(2, 5):
        started = T0 + (n - 1) * EVERY
        promote_at = rt.engine.tick(FERNET, started)
        retire_at = rt.engine.tick(FERNET, promote_at)
        nxt = rt.engine.tick(FERNET, retire_at)
        row = rt.journal.latest(FERNET)
        assert row is not None
        assert (row.version, row.status, row.started_at) == (n, "done", started)
        assert nxt == rt.engine.next_due(FERNET, retire_at) == started + EVERY
        ring = harness.ring()
        assert ring.version == n
        assert key_ids(ring) == [f"v{n}"]
        assert row.backend_version == harness.versions(FERNET)[-1].version
    assert [r.version for r in rt.journal.history(FERNET)] == [4, 3, 2, 1]
    # One write for the first rotation, then stage + promote + retire for each later one.
    assert [int(v.version) for v in harness.versions(FERNET)] == list(range(1, 11))


def test_history_report_lists_each_step_once(harness: Harness) -> None:
    rt = harness.build()
    to_promoted(rt)
    rt.engine.tick(FERNET, RETIRE_AT)
    latest = history_report(rt.engine, FERNET)[0]
    assert (latest["version"], latest["status"], latest["new_key"], latest["previous_key"]) == (2, "done", "v2", "v1")
    assert [(s["name"], s["state"]) for s in latest["steps"]] == [
        ("stage", "done"), ("promote", "done"), ("reencrypt", "done"), ("retire", "done"),
    ]  # fmt: skip


# -- api_token lifecycle and schedules -----------------------------------------------------------


def test_api_token_previous_stays_valid_until_grace_then_only_its_hash_remains(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt, TOKEN)
    first = harness.credentials()
    assert first.current.id == "v1"
    assert first.previous is None
    assert first.current.value.reveal().startswith("bot_")
    old_value = first.current.value

    assert rt.engine.tick(TOKEN, T1) == T1 + GRACE
    cs = harness.credentials()
    assert cs.current.id == "v2"
    assert cs.current.value != old_value
    assert cs.previous is not None
    assert cs.previous.id == "v1"
    assert cs.previous.value == old_value
    assert cs.previous.valid_until == T1 + GRACE

    assert rt.engine.tick(TOKEN, T1 + GRACE - SECOND) == T1 + GRACE
    assert harness.credentials().previous is not None

    assert rt.engine.tick(TOKEN, T1 + GRACE) == T1 + EVERY
    cs = harness.credentials()
    assert cs.previous is None
    assert cs.version == 2
    expected = hashlib.sha256(old_value.reveal().encode()).hexdigest()
    assert [(r.id, r.sha256) for r in cs.revoked] == [("v1", expected)]
    row = rt.journal.latest(TOKEN)
    assert row is not None
    assert (row.version, row.phase, row.status, row.previous_key, row.new_key) == (
        2, "revoked", "done", "v1", "v2",
    )  # fmt: skip
    assert [e for _c, e, _r in outbox(harness) if e.startswith("token.")] == [
        "token.issued", "token.revoked", "token.issued", "token.revoked",
    ]  # fmt: skip


def test_cron_schedule_decides_when_the_next_rotation_is_due(make_harness: HarnessFactory) -> None:
    h = make_harness(fernet_secret(every=None, cron="0 3 * * 1"))  # Mondays 03:00; T0 is one
    rt = h.build()
    week = timedelta(days=7)
    assert rt.engine.tick(FERNET, T0) == T0 + week
    assert rt.engine.next_due(FERNET, T0 + timedelta(days=3)) == T0 + week
    assert rt.engine.tick(FERNET, T0 + timedelta(days=3)) == T0 + week
    assert len(rt.journal.history(FERNET)) == 1
    assert rt.engine.tick(FERNET, T0 + week) == T0 + week + PROPAGATION
    row = rt.journal.active(FERNET)
    assert row is not None
    assert (row.version, row.phase) == (2, "staged")


# -- crash and resume ----------------------------------------------------------------------------


def test_crash_between_intent_and_act_resumes_with_the_recorded_request_id(harness: Harness) -> None:
    a = harness.build()
    first_rotation(a)
    # The process recorded the rotation and the stage's intent, then died before acting.
    rot = a.journal.start(
        secret=FERNET, kind="fernet", version=2, phase="pending", trigger="schedule",
        emergency=False, reason=None, now=T1,
    )  # fmt: skip
    intent = a.journal.begin_step(rot.id, "stage", T1)
    assert intent.state == "intent"
    b = harness.build()
    assert b.engine.tick(FERNET, T1 + SECOND) == T1 + SECOND + PROPAGATION
    stage = b.journal.step(rot.id, "stage")
    assert stage is not None
    assert (stage.state, stage.request_id) == ("done", intent.request_id)
    current = harness.reader.read(harness.secret(FERNET).path)
    assert current is not None
    assert current.request_id == intent.request_id
    assert states(harness.ring()) == {"v1": "primary", "v2": "decrypt_only"}


def reset_step(h: Harness, rotation_id: int, step: str, phase: str, **columns: object) -> None:
    """Stage a crash after a step acted on the backend but before its result was recorded."""
    h.sql(
        "UPDATE steps SET state = 'intent', finished_at = NULL, result = NULL WHERE rotation_id = ? AND name = ?",
        rotation_id,
        step,
    )
    assignments = ", ".join(["phase = ?", *(f"{c} = ?" for c in columns)])
    h.sql(f"UPDATE rotations SET {assignments} WHERE id = ?", phase, *columns.values(), rotation_id)
    h.sql("DELETE FROM outbox WHERE rotation_id = ?", rotation_id)


def test_crash_after_stage_acted_reuses_the_key_and_writes_no_new_version(harness: Harness) -> None:
    a = harness.build()
    to_staged(a)
    rot = a.journal.active(FERNET)
    assert rot is not None
    stage = a.journal.step(rot.id, "stage")
    assert stage is not None
    before = harness.ring()
    versions_before = [v.version for v in harness.versions(FERNET)]
    reset_step(harness, rot.id, "stage", "pending", new_key=None, previous_key=None, promote_after=None,
               backend_version=None)  # fmt: skip
    a.close()

    b = harness.build()
    resumed_at = T1 + timedelta(minutes=3)
    assert b.engine.tick(FERNET, resumed_at) == resumed_at + PROPAGATION
    again = b.journal.step(rot.id, "stage")
    assert again is not None
    assert (again.state, again.request_id) == ("done", stage.request_id)
    assert [v.version for v in harness.versions(FERNET)] == versions_before  # no second write
    ring = harness.ring()
    assert key_ids(ring) == ["v1", "v2"]  # exactly one v2: no second key was generated
    assert [k.material for k in ring.keys] == [k.material for k in before.keys]
    row = b.journal.get(rot.id)
    assert (row.phase, row.new_key, row.previous_key) == ("staged", "v2", "v1")
    assert row.backend_version == versions_before[-1]

    # The rotation then completes exactly once, and its version is the next one.
    retire_at = b.engine.tick(FERNET, resumed_at + PROPAGATION)
    b.engine.tick(FERNET, retire_at)
    assert [(r.version, r.status) for r in b.journal.history(FERNET)] == [(2, "done"), (1, "done")]
    mine = [(c, e) for c, e, r in outbox(harness) if r == rot.id]
    assert mine == [(CONSUMER, "key.staged"), (CONSUMER, "key.promoted"), (CONSUMER, "key.retired")]
    assert key_ids(harness.ring()) == ["v2"]


def test_crash_after_promote_acted_keeps_the_first_retirement_deadline(harness: Harness) -> None:
    a = harness.build()
    to_promoted(a)
    rot = a.journal.active(FERNET)
    assert rot is not None
    assert rot.retire_after == RETIRE_AT
    versions_before = [v.version for v in harness.versions(FERNET)]
    reset_step(harness, rot.id, "promote", "staged", retire_after=None)
    h_reencrypt = "DELETE FROM steps WHERE rotation_id = ? AND name = 'reencrypt'"
    harness.sql(h_reencrypt, rot.id)
    a.close()

    b = harness.build()
    late = PROMOTE_AT + timedelta(hours=5)
    # Resumed later, the promotion finds its effect in place and keeps the deadline it wrote.
    assert b.engine.tick(FERNET, late) == RETIRE_AT
    row = b.journal.get(rot.id)
    assert (row.phase, row.retire_after) == ("reencrypted", RETIRE_AT)
    assert [v.version for v in harness.versions(FERNET)] == versions_before
    assert [(c, e) for c, e, r in outbox(harness) if r == rot.id] == [(CONSUMER, "key.promoted")]


# -- operator rotations --------------------------------------------------------------------------


def test_rotate_refuses_while_a_rotation_is_active(harness: Harness) -> None:
    rt = harness.build()
    to_staged(rt)
    with pytest.raises(RotationInProgress, match="in progress"):
        rt.engine.rotate(FERNET, trigger="cli", emergency=False, reason=None, now=T1 + SECOND)
    assert [r.version for r in rt.journal.history(FERNET)] == [2, 1]
    assert states(harness.ring()) == {"v1": "primary", "v2": "decrypt_only"}


def test_manual_rotate_starts_a_rotation_before_it_is_due(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt)
    at = T0 + timedelta(days=1)
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=False, reason="new hire left", now=at)
    assert (row.version, row.phase, row.status, row.trigger, row.reason) == (2, "staged", "active", "cli",
                                                                             "new hire left")  # fmt: skip
    assert row.promote_after == at + PROPAGATION
    assert rt.engine.next_due(FERNET, at) == at + EVERY


def test_emergency_on_a_staged_rotation_promotes_at_once_and_skips_grace(harness: Harness) -> None:
    rt = harness.build()
    to_staged(rt)
    at = T1 + SECOND
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="key leaked", now=at)
    assert (row.phase, row.status, row.emergency, row.reason) == ("retired", "done", True, "key leaked")
    ring = harness.ring()
    assert key_ids(ring) == ["v2"]
    assert ring.primary == "v2"


def test_emergency_on_a_promoted_rotation_retires_without_the_grace_wait(harness: Harness) -> None:
    rt = harness.build()
    to_promoted(rt)
    at = PROMOTE_AT + timedelta(minutes=1)
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="key leaked", now=at)
    assert (row.phase, row.status) == ("retired", "done")
    assert key_ids(harness.ring()) == ["v2"]  # the old key is gone now, not at RETIRE_AT


def test_emergency_on_a_fresh_rotation_completes_in_one_call(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt)
    old = harness.ring()
    at = T0 + timedelta(hours=2)
    row = rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="key leaked", now=at)
    assert (row.version, row.phase, row.status) == (2, "retired", "done")
    ring = harness.ring()
    assert key_ids(ring) == ["v2"]
    assert ring.key("v2") is not None
    assert ring.primary_key.material != old.primary_key.material
    assert outbox(harness, "key.retired")[-1] == (CONSUMER, "key.retired", row.id)


def test_emergency_api_token_revokes_the_previous_at_once(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt, TOKEN)
    old = harness.credentials().current
    row = rt.engine.rotate(TOKEN, trigger="cli", emergency=True, reason="token leaked", now=T0 + SECOND)
    assert (row.phase, row.status) == ("revoked", "done")
    cs = harness.credentials()
    assert cs.previous is None
    assert [r.sha256 for r in cs.revoked] == [old.sha256]


# -- rollback ------------------------------------------------------------------------------------


def test_rollback_after_promote_restores_the_old_primary_and_keeps_the_new_key(harness: Harness) -> None:
    rt = harness.build()
    to_promoted(rt)
    under_v2 = multifernet(harness.ring()).encrypt(b"written after promotion")
    at = PROMOTE_AT + timedelta(hours=1)
    row = rt.engine.rollback(FERNET, trigger="cli", reason="bots crash", now=at)
    assert row.status == "rolled_back"
    ring = harness.ring()
    assert ring.primary == "v1"
    assert states(ring) == {"v1": "primary", "v2": "decrypt_only"}
    assert decrypts(ring, under_v2)  # data written under the new key stays readable
    assert outbox(harness, "rotation.rolled_back") == [(CONSUMER, "rotation.rolled_back", row.id)]

    # The retirement the rotation had planned does not happen.
    assert rt.engine.tick(FERNET, RETIRE_AT) == T1 + EVERY
    assert key_ids(harness.ring()) == ["v1", "v2"]

    # The next rotation takes the next version and eventually retires both older keys.
    t2 = T1 + EVERY
    promote_at = rt.engine.tick(FERNET, t2)
    retire_at = rt.engine.tick(FERNET, promote_at)
    rt.engine.tick(FERNET, retire_at)
    assert [(r.version, r.status) for r in rt.journal.history(FERNET)] == [(3, "done"), (2, "rolled_back"),
                                                                            (1, "done")]  # fmt: skip
    assert key_ids(harness.ring()) == ["v3"]


def test_rollback_in_staged_removes_the_never_primary_key(harness: Harness) -> None:
    rt = harness.build()
    to_staged(rt)
    v1 = harness.ring().primary_key.material
    row = rt.engine.rollback(FERNET, trigger="cli", reason=None, now=T1 + SECOND)
    assert row.status == "rolled_back"
    ring = harness.ring()
    assert key_ids(ring) == ["v1"]
    assert ring.primary_key.material == v1
    assert rt.engine.tick(FERNET, PROMOTE_AT) == T1 + EVERY  # nothing left to promote


def test_rollback_when_the_previous_key_is_gone_is_impossible_and_changes_nothing(harness: Harness) -> None:
    rt = harness.build()
    to_promoted(rt)
    rt.engine.tick(FERNET, RETIRE_AT)
    versions = [v.version for v in harness.versions(FERNET)]
    with pytest.raises(RollbackImpossible, match="v1"):
        rt.engine.rollback(FERNET, trigger="cli", reason=None, now=RETIRE_AT + SECOND)
    row = rt.journal.latest(FERNET)
    assert row is not None
    assert row.status == "done"
    assert rt.journal.step(row.id, "rollback") is None
    assert [v.version for v in harness.versions(FERNET)] == versions


def test_rollback_of_the_rotation_that_created_the_secret_is_impossible(harness: Harness) -> None:
    rt = harness.build()
    first_rotation(rt)
    with pytest.raises(RollbackImpossible, match="no previous key"):
        rt.engine.rollback(FERNET, trigger="cli", reason=None, now=T0 + SECOND)


def test_rollback_after_completion_uses_the_kept_reserve_key(make_harness: HarnessFactory) -> None:
    h = make_harness(fernet_secret(keep=1))
    rt = h.build()
    to_promoted(rt)
    rt.engine.tick(FERNET, RETIRE_AT)
    assert key_ids(h.ring()) == ["v1", "v2"]  # v1 kept as the rollback reserve
    row = rt.engine.rollback(FERNET, trigger="cli", reason=None, now=RETIRE_AT + SECOND)
    assert row.status == "rolled_back"
    assert h.ring().primary == "v1"


def test_interrupted_rollback_is_finished_by_the_next_tick_not_undone(harness: Harness) -> None:
    a = harness.build()
    to_promoted(a)
    rot = a.journal.active(FERNET)
    assert rot is not None
    # The operator's rollback recorded its intent, then the process died.
    intent = a.journal.begin_step(rot.id, "rollback", PROMOTE_AT + SECOND)
    a.close()
    b = harness.build()
    # Even past the retirement deadline, the tick finishes the rollback instead of retiring v1.
    assert b.engine.tick(FERNET, RETIRE_AT + SECOND) == T1 + EVERY
    assert b.journal.get(rot.id).status == "rolled_back"
    assert states(harness.ring()) == {"v1": "primary", "v2": "decrypt_only"}
    current = harness.reader.read(harness.secret(FERNET).path)
    assert current is not None
    assert current.request_id == intent.request_id


def test_resumed_rollback_that_fails_is_recorded_and_retried_not_raised(harness: Harness) -> None:
    rt = harness.build()
    to_promoted(rt)
    rot = rt.journal.active(FERNET)
    assert rot is not None
    rt.journal.begin_step(rot.id, "rollback", PROMOTE_AT + SECOND)
    key_file = harness.backend_settings.master_key_file
    assert key_file is not None
    good_key = key_file.read_bytes()
    key_file.write_bytes(b"not a master key\n")
    rt.backends["local"].close()
    at = PROMOTE_AT + 2 * SECOND
    retry_at = rt.engine.tick(FERNET, at)
    assert at < retry_at <= at + timedelta(seconds=5)
    row = rt.journal.get(rot.id)
    assert (row.status, row.attempts) == ("active", 1)
    assert row.error is not None
    assert row.error.startswith("rollback: ")
    key_file.write_bytes(good_key)
    assert rt.engine.tick(FERNET, retry_at) == T1 + EVERY
    assert rt.journal.get(rot.id).status == "rolled_back"
    assert harness.ring().primary == "v1"


def test_rollback_resumed_after_its_write_does_not_write_again(harness: Harness) -> None:
    a = harness.build()
    to_promoted(a)
    row = a.engine.rollback(FERNET, trigger="cli", reason=None, now=PROMOTE_AT + SECOND)
    versions = [v.version for v in harness.versions(FERNET)]
    harness.sql("UPDATE steps SET state = 'intent', finished_at = NULL WHERE rotation_id = ? AND name = 'rollback'",
                row.id)  # fmt: skip
    harness.sql("UPDATE rotations SET status = 'active', finished_at = NULL WHERE id = ?", row.id)
    b = harness.build()
    b.engine.tick(FERNET, PROMOTE_AT + 2 * SECOND)
    assert b.journal.get(row.id).status == "rolled_back"
    assert [v.version for v in harness.versions(FERNET)] == versions
    assert harness.ring().primary == "v1"


def test_rollback_of_a_pending_token_rotation_cancels_it_and_ticks_go_on(harness: Harness) -> None:
    """A rotation whose issue never ran has nothing to undo: rolling it back must not wedge it."""
    rt = harness.build()
    first_rotation(rt, TOKEN)
    before = harness.credentials()
    rot = rt.journal.start(
        secret=TOKEN, kind="api_token", version=2, phase="pending", trigger="schedule",
        emergency=False, reason=None, now=T1,
    )  # fmt: skip
    row = rt.engine.rollback(TOKEN, trigger="cli", reason="not now", now=T1 + SECOND)
    assert row.status == "rolled_back"
    assert rt.journal.get(rot.id).status == "rolled_back"
    assert harness.credentials().current.value == before.current.value
    # Ticks neither raise nor touch the secret until the next rotation is due.
    assert rt.engine.tick(TOKEN, T1 + 2 * SECOND) == T1 + EVERY


def test_rollback_of_a_half_issued_token_rotation_restores_the_old_token(harness: Harness) -> None:
    a = harness.build()
    first_rotation(a, TOKEN)
    old = harness.credentials().current
    assert a.engine.tick(TOKEN, T1) == T1 + GRACE
    rot = a.journal.active(TOKEN)
    assert rot is not None
    # The issue wrote its token, then the process died before recording it.
    reset_step(harness, rot.id, "issue", "pending", previous_key=None, new_key=None, retire_after=None)
    b = harness.build()
    row = b.engine.rollback(TOKEN, trigger="cli", reason=None, now=T1 + SECOND)
    assert row.status == "rolled_back"
    cs = harness.credentials()
    assert cs.current.value == old.value
    assert cs.previous is not None
    assert cs.previous.id == "v2"


def test_rollback_of_a_secret_never_created_is_refused_and_the_rotation_goes_on(
    make_harness: HarnessFactory,
) -> None:
    h = make_harness(fernet_secret())
    rt = h.build()
    (h.backend_settings.directory / "bots").write_bytes(b"in the way\n")
    retry_at = rt.engine.tick(FERNET, T0)
    with pytest.raises(RollbackImpossible, match="nothing to roll back"):
        rt.engine.rollback(FERNET, trigger="cli", reason=None, now=T0 + SECOND)
    row = rt.journal.active(FERNET)
    assert row is not None
    assert rt.journal.step(row.id, "rollback") is None
    (h.backend_settings.directory / "bots").unlink()
    assert rt.engine.tick(FERNET, retry_at) == T0 + EVERY
    assert h.ring().primary == "v1"


# -- failures ------------------------------------------------------------------------------------


def test_failing_step_is_recorded_retried_and_keeps_the_previous_primary(harness: Harness) -> None:
    rt = harness.build()
    to_staged(rt)
    under_v1 = multifernet(harness.ring()).encrypt(b"written before the failure")
    key_file = harness.backend_settings.master_key_file
    assert key_file is not None
    good_key = key_file.read_bytes()
    key_file.write_bytes(b"not a master key\n")
    rt.backends["local"].close()  # drop the key held in memory, as a restart would

    retry_at = rt.engine.tick(FERNET, PROMOTE_AT)
    assert PROMOTE_AT < retry_at <= PROMOTE_AT + timedelta(seconds=5)
    row = rt.journal.active(FERNET)
    assert row is not None
    assert (row.phase, row.attempts, row.next_attempt_at) == ("staged", 1, retry_at)
    assert row.error is not None
    assert row.error.startswith("promote: ")
    assert "master_key_file" in row.error
    # Before the retry time a tick waits.
    assert rt.engine.tick(FERNET, PROMOTE_AT + timedelta(milliseconds=1)) == retry_at
    assert rt.journal.get(row.id).attempts == 1

    retry2 = rt.engine.tick(FERNET, retry_at)
    assert retry2 > retry_at
    assert rt.journal.get(row.id).attempts == 2
    # The bots' view is unchanged: the previous primary is in force and old data decrypts.
    ring = harness.ring()
    assert ring.primary == "v1"
    assert decrypts(ring, under_v1)
    # One failure notice per consumer, however many attempts fail.
    assert outbox(harness, "rotation.failed") == [(CONSUMER, "rotation.failed", row.id)]
    assert [e["event"] for e in audit_events(rt)].count("rotation.failed") == 1
    status = secret_status(rt.engine, FERNET, retry_at)
    assert (status["state"], status["attempts"], status["next_step"]) == ("failing", 2, "promote")
    assert status["error"] == rt.journal.get(row.id).error

    key_file.write_bytes(good_key)
    retire_at = rt.engine.tick(FERNET, retry2)
    assert retire_at == retry2 + GRACE
    row = rt.journal.get(row.id)
    assert (row.phase, row.error, row.attempts, row.next_attempt_at) == ("reencrypted", None, 0, None)
    assert harness.ring().primary == "v2"
    assert secret_status(rt.engine, FERNET, retry2)["state"] == "in progress"
    assert rt.engine.tick(FERNET, retire_at) == T1 + EVERY
    assert rt.journal.get(row.id).status == "done"


def test_unwritable_backend_path_fails_the_stage_until_fixed(make_harness: HarnessFactory) -> None:
    h = make_harness(fernet_secret())
    rt = h.build()
    blocker = h.backend_settings.directory / "bots"
    blocker.write_bytes(b"a regular file where a directory must be\n")
    retry_at = rt.engine.tick(FERNET, T0)
    assert T0 < retry_at <= T0 + timedelta(seconds=5)
    row = rt.journal.active(FERNET)
    assert row is not None
    assert (row.phase, row.attempts) == ("pending", 1)
    assert row.error is not None
    assert row.error.startswith("stage: ")
    assert secret_status(rt.engine, FERNET, T0)["state"] == "failing"
    assert outbox(h, "rotation.failed") == [(CONSUMER, "rotation.failed", row.id)]

    blocker.unlink()
    assert rt.engine.tick(FERNET, retry_at) == T0 + EVERY
    assert rt.journal.get(row.id).status == "done"
    assert h.ring().primary == "v1"
    assert len(outbox(h, "rotation.failed")) == 1


# -- secrecy -------------------------------------------------------------------------------------


def test_no_key_material_reaches_the_state_db_the_audit_log_or_the_logs(
    harness: Harness, log_stream: io.StringIO
) -> None:
    rt = harness.build()
    secrets: set[str] = set()

    def collect(_name: str) -> None:
        for name in (FERNET, TOKEN):
            secrets.update(materials(harness.doc(name)))

    rt.engine.on_change = collect
    for name in (FERNET, TOKEN):
        first_rotation(rt, name)
        due = T1
        while (due := rt.engine.tick(name, due)) < T1 + EVERY:
            pass
    rt.engine.rotate(FERNET, trigger="cli", emergency=True, reason="drill", now=T1 + EVERY - SECOND)
    promote_at = rt.engine.tick(FERNET, T1 + 2 * EVERY)
    rt.engine.tick(FERNET, promote_at)
    rt.engine.rollback(FERNET, trigger="cli", reason="drill", now=promote_at + SECOND)

    fernet_docs = [d for d in (harness.doc(FERNET),) if isinstance(d, FernetRing)]
    token_docs = [d for d in (harness.doc(TOKEN),) if isinstance(d, CredentialSet)]
    assert fernet_docs
    assert token_docs
    assert len(secrets) >= 6  # keys v1..v4 and tokens v1, v2 were seen
    assert all(len(s) >= 40 for s in secrets)

    state_dir = harness.settings.daemon.state_dir
    db_bytes = b"".join(p.read_bytes() for p in sorted(state_dir.glob("state.db*")))
    audit_bytes = rt.audit.path.read_bytes()
    log_text = log_stream.getvalue()
    # The scanned bytes are real: the journal, the outbox, audit records and log lines are there.
    assert b"key.promoted" in db_bytes
    assert b"rotation.rolled_back" in audit_bytes
    assert "rotation staged" in log_text
    assert not any(s.encode() in db_bytes for s in secrets)
    assert not any(s.encode() in audit_bytes for s in secrets)
    assert not any(s in log_text for s in secrets)
    assert rt.audit.verify().ok
