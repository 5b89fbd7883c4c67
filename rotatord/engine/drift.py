"""Drift and tamper detection: does the backend still hold what rotatord last wrote?

After each write the engine records the backend's fingerprint of the new version (its
:class:`~rotatord.interfaces.Observed`) as the secret's *baseline*.  Before every step, before a
scheduled rotation starts, and on the daemon's periodic check, :meth:`DriftGuard.check` observes
the path again and compares.  A difference is *drift*: a version rotatord did not write, a
deleted or destroyed version, a changed or unreadable document, removed management marks, a
moved staging label.  Drift is persisted, logged at WARNING, audited and announced by a
``secret.drift_detected`` webhook (to the secret's consumers and ``notify.security_consumers``),
and the secret's rotations pause until an operator adopts the current document
(:meth:`DriftGuard.accept` via ``rotatord adopt``) or rotates with ``--emergency``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ..audit import AuditLog
from ..config import SecretSettings
from ..errors import ConflictError, DocumentInvalid, DriftDetected, NotManaged
from ..interfaces import Backend, Event, Observed
from .drift_store import Baseline, DriftLedger, DriftRecord
from .journal import Journal, RotationRow

__all__ = ["DriftGuard", "Finding", "compare"]

log = logging.getLogger("rotatord.drift")

EVENT = "secret.drift_detected"


@dataclass(frozen=True)
class Finding:
    """One difference: a short reason code and a sentence naming versions, never values."""

    reason: str
    message: str


def compare(base: Baseline, seen: Observed | None) -> list[Finding]:
    """Every way ``seen`` differs from ``base``, most serious first; empty when it matches."""
    if seen is None:
        return [Finding("secret_deleted", f"the secret is gone from the backend (rotatord last wrote {base.version})")]
    out: list[Finding] = []
    if seen.unreadable in ("deleted", "destroyed"):
        out.append(Finding(f"version_{seen.unreadable}", f"the current version {seen.version} was {seen.unreadable}"))
    elif seen.unreadable is not None:
        what = "is not a rotatord document" if seen.unreadable == "foreign" else "fails the document schema"
        out.append(Finding("document_invalid", f"the current version {seen.version} {what}"))
    if seen.version != base.version and seen.unreadable is None:
        if base.labels is not None and seen.version in base.labels.values():
            out.append(
                Finding("label_moved", f"the current label was moved from {base.version} back to {seen.version}")
            )
        else:
            out.append(Finding("version_changed", f"version {seen.version} is current, rotatord wrote {base.version}"))
    elif seen.digest != base.digest and seen.unreadable is None:
        out.append(Finding("document_changed", f"the document of version {seen.version} was changed in place"))
    if base.marked and not seen.marked:
        out.append(Finding("marks_removed", "rotatord's management tags/metadata were removed"))
    destroyed = sorted(seen.deleted - base.deleted - {seen.version or ""})
    if destroyed:
        out.append(Finding("version_destroyed", f"version(s) {', '.join(destroyed)} were deleted or destroyed"))
    moved = any(f.reason == "label_moved" for f in out)
    if base.labels is not None and seen.labels is not None and dict(seen.labels) != base.labels and not moved:
        out.append(Finding("labels_changed", "the staging labels were changed by hand"))
    return out


@dataclass(frozen=True)
class DriftSnapshot:
    """Open drift (by secret) and baselines, read in two queries at the start of a sweep."""

    open: frozenset[str]
    baselines: dict[str, Baseline]


class DriftGuard:
    """Detects, records and resolves drift for the engine (which holds the per-secret lock)."""

    def __init__(self, journal: Journal, audit: AuditLog, security_consumers: Sequence[str] = ()) -> None:
        self.journal = journal
        self.ledger = DriftLedger(journal)
        self.audit = audit
        self.security_consumers = tuple(security_consumers)
        self._told_paused: set[int] = set()
        #: Told of each newly detected drift with its event (None when the secret has no rotation
        #: yet): the engine runs the secret's ``drift`` hooks from here.
        self.on_detected: Callable[[str, DriftRecord, Event | None, datetime], None] | None = None

    def check(self, secret: SecretSettings, backend: Backend, now: datetime) -> DriftRecord | None:
        """The open drift of ``secret`` (newly detected, or found earlier), or None.

        Raises what :meth:`Backend.observe` raises (the caller retries later).
        """
        known = self.ledger.open_drift(secret.name)
        if known is not None:
            return known
        base = self.ledger.baseline(secret.name)
        latest = self.journal.active(secret.name) or self.journal.latest(secret.name)
        if base is None and latest is None:
            return None  # rotatord never wrote this secret: there is nothing to compare with
        seen = backend.observe(secret.path)
        if seen is not None and self._own_pending(secret.name, seen):
            self.ledger.set_baseline(secret.name, seen, "write", now)  # our write, landed before a crash
            return None
        if base is None:
            # A state database from before drift detection, or a first write still to come:
            # start from what is there if it is what the journal last recorded.
            assert latest is not None
            if seen is not None and seen.unreadable is None and latest.backend_version in (None, seen.version):
                self.ledger.set_baseline(secret.name, seen, "write", now)
                return None
            if seen is None and latest.backend_version is None:
                return None  # the first write is still to come
            base = Baseline(secret.name, latest.backend_version, None, False, None, frozenset(), "write", now)
            findings = [f for f in compare(base, seen) if f.reason != "document_changed"]
        else:
            findings = compare(base, seen)
        if not findings:
            return None
        return self._report(secret, base, seen, findings, latest, now)

    def snapshot(self) -> DriftSnapshot:
        """What the periodic sweep compares against first: every baseline and open drift."""
        return DriftSnapshot(frozenset(r.secret for r in self.ledger.all_open()), self.ledger.all_baselines())

    def unchanged(self, secret: SecretSettings, backend: Backend, snap: DriftSnapshot) -> bool:
        """True when the backend holds exactly the baseline of ``snap`` and no drift was open:
        the sweep's fast path (no query per secret).  False means "look properly" with
        :meth:`check`: a baseline that moved since the snapshot is then read afresh, so a write
        rotatord made meanwhile is never mistaken for drift."""
        base = snap.baselines.get(secret.name)
        if base is None or secret.name in snap.open:
            return False
        return not compare(base, backend.observe(secret.path))

    def paused(self, record: DriftRecord) -> None:
        """Log once per drift record that a scheduled rotation was skipped because of it."""
        if record.id not in self._told_paused:
            self._told_paused.add(record.id)
            log.warning(
                "rotation paused by drift; run 'rotatord adopt' or 'rotatord rotate --emergency'",
                extra={"secret": record.secret, "reason": record.reason, "drift_id": record.id},
            )

    def confirm(self, secret: SecretSettings, backend: Backend, current_version: str | None, now: datetime) -> None:
        """Raise DriftDetected unless ``current_version`` (just read, about to be written over)
        is the baseline or rotatord's own pending write: never write over someone else's change."""
        base = self.ledger.baseline(secret.name)
        if base is None or current_version == base.version:
            return
        record = self.check(secret, backend, now)
        if record is not None:
            raise self.error(record)

    def before_write(self, secret: SecretSettings, request_id: str, digest: str, now: datetime) -> None:
        self.ledger.set_pending(secret.name, request_id, digest, now)

    def after_write(self, secret: SecretSettings, backend: Backend, version: str, digest: str, now: datetime) -> None:
        """Make the version just written the baseline (with its marks and labels, as observed).

        The version the write returned is rotatord's even when its document is not ``digest``:
        a write resumed after a crash may publish the body its first attempt stored (AWS
        versions are immutable), so the observed digest of that version is the one to keep.
        """
        seen = backend.observe(secret.path)
        if seen is None or seen.version != version:
            # Someone moved the path on already: keep what we wrote; the next check reports it.
            seen = Observed(version, digest, marked=False)
        self.ledger.set_baseline(secret.name, seen, "write", now)

    def accept(
        self,
        secret: SecretSettings,
        backend: Backend,
        actor: str,
        resolution: str,
        now: datetime,
        note: str | None = None,
    ) -> Observed:
        """Make the backend's current document the baseline and close the open drift.

        Validates first: an unreadable document (schema, foreign data, deleted or destroyed
        version) raises DocumentInvalid / NotManaged and nothing changes.  Puts rotatord's
        management marks back (AWS tag, Vault metadata).  Raises ConflictError when the secret
        changes meanwhile.
        """
        where = f"{secret.name!r} ({secret.backend}:{secret.path})"
        seen = backend.observe(secret.path)
        if seen is None:
            raise NotManaged(f"{where}: nothing is stored there; nothing to accept")
        if seen.unreadable is not None:
            cls = NotManaged if seen.unreadable == "foreign" else DocumentInvalid
            why = seen.problem or f"the current version {seen.version} was {seen.unreadable}"
            raise cls(f"{where}: the current document cannot be accepted: {why}; nothing was changed")
        if seen.owner != (secret.name, secret.kind):
            owner = f"the {seen.owner[1]} document of {seen.owner[0]!r}" if seen.owner else "an unnamed document"
            raise NotManaged(f"{where}: holds {owner}, not the {secret.kind} of {secret.name!r}; nothing was changed")
        if not seen.marked:
            backend.mark_managed(secret.path)
            again = backend.observe(secret.path)
            if again is None or (again.version, again.digest) != (seen.version, seen.digest):
                raise ConflictError(f"{where}: changed while it was being accepted; try again")
            seen = again
        record = self.ledger.open_drift(secret.name)
        self.ledger.set_baseline(secret.name, seen, resolution, now, resolve=(actor, resolution))
        self.audit.append(
            "secret.drift_resolved" if record else "secret.adopted", actor=actor, secret=secret.name,
            resolution=resolution, backend_version=seen.version, drift_id=record.id if record else None,
            reason=record.reason if record else None, note=note,
        )  # fmt: skip
        log.warning(
            "current document accepted as the new baseline",
            extra={"secret": secret.name, "backend_version": seen.version, "resolution": resolution,
                   "drift_id": record.id if record else None},
        )  # fmt: skip
        return seen

    @staticmethod
    def error(record: DriftRecord) -> DriftDetected:
        return DriftDetected(
            f"{record.secret!r}: drift detected ({record.reason}): {record.message}; its rotations are paused: "
            f"run 'rotatord adopt {record.secret}' to accept the current document, or "
            f"'rotatord rotate {record.secret} --emergency'"
        )

    # -- internals -------------------------------------------------------------------------

    def _own_pending(self, name: str, seen: Observed) -> bool:
        pending = self.ledger.pending(name)
        return pending is not None and seen.digest is not None and seen.digest == pending[1]

    def _report(
        self,
        secret: SecretSettings,
        base: Baseline,
        seen: Observed | None,
        findings: list[Finding],
        latest: RotationRow | None,
        now: datetime,
    ) -> DriftRecord:
        reason = findings[0].reason
        message = "; ".join(f.message for f in findings)
        observed = seen.version if seen else None
        events: list[tuple[str, Event]] = []
        event: Event | None = None
        if latest is not None:
            event = Event(
                type=EVENT, secret=secret.name, rotation_id=latest.id, version=latest.version, phase=latest.phase,
                backend=secret.backend, path=secret.path, backend_version=observed, occurred_at=now,
                detail={"reason": reason, "reasons": ",".join(f.reason for f in findings), "message": message,
                        "baseline_version": base.version or ""},
            )  # fmt: skip
            consumers = dict.fromkeys((*secret.consumers, *self.security_consumers))
            events = [(consumer, event) for consumer in consumers]
        record = self.ledger.record(secret.name, reason, message, observed, base.version, now, events)
        self.audit.append(
            EVENT, actor="drift-check", secret=secret.name, drift_id=record.id, reason=reason, message=message,
            observed_version=observed, baseline_version=base.version,
        )  # fmt: skip
        log.warning(
            "drift detected: the backend holds what rotatord did not write; rotations of this secret are paused",
            extra={"secret": secret.name, "reason": reason, "detail": message, "observed_version": observed,
                   "baseline_version": base.version, "drift_id": record.id},
        )  # fmt: skip
        if self.on_detected is not None:
            self.on_detected(secret.name, record, event, now)
        return record
