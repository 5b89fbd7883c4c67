"""Decrypt before encrypt, with acknowledgements: when a staged key may become primary.

A staged rotation promotes as soon as every *required* consumer acknowledged ``key.staged``
(a 2xx means "I re-read the secret"), or when the propagation window ends.  If the window ends
first, the configured policy decides: promote anyway (and alert), or hold at staged (and alert)
until the acknowledgements arrive or an operator intervenes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Literal

from ..config import ConsumerSettings, SecretSettings
from ..interfaces import Notifier
from .journal import Journal, RotationRow

__all__ = ["ACK_POLL", "AckGate"]

log = logging.getLogger("rotatord.engine")
#: How often a rotation waiting for acknowledgements looks again.
ACK_POLL = timedelta(seconds=2)
HOLD_POLL = timedelta(seconds=5)


class AckGate:
    def __init__(
        self,
        notifier: Notifier,
        consumers: Mapping[str, ConsumerSettings],
        journal: Journal,
        policy: Literal["promote", "hold"],
    ) -> None:
        self.notifier = notifier
        self.consumers = consumers
        self.journal = journal
        self.policy = policy

    def required(self, secret: SecretSettings) -> list[str]:
        return [
            name
            for name in secret.consumers
            if (c := self.consumers.get(name)) is not None and c.required and "key.staged" in c.events
        ]

    def promote_at(self, secret: SecretSettings, rot: RotationRow, now: datetime) -> datetime | None:
        """When the promote step may run: ``None`` or a past time means now."""
        window_end = rot.promote_after
        required = self.required(secret)
        if not required or rot.emergency or rot.previous_key is None:
            return window_end
        if self.notifier.acknowledged(rot.id, "key.staged"):
            return None
        if window_end is None or now < window_end:
            return min(window_end, now + ACK_POLL) if window_end else now + ACK_POLL
        missing = ", ".join(required)
        if self.policy == "promote":
            log.warning(
                "propagation window ended without every required acknowledgement; promoting anyway",
                extra={"secret": rot.secret, "version": rot.version, "required": missing},
            )
            return None
        message = f"holding at staged: no acknowledgement of key.staged from required consumer(s) {missing}"
        if rot.error != message:
            log.error(message, extra={"secret": rot.secret, "version": rot.version})
            self.journal.update(rot.id, now, error=message)
        return now + HOLD_POLL
