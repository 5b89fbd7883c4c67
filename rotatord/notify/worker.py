"""The outbox worker: sends due webhooks concurrently, records every attempt, retries on schedule.

It runs off the rotation path: the engine only writes outbox rows (with the phase change) and
asks :meth:`OutboxWorker.acknowledged`; a slow or dead bot never holds a rotation step.

Each pass claims the pending rows that are due, settles those that must not be sent (the
consumer does not subscribe to the event: ``skipped``; it is no longer configured or answered
410 at its current URL: ``dead``), reads each consumer's signing secrets once, and sends the rest
concurrently, at most ``notify.concurrency`` at a time (that many lanes take rows from the
pass's queue in turn, so a hanging consumer holds one lane and the others carry on; a task per
row would only add scheduling work).  Every attempt carries the row's stable
``webhook-id`` and a fresh ``webhook-timestamp``; it is written as soon as it ends (attempts
finishing together share one transaction), so a consumer that hangs until its timeout delays
nobody's acknowledgement.  After ``retry_schedule`` is exhausted a row is dead-lettered; a
consumer whose every attempt failed for ``failing_after`` is marked failing and logged as an
alert.  Delivery is at least once: a process killed mid-request sends the row again after a
restart, with the same id, which receivers deduplicate.

Only one process may run the worker against a state database (the leader, with PostgreSQL);
within a process, rows in flight are never claimed twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..config.model import ConsumerSettings, NotifySettings
from ..engine.journal import Journal
from ..errors import ConfigError
from ..interfaces import Notifier
from ..timeutil import Clock, SystemClock, format_ts
from .delivery import Outcome, Sender, tls_context
from .outbox import AttemptRecord, DeliveryFilter, OutboxRow, OutboxStore, url_digest
from .signer import SigningKeys
from .ssrf import TargetPolicy

__all__ = ["CLAIM_LIMIT", "JITTER", "POLL_SECONDS", "OutboxWorker", "SigningSecrets"]

log = logging.getLogger("rotatord.notify")

#: Consumer name -> its current signing secret, then the previous one while it rotates.
SigningSecrets = Callable[[str], Sequence[str]]
#: The run loop looks for due rows at least this often (seconds).
POLL_SECONDS = 1.0
#: Retry delays are stretched by up to this fraction, so failures do not come back in lockstep.
JITTER = 0.1
#: Rows claimed per pass.
CLAIM_LIMIT = 10_000
#: When a signing secret cannot be read, try again after this long without counting an attempt.
SECRET_RETRY = timedelta(seconds=30)
#: How long the recorder lets finished attempts gather before writing them (seconds).
RECORD_COALESCE = 0.01
#: On stop, deliveries in flight get this long to finish; the rest stay pending for the next start.
STOP_GRACE = 2.0


@dataclass
class _Pass:
    """What the deliveries of one event loop share: the session, the slots, and the attempts
    finished but not yet written (one recorder task writes them, in batches)."""

    sender: Sender
    slots: asyncio.Semaphore
    buffer: list[AttemptRecord] = field(default_factory=list)
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False
    active: int = 0  # attempts started and not yet buffered


class OutboxWorker(Notifier):
    """Delivers the outbox to ``consumers`` (name -> settings) under ``notify``'s policy.

    ``signing_secrets(name)`` returns the consumer's ``whsec_`` secrets, current first; it may
    block (it reads the backend) and is called in a worker thread, once per consumer per pass.
    """

    def __init__(
        self,
        journal: Journal,
        consumers: Mapping[str, ConsumerSettings],
        notify: NotifySettings,
        signing_secrets: SigningSecrets,
        clock: Clock | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.consumers = consumers
        self.notify = notify
        self.policy = TargetPolicy(notify.allow)
        self.store = OutboxStore(journal)
        self.store.ensure_schema(consumers)
        self._signing_secrets = signing_secrets
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()  # jitter, not security
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        try:
            self._tls = tls_context(notify.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"notify.ca_bundle: cannot load {notify.ca_bundle}: {why}") from None
        for consumer in consumers.values():
            self.policy.target_problem(consumer.url)  # parse each URL once, now, not per delivery
        #: Told of every attempt once it is recorded (e.g. to count it in metrics); on the loop.
        self.on_attempt: Callable[[AttemptRecord], None] | None = None

    # -- Notifier ----------------------------------------------------------------------------

    def deliver_pending(self, now: datetime) -> int:
        """One pass at ``now`` in a private event loop; returns when every attempt is recorded.
        Outside an event loop only (inside one, use :meth:`deliver_due` or :meth:`run`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.deliver_due(now))
        raise RuntimeError("deliver_pending() blocks: inside an event loop, await deliver_due() or run()")

    def acknowledged(self, rotation_id: int, event_type: str) -> bool:
        """Every required consumer subscribed to ``event_type`` that was told about this rotation
        has a delivered (2xx) row for it.  True when no required consumer was told."""
        required = [name for name, c in self.consumers.items() if c.required and event_type in c.events]
        return self.store.acknowledged(rotation_id, event_type, required)

    # -- driving it ----------------------------------------------------------------------------

    async def deliver_due(self, now: datetime) -> int:
        """One pass at ``now`` with its own session; returns how many requests were attempted."""
        async with self._open() as p:
            tasks, count = await self._dispatch(now, p)
            if tasks:
                await asyncio.gather(*tasks)
            return count

    async def run(self, stop_event: asyncio.Event, wake_event: asyncio.Event) -> None:
        """Deliver until ``stop_event``: at once when ``wake_event`` is set (new rows, a replay),
        else when the next row is due, looking at least every :data:`POLL_SECONDS`."""
        async with self._open() as p:
            tasks: set[asyncio.Task[None]] = set()
            while not stop_event.is_set():
                wake_event.clear()
                delay = POLL_SECONDS
                try:
                    now = self._clock.now()
                    for task in (await self._dispatch(now, p))[0]:
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    nxt = await asyncio.to_thread(self.store.next_due, now)
                    if nxt is not None:
                        delay = min(POLL_SECONDS, max((nxt - self._clock.now()).total_seconds(), 0.0))
                except Exception as exc:
                    log.error("webhook pass failed; trying again", extra={"error": type(exc).__name__})
                await _wait_any((stop_event, wake_event), delay)
            if tasks:
                _done, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[_Pass]:
        concurrency = self.notify.concurrency
        async with Sender(self.policy, concurrency=concurrency, tls=self._tls) as sender:
            p = _Pass(sender, asyncio.Semaphore(concurrency))
            recorder = asyncio.create_task(self._recorder(p))
            try:
                yield p
            finally:
                # Every attempt that finished is written before the pass ends.
                p.closing = True
                p.dirty.set()
                await recorder

    # -- one pass ------------------------------------------------------------------------------

    async def _dispatch(self, now: datetime, p: _Pass) -> tuple[list[asyncio.Task[None]], int]:
        """Claim due rows, settle the ones not to send, start the lanes that send the rest.
        Returns the lanes and how many rows they send."""
        claimed, disabled_urls = await asyncio.to_thread(self.store.claim, now, CLAIM_LIMIT)
        with self._inflight_lock:
            rows = [r for r in claimed if r.id not in self._inflight]
            self._inflight.update(r.id for r in rows)
        send: list[OutboxRow] = []
        ready = False
        try:
            skipped: list[int] = []
            unknown: list[int] = []
            disabled: list[int] = []
            for row in rows:
                consumer = self.consumers.get(row.consumer)
                if consumer is None:
                    unknown.append(row.id)
                elif row.event_type not in consumer.events:
                    skipped.append(row.id)
                elif (gone := disabled_urls.get(row.consumer)) is not None and gone == url_digest(consumer.url):
                    disabled.append(row.id)
                else:
                    send.append(row)
            secrets, unavailable = await asyncio.to_thread(self._read_secrets, {r.consumer for r in send})
            held = [r for r in send if r.consumer in unavailable]
            send = [r for r in send if r.consumer not in unavailable]
            if skipped or unknown or disabled or held:  # a fan-out usually settles nothing: no thread hop
                await asyncio.to_thread(self._settle, now, skipped, unknown, disabled, held, unavailable)
            ready = True
        finally:
            # Only rows about to be sent stay in flight (their lane releases them), even on error.
            sending = {r.id for r in send} if ready else set()
            with self._inflight_lock:
                self._inflight.difference_update(r.id for r in rows if r.id not in sending)
        start = time.monotonic()
        queue = deque(send)
        lanes = min(len(send), self.notify.concurrency)
        return [asyncio.create_task(self._lane(p, queue, secrets, now, start)) for _ in range(lanes)], len(send)

    async def _lane(
        self, p: _Pass, queue: deque[OutboxRow], keys: Mapping[str, SigningKeys], now: datetime, start: float
    ) -> None:
        """Send rows from ``queue`` (shared by the pass's lanes) one after another until it is empty."""
        try:
            while queue:
                row = queue.popleft()
                await self._attempt(p, row, keys[row.consumer], now, start)
        except BaseException:
            # Stopping: rows not started stay pending, free for the next pass (or the next start).
            with self._inflight_lock:
                self._inflight.difference_update(r.id for r in queue)
            queue.clear()
            raise

    def _read_secrets(self, names: Iterable[str]) -> tuple[dict[str, SigningKeys], dict[str, str]]:
        """Each consumer's secrets, validated and keyed once for the pass; or why they are
        unusable (never their values)."""
        found: dict[str, SigningKeys] = {}
        unavailable: dict[str, str] = {}
        for name in sorted(names):
            consumer = self.consumers[name]
            try:
                keys = SigningKeys(list(self._signing_secrets(name)))
            except Exception as exc:  # a failing read for one consumer must not stop the others
                why = f"signing secret {consumer.signing_secret!r} unavailable ({type(exc).__name__})"
                log.warning("cannot sign webhooks", extra={"consumer": name, "error": why})
                unavailable[name] = why
                continue
            found[name] = keys
        return found, unavailable

    def _settle(
        self,
        now: datetime,
        skipped: Collection[int],
        unknown: Collection[int],
        disabled: Collection[int],
        held: Sequence[OutboxRow],
        unavailable: Mapping[str, str],
    ) -> None:
        self.store.settle(skipped, "skipped", "the consumer does not subscribe to this event type")
        self.store.settle(unknown, "dead", "the consumer is no longer configured")
        self.store.settle(disabled, "dead", "endpoint disabled: it answered 410 Gone (replay after fixing it)")
        for name, why in unavailable.items():
            self.store.postpone([r.id for r in held if r.consumer == name], now + SECRET_RETRY, why)

    async def _attempt(self, p: _Pass, row: OutboxRow, keys: SigningKeys, now: datetime, start: float) -> None:
        consumer = self.consumers[row.consumer]
        body = row.payload.encode()
        p.active += 1
        try:
            async with p.slots:
                # Signed inside the slot, so the timestamp is the moment of sending.
                sent_at = now.timestamp() + (time.monotonic() - start)
                headers = keys.headers(row.webhook_id, int(sent_at), body)
                outcome = await p.sender.post(consumer.url, headers, body, consumer.timeout.total_seconds())
            finished = now + timedelta(seconds=time.monotonic() - start)
            record = self._next_step(row, consumer, outcome, finished)
        except BaseException as exc:
            # Cancelled (stopping) or a bug: nothing to write, the row stays pending.
            with self._inflight_lock:
                self._inflight.discard(row.id)
            if not isinstance(exc, Exception):
                raise
            log.error(
                "webhook attempt failed unexpectedly", extra={"webhook_id": row.webhook_id, "error": type(exc).__name__}
            )
            return
        finally:
            p.active -= 1
        # The recorder releases the row once the attempt is written, so no pass claims it before.
        p.buffer.append(record)
        p.dirty.set()

    def _next_step(
        self, row: OutboxRow, consumer: ConsumerSettings, outcome: Outcome, finished: datetime
    ) -> AttemptRecord:
        attempts = row.attempts + 1
        if outcome.verdict == "delivered":
            return AttemptRecord(row.id, row.consumer, attempts, finished, delivered=True)
        if outcome.verdict == "disabled":
            return AttemptRecord(
                row.id, row.consumer, attempts, finished, False, outcome.summary, disable_url=url_digest(consumer.url)
            )
        schedule = self.notify.retry_schedule
        if attempts >= len(schedule):
            return AttemptRecord(row.id, row.consumer, attempts, finished, False, outcome.summary)
        delay = schedule[attempts].total_seconds()
        delay += delay * self._rng.uniform(0, JITTER)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        next_at = finished + timedelta(seconds=delay)
        return AttemptRecord(row.id, row.consumer, attempts, finished, False, outcome.summary, next_at)

    async def _recorder(self, p: _Pass) -> None:
        """Write finished attempts until the pass closes.  Attempts that end while a write is in
        progress go together in the next transaction, so a fan-out costs a few commits, and an
        attempt is visible (to :meth:`acknowledged`) moments after it ends, whatever the others do."""
        while True:
            await p.dirty.wait()
            if not p.closing and p.active:
                # Let the attempts finishing around now join this write: fewer, larger commits.
                # With none in flight there is nothing to wait for: the last batch goes at once.
                await asyncio.sleep(RECORD_COALESCE)
            p.dirty.clear()
            while p.buffer:
                batch, p.buffer = p.buffer, []
                await self._write(batch)
            if p.closing:
                return

    async def _write(self, batch: list[AttemptRecord]) -> None:
        try:
            newly_failing = await asyncio.to_thread(self.store.record, batch, self.notify.failing_after)
        except Exception as exc:
            log.error(
                "could not record webhook attempts; they stay pending and are sent again",
                extra={"count": len(batch), "error": type(exc).__name__},
            )
            return
        finally:
            with self._inflight_lock:
                self._inflight.difference_update(r.row_id for r in batch)
        for rec in batch:
            _log_attempt(rec)
            if self.on_attempt is not None:
                self.on_attempt(rec)
        for name in newly_failing:
            log.error(
                "webhook endpoint failing: every attempt failed for notify.failing_after",
                extra={"consumer": name, "failing_after": str(self.notify.failing_after)},
            )

    # -- operators ---------------------------------------------------------------------------

    def list_deliveries(self, filters: DeliveryFilter | None = None) -> list[dict[str, Any]]:
        """Outbox rows, newest first (``rotatord webhooks list``); no payloads, no bodies."""
        return self.store.deliveries(filters or DeliveryFilter())

    def replay(
        self,
        webhook_id: str | None = None,
        *,
        consumer: str | None = None,
        since: datetime | None = None,
        include_delivered: bool = False,
        now: datetime | None = None,
    ) -> int:
        """Send again (``rotatord webhooks replay``): one row by ``webhook_id`` whatever its
        status, or a consumer's dead rows (and delivered ones with ``include_delivered``) created
        since ``since``.  Rows keep their webhook id, restart the schedule, and their endpoint is
        re-enabled.  Returns how many rows were reset; wake the run loop afterwards."""
        return self.store.replay(
            now or self._clock.now(),
            webhook_id=webhook_id,
            consumer=consumer,
            since=since,
            include_delivered=include_delivered,
        )

    def pending_count(self) -> int:
        return self.store.pending_count()

    def endpoints(self) -> list[dict[str, Any]]:
        """Per configured consumer: failing / disabled state and last success (for ``status``)."""
        states = self.store.endpoint_states()
        out = []
        for name, consumer in sorted(self.consumers.items()):
            s = states.get(name)
            out.append(
                {
                    "consumer": name,
                    "required": consumer.required,
                    "failing": bool(s and s.failing_at),
                    "failing_since": format_ts(s.failing_since) if s else None,
                    "disabled": bool(s and s.disabled_for(consumer.url)),
                    "last_success_at": format_ts(s.last_success_at) if s else None,
                    "last_error": s.last_error if s else None,
                }
            )
        return out


def _log_attempt(rec: AttemptRecord) -> None:
    if rec.delivered:
        if log.isEnabledFor(logging.DEBUG):  # a fan-out delivers thousands: skip building unused records
            log.debug("webhook delivered", extra={"consumer": rec.consumer, "attempts": rec.attempts, "error": None})
        return
    extra = {"consumer": rec.consumer, "attempts": rec.attempts, "error": rec.error}
    if rec.next_attempt_at is not None:
        log.info(
            "webhook attempt failed; will retry", extra={**extra, "next_attempt_at": format_ts(rec.next_attempt_at)}
        )
    else:
        log.warning("webhook dead-lettered", extra=extra)


async def _wait_any(events: Sequence[asyncio.Event], timeout: float) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)
