"""Moving a secret's stored data to its primary key, in resumable passes, and taking its census.

A pass walks every store once from its checkpoint (persisted after each batch, so a crash
resumes mid-store); after the pass a census counts items per key.  Items still under an old key
(a bot that wrote with a stale ring, or a conflict with a concurrent update) are picked up by the
next pass.  Nothing here holds key material beyond the call: the ring arrives as an argument.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ..crypto.keyring import KeyIdentifier
from ..document import FernetRing
from ..errors import ReencryptionIncomplete, StepInterrupted
from ..interfaces import Census, DataStore, ReencryptReport, RotateBatch
from .ledger import JournalProgress, StoreLedger
from .priority import PRIORITY, PriorityGate

__all__ = ["MAX_PASSES", "MoveResult", "Reencryptor"]

log = logging.getLogger("rotatord.reencrypt")
MAX_PASSES = 3


@dataclass(frozen=True)
class MoveResult:
    reports: list[ReencryptReport]
    censuses: list[Census]
    passes: int

    def stale(self, primary: str) -> int:
        """Items still under a key other than the primary (unreadable ones excluded)."""
        return sum(n for c in self.censuses for kid, n in c.by_key.items() if kid != primary)

    def summary(self) -> dict[str, int]:
        return {
            "stores": len(self.reports),
            "rewritten": sum(r.rewritten for r in self.reports),
            "skipped": sum(r.skipped for r in self.reports),
            "conflicts": sum(r.conflicts for r in self.reports),
            "quarantined": sum(r.quarantined for r in self.reports),
            "passes": self.passes,
        }


class Reencryptor:
    def __init__(
        self,
        ledger: StoreLedger,
        clock: Callable[[], datetime],
        batch_rotator: Callable[[FernetRing], RotateBatch],
        should_stop: Callable[[], bool] = lambda: False,
        priority: PriorityGate | None = None,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.batch_rotator = batch_rotator
        self.should_stop = should_stop
        self.priority = priority or PRIORITY

    def census(self, secret: str, ring: FernetRing, stores: Sequence[DataStore]) -> list[Census]:
        identify = KeyIdentifier(ring).identify
        results = [store.census(identify) for store in stores]
        self.ledger.record_census(secret, results, self.clock())
        return results

    def move(
        self,
        secret: str,
        rotation_id: int,
        step: str,
        ring: FernetRing,
        stores: Sequence[DataStore],
        *,
        urgent: bool = False,
    ) -> MoveResult:
        """Run passes (resuming an interrupted one) until the census shows nothing under an old key.

        ``urgent`` (an emergency rotation) holds the priority gate: every other secret's pass in
        this process pauses after its current batch until this move ends.

        Raises StepInterrupted when the daemon stops mid-pass and ReencryptionIncomplete when
        items remain after MAX_PASSES passes in this attempt (the engine retries with backoff).
        """
        rotate = self.batch_rotator(ring)
        try:
            if urgent:
                with self.priority.urgent(secret):
                    return self._move(secret, rotation_id, step, ring, stores, rotate, urgent=True)
            return self._move(secret, rotation_id, step, ring, stores, rotate, urgent=False)
        finally:
            close = getattr(rotate, "close", None)
            if close is not None:  # worker processes hold key material: never leave them behind
                close()

    def _move(
        self,
        secret: str,
        rotation_id: int,
        step: str,
        ring: FernetRing,
        stores: Sequence[DataStore],
        rotate: RotateBatch,
        *,
        urgent: bool,
    ) -> MoveResult:
        identify = KeyIdentifier(ring).identify
        first = self._first_open_pass(rotation_id, step, stores)
        reports: list[ReencryptReport] = []
        censuses: list[Census] = []
        for n in range(first, first + MAX_PASSES):
            reports = [
                self._pass(secret, rotation_id, f"{step}/{n}", store, rotate, identify, ring.primary, urgent)
                for store in stores
            ]
            censuses = self.census(secret, ring, stores)
            result = MoveResult(reports, censuses, n + 1)
            if result.stale(ring.primary) == 0:
                return result
            log.info(
                "items remain under old keys; another pass",
                extra={"secret": secret, "pass": n + 1, "stale": result.stale(ring.primary)},
            )
        raise ReencryptionIncomplete(
            f"{MoveResult(reports, censuses, 0).stale(ring.primary)} items of {secret!r} are still under old keys "
            f"after {MAX_PASSES} passes (bots still writing with an old ring?); retrying"
        )

    def _first_open_pass(self, rotation_id: int, step: str, stores: Sequence[DataStore]) -> int:
        rows = {(r.step, r.store): r for r in self.ledger.for_rotation(rotation_id) if r.step.startswith(f"{step}/")}
        n = 0
        while all((row := rows.get((f"{step}/{n}", s.label))) is not None and row.done for s in stores):
            n += 1
        # A pass that was fully done is followed by its census; resume at the first unfinished one,
        # but start a fresh pass rather than repeating a finished one.
        return n

    def _pass(
        self,
        secret: str,
        rotation_id: int,
        step: str,
        store: DataStore,
        rotate: RotateBatch,
        identify: Callable[[bytes], str | None],
        primary: str,
        urgent: bool = False,
    ) -> ReencryptReport:
        saved = self.ledger.load(rotation_id, step, store.label)
        if saved is not None and saved.done:
            return saved.totals
        estimate = saved.estimate if saved is not None else store.estimate()
        progress = JournalProgress(
            self.ledger,
            secret=secret,
            rotation_id=rotation_id,
            step=step,
            store=store.label,
            estimate=estimate,
            clock=self.clock,
            stopping=self.should_stop,
            pause=None if urgent else lambda: self.priority.wait_turn(secret, self.should_stop),
        )
        report = store.reencrypt(rotate, identify, primary, saved.checkpoint if saved else None, progress)
        if self.should_stop():
            raise StepInterrupted(f"{store.label}: stopped by shutdown; resumes from its checkpoint")
        # The pass read every item (resumed or not, within this rotation): what it did not find
        # unreadable is readable now or gone.  Before "done", so a crash in between repeats this.
        forgotten = self.ledger.forget_quarantined(secret, store.label, rotation_id)
        self.ledger.save(rotation_id, step, store.label, None, report, done=True, estimate=estimate, now=self.clock())
        log.info(
            "store pass done",
            extra={"secret": secret, "store": store.label, "step": step, "rewritten": report.rewritten,
                   "skipped": report.skipped, "conflicts": report.conflicts, "quarantined": report.quarantined,
                   "no_longer_quarantined": forgotten},
        )  # fmt: skip
        return report


def serial_batch_rotator(ring: FernetRing) -> RotateBatch:
    """In-process re-encryption of a batch: the fallback when processes do not pay."""
    from ..crypto.keyring import rotator
    from ..errors import DecryptError

    rotate_one = rotator(ring)

    def rotate(tokens: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for token in tokens:
            try:
                out.append(rotate_one(token))
            except DecryptError:
                out.append(None)
        return out

    return rotate
