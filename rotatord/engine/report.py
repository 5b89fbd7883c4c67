"""What ``status`` and ``history`` show: facts from the journal and the policy, never material.

Reads only the state database, so it answers quickly whether or not backends are reachable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..timeutil import format_ts
from .journal import RotationRow
from .revoked_use import RevokedUseStore
from .runner import Engine
from .states import HELD_BY_HOOK, next_step

__all__ = ["census_report", "history_report", "progress_report", "secret_status"]


def secret_status(engine: Engine, name: str, now: datetime) -> dict[str, Any]:
    secret = engine.setting(name)
    latest = engine.journal.latest(name)
    due = engine.next_due(name, now)
    out: dict[str, Any] = {
        "name": name,
        "kind": secret.kind,
        "backend": secret.backend,
        "path": secret.path,
        "version": latest.version if latest else 0,
        "phase": latest.phase if latest else "none",
        "state": "never rotated",
        "rotated_at": format_ts(latest.started_at) if latest else None,
        "age_seconds": int((now - latest.started_at).total_seconds()) if latest else None,
        "next_rotation_at": format_ts(due),
        "next_step": None,
        "next_step_at": None,
        "backend_version": latest.backend_version if latest else None,
        "error": None,
        "attempts": 0,
        "emergency": bool(latest.emergency) if latest else False,
        "drift": None,
        # Bots' reports of revoked credentials still presented (rotatord.daemon.reports).
        "revoked_use": RevokedUseStore(engine.journal).summary(name),
    }
    record = engine.drift.ledger.open_drift(name)
    if record is not None:
        out["drift"] = {
            "id": record.id,
            "reason": record.reason,
            "message": record.message,
            "detected_at": format_ts(record.detected_at),
            "observed_version": record.observed_version,
            "baseline_version": record.baseline_version,
        }
    if latest is None:
        return out
    if latest.emergency:  # live while it runs, final afterwards
        out["blast_radius"] = engine.blast_report(latest)
    out["state"] = latest.status
    if latest.active:
        step = next_step(latest.kind, latest.phase)
        when = latest.next_attempt_at or _ready_at(latest, step)
        held = bool(latest.error and latest.error.startswith(HELD_BY_HOOK))
        out["state"] = "held" if held else "failing" if latest.error else "in progress"
        out["next_step"] = step
        out["next_step_at"] = format_ts(when) if when else format_ts(now)
        out["error"] = latest.error
        out["attempts"] = latest.attempts
        out["progress"] = progress_report(engine, latest.id)
    if record is not None:
        out["state"] = "paused (drift)"
    return out


def census_report(engine: Engine, name: str, now: datetime) -> dict[str, Any]:
    """A fresh census of every store of ``name``, plus what is quarantined."""
    censuses = engine.census(name)
    ledger = engine.reencryptor.ledger
    return {
        "name": name,
        "taken_at": format_ts(now),
        "stores": [
            {"store": c.store, "by_key": dict(sorted(c.by_key.items())), "unreadable": c.unreadable, "total": c.total}
            for c in censuses
        ],
        "quarantined": [{**q, "found_at": format_ts(q["found_at"])} for q in ledger.quarantined(name)],
    }


def progress_report(engine: Engine, rotation_id: int) -> list[dict[str, Any]]:
    return [
        {
            "store": row.store,
            "step": row.step,
            "done": row.done,
            "estimate": row.estimate,
            "scanned": row.totals.scanned,
            "rewritten": row.totals.rewritten,
            "skipped": row.totals.skipped,
            "conflicts": row.totals.conflicts,
            "quarantined": row.totals.quarantined,
            "updated_at": format_ts(row.updated_at),
        }
        for row in engine.reencryptor.ledger.for_rotation(rotation_id)
    ]


def _ready_at(rot: RotationRow, step: str | None) -> datetime | None:
    if step == "promote":
        return rot.promote_after
    if step in ("retire", "revoke"):
        return rot.retire_after
    return None


def history_report(engine: Engine, name: str, limit: int = 50) -> list[dict[str, Any]]:
    engine.setting(name)
    rows = []
    for rot in engine.journal.history(name, limit):
        steps = engine.journal.steps(rot.id)
        rollback = next((s for s in steps if s.name == "rollback" and s.state == "done"), None)
        rows.append(
            {
                "rotation_id": rot.id,
                "version": rot.version,
                "phase": rot.phase,
                "status": rot.status,
                "trigger": rot.trigger,
                "emergency": rot.emergency,
                "reason": rot.reason,
                "started_at": format_ts(rot.started_at),
                "finished_at": format_ts(rot.finished_at),
                "new_key": rot.new_key,
                "previous_key": rot.previous_key,
                "backend_version": rot.backend_version,
                "error": rot.error,
                "rollback_reason": (rollback.result or {}).get("reason") if rollback else None,
                "steps": [
                    {"name": s.name, "state": s.state, "at": format_ts(s.finished_at or s.started_at)} for s in steps
                ],
            }
        )
        if engine.hooks is not None and engine.hooks.configured(name):
            rows[-1]["hooks"] = [
                {"hook": h.label, "phase": h.phase, "state": h.state, "attempts": h.attempts, "error": h.last_error}
                for h in engine.hooks.ledger.runs(rot.id)
            ]
    return rows
