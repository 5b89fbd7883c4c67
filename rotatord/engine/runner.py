"""The rotation engine: advances each secret's persisted state machine one idempotent step at a time.

Every step follows the same protocol (STYLE rule 9): record the intent (with a request id) in
the journal, act (each action first checks whether its effect already exists), append the audit
record, then record the result, the new phase and the step's webhook events in one transaction.
``kill -9`` anywhere in between is survived by running the step again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..audit import AuditLog
from ..config import SecretSettings
from ..crypto.generators import generator_for
from ..document import CredentialSet, Document, FernetRing, digest, key_id_for
from ..errors import (
    ConflictError,
    NotManaged,
    RetirementBlocked,
    RollbackImpossible,
    RotationInProgress,
    RotatordError,
    StepInterrupted,
    UnknownSecret,
    UsageError,
)
from ..interfaces import Backend, Census, DataStore, Event
from ..timeutil import utcnow
from . import transitions as t
from .drift import DriftGuard, DriftSnapshot
from .drift_store import DriftRecord
from .emergency import EmergencyReports
from .gate import AckGate
from .journal import ACTIVE, Journal, RotationRow
from .ledger import StoreLedger
from .policy import RetryPolicy, next_rotation_due
from .reencrypt import Reencryptor, serial_batch_rotator
from .states import EVENT_AFTER, FIRST_PHASE, PHASE_AFTER, next_step

if TYPE_CHECKING:
    from ..hooks.runner import HookRunner

__all__ = ["CRASH_ENV", "Engine", "StepOutcome"]

log = logging.getLogger("rotatord.engine")

#: Test-only: a comma-separated list of ``<step>.<point>`` names (point: intent, acted, done) at
#: which the process SIGKILLs itself, so crash tests can name the instant they interrupt.
CRASH_ENV = "ROTATORD_TEST_CRASH_AT"
CAS_ATTEMPTS = 3


@dataclass(frozen=True)
class StepOutcome:
    """What a step did: facts for the journal (never material) and the rotation columns to update."""

    result: dict[str, Any]
    updates: dict[str, Any]
    detail: dict[str, str]


class Engine:
    """Runs rotations for the configured secrets.  Thread-safe: one lock per secret."""

    def __init__(
        self,
        secrets: Sequence[SecretSettings],
        backends: Mapping[str, Backend],
        journal: Journal,
        audit: AuditLog,
        retry: RetryPolicy,
        stores: Mapping[str, Sequence[DataStore]] | None = None,
        locks: dict[str, threading.RLock] | None = None,
        reencryptor: Reencryptor | None = None,
        gate: AckGate | None = None,
        hooks: HookRunner | None = None,
        security_consumers: Sequence[str] = (),
        drift_hold: timedelta = timedelta(minutes=5),
    ) -> None:
        self.secrets = {s.name: s for s in secrets}
        self.drift = DriftGuard(journal, audit, security_consumers)
        #: How long a secret paused by drift waits before its next tick looks again.
        self.drift_hold = drift_hold
        self.gate = gate
        self.hooks = hooks
        self.drift.on_detected = self._drift_hooks
        self.backends = backends
        self.journal = journal
        self.audit = audit
        self.retry = retry
        self.stores = stores or {}
        self.reencryptor = reencryptor or Reencryptor(StoreLedger(journal), utcnow, serial_batch_rotator)
        self.emergencies = EmergencyReports(self)
        # Shared across engine instances (a reload builds a new engine while a step may still run).
        self._locks = locks if locks is not None else {}
        for name in self.secrets:
            self._locks.setdefault(name, threading.RLock())
        self._crash_points = {p for p in os.environ.get(CRASH_ENV, "").split(",") if p}
        self.on_change: Callable[[str], None] | None = None
        #: Told of every failed step (and failed start) with the error, e.g. to count it in metrics.
        self.on_failure: Callable[[SecretSettings, str, Exception], None] | None = None

    # -- entry points ----------------------------------------------------------------------

    def setting(self, name: str) -> SecretSettings:
        try:
            return self.secrets[name]
        except KeyError:
            raise UnknownSecret(name) from None

    def next_due(self, name: str, now: datetime) -> datetime:
        latest = self.journal.latest(name)
        return next_rotation_due(self.setting(name), latest.started_at if latest else None, now)

    def tick(self, name: str, now: datetime) -> datetime:
        """Scheduler entry: advance the active rotation, or start one that is due.  Returns the
        next time something is due for this secret."""
        with self._lock(name):
            return self._with_hooks(name, self._tick(name, now), now)

    def _tick(self, name: str, now: datetime) -> datetime:
        rot = self.journal.active(name)
        if rot is None:
            due = self.next_due(name, now)
            if due > now:
                return due
            try:
                record = self.drift.check(self.setting(name), self.backends[self.setting(name).backend], now)
                if record is not None:  # a scheduled rotation never writes over someone else's change
                    self.drift.paused(record)
                    self._changed(name)
                    return now + self.drift_hold
                rot = self._start(name, trigger="schedule", emergency=False, reason=None, now=now)
            except RotatordError as exc:
                log.error("cannot start rotation", extra={"secret": name, "error": str(exc)})
                self._failure(self.setting(name), "start", exc)
                return now + self.retry.delay(1)
        return self._advance(rot, now)

    def _drift_hooks(self, name: str, record: DriftRecord, event: Event | None, now: datetime) -> None:
        """The secret's ``drift`` hooks, once per drift record (its id is the occasion)."""
        if self.hooks is None or event is None or not self.hooks.configured(name):
            return
        try:
            self.hooks.fire(name, "drift", event, now=now, occasion=f"drift-{record.id}")
        except RotatordError as exc:  # the drift is recorded and reported whatever a hook does
            log.error("drift hooks could not run", extra={"secret": name, "error": str(exc)})

    def _with_hooks(self, name: str, when: datetime, now: datetime) -> datetime:
        """Run the hook runs that are due (those of finished rotations too) and return the
        earlier of ``when`` and the next pending hook run."""
        if self.hooks is None or not self.hooks.configured(name):
            return when
        self.hooks.run_due(self.setting(name), now)
        pending = self.hooks.next_at(name)
        return min(when, pending) if pending is not None else when

    def rotate(self, name: str, *, trigger: str, emergency: bool, reason: str | None, now: datetime) -> RotationRow:
        """Start a rotation now (operator's request) and run the steps that are ready.

        An emergency needs a non-empty ``reason`` (UsageError before anything changes); it opens
        a blast-radius report, recorded in the audit log now, at each phase and at the end.

        A secret with drift is refused unless ``emergency``.  An emergency rotation first
        accepts the backend's current document as the baseline (clearing the drift) and rotates
        from it, so keys someone added out of band stay in the ring as decrypt-only keys and
        stored data under them stays readable until the census says otherwise.  If that
        document is unreadable (fails the schema, foreign, deleted or destroyed) it refuses:
        the journal holds no key material to rebuild a ring from, and a fresh ring would drop
        keys stored data may need; the operator restores a valid version first.
        """
        secret = self.setting(name)
        if emergency and not (reason or "").strip():
            raise UsageError(
                f"an emergency rotation of {name!r} needs a reason (--reason TEXT): it is recorded in the audit log"
            )
        # An emergency holds the priority gate from the start: while it waits for a step of this
        # secret that is running (its lock), other secrets' re-encryption already pauses.
        urgent = self.reencryptor.priority.urgent(name) if emergency else nullcontext()
        with urgent, self._lock(name):
            record = self.drift.check(secret, self.backends[secret.backend], now)
            if record is not None:
                if not emergency:
                    raise self.drift.error(record)
                self.drift.accept(secret, self.backends[secret.backend], trigger, "emergency", now, note=reason)
            active = self.journal.active(name)
            if active is not None:
                if not emergency:
                    raise RotationInProgress(
                        f"rotation {active.version} of {name!r} is in progress (phase {active.phase}); "
                        "wait for it, roll it back, or use --emergency to finish it now"
                    )
                rot = self.journal.update(
                    active.id,
                    now,
                    emergency=True,
                    reason=reason or active.reason,
                    promote_after=now,
                    next_attempt_at=None,
                )
                if rot.retire_after is not None:
                    rot = self.journal.update(rot.id, now, retire_after=now)
                self._audit("rotation.emergency", rot, actor=trigger, reason=reason)
            else:
                rot = self._start(name, trigger=trigger, emergency=emergency, reason=reason, now=now)
            if emergency:
                self.emergencies.opened(rot, trigger, now)
            self._with_hooks(name, self._advance(rot, now), now)
            return self.journal.get(rot.id)

    def rollback(self, name: str, *, trigger: str, reason: str | None, now: datetime) -> RotationRow:
        """Put the previous primary back while it is still in the ring."""
        secret = self.setting(name)
        with self._lock(name):
            rot = self.journal.active(name) or self.journal.latest(name)
            if rot is None:
                raise RollbackImpossible(f"{name!r} has no rotation to roll back")
            if rot.status == "rolled_back":
                raise RollbackImpossible(f"rotation {rot.version} of {name!r} is already rolled back")
            if rot.previous_key is None and rot.phase != FIRST_PHASE:
                raise RollbackImpossible(
                    f"rotation {rot.version} of {name!r} created the secret; there is no previous key"
                )
            record = self.drift.check(secret, self.backends[secret.backend], now)
            if record is not None:
                raise self.drift.error(record)
            # Find out whether there is anything to put back BEFORE recording the intent: every
            # later tick finishes a recorded rollback, so an impossible one must never be recorded.
            current = self.backends[secret.backend].read(secret.path)
            if current is not None:
                self._check_owner(secret, current.document)
            self._rolled_back(secret, rot, current.document if current else None, now)
            step = self.journal.begin_step(rot.id, "rollback", now)
            return self._finish_rollback(secret, rot, step.request_id, trigger, reason, now)

    def census(self, name: str) -> list[Census]:
        """Count each store's items per key now (read-only) and record the result."""
        secret = self.setting(name)
        stores = self.stores.get(name, ())
        if secret.kind != "fernet" or not stores:
            return []
        current = self.backends[secret.backend].read(secret.path)
        ring = self._require_ring(secret, current.document if current else None)
        return self.reencryptor.census(name, ring, stores)

    def reencrypt(self, name: str, *, trigger: str, now: datetime) -> dict[str, Any]:
        """Resume the re-encryption step of the active rotation, or force a pass outside one."""
        secret = self.setting(name)
        stores = self.stores.get(name, ())
        if secret.kind != "fernet" or not stores:
            raise UsageError(f"{name!r} has no data stores to re-encrypt")
        with self._lock(name):
            active = self.journal.active(name)
            if active is not None:
                if active.phase in ("promoted", "reencrypted") and active.next_attempt_at:
                    active = self.journal.update(active.id, now, next_attempt_at=None)
                self._advance(active, now)
                rot = self.journal.get(active.id)
                return {"rotation": rot.version, "phase": rot.phase, "error": rot.error}
            latest = self.journal.latest(name)
            if latest is None:
                raise UsageError(f"{name!r} was never created; nothing to re-encrypt")
            record = self.drift.check(secret, self.backends[secret.backend], now)
            if record is not None:  # never move data under a key someone else put in the ring
                raise self.drift.error(record)
            current = self.backends[secret.backend].read(secret.path)
            ring = self._require_ring(secret, current.document if current else None)
            step = f"manual-{int(now.timestamp() * 1000)}"
            moved = self.reencryptor.move(name, latest.id, step, ring, stores)
            self._audit("reencrypt.forced", latest, actor=trigger, **moved.summary())
            return {"rotation": latest.version, "phase": latest.phase, **moved.summary()}

    def signing_secrets(self, name: str) -> list[str]:
        """The whsec_ values that sign webhooks for ``name``'s consumers: current, then previous
        while still valid (dual signatures during a signing-secret rotation)."""
        secret = self.setting(name)
        if secret.kind != "webhook_secret":
            raise UsageError(f"{name!r} is not a webhook_secret")
        current = self.backends[secret.backend].read(secret.path)
        creds = self._credentials(secret, current.document if current else None)
        if creds is None:
            return []
        values = [creds.current.value.reveal()]
        previous = creds.previous
        if previous is not None and (previous.valid_until is None or previous.valid_until > utcnow()):
            values.append(previous.value.reveal())
        return values

    def check_drift(self, name: str, now: datetime, snapshot: DriftSnapshot | None = None) -> DriftRecord | None:
        """The periodic check: compare ``name``'s backend with its baseline now (see engine.drift).
        Returns its open drift, or None.  Raises what the backend raises.

        A secret whose lock is held (a step running, perhaps a long re-encryption) is not
        waited for: that step checked before it acted, and its next one checks again.  With a
        ``snapshot`` (:meth:`DriftGuard.snapshot`, taken once per sweep), a secret whose backend
        still matches it costs no query.
        """
        secret = self.setting(name)
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            return self.drift.ledger.open_drift(name)
        try:
            backend = self.backends[secret.backend]
            if snapshot is not None and self.drift.unchanged(secret, backend, snapshot):
                return None
            return self.drift.check(secret, backend, now)
        finally:
            lock.release()

    def adopt(self, name: str, *, actor: str, reason: str | None, now: datetime) -> dict[str, Any]:
        """``rotatord adopt``: accept the backend's current document as ``name``'s baseline and
        clear its drift, after validating it (schema, name and kind).  An invalid document
        raises DocumentInvalid / NotManaged and nothing changes.  A rotation paused by the
        drift resumes at its next tick."""
        secret = self.setting(name)
        with self._lock(name):
            if self.journal.latest(name) is None:
                raise UsageError(f"{name!r} was never rotated by rotatord; there is nothing to adopt")
            record = self.drift.ledger.open_drift(name)
            seen = self.drift.accept(secret, self.backends[secret.backend], actor, "adopt", now, note=reason)
        self._changed(name)
        return {
            "name": name,
            "backend_version": seen.version,
            "drift_cleared": record is not None,
            "reason": record.reason if record else None,
        }

    def resume(self, now: datetime) -> list[RotationRow]:
        """Every rotation left active by an earlier process (crash, restart, failover)."""
        return self.journal.all_active()

    # -- the state machine -----------------------------------------------------------------

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with self._locks[name]:
            yield

    def _start(self, name: str, *, trigger: str, emergency: bool, reason: str | None, now: datetime) -> RotationRow:
        secret = self.setting(name)
        latest = self.journal.latest(name)
        current = self.backends[secret.backend].read(secret.path)
        doc = current.document if current else None
        if doc is not None:
            self._check_owner(secret, doc)
        version = max(latest.version if latest else 0, doc.version if doc else 0) + 1
        rot = self.journal.start(
            secret=name, kind=secret.kind, version=version, phase=FIRST_PHASE, trigger=trigger,
            emergency=emergency, reason=reason, now=now,
        )  # fmt: skip
        self._audit("rotation.started", rot, actor=trigger, reason=reason)
        log.info("rotation started", extra={"secret": name, "version": version, "trigger": trigger})
        return rot

    def _advance(self, rot: RotationRow, now: datetime) -> datetime:
        secret = self.setting(rot.secret)
        while rot.status == ACTIVE:
            if rot.next_attempt_at is not None and rot.next_attempt_at > now:
                return rot.next_attempt_at
            pending_rollback = self.journal.step(rot.id, "rollback")
            if pending_rollback is not None:  # an interrupted rollback is finished, not undone
                held = self._held(secret, rot, "rollback", now)
                if held is not None:
                    return held
                try:
                    rot = self._finish_rollback(secret, rot, pending_rollback.request_id, "resume", None, now)
                except RotatordError as exc:
                    return self._failed(rot, "rollback", exc, now)
                except Exception as exc:  # as for steps: logged and retried, never raised to the scheduler
                    log.exception("internal error in rollback", extra={"secret": rot.secret})
                    return self._failed(rot, "rollback", exc, now)
                break
            if self.hooks is not None and (held := self.hooks.gate(secret, rot, now)) is not None:
                return held  # a block hook of this phase has not succeeded yet
            step = next_step(rot.kind, rot.phase)
            if step is None:  # every step done but not closed: close it
                rot = self.journal.update(rot.id, now, status="done", finished_at=now)
                break
            ready = self._ready_at(rot, step)
            if step == "promote" and self.gate is not None:
                ready = self.gate.promote_at(secret, rot, now)
            if ready is not None and ready > now:
                return ready
            held = self._held(secret, rot, step, now)
            if held is not None:
                return held
            try:
                rot = self._run_step(secret, rot, step, now)
            except StepInterrupted:
                return now  # a shutdown, not a failure: the next process resumes from the checkpoint
            except RotatordError as exc:
                return self._failed(rot, step, exc, now)
            except Exception as exc:  # a bug must not kill the scheduler; it is logged and retried
                log.exception("internal error in step", extra={"secret": rot.secret, "step": step})
                return self._failed(rot, step, exc, now)
        self._changed(rot.secret)
        return self.next_due(rot.secret, now)

    def _held(self, secret: SecretSettings, rot: RotationRow, step: str, now: datetime) -> datetime | None:
        """Before ``step`` acts: when to look again if the secret drifted (the step holds: it
        never acts on a secret someone else changed), or None to go on.  A failed check counts
        as a failure of the step."""
        try:
            record = self.drift.check(secret, self.backends[secret.backend], now)
        except RotatordError as exc:
            return self._failed(rot, step, exc, now)
        if record is None:
            return None
        self.drift.paused(record)
        self._changed(rot.secret)
        return now + self.drift_hold

    @staticmethod
    def _ready_at(rot: RotationRow, step: str) -> datetime | None:
        if step == "promote":
            return rot.promote_after
        if step in ("retire", "revoke"):
            return rot.retire_after
        return None

    def _run_step(self, secret: SecretSettings, rot: RotationRow, step: str, now: datetime) -> RotationRow:
        intent = self.journal.begin_step(rot.id, step, now)
        self._crash(f"{step}.intent")
        outcome = getattr(self, f"_step_{step}")(secret, rot, intent.request_id, now)
        self._crash(f"{step}.acted")
        phase = PHASE_AFTER[step]
        updates = dict(outcome.updates, phase=phase)
        if phase in ("retired", "revoked"):
            updates.update(status="done", finished_at=now)
        self._audit(f"rotation.{phase}", rot, actor=rot.trigger, request_id=intent.request_id, **outcome.result)
        events = self._events(secret, rot, EVENT_AFTER.get(step), phase, outcome, now)
        hook_runs = None
        if self.hooks is not None:  # recorded with the phase itself: a phase never happens without its hooks
            event = self._event(secret, rot, EVENT_AFTER.get(step, f"key.{phase}"), phase, outcome, now)
            hook_runs = self.hooks.recorder(secret, rot, phase, updates, event)
        rot = self.journal.complete_step(rot.id, step, now, outcome.result, updates, events, also=hook_runs)
        log.info(
            f"rotation {phase}",
            extra={"secret": rot.secret, "version": rot.version, "phase": phase, **outcome.result},
        )
        if rot.emergency:
            self.emergencies.after_step(rot, step, now)
        self._changed(rot.secret)
        self._crash(f"{step}.done")
        return rot

    def _failed(self, rot: RotationRow, step: str, exc: Exception, now: datetime) -> datetime:
        attempts = rot.attempts + 1
        retry_at = now + self.retry.delay(attempts)
        message = str(exc) if isinstance(exc, RotatordError) else f"internal error ({type(exc).__name__})"
        self.journal.update(rot.id, now, error=f"{step}: {message}", attempts=attempts, next_attempt_at=retry_at)
        transient = isinstance(exc, RotatordError) and exc.transient
        log.log(
            logging.WARNING if transient else logging.ERROR,
            "step failed; the previous primary stays in force",
            extra={"secret": rot.secret, "version": rot.version, "step": step, "error": message,
                   "attempt": attempts, "retry_at": retry_at.isoformat()},
        )  # fmt: skip
        secret = self.setting(rot.secret)
        self._failure(secret, step, exc)
        if attempts == 1:
            self._audit("rotation.failed", rot, actor=rot.trigger, step=step, error=message)
            outcome = StepOutcome({}, {}, {"step": step, "error": message})
            self.journal.queue_events(self._events(secret, rot, "rotation.failed", rot.phase, outcome, now), now)
            if self.hooks is not None:
                event = self._event(secret, rot, "rotation.failed", rot.phase, outcome, now)
                try:
                    self.hooks.fire(rot.secret, "failed", event, now=now, occasion=step, rotation=rot)
                except RotatordError as hook_exc:  # the failure is recorded whatever its hooks do
                    log.error("failed hooks could not run", extra={"secret": rot.secret, "error": str(hook_exc)})
        self._changed(rot.secret)
        return retry_at

    # -- steps: each reads, checks whether its effect exists, writes with check-and-set ----

    def _step_stage(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        generator = generator_for("fernet")
        before: dict[str, str | None] = {}

        def mutate(doc: Document | None) -> Document | None:
            ring = self._ring(secret, doc)
            before["primary"] = ring.primary if ring else None
            return t.stage_ring(ring, secret.name, rot.version, generator.generate, now)

        version, doc = self._cas(secret, mutate, request_id, now)
        assert isinstance(doc, FernetRing)
        kid = key_id_for(rot.version)
        previous = before["primary"] if before["primary"] != kid else None
        immediate = previous is None or rot.emergency
        promote_after = now if immediate else now + secret.propagation
        updates = {"backend_version": version, "new_key": kid, "previous_key": previous, "promote_after": promote_after}
        return StepOutcome({"backend_version": version, "key": kid}, updates, {"key": kid})

    def _step_promote(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        retire_after = now if (rot.emergency or rot.previous_key is None) else now + secret.grace

        def mutate(doc: Document | None) -> Document | None:
            ring = self._require_ring(secret, doc)
            return t.promote_ring(ring, rot.version, now, retire_after)

        version, doc = self._cas(secret, mutate, request_id, now)
        assert isinstance(doc, FernetRing)
        old = doc.key(rot.previous_key) if rot.previous_key else None
        if old is not None and old.retire_after is not None:
            retire_after = old.retire_after  # resumed: the deadline written the first time wins
        updates = {"backend_version": version, "retire_after": retire_after}
        return StepOutcome({"backend_version": version, "primary": doc.primary}, updates, {"primary": doc.primary})

    def _step_reencrypt(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        stores = self.stores.get(secret.name, ())
        if not stores:
            return StepOutcome({"stores": 0}, {}, {})
        current = self.backends[secret.backend].read(secret.path)
        ring = self._require_ring(secret, current.document if current else None)
        moved = self.reencryptor.move(secret.name, rot.id, "reencrypt", ring, stores, urgent=rot.emergency)
        return StepOutcome(moved.summary(), {}, {})

    def _step_retire(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        current = self.backends[secret.backend].read(secret.path)
        ring = self._require_ring(secret, current.document if current else None)
        # The journal's deadline for the previous key wins when it is earlier than the ring's:
        # an emergency declared after the promotion shortens the grace the promotion wrote.
        deadlines = {rot.previous_key: rot.retire_after} if rot.previous_key and rot.retire_after else {}
        # After an emergency the old key is presumed compromised: it is never kept as a rollback reserve.
        keep = 0 if rot.emergency else secret.keep
        candidates = {k.id for k in t.retire_candidates(ring, now, keep, deadlines)}
        stores = self.stores.get(secret.name, ())
        if candidates and stores:
            # The final sweep catches items bots wrote under the old key during the run; then a
            # fresh census must find nothing that only a retiring key can decrypt.
            moved = self.reencryptor.move(secret.name, rot.id, "retire", ring, stores, urgent=rot.emergency)
            for census in moved.censuses:
                needed = {kid: census.count(kid) for kid in candidates if census.count(kid)}
                if needed:
                    raise RetirementBlocked(
                        f"{census.store} still holds items under "
                        + ", ".join(f"{kid} ({n})" for kid, n in sorted(needed.items()))
                    )

        def mutate(doc: Document | None) -> Document | None:
            return t.retire_ring(self._require_ring(secret, doc), candidates, now)

        version, _doc = self._cas(secret, mutate, request_id, now)
        removed = ",".join(sorted(candidates))
        return StepOutcome({"backend_version": version, "removed": removed}, {"backend_version": version},
                           {"removed": removed})  # fmt: skip

    def _step_issue(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        generator = generator_for(secret.kind, token_prefix=secret.token_prefix)
        before: dict[str, str | None] = {}
        emergency_or_first: dict[str, bool] = {}

        def mutate(doc: Document | None) -> Document | None:
            cs = self._credentials(secret, doc)
            before["current"] = cs.current.id if cs else None
            emergency_or_first["v"] = rot.emergency or cs is None
            valid_until = now if emergency_or_first["v"] else now + secret.grace
            return t.issue_credential(
                cs, name=secret.name, kind=secret.kind, version=rot.version,  # type: ignore[arg-type]
                generate=generator.generate, now=now, valid_until=valid_until, ttl=secret.token_ttl,
            )  # fmt: skip

        version, doc = self._cas(secret, mutate, request_id, now)
        assert isinstance(doc, CredentialSet)
        kid = key_id_for(rot.version)
        previous = before["current"] if before["current"] != kid else (doc.previous.id if doc.previous else None)
        retire_after = doc.previous.valid_until if doc.previous and doc.previous.valid_until else now
        updates = {"backend_version": version, "new_key": kid, "previous_key": previous, "retire_after": retire_after}
        return StepOutcome({"backend_version": version, "id": kid}, updates, {"id": kid})

    def _step_revoke(self, secret: SecretSettings, rot: RotationRow, request_id: str, now: datetime) -> StepOutcome:
        def mutate(doc: Document | None) -> Document | None:
            cs = self._credentials(secret, doc)
            if cs is None:
                raise NotManaged(f"{secret.path}: the credential document disappeared")
            return t.revoke_credential(cs, now)

        version, _doc = self._cas(secret, mutate, request_id, now)
        revoked = rot.previous_key or ""
        return StepOutcome({"backend_version": version, "revoked": revoked}, {"backend_version": version},
                           {"revoked": revoked})  # fmt: skip

    def _rolled_back(
        self, secret: SecretSettings, rot: RotationRow, doc: Document | None, now: datetime
    ) -> Document | None:
        """``doc`` with rotation ``rot`` undone, or None when there is nothing (left) to undo.

        Pure, so :meth:`rollback` can ask it before recording the intent.  Raises
        RollbackImpossible when no previous primary is left to put back, NotManaged when the
        document vanished after the rotation wrote it.
        """
        retire_after = now + secret.grace
        kid = key_id_for(rot.version)
        if doc is None:
            if rot.phase == FIRST_PHASE:
                raise RollbackImpossible(f"{secret.name!r} was never created; there is nothing to roll back")
            raise NotManaged(f"{secret.path}: the secret disappeared from the backend")
        if secret.kind == "fernet":
            ring = self._require_ring(secret, doc)
            if rot.phase in (FIRST_PHASE, "staged"):  # never primary: nothing was encrypted under it
                if ring.primary == kid:
                    raise RollbackImpossible(
                        f"rotation {rot.version} of {secret.name!r} created the secret; there is no previous key"
                    )
                return t.retire_ring(ring, {kid}, now)
            assert rot.previous_key is not None
            return t.rollback_ring(ring, rot.previous_key, now, retire_after)
        cs = self._credentials(secret, doc)
        assert cs is not None
        if rot.phase == FIRST_PHASE and cs.current.id != kid:
            return None  # the new credential was never issued: the old one is still current
        # previous_key is recorded when the issue completes; a half-done issue left it in the document.
        restore = rot.previous_key or (cs.previous.id if cs.previous else None)
        if restore is None:
            raise RollbackImpossible(f"{secret.name!r} has no previous credential")
        return t.rollback_credentials(cs, restore, now, retire_after)

    def _finish_rollback(
        self, secret: SecretSettings, rot: RotationRow, request_id: str, trigger: str, reason: str | None, now: datetime
    ) -> RotationRow:
        def mutate(doc: Document | None) -> Document | None:
            return self._rolled_back(secret, rot, doc, now)

        version, _doc = self._cas(secret, mutate, request_id, now)
        self._audit("rotation.rolled_back", rot, actor=trigger, reason=reason, backend_version=version)
        outcome = StepOutcome({"backend_version": version}, {}, {"reason": reason or ""})
        events = self._events(secret, rot, "rotation.rolled_back", rot.phase, outcome, now)
        # The reason goes into the journal too, so ``history`` says why without the audit log.
        result = {"backend_version": version, **({"reason": reason} if reason else {})}
        rot = self.journal.complete_step(
            rot.id, "rollback", now, result,
            {"status": "rolled_back", "finished_at": now, "backend_version": version}, events,
        )  # fmt: skip
        log.warning("rotation rolled back", extra={"secret": rot.secret, "version": rot.version, "reason": reason})
        if rot.emergency:
            self.emergencies.after_step(rot, "rollback", now)
        self._changed(rot.secret)
        return rot

    def blast_report(self, rot: RotationRow) -> dict[str, Any]:
        """The live blast-radius report of the emergency rotation ``rot`` (state database only)."""
        return self.emergencies.report(rot)

    # -- helpers ---------------------------------------------------------------------------

    def _cas(
        self,
        secret: SecretSettings,
        mutate: Callable[[Document | None], Document | None],
        request_id: str,
        now: datetime,
    ) -> tuple[str, Document]:
        """Read, transform, write with check-and-set; on a conflict re-read and re-validate.

        Each read must find the version rotatord last wrote (or its own pending write): a
        version someone else wrote raises DriftDetected instead of being written over.  The
        digest of the new document is journaled before the write and the observed version
        after it, so drift detection knows rotatord's own writes, even across a crash.
        """
        backend = self.backends[secret.backend]
        for _attempt in range(CAS_ATTEMPTS):
            current = backend.read(secret.path)
            if current is not None:
                self._check_owner(secret, current.document)
            self.drift.confirm(secret, backend, current.version if current else None, now)
            new = mutate(current.document if current else None)
            if new is None:
                assert current is not None
                return current.version, current.document
            new_digest = digest(new)
            self.drift.before_write(secret, request_id, new_digest, now)
            try:
                version = backend.write(
                    secret.path, new, expected=current.version if current else None, request_id=request_id
                )
            except ConflictError:
                log.info("concurrent change; re-reading", extra={"secret": secret.name, "path": secret.path})
                continue
            self.drift.after_write(secret, backend, version, new_digest, now)
            return version, new
        raise ConflictError(f"{secret.path}: changed concurrently {CAS_ATTEMPTS} times in a row; will retry")

    @staticmethod
    def _check_owner(secret: SecretSettings, doc: Document) -> None:
        if doc.name != secret.name or doc.kind != secret.kind:
            raise NotManaged(
                f"{secret.path}: holds the {doc.kind} document of {doc.name!r}, "
                f"not the {secret.kind} of {secret.name!r}"
            )

    @staticmethod
    def _ring(secret: SecretSettings, doc: Document | None) -> FernetRing | None:
        if doc is None or isinstance(doc, FernetRing):
            return doc
        raise NotManaged(f"{secret.path}: holds a {doc.kind} document, not a fernet ring")

    def _require_ring(self, secret: SecretSettings, doc: Document | None) -> FernetRing:
        ring = self._ring(secret, doc)
        if ring is None:
            raise NotManaged(f"{secret.path}: the key ring disappeared from the backend")
        return ring

    @staticmethod
    def _credentials(secret: SecretSettings, doc: Document | None) -> CredentialSet | None:
        if doc is None or isinstance(doc, CredentialSet):
            return doc
        raise NotManaged(f"{secret.path}: holds a {doc.kind} document, not {secret.kind} credentials")

    def _events(
        self,
        secret: SecretSettings,
        rot: RotationRow,
        event_type: str | None,
        phase: str,
        outcome: StepOutcome,
        now: datetime,
    ) -> list[tuple[str, Event]]:
        if event_type is None:
            return []
        event = self._event(secret, rot, event_type, phase, outcome, now)
        return [(consumer, event) for consumer in secret.consumers]

    @staticmethod
    def _event(
        secret: SecretSettings, rot: RotationRow, event_type: str, phase: str, outcome: StepOutcome, now: datetime
    ) -> Event:
        version = outcome.updates.get("backend_version", rot.backend_version)
        return Event(
            type=event_type, secret=secret.name, rotation_id=rot.id, version=rot.version, phase=phase,
            backend=secret.backend, path=secret.path, backend_version=version, occurred_at=now, detail=outcome.detail,
        )  # fmt: skip

    def _audit(self, event: str, rot: RotationRow, *, actor: str, **fields: object) -> None:
        self.audit.append(event, actor=actor, secret=rot.secret, rotation_id=rot.id, version=rot.version, **fields)

    def _crash(self, point: str) -> None:
        if point in self._crash_points:
            log.warning("test crash point reached", extra={"point": point})
            os.kill(os.getpid(), signal.SIGKILL)

    def _failure(self, secret: SecretSettings, step: str, exc: Exception) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(secret, step, exc)
        except Exception:  # counting a failure must never become one
            log.exception("failure observer failed", extra={"secret": secret.name})

    def _changed(self, name: str) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(name)
        except Exception:  # an observer's failure must never look like a failed step
            log.exception("change observer failed", extra={"secret": name})
