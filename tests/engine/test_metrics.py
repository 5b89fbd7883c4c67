"""The Prometheus collector over a real SQLite state database and a real Engine.

Each test drives the engine with chosen times and scrapes :class:`rotatord.metrics.Metrics`
as the daemon's /metrics does; samples are parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from rotatord.crypto.keyring import multifernet
from rotatord.daemon.endpoint import HttpEndpoint
from rotatord.daemon.http import HttpServer
from rotatord.daemon.runtime import Runtime
from rotatord.engine.journal import Journal
from rotatord.metrics import Metrics, store_labels
from rotatord.notify.outbox import AttemptRecord
from tests.engine.conftest import (
    CONSUMER,
    EVERY,
    FERNET,
    PROPAGATION,
    T0,
    TOKEN,
    Harness,
    HarnessFactory,
    bot_db_store,
    fernet_secret,
    materials,
    token_secret,
)
from tests.helpers import assert_no_material, unwritable

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


def scrape(metrics: Metrics) -> tuple[str, Samples]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def names(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


@pytest.fixture
def rig(harness: Harness) -> Iterator[tuple[Runtime, Metrics, FixedClock]]:
    runtime = harness.build()
    clock = FixedClock(T0)
    metrics = Metrics(lambda: runtime, clock=clock)
    runtime.engine.on_failure = metrics.record_failure
    yield runtime, metrics, clock


def test_never_rotated_secrets_are_due_now(rig: tuple[Runtime, Metrics, FixedClock]) -> None:
    _runtime, metrics, _clock = rig
    _text, s = scrape(metrics)
    assert value(s, "rotatord_state_db_up") == 1 and value(s, "rotatord_secrets") == 2
    assert value(s, "rotatord_leader") == 1 and value(s, "rotatord_ready") == 1
    for name in (FERNET, TOKEN):
        assert value(s, "rotatord_rotation_version", secret=name) == 0
        assert value(s, "rotatord_rotation_phase", secret=name, phase="none", status="none") == 1
        assert value(s, "rotatord_secret_next_rotation_seconds", secret=name) == 0
        assert value(s, "rotatord_rotations_total", secret=name, result="completed") == 0
    assert value(s, "rotatord_secret_info", secret=FERNET, kind="fernet", backend="local") == 1
    assert names(s, "rotatord_secret_age_seconds") == []


def test_rotations_phases_ages_and_next_rotation(harness: Harness, rig: tuple[Runtime, Metrics, FixedClock]) -> None:
    runtime, metrics, clock = rig
    engine = runtime.engine
    engine.tick(FERNET, T0)
    engine.tick(TOKEN, T0)
    clock.at = T0 + EVERY / 2
    _text, s = scrape(metrics)
    for name in (FERNET, TOKEN):
        assert value(s, "rotatord_rotation_version", secret=name) == 1
        assert value(s, "rotatord_rotations_total", secret=name, result="completed") == 1
        assert value(s, "rotatord_rotation_in_progress", secret=name) == 0
        assert value(s, "rotatord_secret_age_seconds", secret=name) == (EVERY / 2).total_seconds()
        assert value(s, "rotatord_secret_next_rotation_seconds", secret=name) == (EVERY / 2).total_seconds()
        assert value(s, "rotatord_secret_last_rotation_timestamp_seconds", secret=name) == T0.timestamp()
        assert value(s, "rotatord_secret_next_rotation_timestamp_seconds", secret=name) == (T0 + EVERY).timestamp()
    assert value(s, "rotatord_rotation_phase", secret=FERNET, phase="retired", status="done") == 1
    assert value(s, "rotatord_rotation_phase", secret=TOKEN, phase="revoked", status="done") == 1

    # Version 2 staged: in progress, waiting out the propagation window.
    t1 = T0 + EVERY
    engine.tick(FERNET, t1)
    clock.at = t1
    _text, s = scrape(metrics)
    assert value(s, "rotatord_rotation_version", secret=FERNET) == 2
    assert value(s, "rotatord_rotation_phase", secret=FERNET, phase="staged", status="active") == 1
    assert names(s, "rotatord_rotation_phase").count({"secret": FERNET, "phase": "staged", "status": "active"}) == 1
    assert value(s, "rotatord_rotation_in_progress", secret=FERNET) == 1
    assert value(s, "rotatord_rotation_failing", secret=FERNET) == 0
    # The token was not rotated: a month after T0 it is due now, and overdue a day later.
    clock.at = t1 + EVERY / 30
    _text, s = scrape(metrics)
    assert value(s, "rotatord_secret_next_rotation_seconds", secret=TOKEN) == -(EVERY / 30).total_seconds()

    engine.rollback(FERNET, trigger="test", reason="metrics", now=t1 + PROPAGATION / 2)
    _text, s = scrape(metrics)
    assert value(s, "rotatord_rotations_total", secret=FERNET, result="rolled_back") == 1
    assert value(s, "rotatord_rotations_total", secret=FERNET, result="completed") == 1
    assert value(s, "rotatord_rotation_in_progress", secret=FERNET) == 0
    secrets = materials(harness.doc(FERNET)) | materials(harness.doc(TOKEN))
    assert_no_material(secrets, texts=[scrape(metrics)[0]])


def test_failed_steps_and_backend_errors_are_counted(
    harness: Harness, rig: tuple[Runtime, Metrics, FixedClock]
) -> None:
    runtime, metrics, _clock = rig
    store_dir = harness.backend_settings.directory
    store_dir.mkdir(parents=True, exist_ok=True)
    with unwritable(store_dir):
        runtime.engine.tick(FERNET, T0)
        runtime.engine.tick(FERNET, T0 + EVERY)  # the retry fails the same way
    _text, s = scrape(metrics)
    assert value(s, "rotatord_rotation_failing", secret=FERNET) == 1
    assert value(s, "rotatord_rotation_failed_attempts", secret=FERNET) == 2
    assert value(s, "rotatord_rotation_phase", secret=FERNET, phase="pending", status="active") == 1
    failures = [labels for labels in names(s, "rotatord_step_failures_total") if labels["secret"] == FERNET]
    assert failures == [{"secret": FERNET, "step": "stage", "error": "PermissionDenied"}]
    assert value(s, "rotatord_step_failures_total", secret=FERNET, step="stage", error="PermissionDenied") == 2
    assert value(s, "rotatord_backend_errors_total", backend="local", error="PermissionDenied") == 2
    # Once the backend is writable again the retry succeeds and the gauge clears; counters stay.
    runtime.engine.tick(FERNET, T0 + EVERY * 2)
    _text, s = scrape(metrics)
    assert value(s, "rotatord_rotation_failing", secret=FERNET) == 0
    assert value(s, "rotatord_backend_errors_total", backend="local", error="PermissionDenied") == 2


def test_reencryption_census_and_quarantine(make_harness: HarnessFactory, tmp_path: Path) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,)), consumers=())
    runtime = h.build()
    clock = FixedClock(T0)
    metrics = Metrics(lambda: runtime, clock=clock)
    engine = runtime.engine
    engine.tick(FERNET, T0)
    v1 = multifernet(h.ring())
    with sqlite3.connect(db) as conn:
        rows = [(i, v1.encrypt(b"row %d" % i).decode()) for i in range(40)]
        conn.executemany("INSERT INTO msgs VALUES (?, ?)", [*rows, (40, "not a fernet token")])
    t1 = T0 + EVERY
    engine.tick(FERNET, t1)
    engine.tick(FERNET, t1 + PROPAGATION)  # promote, re-encrypt
    engine.census(FERNET)
    text, s = scrape(metrics)
    base = {"secret": FERNET, "store": "0", "store_kind": "sql"}
    assert value(s, "rotatord_reencrypt_items_total", **base, step="reencrypt", outcome="rewritten") == 40
    assert value(s, "rotatord_reencrypt_items_total", **base, step="reencrypt", outcome="quarantined") == 1
    assert value(s, "rotatord_reencrypt_items_total", **base, step="reencrypt", outcome="scanned") == 41
    assert value(s, "rotatord_reencrypt_done", **base, step="reencrypt") == 1
    assert value(s, "rotatord_census_items", **base, key="v2") == 40
    assert value(s, "rotatord_census_unreadable_items", **base) == 1
    assert value(s, "rotatord_quarantined_items", **base) == 1
    assert_no_material(materials(h.doc(FERNET)), texts=[text])
    assert "not a fernet token" not in text and "msgs" not in text


def test_webhook_deliveries_by_consumer_and_status(harness: Harness, rig: tuple[Runtime, Metrics, FixedClock]) -> None:
    runtime, metrics, _clock = rig
    runtime.engine.tick(TOKEN, T0)  # issue + revoke: two events for the one consumer
    _text, s = scrape(metrics)
    assert value(s, "rotatord_webhook_deliveries", consumer=CONSUMER, status="pending") == 2
    assert value(s, "rotatord_webhook_deliveries", consumer=CONSUMER, status="dead") == 0
    assert {labels["status"] for labels in names(s, "rotatord_webhook_deliveries")} == {"pending", "dead"}
    assert value(s, "rotatord_webhook_pending") == 2
    assert value(s, "rotatord_webhook_retrying", consumer=CONSUMER) == 0
    assert value(s, "rotatord_webhook_endpoint_failing", consumer=CONSUMER) == 0
    harness.sql("UPDATE outbox SET attempts = 3 WHERE id = (SELECT min(id) FROM outbox)")
    harness.sql("UPDATE outbox SET status = 'dead' WHERE id = (SELECT max(id) FROM outbox)")
    naive_t0 = T0.replace(tzinfo=None).isoformat(" ")
    harness.sql("UPDATE webhook_endpoints SET failing_at = ? WHERE consumer = ?", naive_t0, CONSUMER)
    _text, s = scrape(metrics)
    assert value(s, "rotatord_webhook_retrying", consumer=CONSUMER) == 1
    assert value(s, "rotatord_webhook_deliveries", consumer=CONSUMER, status="dead") == 1
    assert value(s, "rotatord_webhook_endpoint_failing", consumer=CONSUMER) == 1


def test_role_readiness_and_an_unreadable_database(harness: Harness, tmp_path: Path) -> None:
    runtime = harness.build()
    missing = Journal(f"sqlite:///{tmp_path / 'absent' / 'state.db'}")
    broken = dataclasses.replace(runtime, journal=missing)
    metrics = Metrics(lambda: broken, role=lambda: "standby", ready=lambda: False)
    _text, s = scrape(metrics)
    assert value(s, "rotatord_leader") == 0 and value(s, "rotatord_ready") == 0
    assert value(s, "rotatord_state_db_up") == 0
    assert names(s, "rotatord_rotation_version") == []
    before_start = Metrics(lambda: None)
    _text, s = scrape(before_start)
    assert value(s, "rotatord_ready") == 1 and names(s, "rotatord_state_db_up") == []


def test_scrape_cost_does_not_grow_with_the_number_of_secrets(make_harness: HarnessFactory) -> None:
    """One query per table: 1,000 secrets cost the same number of statements as two."""

    def statements(h: Harness) -> int:
        runtime = h.build()
        for i, name in enumerate(s.name for s in h.settings.secrets):
            runtime.journal.start(
                secret=name, kind="fernet", version=1, phase="pending", trigger="t", emergency=False,
                reason=None, now=T0,
            )  # fmt: skip
            if i % 2:
                runtime.journal.update(runtime.journal.latest(name).id, T0, status="done")  # type: ignore[union-attr]
        metrics = Metrics(lambda: runtime, clock=FixedClock(T0 + EVERY))
        seen: list[str] = []
        engine = runtime.journal._engine
        listener = lambda *args: seen.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            _text, s = scrape(metrics)
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        assert len(names(s, "rotatord_rotation_version")) == len(h.settings.secrets)
        return len(seen)

    few = statements(make_harness(fernet_secret(), token_secret()))
    many = statements(make_harness(*(fernet_secret(name=f"bot-{i:04d}", path=f"bots/b{i}/key") for i in range(1000))))
    assert many == few


def test_store_labels() -> None:
    assert store_labels("bot-db.stores[3]:redis:sess:*[token]") == ("3", "redis")
    assert store_labels("odd label") == ("odd label", "")


CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
METRIC_NAME = re.compile(r"\b((?:rotatord|process)_[a-z_]+)\b")


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition can carry: gauges as named, counters with _total."""
    found: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _hash, _type, name, kind = line.split()
            found.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return found


