"""The blast-radius report of an emergency rotation: what the compromised key still exposes.

Per data store, how many items are still under the compromised key (exact after each census,
estimated from the re-encryption checkpoints in between); which consumers have not yet
acknowledged the new key (a 2xx on ``key.promoted``, or ``token.issued`` for tokens); and when
the compromised key was retired or the old token revoked.  Everything comes from the state
database (journal, ledger, outbox), never from key material, so ``status`` answers it quickly
while the rotation runs.

One row per emergency rotation (table ``emergency_reports``) keeps what the report cannot
recompute later: which key was compromised, when the emergency was declared, and the exposure
census taken right after the new key became primary (what the leak exposed at that moment).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Integer, String, Table, Text, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..interfaces import Census
from ..timeutil import format_ts
from .journal import ACTIVE, Journal, RotationRow, UTCDateTime, metadata, outbox
from .ledger import CheckpointRow, StoreLedger
from .states import next_step

__all__ = ["ACK_EVENT", "BlastTracker", "EmergencyRow"]

emergencies = Table(
    "emergency_reports",
    metadata,
    Column("rotation_id", Integer, primary_key=True),
    Column("secret", String(64), nullable=False),
    Column("compromised_key", String(32)),
    Column("opened_at", UTCDateTime, nullable=False),
    Column("exposure", Text),  # JSON {store label: items under the compromised key}
    Column("exposure_taken_at", UTCDateTime),
    # The wall-clock end: the engine passes one ``now`` to every step of a call, so a step's
    # journal time is when the request came, not when a long re-encryption let it finish.
    Column("closed_at", UTCDateTime),
)

#: The event whose acknowledgement means "this consumer now uses the new key".
ACK_EVENT = {"fernet": "key.promoted", "api_token": "token.issued", "webhook_secret": "token.issued"}


@dataclass(frozen=True)
class EmergencyRow:
    rotation_id: int
    secret: str
    compromised_key: str | None
    opened_at: datetime
    exposure: dict[str, int] | None
    exposure_taken_at: datetime | None
    closed_at: datetime | None


class BlastTracker:
    """Records emergencies and computes their reports.  Thread-safe; each method one transaction."""

    def __init__(self, journal: Journal, ledger: StoreLedger) -> None:
        self.journal = journal
        self.ledger = ledger
        with journal.transaction() as conn:
            emergencies.create(conn, checkfirst=True)

    def open(self, rot: RotationRow, compromised: str | None, now: datetime) -> EmergencyRow:
        """Record the emergency of ``rot`` once; a second call returns the first record."""
        try:
            with self.journal.transaction() as conn:
                conn.execute(
                    insert(emergencies).values(
                        rotation_id=rot.id, secret=rot.secret, compromised_key=compromised, opened_at=now
                    )
                )
        except IntegrityError:
            pass  # declared before (a second --emergency, or a resumed step): the first record stands
        row = self.get(rot.id)
        assert row is not None
        return row

    def get(self, rotation_id: int) -> EmergencyRow | None:
        with self.journal.transaction() as conn:
            r = conn.execute(select(emergencies).where(emergencies.c.rotation_id == rotation_id)).first()
        if r is None:
            return None
        m = r._mapping
        return EmergencyRow(
            rotation_id=m["rotation_id"],
            secret=m["secret"],
            compromised_key=m["compromised_key"],
            opened_at=m["opened_at"],
            exposure=json.loads(m["exposure"]) if m["exposure"] else None,
            exposure_taken_at=m["exposure_taken_at"],
            closed_at=m["closed_at"],
        )

    def record_exposure(self, rotation_id: int, censuses: Sequence[Census], now: datetime) -> None:
        """Keep the first census taken while the compromised key was still in the ring."""
        row = self.get(rotation_id)
        if row is None or row.exposure is not None or row.compromised_key is None:
            return
        exposure = {c.store: c.count(row.compromised_key) for c in censuses}
        with self.journal.transaction() as conn:
            conn.execute(
                update(emergencies)
                .where(emergencies.c.rotation_id == rotation_id, emergencies.c.exposure.is_(None))
                .values(exposure=json.dumps(exposure, sort_keys=True), exposure_taken_at=now)
            )

    def close(self, rotation_id: int, at: datetime) -> None:
        """Record when the emergency really ended (first call wins)."""
        with self.journal.transaction() as conn:
            conn.execute(
                update(emergencies)
                .where(emergencies.c.rotation_id == rotation_id, emergencies.c.closed_at.is_(None))
                .values(closed_at=at)
            )

    # -- the report --------------------------------------------------------------------------

    def report(self, rot: RotationRow, consumers: Sequence[str], stores: Sequence[str]) -> dict[str, Any]:
        """The blast-radius report of ``rot`` now (``stores``: the configured store labels)."""
        row = self.get(rot.id)
        compromised = row.compromised_key if row else rot.previous_key
        steps = {s.name: s for s in self.journal.steps(rot.id)}

        def done_at(name: str) -> str | None:
            step = steps.get(name)
            if step is None or step.state != "done":
                return None
            last = name in ("retire", "revoke")
            return format_ts(row.closed_at if last and row is not None and row.closed_at else step.finished_at)

        checkpoints = self.ledger.for_rotation(rot.id)  # read once: status and the live view call this often
        store_rows = self._stores(rot, row, compromised, stores, checkpoints) if rot.kind == "fernet" else []
        known = [s["remaining"] for s in store_rows if s["remaining"] is not None]
        consumer_rows = self._consumers(rot, consumers)
        state = "rolled back" if rot.status == "rolled_back" else rot.status if rot.status != ACTIVE else None
        if state is None:
            state = "failing" if rot.error else "in progress"
        return {
            "secret": rot.secret,
            "kind": rot.kind,
            "rotation_id": rot.id,
            "version": rot.version,
            "reason": rot.reason,
            "trigger": rot.trigger,
            "compromised_key": compromised,
            "new_key": rot.new_key,
            "phase": rot.phase,
            "next_step": next_step(rot.kind, rot.phase) if rot.status == ACTIVE else None,
            "state": state,
            "error": rot.error,
            "opened_at": format_ts(row.opened_at if row else rot.started_at),
            "updated_at": format_ts(max([rot.updated_at, *(c.updated_at for c in checkpoints)])),
            "finished_at": format_ts((row.closed_at if row else None) or rot.finished_at),
            "promoted_at": done_at("promote") or done_at("issue"),
            "retired_at": done_at("retire"),
            "revoked_at": done_at("revoke"),
            "exposure_taken_at": format_ts(row.exposure_taken_at) if row else None,
            "stores": store_rows,
            "remaining": sum(known) if known else (0 if rot.kind == "fernet" and not store_rows else None),
            "consumers": consumer_rows,
            "unacknowledged": [c["consumer"] for c in consumer_rows if not c["acknowledged"]],
        }

    def _stores(
        self,
        rot: RotationRow,
        row: EmergencyRow | None,
        compromised: str | None,
        labels: Sequence[str],
        checkpoints: Sequence[CheckpointRow],
    ) -> list[dict[str, Any]]:
        exposure = (row.exposure if row else None) or {}
        since = (row.exposure_taken_at or row.opened_at) if row else rot.started_at
        censuses = {c.store: c for c in self.ledger.latest_census(rot.secret)}
        quarantined: dict[str, int] = {}
        for q in self.ledger.quarantined(rot.secret):
            quarantined[q["store"]] = quarantined.get(q["store"], 0) + 1
        out = []
        for label in dict.fromkeys([*labels, *exposure]):
            mine = [c for c in checkpoints if c.store == label]
            census = censuses.get(label)
            base: int | None
            if compromised is None:  # the emergency created the secret: nothing was ever under an old key
                base, counted_at = 0, None
            elif census is not None and census.taken_at is not None and census.taken_at >= since:
                base, counted_at = census.count(compromised), census.taken_at
            elif label in exposure and row is not None and row.exposure_taken_at is not None:
                base, counted_at = exposure[label], row.exposure_taken_at
            else:
                base, counted_at = None, None
            # Between two censuses, what the passes since the last one rewrote is already gone.
            moving = [c for c in mine if counted_at is not None and c.updated_at > counted_at]
            remaining = None if base is None else max(0, base - sum(c.totals.rewritten for c in moving))
            out.append(
                {
                    "store": label,
                    "exposed": exposure.get(label),
                    "remaining": remaining,
                    "estimated": bool(moving),
                    "counted_at": format_ts(counted_at),
                    "scanned": sum(c.totals.scanned for c in mine),
                    "rewritten": sum(c.totals.rewritten for c in mine),
                    "conflicts": sum(c.totals.conflicts for c in mine),
                    "unreadable": census.unreadable if census is not None else None,
                    "quarantined": quarantined.get(label, 0),
                }
            )
        return out

    def _consumers(self, rot: RotationRow, consumers: Sequence[str]) -> list[dict[str, Any]]:
        event = ACK_EVENT[rot.kind]
        with self.journal.transaction() as conn:
            rows = conn.execute(
                select(outbox.c.consumer, outbox.c.status, outbox.c.attempts, outbox.c.last_error)
                .where(outbox.c.rotation_id == rot.id, outbox.c.event_type == event)
                .order_by(outbox.c.id)
            ).all()
        latest = {r.consumer: r for r in rows}
        out = []
        for name in dict.fromkeys([*consumers, *latest]):
            r = latest.get(name)
            out.append(
                {
                    "consumer": name,
                    "event": event,
                    "acknowledged": r is not None and r.status == "delivered",
                    # not told yet: the event is queued only when the new key becomes the one to use
                    "delivery": r.status if r is not None else "not told yet",
                    "attempts": int(r.attempts) if r is not None else 0,
                    "last_error": r.last_error if r is not None else None,
                }
            )
        return out
