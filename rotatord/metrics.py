"""Prometheus metrics: the one module that imports prometheus_client.

Almost everything is read from the state database at scrape time by :class:`StateCollector`
(one query per table, see :mod:`rotatord.engine.snapshot`), so the numbers are those every
instance and ``rotatord status`` see, survive restarts, and need no bookkeeping in the engine.
Only what the database does not hold is counted in process: failed steps and backend errors,
by the error's class name (:meth:`Metrics.record_failure`, wired to ``Engine.on_failure``), and
webhook attempts by result (:meth:`Metrics.record_attempt`, ``OutboxWorker.on_attempt``): the
outbox keeps every delivered row forever, so counting those at each scrape would grow with history.

Labels carry names only: secret, backend, consumer, store index and kind, key id ("v7"), step,
phase, status, error class.  Never key material, a URL, a path of a secret's value or an error
message (messages may name things an operator typed; class names cannot carry anything).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from . import __version__
from .config import SecretSettings
from .engine.policy import next_rotation_due
from .engine.snapshot import OPEN_STATUSES, StateSnapshot, take_snapshot
from .errors import BackendError, RotatordError
from .timeutil import Clock, SystemClock

if TYPE_CHECKING:
    from .daemon.runtime import Runtime
    from .notify.outbox import AttemptRecord

__all__ = ["CONTENT_TYPE", "Metrics", "RoleProvider", "StateCollector", "store_labels"]

log = logging.getLogger("rotatord.metrics")

#: What a role provider returns: one instance alone, or the leader / a standby of several.
RoleProvider = Callable[[], str]
RuntimeProvider = Callable[[], "Runtime | None"]
_STORE_LABEL = re.compile(r"\.stores\[(\d+)\]:([a-z_]+):")
_RESULTS = {"done": "completed", "rolled_back": "rolled_back"}
#: The classic text format: every Prometheus version reads it, and all our names are plain.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_OUTCOMES = ("scanned", "rewritten", "skipped", "conflicts", "quarantined")


def store_labels(label: str) -> tuple[str, str]:
    """(index, kind) of a store label such as ``bot-db.stores[0]:sql:messages(body)``.

    Index and kind are short and stable; the rest of the label (a table, a directory) would
    only lengthen every series."""
    match = _STORE_LABEL.search(label)
    return (match.group(1), match.group(2)) if match else (label, "")


class StateCollector(Collector):
    """Reads the state database at each scrape and turns it into metric families."""

    def __init__(self, runtime: RuntimeProvider, role: RoleProvider, ready: Callable[[], bool], clock: Clock) -> None:
        self._runtime = runtime
        self._role = role
        self._ready = ready
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        info = _g("rotatord_build_info", "rotatord version", ["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _gauge("rotatord_leader", "1 when this instance acts (leader or single), 0 on a standby",
                     0 if self._role() == "standby" else 1)  # fmt: skip
        yield _gauge("rotatord_ready", "1 once the daemon resumed its rotations and serves requests",
                     1 if self._ready() else 0)  # fmt: skip
        runtime = self._runtime()
        if runtime is None:
            return
        secrets = runtime.engine.secrets
        consumers = list(runtime.settings.consumers)
        yield _gauge("rotatord_secrets", "Managed secrets configured", len(secrets))
        try:
            snap = take_snapshot(runtime.journal, endpoints=bool(consumers))
        except (RotatordError, SQLAlchemyError, OSError) as exc:
            # Reported as a metric (and alerted on), not as a failed scrape: the rest still counts.
            log.warning("metrics: cannot read the state database", extra={"error": type(exc).__name__})
            yield _gauge("rotatord_state_db_up", "1 when the scrape could read the state database", 0)
            return
        yield _gauge("rotatord_state_db_up", "1 when the scrape could read the state database", 1)
        yield from _secret_families(snap, secrets, self._clock.now())
        yield from _store_families(snap, secrets)
        yield from _webhook_families(snap, consumers)
        drifted = _g(
            "rotatord_drift_open",
            "Open drift records: the backend holds what rotatord did not write; rotations paused",
            ["secret", "reason"],
        )
        for (secret, reason), count in sorted(snap.drift.items()):
            if secret in secrets:
                drifted.add_metric([secret, reason], count)
        yield drifted
        yield _gauge("rotatord_metrics_scrape_duration_seconds", "Time spent reading state for this scrape",
                     time.monotonic() - started)  # fmt: skip


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _g(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=labels)


def _c(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, labels=labels)


def _secret_families(snap: StateSnapshot, secrets: dict[str, SecretSettings], now: datetime) -> Iterator[Metric]:
    secret_info = _g("rotatord_secret_info", "A managed secret", ["secret", "kind", "backend"])
    version = _g("rotatord_rotation_version", "Version of the latest rotation (0: never)", ["secret"])
    phase = _g(
        "rotatord_rotation_phase", "Phase and status of the latest rotation (always 1)", ["secret", "phase", "status"]
    )
    in_progress = _g("rotatord_rotation_in_progress", "1 while a rotation is active", ["secret"])
    failing = _g(
        "rotatord_rotation_failing", "1 while the active rotation's last step failed (it is retried)", ["secret"]
    )
    attempts = _g(
        "rotatord_rotation_failed_attempts", "Consecutive failed attempts of the active rotation's step", ["secret"]
    )
    results = _c("rotatord_rotations", "Rotations finished, by result", ["secret", "result"])
    last = _g("rotatord_secret_last_rotation_timestamp_seconds", "When the latest rotation started", ["secret"])
    age = _g("rotatord_secret_age_seconds", "Seconds since the latest rotation started", ["secret"])
    due_at = _g("rotatord_secret_next_rotation_timestamp_seconds", "When the next rotation is due", ["secret"])
    due_in = _g(
        "rotatord_secret_next_rotation_seconds",
        "Seconds until the next rotation is due (negative: overdue)",
        ["secret"],
    )
    for name, secret in sorted(secrets.items()):
        rot = snap.latest.get(name)
        secret_info.add_metric([name, secret.kind, secret.backend], 1)
        version.add_metric([name], rot.version if rot else 0)
        phase.add_metric([name, rot.phase if rot else "none", rot.status if rot else "none"], 1)
        in_progress.add_metric([name], 1 if rot and rot.active else 0)
        failing.add_metric([name], 1 if rot and rot.active and rot.error else 0)
        attempts.add_metric([name], rot.attempts if rot and rot.active else 0)
        for status, result in _RESULTS.items():
            results.add_metric([name, result], snap.rotations.get((name, status), 0))
        if rot is not None:
            started = rot.started_at.timestamp()
            last.add_metric([name], started)
            age.add_metric([name], now.timestamp() - started)
        due = next_rotation_due(secret, rot.started_at if rot else None, now).timestamp()
        due_at.add_metric([name], due)
        due_in.add_metric([name], due - now.timestamp())
    yield from (secret_info, version, phase, in_progress, failing, attempts, results, last, age, due_at, due_in)


def _store_families(snap: StateSnapshot, secrets: dict[str, SecretSettings]) -> Iterator[Metric]:
    labels = ["secret", "store", "store_kind"]
    items = _c(
        "rotatord_reencrypt_items",
        "Items re-encryption handled in the latest rotation, by outcome",
        [*labels, "step", "outcome"],
    )
    estimate = _g(
        "rotatord_reencrypt_estimated_items", "Items the store expected at the start of the pass", [*labels, "step"]
    )
    done = _g("rotatord_reencrypt_done", "1 once the store's pass finished", [*labels, "step"])
    # Checkpoints are kept per pass ("reencrypt/0", "reencrypt/1", ...; forced runs outside a
    # rotation are "manual-<ms>/<n>").  Passes add up under one step label, so neither repeated
    # passes nor repeated `rotatord reencrypt` runs multiply the series or make a counter go down.
    merged: dict[tuple[str, str, str], list[int]] = {}
    finished: dict[tuple[str, str, str], bool] = {}
    latest: dict[tuple[str, str, str], tuple[int, int | None]] = {}
    for p in snap.progress:
        if p.secret not in secrets:
            continue
        step, number = _step_and_pass(p.step)
        key = (p.secret, p.store, step)
        t = p.totals
        sums = merged.setdefault(key, [0] * len(_OUTCOMES))
        for i, count in enumerate((t.scanned, t.rewritten, t.skipped, t.conflicts, t.quarantined)):
            sums[i] += count
        finished[key] = finished.get(key, True) and p.done
        if number >= latest.get(key, (-1, None))[0]:
            latest[key] = (number, p.estimate)
    for (secret, store, step), sums in sorted(merged.items()):
        base = [secret, *store_labels(store)]
        for outcome, value in zip(_OUTCOMES, sums, strict=True):
            items.add_metric([*base, step, outcome], value)
        done.add_metric([*base, step], 1 if finished[(secret, store, step)] else 0)
        est = latest[(secret, store, step)][1]
        if est is not None:
            estimate.add_metric([*base, step], est)
    census = _g("rotatord_census_items", "Items per key at the latest census", [*labels, "key"])
    unreadable = _g(
        "rotatord_census_unreadable_items", "Items no key of the ring could read at the latest census", labels
    )
    taken = _g("rotatord_census_timestamp_seconds", "When the latest census was taken", labels)
    seen: set[tuple[str, str]] = set()
    for c in sorted(snap.census, key=lambda c: (c.secret, c.store, c.key_id)):
        if c.secret not in secrets:
            continue
        base = [c.secret, *store_labels(c.store)]
        if c.key_id:
            census.add_metric([*base, c.key_id], c.count)
        else:
            unreadable.add_metric(base, c.count)
        if (c.secret, c.store) not in seen:
            seen.add((c.secret, c.store))
            taken.add_metric(base, c.taken_at.timestamp())
    quarantined = _g(
        "rotatord_quarantined_items", "Items quarantined (unreadable, never rewritten) awaiting an operator", labels
    )
    for (secret, store), count in sorted(snap.quarantined.items()):
        if secret in secrets:
            quarantined.add_metric([secret, *store_labels(store)], count)
    yield from (items, estimate, done, census, unreadable, taken, quarantined)


def _step_and_pass(checkpoint_step: str) -> tuple[str, int]:
    """("reencrypt", 1) for "reencrypt/1"; ("manual", n) for a forced run's "manual-<ms>/<n>"."""
    step, _, number = checkpoint_step.partition("/")
    return ("manual" if step.startswith("manual-") else step), int(number) if number.isdigit() else 0