def test_dashboard_and_alert_rules_use_only_exposed_metrics(rig: tuple[Runtime, Metrics, FixedClock]) -> None:
    _runtime, metrics, _clock = rig
    text, _samples = scrape(metrics)
    exposed = exposed_names(text)
    assert {"rotatord_step_failures_total", "rotatord_rotations_total", "rotatord_webhook_pending"} <= exposed

    rules = yaml.safe_load((CONTRIB / "prometheus" / "rotatord-alerts.yml").read_text())
    [group] = rules["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    for required in ("RotationOverdue", "RotationFailed", "WebhookDeliveriesFailing", "QuarantineNotEmpty"):
        assert f"Rotatord{required}" in alerts
    rule_exprs = []
    for name, rule in alerts.items():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        rule_exprs.append(rule["expr"])

    dashboard = json.loads((CONTRIB / "grafana" / "rotatord-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] == "rotatord" and dashboard["schemaVersion"] >= 30
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(panel_exprs) >= 20
    used = {m for expr in rule_exprs + panel_exprs + variables for m in METRIC_NAME.findall(expr)}
    assert used, "no metric names found"
    assert used - exposed == set(), "dashboard or alert rules name metrics rotatord does not expose"


def test_webhook_attempts_are_counted_by_result(harness: Harness, rig: tuple[Runtime, Metrics, FixedClock]) -> None:
    runtime, metrics, _clock = rig
    assert runtime.notifier is not None
    endpoint = HttpEndpoint(HttpServer(), metrics)
    endpoint.observe(runtime)  # as the daemon wires it, for each runtime it builds
    assert runtime.notifier.on_attempt == metrics.record_attempt
    assert runtime.engine.on_failure == metrics.record_failure
    later = T0 + PROPAGATION
    for record in (
        AttemptRecord(1, CONSUMER, 1, T0, delivered=True),
        AttemptRecord(2, CONSUMER, 1, T0, False, "HTTP 503", next_attempt_at=later),
        AttemptRecord(2, CONSUMER, 2, later, False, "HTTP 503", next_attempt_at=later),
        AttemptRecord(3, CONSUMER, 8, T0, False, "timeout"),
        AttemptRecord(4, "other", 1, T0, False, "HTTP 410", disable_url="0" * 64),
    ):
        metrics.record_attempt(record)
    _text, s = scrape(metrics)
    assert value(s, "rotatord_webhook_attempts_total", consumer=CONSUMER, result="delivered") == 1
    assert value(s, "rotatord_webhook_attempts_total", consumer=CONSUMER, result="failed") == 2
    assert value(s, "rotatord_webhook_attempts_total", consumer=CONSUMER, result="dead") == 1
    assert value(s, "rotatord_webhook_attempts_total", consumer="other", result="gone") == 1


def test_prometheus_client_is_imported_by_one_module() -> None:
    package = Path(__file__).resolve().parents[2] / "rotatord"
    importers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(r"^\s*(from|import) prometheus_client\b", path.read_text(), re.MULTILINE)
    )
    assert importers == ["metrics.py"]
