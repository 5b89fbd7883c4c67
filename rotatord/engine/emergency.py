"""The engine's side of an emergency rotation: which key is compromised, the exposure census,
and the blast-radius report recorded in the audit log when the emergency is declared, after
each step and at the end (``emergency.blast_radius`` with ``stage`` opened / phase / closed).

The report itself is computed by :class:`~rotatord.engine.blast.BlastTracker` from the state
database; this module decides when to take the census and when to record.  The engine calls
:meth:`EmergencyReports.opened` under the secret's lock, before the first step, and
:meth:`EmergencyReports.after_step` after every completed step (and rollback) of an emergency.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..document import CredentialSet, FernetRing
from ..errors import RotatordError
from .blast import BlastTracker
from .journal import RotationRow
from .states import FIRST_PHASE

if TYPE_CHECKING:
    from .runner import Engine

__all__ = ["EVENT", "EmergencyReports"]

log = logging.getLogger("rotatord.engine")
EVENT = "emergency.blast_radius"


class EmergencyReports:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tracker = BlastTracker(engine.journal, engine.reencryptor.ledger)

    def report(self, rot: RotationRow) -> dict[str, Any]:
        """The live blast-radius report of the emergency rotation ``rot`` (state database only)."""
        secret = self.engine.setting(rot.secret)
        labels = [s.label for s in self.engine.stores.get(rot.secret, ())]
        return self.tracker.report(rot, secret.consumers, labels)

    def opened(self, rot: RotationRow, actor: str, now: datetime) -> None:
        """Record which key is compromised (the primary the emergency replaces) and report it.

        Raises AuditError when the audit log cannot be written (before any step ran).
        """
        compromised = rot.previous_key
        if compromised is None and rot.phase == FIRST_PHASE:
            compromised = self._current_primary(rot)
        self.tracker.open(rot, compromised, now)
        if rot.phase in ("promoted", "reencrypted"):  # declared late: the new key is primary already
            self._exposure(rot)
        self._record("opened", rot, actor)

    def after_step(self, rot: RotationRow, step: str, now: datetime) -> None:
        """After a step of an emergency: the exposure census after the promotion, then the report.

        Never raises a RotatordError: the step is done, and a missing report must not look like
        its failure (it is logged instead).
        """
        try:
            if self.tracker.get(rot.id) is None:  # declared by a process that died before recording it
                self.tracker.open(rot, rot.previous_key, now)
            if step == "promote":
                self._exposure(rot)
            if not rot.active:
                self.tracker.close(rot.id, self.engine.reencryptor.clock())
            self._record("phase" if rot.active else "closed", rot, rot.trigger)
        except RotatordError as exc:
            log.error("blast-radius report not recorded", extra={"secret": rot.secret, "error": str(exc)})

    def _current_primary(self, rot: RotationRow) -> str | None:
        secret = self.engine.setting(rot.secret)
        try:
            current = self.engine.backends[secret.backend].read(secret.path)
        except RotatordError as exc:  # the steps retry the backend; the report says "unknown"
            log.warning("compromised key unknown", extra={"secret": rot.secret, "error": str(exc)})
            return None
        doc = current.document if current else None
        if isinstance(doc, FernetRing):
            return doc.primary
        if isinstance(doc, CredentialSet):
            return doc.current.id
        return None

    def _exposure(self, rot: RotationRow) -> None:
        """Count what is still under the compromised key, once, before re-encryption moves it."""
        engine = self.engine
        if not engine.stores.get(rot.secret):
            return
        try:
            with engine.reencryptor.priority.urgent(rot.secret):  # other secrets' passes wait for it too
                censuses = engine.census(rot.secret)
        except RotatordError as exc:  # a store that is down: re-encryption retries it; report without it
            log.warning("exposure census failed", extra={"secret": rot.secret, "error": str(exc)})
            return
        self.tracker.record_exposure(rot.id, censuses, engine.reencryptor.clock())

    def _record(self, stage: str, rot: RotationRow, actor: str) -> None:
        report = self.report(self.engine.journal.get(rot.id))
        self.engine.audit.append(
            EVENT, actor=actor, secret=rot.secret, rotation_id=rot.id, version=rot.version, stage=stage, report=report
        )