def _webhook_families(snap: StateSnapshot, consumers: list[str]) -> Iterator[Metric]:
    deliveries = _g(
        "rotatord_webhook_deliveries", "Webhooks waiting (pending) or dead-lettered (dead)", ["consumer", "status"]
    )
    retrying = _g("rotatord_webhook_retrying", "Pending webhooks that failed at least once", ["consumer"])
    failing = _g(
        "rotatord_webhook_endpoint_failing", "1 when every attempt failed for notify.failing_after", ["consumer"]
    )
    disabled = _g("rotatord_webhook_endpoint_disabled", "1 when the endpoint answered 410 Gone", ["consumer"])
    success = _g("rotatord_webhook_last_success_timestamp_seconds", "When the consumer last answered 2xx", ["consumer"])
    # Per configured consumer only: rows of a consumer removed from the configuration are
    # dead-lettered by the worker and would otherwise stay as series nobody can act on.
    pending = sum(n for (_consumer, status), n in snap.deliveries.items() if status == "pending")
    for consumer in sorted(consumers):
        for status in OPEN_STATUSES:
            deliveries.add_metric([consumer, status], snap.deliveries.get((consumer, status), 0))
        retrying.add_metric([consumer], snap.retrying.get(consumer, 0))
        endpoint = snap.endpoints.get(consumer)
        failing.add_metric([consumer], 1 if endpoint and endpoint.failing else 0)
        disabled.add_metric([consumer], 1 if endpoint and endpoint.disabled else 0)
        if endpoint is not None and endpoint.last_success_at is not None:
            success.add_metric([consumer], endpoint.last_success_at.timestamp())
    yield from (deliveries, _gauge("rotatord_webhook_pending", "Webhooks waiting to be delivered", pending))
    yield from (retrying, failing, disabled, success)


