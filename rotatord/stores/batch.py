"""What every data store shares: the batch loop, checkpoints carrying running totals, the rate limit.

A store reads its items in :class:`Batch` objects (one token per item, plus a store-specific
*handle* saying where the item lives and what it held) and writes with its own compare-and-swap.
:func:`run_reencrypt` does the rest, the same way for every store:

1. classify each token with ``identify``: under the primary -> skipped, never decrypted; signed by
   no key of the ring -> quarantined; otherwise -> re-encrypted;
2. re-encrypt with ``rotate`` on a helper thread (``rotate`` may fan out to worker processes),
   while the main thread reads and classifies the next batch and writes the previous one, so the
   crypto workers never wait for the database and the database never waits for the crypto;
3. write back with the store's compare-and-swap; an item changed meanwhile is a *conflict*:
   counted, left alone, picked up by a later pass;
4. report quarantined items, then checkpoint (position + cumulative totals) and stop early if
   the daemon is stopping.

When ``rotate`` also offers ``classify_rotate`` (:class:`ClassifyRotate`, as
:class:`rotatord.crypto.parallel.BatchRotator` does), steps 1 and 2 happen together in its
worker processes: each token's HMAC is then checked once instead of twice and the main thread
is left with the I/O.  ``identify`` is not called on that path; the rotator's ring must be the
one ``identify`` was built from (the engine builds both from the ring it read).

With ``write_behind`` (stores whose writes wait on a server: PostgreSQL, MariaDB, Redis), step
3 runs on :data:`WRITERS` writer threads, each batch on one of them with its own connection, so
that the database works on the writes of the batches in flight while the main thread reads the
next one; :data:`WRITE_BEHIND_DEPTH` batches are then in flight, one per writer and one being
re-encrypted.  Writes may then finish out of order; they are still recorded (checkpointed) in read
order, and a batch written past the last checkpoint is found under the primary on resume.
SQLite works inside this process and gains nothing from it (measured): it writes on the main
thread.

Batches are checkpointed strictly in read order, so a checkpoint always means "everything up to
here was processed"; at most :func:`depth` + 1 batches are in memory at any time.  A
stopping daemon (``progress.should_stop()``) gets no new batch read; the batches already in
flight are finished and checkpointed, so every write that lands is counted.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from ..errors import StoreError
from ..interfaces import Census, Identify, Progress, ReencryptReport, RotateBatch

__all__ = [
    "PIPELINE_DEPTH",
    "WRITERS",
    "WRITE_BEHIND_DEPTH",
    "Batch",
    "ClassifyRotate",
    "Pacer",
    "TokenBucket",
    "Totals",
    "count_census",
    "decode_checkpoint",
    "depth",
    "encode_checkpoint",
    "run_reencrypt",
]

H = TypeVar("H")

#: Batches whose re-encryption may be in flight at once.  Two keep the worker processes busy
#: while the main thread writes one batch and reads the next.
PIPELINE_DEPTH = 2
#: Writer threads of a ``write_behind`` store: with two, the server works on the writes of two
#: batches at once, each on its own connection (measured: +15 % on PostgreSQL).
WRITERS = 2
#: Batches in flight for a ``write_behind`` store: one per writer thread and one more being
#: re-encrypted.  A write waits on the server far longer than its batch's crypto takes (on
#: PostgreSQL 30 ms against 15 ms per 1000 rows), so with only two in flight the workers and
#: the server took turns (measured: +5-10 % with three).
WRITE_BEHIND_DEPTH = WRITERS + 1
UNSIGNED = "not a Fernet token of any key in the ring (corrupt, truncated or foreign)"
UNDECRYPTABLE = "signed by a key of the ring but cannot be decrypted"


@dataclass
class Batch(Generic[H]):
    """Items read together.  ``tokens[i]`` is what ``handles[i]`` held, as bytes; ``cursor`` is a
    JSON-ready position such that resuming after it continues with the next batch."""

    handles: list[H]
    tokens: list[bytes]
    cursor: object


@runtime_checkable
class ClassifyRotate(Protocol):
    """A RotateBatch that can also identify: per token ``(signing key id or None, new token or
    None)``, the new token None for items under ``primary_id``, unsigned or undecryptable."""

    def __call__(self, tokens: Sequence[bytes]) -> list[bytes | None]: ...

    def classify_rotate(self, tokens: Sequence[bytes], primary_id: str) -> list[tuple[str | None, bytes | None]]: ...


@dataclass
class Totals:
    """Running counts, cumulative across resumes (they travel inside the checkpoint)."""

    scanned: int = 0
    rewritten: int = 0
    skipped: int = 0
    conflicts: int = 0
    quarantined: int = 0

    def as_list(self) -> list[int]:
        return [self.scanned, self.rewritten, self.skipped, self.conflicts, self.quarantined]

    def report(self, store: str) -> ReencryptReport:
        return ReencryptReport(store, *self.as_list())


def encode_checkpoint(cursor: object, totals: Totals) -> str:
    """The opaque checkpoint string: a store position and the totals so far.  Never a value."""
    return json.dumps({"v": 1, "at": cursor, "n": totals.as_list()}, separators=(",", ":"))


def decode_checkpoint(label: str, checkpoint: str | None) -> tuple[object, Totals]:
    """``(cursor, totals)`` from :func:`encode_checkpoint`; ``(None, zeros)`` for no checkpoint.
    Raises StoreError naming the store for a string this module did not produce."""
    if checkpoint is None:
        return None, Totals()
    try:
        data = json.loads(checkpoint)
        counts = data["n"]
        if data.get("v") != 1 or len(counts) != 5 or not all(isinstance(n, int) and n >= 0 for n in counts):
            raise ValueError("bad shape")
        return data["at"], Totals(*counts)
    except (ValueError, TypeError, KeyError):
        raise StoreError(f"{label}: the checkpoint is not one this store wrote; restart the step") from None


class TokenBucket:
    """At most ``rate`` items per second on average, bursts up to one second's worth.

    Time is a parameter: :meth:`reserve` takes ``now`` (monotonic seconds) and returns how long to
    wait before handling ``n`` items.  A reservation larger than the bucket runs it into debt, so
    batches bigger than ``rate`` still average out to ``rate``.
    """

    def __init__(self, rate: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self._tokens = self.capacity
        self._last = now

    def reserve(self, n: int, now: float) -> float:
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate) - n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Pacer:
    """Applies a :class:`TokenBucket` with a clock and a sleep function (both parameters).

    Waits in slices so that a stopping daemon is not held by a slow rate limit.
    """

    SLICE = 0.25

    def __init__(
        self, rate: float, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._bucket = TokenBucket(rate, clock())

    def wait(self, n: int, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait until ``n`` more items are allowed; False if ``should_stop`` became true first."""
        now = self._clock()
        deadline = now + self._bucket.reserve(n, now)
        while (remaining := deadline - self._clock()) > 0:
            if should_stop():
                return False
            self._sleep(min(remaining, self.SLICE))
        return True


