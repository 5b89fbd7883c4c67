"""The lifecycle of one rotation: phases, the step that leaves each phase, and its event.

``fernet``:  pending -stage-> staged -promote-> promoted -reencrypt-> reencrypted -retire-> retired
``api_token`` / ``webhook_secret``:  pending -issue-> issued -revoke-> revoked

A rotation's ``status`` is ``active`` until its last step, then ``done``; ``rolled_back`` when an
operator put the previous primary back.  Failures never end a rotation: it stays active, records
the error and retries with backoff, and the previous primary keeps working meanwhile.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EVENT_AFTER", "FIRST_PHASE", "HELD_BY_HOOK", "PHASE_AFTER", "STEPS", "TERMINAL_PHASES", "next_step"]

FIRST_PHASE: Final = "pending"
STEPS: Final[dict[str, tuple[str, ...]]] = {
    "fernet": ("stage", "promote", "reencrypt", "retire"),
    "api_token": ("issue", "revoke"),
    "webhook_secret": ("issue", "revoke"),
}
PHASE_AFTER: Final = {
    "stage": "staged",
    "promote": "promoted",
    "reencrypt": "reencrypted",
    "retire": "retired",
    "issue": "issued",
    "revoke": "revoked",
}
EVENT_AFTER: Final = {
    "stage": "key.staged",
    "promote": "key.promoted",
    "retire": "key.retired",
    "issue": "token.issued",
    "revoke": "token.revoked",
}
TERMINAL_PHASES: Final = frozenset({"retired", "revoked"})
#: How a rotation's error starts while a ``block`` hook holds it at its phase (rotatord.hooks).
HELD_BY_HOOK: Final = "held by hook"


def next_step(kind: str, phase: str) -> str | None:
    """The step that leaves ``phase``, or None when the rotation has no step left."""
    order = STEPS[kind]
    if phase == FIRST_PHASE:
        return order[0]
    for i, step in enumerate(order):
        if PHASE_AFTER[step] == phase:
            return order[i + 1] if i + 1 < len(order) else None
    raise ValueError(f"phase {phase!r} is not a phase of kind {kind!r}")