class Metrics:
    """The registry served at ``/metrics``: state read at scrape time, plus failure counters.

    ``runtime()`` returns the daemon's current runtime (None before it is built), ``role()`` one
    ``single``, ``leader`` or ``standby``, ``ready()`` whether the daemon finished starting.
    """

    def __init__(
        self,
        runtime: RuntimeProvider,
        *,
        role: RoleProvider = lambda: "single",
        ready: Callable[[], bool] = lambda: True,
        clock: Clock | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(runtime, role, ready, clock or SystemClock()))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._step_failures = Counter(
            "rotatord_step_failures", "Failed rotation steps, by error class (retried with backoff)",
            ["secret", "step", "error"], registry=self.registry,
        )  # fmt: skip
        self._backend_errors = Counter(
            "rotatord_backend_errors", "Errors from secret backends during rotations, by error class",
            ["backend", "error"], registry=self.registry,
        )  # fmt: skip
        self._attempts = Counter(
            "rotatord_webhook_attempts", "Webhook delivery attempts, by result (delivered, failed: retried, "
            "dead: retries exhausted, gone: 410)", ["consumer", "result"], registry=self.registry,
        )  # fmt: skip

    def record_failure(self, secret: SecretSettings, step: str, exc: Exception) -> None:
        """Count a failed step (an ``Engine.on_failure`` observer).  Thread-safe."""
        error = type(exc).__name__
        self._step_failures.labels(secret.name, step, error).inc()
        if isinstance(exc, BackendError):
            self._backend_errors.labels(secret.backend, error).inc()

    def record_attempt(self, record: AttemptRecord) -> None:
        """Count a recorded webhook attempt (an ``OutboxWorker.on_attempt`` observer)."""
        if record.delivered:
            result = "delivered"
        elif record.disable_url is not None:
            result = "gone"
        elif record.next_attempt_at is None:
            result = "dead"
        else:
            result = "failed"
        self._attempts.labels(record.consumer, result).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type.  Blocks on the state database: call it
        from a worker thread, not the event loop."""
        return generate_latest(self.registry), CONTENT_TYPE
