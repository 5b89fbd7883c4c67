"""Emergency re-encryption runs first: other secrets' passes pause between batches meanwhile.

An emergency rotation's re-encryption (the compromised key's data moving to the new key) holds
the gate for its secret while it runs.  Every other pass in the process calls
:meth:`PriorityGate.wait_turn` after each committed batch and waits there, its checkpoint
durable, until no other secret holds the gate (or the daemon stops).  So the emergency does not
share the stores, the CPU or the worker processes with routine work, and the routine work
resumes from where it paused.  Two emergencies at once both run: neither waits for the other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["PRIORITY", "PriorityGate"]

log = logging.getLogger("rotatord.reencrypt")


class PriorityGate:
    """Thread-safe; shared by every engine of a process (a reload builds a new engine)."""

    def __init__(self, poll: float = 0.5) -> None:
        self._cond = threading.Condition()
        self._holders: Counter[str] = Counter()
        self._poll = poll

    @contextmanager
    def urgent(self, secret: str) -> Iterator[None]:
        """Hold the gate for ``secret`` while the block runs (re-entrant per secret)."""
        with self._cond:
            self._holders[secret] += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders[secret] -= 1
                if self._holders[secret] <= 0:
                    del self._holders[secret]
                self._cond.notify_all()

    def holders(self) -> list[str]:
        """The secrets whose emergency re-encryption runs now."""
        with self._cond:
            return sorted(self._holders)

    def wait_turn(self, secret: str, should_stop: Callable[[], bool] = lambda: False) -> float:
        """Block while another secret holds the gate; return how long it waited (seconds).

        Returns at once when nobody else holds it, and as soon as ``should_stop()`` turns true,
        so a stopping daemon is never held here.
        """
        started = time.monotonic()
        logged = False
        with self._cond:
            while any(s != secret for s in self._holders) and not should_stop():
                if not logged:
                    others = ", ".join(s for s in sorted(self._holders) if s != secret)
                    log.info(
                        "re-encryption paused: an emergency rotation runs first",
                        extra={"secret": secret, "emergency": others},
                    )
                    logged = True
                self._cond.wait(self._poll)
        if logged:
            log.info("re-encryption resumed", extra={"secret": secret})
        return time.monotonic() - started if logged else 0.0


#: The process-wide gate (engines built on reload share it, as they share the secret locks).
PRIORITY = PriorityGate()