def count_census(
    store: str, token_batches: Iterable[Sequence[bytes]], identify: Identify, pacer: Pacer | None = None
) -> Census:
    """Count tokens per signing key id; ``None`` from ``identify`` counts as unreadable."""
    by_key: dict[str, int] = {}
    unreadable = 0
    for tokens in token_batches:
        if pacer is not None:
            pacer.wait(len(tokens))
        for token in tokens:
            key_id = identify(token)
            if key_id is None:
                unreadable += 1
            else:
                by_key[key_id] = by_key.get(key_id, 0) + 1
    return Census(store, by_key, unreadable)


@dataclass
class _Plan:
    """What became of each item of a batch, once its re-encryption is known."""

    skipped: int = 0
    rotate: list[int] = field(default_factory=list)
    unsigned: list[int] = field(default_factory=list)


def depth(write_behind: bool) -> int:
    """How many batches :func:`run_reencrypt` keeps in flight."""
    return WRITE_BEHIND_DEPTH if write_behind else PIPELINE_DEPTH


def _classify(tokens: Sequence[bytes], identify: Identify, primary_id: str) -> _Plan:
    plan = _Plan()
    rotate, unsigned = plan.rotate, plan.unsigned
    for index, token in enumerate(tokens):
        key_id = identify(token)
        if key_id == primary_id:
            plan.skipped += 1
        elif key_id is None:
            unsigned.append(index)
        else:
            rotate.append(index)
    return plan


Outcome = tuple[_Plan, list[bytes | None]]


def _identify_then_rotate(
    tokens: list[bytes], identify: Identify, rotate: RotateBatch, primary_id: str
) -> Callable[[], Outcome]:
    """Classify now (main thread), re-encrypt on the helper thread; the result waits for both."""
    plan = _classify(tokens, identify, primary_id)
    if not plan.rotate:
        return lambda: (plan, [])
    return lambda: (plan, rotate([tokens[i] for i in plan.rotate]))


