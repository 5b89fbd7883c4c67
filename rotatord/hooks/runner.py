"""Which hooks run when, with what, and what a failure does (certbot's deploy-hook model).

After a phase is durable, every hook listing it runs once: the event as JSON on stdin and as
``ROTATORD_*`` variables in an otherwise clean environment; key material only on stdin, and only
for a hook configured ``with_secret = true``.  A failed run follows its hook's ``on_failure``:

* ``ignore``: logged and audited, never run again;
* ``retry``: run again with the engine's step backoff until it succeeds; the rotation goes on;
* ``block``: as ``retry``, and the rotation does not leave that phase until it succeeds (its
  status reads "held by hook ..."). ``failed`` and ``drift`` hold nothing: there ``block`` is ``retry``.

api_token / webhook_secret rotations have the phases ``issued`` and ``revoked``; a hook listing
``promoted`` also runs at ``issued`` (the new credential is the one in use) and ``retired`` at
``revoked`` (the old one stops working).

Runs are recorded in the state database (``hooks.ledger``) so each runs at least once across
crashes and never again once done.  Commands run synchronously on the calling thread, which is
always a scheduler or executor thread, never the asyncio loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from ..audit import AuditLog
from ..config import SecretSettings
from ..config.model import HookSettings
from ..document import CredentialSet, FernetRing
from ..engine.journal import Journal, RotationRow
from ..engine.policy import RetryPolicy
from ..engine.states import HELD_BY_HOOK as HELD
from ..errors import RotatordError
from ..interfaces import Backend, Event
from ..logs import redact_text
from ..timeutil import format_ts
from .ledger import DONE, DROPPED, FAILED, PENDING, HookLedger, HookRunRow, NewRun
from .process import ProcessResult, run_process

__all__ = ["BASE_ENV", "EVENT_TYPES", "HELD", "LIFECYCLE_PHASES", "SCHEMA", "HookRunner", "HookSpec"]

log = logging.getLogger("rotatord.hooks")

SCHEMA = "rotatord.hook/v1"
BASE_ENV: Mapping[str, str] = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
EVENT_TYPES: Mapping[str, str] = {
    "staged": "key.staged",
    "promoted": "key.promoted",
    "reencrypted": "key.reencrypted",
    "retired": "key.retired",
    "issued": "token.issued",
    "revoked": "token.revoked",
    "failed": "rotation.failed",
    "drift": "secret.drift_detected",
}
LIFECYCLE_PHASES = frozenset({"staged", "promoted", "reencrypted", "retired", "issued", "revoked"})
_ALSO = {"issued": "promoted", "revoked": "retired"}
#: A held rotation never looks again sooner than this, even when its hook could not be run.
_MIN_HOLD = timedelta(seconds=1)


class HookSpec:
    """One configured hook: ``key`` identifies its runs in the journal across restarts."""

    def __init__(self, scope: str, label: str, settings: HookSettings) -> None:
        digest = hashlib.sha256(json.dumps([scope, list(settings.command)]).encode()).hexdigest()[:16]
        self.key = f"{scope}:{digest}"
        self.label = settings.name or label
        self.settings = settings

    def matches(self, phase: str) -> bool:
        phases = self.settings.phases
        return phase in phases or _ALSO.get(phase) in phases


class HookRunner:
    """Queues, runs and retries the hooks of every secret.  Thread-safe: per-secret locks."""

    def __init__(
        self,
        hooks: Sequence[HookSettings],
        secrets: Sequence[SecretSettings],
        backends: Mapping[str, Backend],
        journal: Journal,
        audit: AuditLog,
        retry: RetryPolicy,
        *,
        locks: dict[str, threading.RLock] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        shared = [HookSpec("global", f"hooks[{i}]", h) for i, h in enumerate(hooks)]
        self._specs: dict[str, list[HookSpec]] = {
            s.name: shared + [HookSpec("secret", f"{s.name}.hooks[{i}]", h) for i, h in enumerate(s.hooks)]
            for s in secrets
        }
        self.secrets = {s.name: s for s in secrets}
        self.backends = backends
        self.ledger = HookLedger(journal)
        self.journal = journal
        self.audit = audit
        self.retry = retry
        self.should_stop = should_stop
        self._locks = locks if locks is not None else {}
        for name in self.secrets:
            self._locks.setdefault(name, threading.RLock())

    def configured(self, secret: str) -> bool:
        return bool(self._specs.get(secret))

    # -- queueing --------------------------------------------------------------------------

    def recorder(
        self, secret: SecretSettings, rot: RotationRow, phase: str, updates: Mapping[str, Any], event: Event
    ) -> Callable[[Connection], None] | None:
        """What ``Journal.complete_step`` runs in the phase's own transaction to record the phase's
        hook runs; None when no hook listens to ``phase``."""
        runs = self._new_runs(secret, phase, "", _payload(secret, phase, event, rot, updates))
        if not runs:
            return None
        now = event.occurred_at
        return lambda conn: HookLedger.queue_in(conn, runs, now)

    def fire(
        self, secret: str, phase: str, event: Event, *, now: datetime, occasion: str = "",
        rotation: RotationRow | None = None,
    ) -> None:  # fmt: skip
        """Record the hooks of ``phase`` for ``event`` and run the due ones now, on this thread.

        For phases that are not a step's own transaction: ``failed`` (the engine) and ``drift``
        (drift detection: ``fire(name, "drift", event, now=now, occasion=<what was observed>)``).
        ``occasion`` tells distinct happenings of one phase apart: the same (rotation, phase,
        occasion) is run once per hook however often it is fired.  Blocks while hooks run (up to
        their timeouts): never call it on the asyncio loop.  Raises StateError.
        """
        settings = self.secrets.get(secret)
        if settings is None:
            return
        runs = self._new_runs(settings, phase, occasion[:128], _payload(settings, phase, event, rotation, {}))
        if runs:
            self.ledger.queue(runs, now)
            self.run_due(settings, now)

    def _new_runs(self, secret: SecretSettings, phase: str, occasion: str, payload: dict[str, Any]) -> list[NewRun]:
        rotation_id = int(payload.get("rotation_id") or 0)
        return [
            NewRun(secret.name, rotation_id, phase, occasion, spec.key, spec.label, payload)
            for spec in self._specs.get(secret.name, ())
            if spec.matches(phase)
        ]

    # -- running ---------------------------------------------------------------------------

    def run_due(self, secret: SecretSettings, now: datetime) -> None:
        """Run every pending run of ``secret`` that is due, oldest first."""
        with self._locks.setdefault(secret.name, threading.RLock()):
            for row in self.ledger.due(secret.name, now):
                if self.should_stop():
                    return
                self._run(secret, row, now)

    def gate(self, secret: SecretSettings, rot: RotationRow, now: datetime) -> datetime | None:
        """Run what is due; if a ``block`` hook of this rotation's phases has not succeeded yet,
        record why the rotation is held and return when to look again, else None."""
        if not self.configured(secret.name):
            return None
        self.run_due(secret, now)
        specs = {spec.key: spec for spec in self._specs.get(secret.name, ())}
        held = [
            r
            for r in self.ledger.pending(secret.name, rot.id)
            if r.phase in LIFECYCLE_PHASES and (s := specs.get(r.hook)) is not None and s.settings.on_failure == "block"
        ]
        if not held:
            if rot.error and rot.error.startswith(HELD):
                self.journal.update(rot.id, now, error=None)
            return None
        run = held[0]
        message = f"{HELD} {run.label} after {run.phase}: {run.last_error or 'not run yet'}"
        if rot.error != message:
            self.journal.update(rot.id, now, error=message)
        return max(run.next_attempt_at, now + _MIN_HOLD)

    def next_at(self, secret: str) -> datetime | None:
        return self.ledger.next_at(secret)

    def _run(self, secret: SecretSettings, row: HookRunRow, now: datetime) -> None:
        spec = next((s for s in self._specs.get(secret.name, ()) if s.key == row.hook), None)
        if spec is None:
            log.warning("hook run dropped: the hook is no longer configured", extra=_where(row))
            self.ledger.record(
                row.id, now, state=DROPPED, attempts=row.attempts, next_attempt_at=now, error="no longer configured"
            )
            return
        attempt = row.attempts + 1
        hook = spec.settings
        payload = {**row.event, "hook": {"name": spec.label, "attempt": attempt, "on_failure": hook.on_failure}}
        result = self._execute(secret, spec, payload, attempt)
        if result.outcome == "stopped":
            log.info("hook interrupted by shutdown; it runs again at the next start", extra=_where(row))
            return
        self._log(row, spec, attempt, result)
        if result.ok:
            self.ledger.record(row.id, now, state=DONE, attempts=attempt, next_attempt_at=now, error=None)
            self._audit("hook.succeeded", row, spec, attempt=attempt, seconds=round(result.seconds, 3))
            return
        reason = result.describe()
        if hook.on_failure == "ignore":
            state, retry_at = FAILED, now
        else:
            state, retry_at = PENDING, now + self.retry.delay(attempt)
        self.ledger.record(row.id, now, state=state, attempts=attempt, next_attempt_at=retry_at, error=reason)
        if attempt == 1 or state == FAILED:  # one record per failure episode, not one per retry
            retry = format_ts(retry_at) if state == PENDING else None
            self._audit("hook.failed", row, spec, attempt=attempt, error=reason, retry_at=retry)

    def _execute(self, secret: SecretSettings, spec: HookSpec, payload: dict[str, Any], attempt: int) -> ProcessResult:
        hook = spec.settings
        # Belt and braces: the event holds no material by construction; redact it anyway.
        text = redact_text(json.dumps(payload, sort_keys=True))
        env = {**BASE_ENV, **hook.env, **{k: redact_text(v) for k, v in _variables(payload).items()}}
        stdin = text
        if hook.with_secret:
            try:
                material = self._material(secret, payload)
            except RotatordError as exc:
                return ProcessResult("error", None, "", "", False, 0.0, f"cannot read the secret for the hook: {exc}")
            # The only place material is revealed: straight into the pipe to the hook's stdin.
            stdin = json.dumps({**json.loads(text), "material": material}, sort_keys=True)
        return run_process(hook.command, env, stdin.encode(), hook.timeout.total_seconds(), self.should_stop)

    def _material(self, secret: SecretSettings, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        current = self.backends[secret.backend].read(secret.path)
        doc = current.document if current else None
        if isinstance(doc, FernetRing):
            kid = payload.get("key_id")
            key = (doc.key(kid) if isinstance(kid, str) else None) or doc.primary_key
            return {"key_id": key.id, "key": key.material.reveal(), "primary": doc.primary}
        if isinstance(doc, CredentialSet):
            prev = doc.previous
            return {
                "current": {"id": doc.current.id, "value": doc.current.value.reveal()},
                "previous": {"id": prev.id, "value": prev.value.reveal()} if prev else None,
            }
        return None

    def _log(self, row: HookRunRow, spec: HookSpec, attempt: int, result: ProcessResult) -> None:
        # Output goes through the redacting formatter: a hook may echo the material it was given.
        # A hook that was given material may also print it transformed (hex, a slice, decoded),
        # which no redaction recognises: only the sizes of its output are logged.
        fields: dict[str, object] = {**_where(row), "attempt": attempt, "outcome": result.outcome,
                                     "exit_code": result.returncode, "seconds": round(result.seconds, 3)}  # fmt: skip
        if spec.settings.with_secret:
            fields["stdout_bytes"], fields["stderr_bytes"] = len(result.stdout), len(result.stderr)
        else:
            if result.stdout:
                fields["stdout"] = result.stdout
            if result.stderr:
                fields["stderr"] = result.stderr
        if result.truncated:
            fields["output_truncated"] = True
        if result.ok:
            log.info("hook succeeded", extra=fields)
        else:
            level = logging.INFO if spec.settings.on_failure == "ignore" else logging.WARNING
            log.log(level, f"hook {result.describe()} (on_failure={spec.settings.on_failure})", extra=fields)

    def _audit(self, name: str, row: HookRunRow, spec: HookSpec, **fields: object) -> None:
        version = row.event.get("version")
        self.audit.append(
            name, actor="hook", secret=row.secret, rotation_id=row.rotation_id or None, version=version,
            phase=row.phase, hook=spec.label, on_failure=spec.settings.on_failure, **fields,
        )  # fmt: skip


def _where(row: HookRunRow) -> dict[str, object]:
    return {"secret": row.secret, "hook": row.label, "phase": row.phase, "rotation_id": row.rotation_id}


def _payload(
    secret: SecretSettings, phase: str, event: Event, rot: RotationRow | None, updates: Mapping[str, Any]
) -> dict[str, Any]:
    """The event a hook receives (without material): facts from the journal, never values."""

    def fact(name: str) -> Any:
        return updates.get(name, getattr(rot, name) if rot is not None else None)

    return {
        "schema": SCHEMA,
        "type": EVENT_TYPES.get(phase, event.type),
        "phase": phase,
        "secret": secret.name,
        "kind": secret.kind,
        "rotation_id": event.rotation_id or None,
        "version": event.version,
        "backend": event.backend,
        "path": event.path,
        "backend_version": event.backend_version,
        "key_id": fact("new_key"),
        "previous_key_id": fact("previous_key"),
        "emergency": bool(rot.emergency) if rot is not None else False,
        "trigger": rot.trigger if rot is not None else None,
        "occurred_at": format_ts(event.occurred_at),
        "detail": {str(k): str(v) for k, v in event.detail.items()},
    }


def _variables(payload: Mapping[str, Any]) -> dict[str, str]:
    names = {
        "EVENT": "type", "PHASE": "phase", "SECRET": "secret", "KIND": "kind", "ROTATION_ID": "rotation_id",
        "VERSION": "version", "BACKEND": "backend", "SECRET_PATH": "path", "BACKEND_VERSION": "backend_version",
        "KEY_ID": "key_id", "PREVIOUS_KEY_ID": "previous_key_id", "TRIGGER": "trigger", "OCCURRED_AT": "occurred_at",
    }  # fmt: skip
    out = {f"ROTATORD_{var}": str(payload[key]) for var, key in names.items() if payload.get(key) is not None}
    out["ROTATORD_EMERGENCY"] = "1" if payload.get("emergency") else "0"
    hook = payload.get("hook") or {}
    out["ROTATORD_HOOK"] = str(hook.get("name", ""))
    out["ROTATORD_ATTEMPT"] = str(hook.get("attempt", 1))
    return out