def _fused(tokens: list[bytes], rotate: ClassifyRotate, primary_id: str) -> Outcome:
    plan = _Plan()
    news: list[bytes | None] = []
    for index, (key_id, new) in enumerate(rotate.classify_rotate(tokens, primary_id)):
        if key_id == primary_id:
            plan.skipped += 1
        elif key_id is None:
            plan.unsigned.append(index)
        else:
            plan.rotate.append(index)
            news.append(new)
    return plan, news


@dataclass
class _Applied:
    """A batch once written, for the main thread to record."""

    skipped: int
    attempted: int
    written: int
    quarantine: list[tuple[int, str]]


def _apply(batch: Batch[H], outcome: Future[Outcome], write: Callable[[list[H], list[bytes]], int]) -> _Applied:
    """Wait for a batch's re-encryption and write it (compare-and-swap)."""
    plan, results = outcome.result()
    if len(results) != len(plan.rotate):
        raise ValueError("rotate returned a different number of tokens than it was given")
    quarantine = [(index, UNSIGNED) for index in plan.unsigned]
    handles: list[H] = []
    news: list[bytes] = []
    for index, new in zip(plan.rotate, results, strict=True):
        if new is None:
            quarantine.append((index, UNDECRYPTABLE))
        else:
            handles.append(batch.handles[index])
            news.append(new)
    written = write(handles, news) if handles else 0
    return _Applied(plan.skipped, len(handles), written, sorted(quarantine))


def run_reencrypt(
    *,
    label: str,
    batches: Iterator[Batch[H]],
    write: Callable[[list[H], list[bytes]], int],
    locate: Callable[[H], str],
    rotate: RotateBatch,
    identify: Identify,
    primary_id: str,
    progress: Progress,
    totals: Totals,
    pacer: Pacer | None = None,
    write_behind: bool = False,
) -> ReencryptReport:
    """The loop described in the module docstring.

    ``write(handles, new_tokens)`` stores each new token where its handle says, only if the
    item still holds what the handle recorded, and returns how many it wrote; ``locate(handle)``
    names an item for the quarantine (never its content).  ``totals`` is updated in place.
    ``write_behind``: write on :data:`WRITERS` threads of their own (see the module docstring),
    for stores whose writes wait on a server rather than on this process's CPU.
    """
    fused = rotate if isinstance(rotate, ClassifyRotate) else None
    # Each batch in flight, its re-encryption, and its write when a writer thread does it.
    inflight: deque[tuple[Batch[H], Future[Outcome], Future[_Applied] | None]] = deque()
    in_flight = depth(write_behind)
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="rotatord-rotate")
    writer = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="rotatord-write") if write_behind else None
    exhausted = False
    try:
        while True:
            while not exhausted and len(inflight) < in_flight:
                batch = next(batches, None)
                if batch is None or (pacer and not pacer.wait(len(batch.tokens), progress.should_stop)):
                    exhausted = True
                    break
                if fused is not None:
                    outcome = pool.submit(_fused, batch.tokens, fused, primary_id)
                else:
                    outcome = pool.submit(_identify_then_rotate(batch.tokens, identify, rotate, primary_id))
                written = writer.submit(_apply, batch, outcome, write) if writer is not None else None
                inflight.append((batch, outcome, written))
            if not inflight:
                break
            batch, outcome, written = inflight.popleft()
            applied = written.result() if written is not None else _apply(batch, outcome, write)
            _record(label, batch, applied, locate, progress, totals)
            if progress.should_stop():
                exhausted = True  # finish and checkpoint what is in flight, read nothing more
    finally:
        # With batches in flight only after an error: those not started are cancelled, the
        # others finish (a write may land) but are not checkpointed.
        if writer is not None:
            writer.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
    return totals.report(label)


def _record(
    label: str,
    batch: Batch[H],
    applied: _Applied,
    locate: Callable[[H], str],
    progress: Progress,
    totals: Totals,
) -> None:
    """The main thread's part, in read order: report the quarantine, count, checkpoint."""
    for index, reason in applied.quarantine:
        progress.quarantine(locate(batch.handles[index]), reason)
    totals.scanned += len(batch.tokens)
    totals.rewritten += applied.written
    totals.skipped += applied.skipped
    totals.conflicts += applied.attempted - applied.written
    totals.quarantined += len(applied.quarantine)
    progress.checkpoint(encode_checkpoint(batch.cursor, totals), totals.report(label))
