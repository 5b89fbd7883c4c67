"""Webhook delivery end to end: a real SQLite outbox, real aiohttp requests, real receivers.

Every request is verified by the receivers with the ``standardwebhooks`` PyPI library.  Time is
a parameter: passes run at ``NOW + k s`` with a retry schedule of 0s, 0s, 0s, so retries need no
waiting.  ``NOW`` is the real time because the library checks timestamps against the wall clock
(5 minutes either way).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from rotatord.config.model import EVENT_TYPES, ConsumerSettings, NotifySettings
from rotatord.crypto.generators import WebhookSecretGenerator
from rotatord.engine.journal import Journal, outbox
from rotatord.interfaces import Event
from rotatord.notify.delivery import classify
from rotatord.notify.outbox import DeliveryFilter, OutboxStore, endpoints
from rotatord.notify.ssrf import config_problems
from rotatord.notify.worker import OutboxWorker
from rotatord.timeutil import utcnow
from tests.servers.receivers import Behaviour, ReceiverServer, receiver_server

NOW = utcnow().replace(microsecond=0)
SECOND = timedelta(seconds=1)
ZERO_SCHEDULE = (timedelta(0), timedelta(0), timedelta(0))
LOOPBACK = ("127.0.0.1/32",)


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """``NOW`` is taken per test: a module-level one would be minutes old by the time a long
    suite reaches these tests, and the receivers' library would reject every timestamp."""
    global NOW
    NOW = utcnow().replace(microsecond=0)


def at(k: int) -> Any:
    return NOW + k * SECOND


def new_secret() -> str:
    return WebhookSecretGenerator().generate().reveal()


@dataclass
class Setup:
    journal: Journal
    server: ReceiverServer
    secrets: dict[str, list[str]]
    rotation_id: int
    db_path: Path

    def consumer(
        self, name: str, behaviour: Behaviour | None = None, *, url: str | None = None, **settings: Any
    ) -> ConsumerSettings:
        """A consumer whose receiver endpoint is ``/name``, holding its current secrets."""
        secrets = self.secrets.setdefault(name, [new_secret()])
        endpoint = self.server.endpoint(name, secrets, behaviour)
        return ConsumerSettings(url=url or endpoint, signing_secret=f"{name}-webhook", **settings)

    def worker(
        self,
        consumers: dict[str, ConsumerSettings],
        *,
        allow: Sequence[str] = LOOPBACK,
        schedule: Sequence[timedelta] = ZERO_SCHEDULE,
        journal: Journal | None = None,
        **notify: Any,
    ) -> OutboxWorker:
        settings = NotifySettings(allow=tuple(allow), retry_schedule=tuple(schedule), **notify)
        return OutboxWorker(journal or self.journal, consumers, settings, lambda name: self.secrets[name])

    def queue(self, consumers: Sequence[str], event_type: str = "key.staged", rotation_id: int | None = None) -> None:
        rid = rotation_id or self.rotation_id
        event = Event(
            type=event_type,
            secret="support-bot-db",
            rotation_id=rid,
            version=2,
            phase="staged",
            backend="vault",
            path="bots/support-bot/db-key",
            backend_version="2",
            occurred_at=NOW,
        )
        self.journal.queue_events([(c, event) for c in consumers], NOW)

    def new_rotation(self, secret: str) -> int:
        return self.journal.start(
            secret=secret,
            kind="fernet",
            version=2,
            phase="staged",
            trigger="test",
            emergency=False,
            reason=None,
            now=NOW,
        ).id

    def rows(self, consumer: str | None = None) -> list[dict[str, Any]]:
        return rows_of(self.journal, consumer)


def rows_of(journal: Journal, consumer: str | None = None) -> list[dict[str, Any]]:
    """The outbox as ``rotatord webhooks list`` shows it, read without a worker."""
    return OutboxStore(journal).deliveries(DeliveryFilter(consumer=consumer, limit=1000))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    db = tmp_path / "state.db"
    journal = Journal(f"sqlite:///{db}")
    journal.create()
    with receiver_server() as server:
        s = Setup(journal, server, {}, 0, db)
        s.rotation_id = s.new_rotation("support-bot-db")
        try:
            yield s
        finally:
            journal.close()


def assert_all_verified(requests: Sequence[Any]) -> None:
    assert requests
    for r in requests:
        assert r.verified and all(r.verified), r.errors


# -- signatures, ids, retries --------------------------------------------------------------------


def test_retries_keep_the_id_and_refresh_the_timestamp_until_a_2xx(setup: Setup) -> None:
    bot = setup.consumer("bot", Behaviour(statuses=(500, 503)), required=True)
    worker = setup.worker({"bot": bot})
    setup.queue(["bot"])
    (row,) = setup.rows()

    assert [worker.deliver_pending(at(k)) for k in (0, 5, 10, 15)] == [1, 1, 1, 0]

    requests = setup.server.requests("bot")
    assert_all_verified(requests)
    assert [r.webhook_id for r in requests] == [row["webhook_id"]] * 3
    assert row["webhook_id"].startswith("msg_")
    assert [r.timestamp for r in requests] == [int(at(k).timestamp()) for k in (0, 5, 10)]
    assert [r.status for r in requests] == [500, 503, 204]
    (done,) = setup.rows()
    assert (done["status"], done["attempts"], done["last_error"]) == ("delivered", 3, None)
    assert worker.pending_count() == 0
    assert worker.acknowledged(setup.rotation_id, "key.staged")
    body = json.loads(requests[0].body)
    assert body["type"] == "key.staged" and body["data"]["version"] == 2


def test_the_schedule_ends_in_a_dead_letter_and_no_body_is_kept(setup: Setup) -> None:
    marker = "RECEIVER-BODY-MUST-NOT-BE-STORED"
    bot = setup.consumer("bot", Behaviour(then=500, body=marker.encode()))
    worker = setup.worker({"bot": bot})
    setup.queue(["bot"])
    for k in range(5):
        worker.deliver_pending(at(k))
    assert len(setup.server.requests("bot")) == 3
    (row,) = setup.rows()
    assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 3, "HTTP 500")
    dump = json.dumps([worker.list_deliveries(), worker.endpoints()])
    assert marker not in dump
    with setup.journal.transaction() as conn:
        cells = [v for table in (outbox, endpoints) for r in conn.execute(select(table)) for v in r]
    assert cells and marker not in " ".join(map(str, cells))


def test_retry_after_on_429_is_honoured(setup: Setup) -> None:
    bot = setup.consumer("bot", Behaviour(statuses=(429,), retry_after="120"))
    worker = setup.worker({"bot": bot})
    setup.queue(["bot"])
    assert worker.deliver_pending(at(0)) == 1
    assert worker.deliver_pending(at(60)) == 0  # the schedule says 0s; the receiver asked for 120s
    assert worker.deliver_pending(at(125)) == 1
    assert [r.status for r in setup.server.requests("bot")] == [429, 204]


def test_a_hanging_consumer_times_out(setup: Setup) -> None:
    slow = setup.consumer("slow", Behaviour(hang=True), timeout=timedelta(milliseconds=300))
    worker = setup.worker({"slow": slow})
    setup.queue(["slow"])
    assert worker.deliver_pending(at(0)) == 1
    (row,) = setup.rows()
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "timed out after 0.3s")
    assert_all_verified(setup.server.requests("slow"))


def test_a_hanging_consumer_delays_no_one_else(setup: Setup) -> None:
    """While one request hangs (released only by the test), the others are delivered and
    recorded: their acknowledgement is visible before the hanging one ends."""
    consumers = {"slow": setup.consumer("slow", Behaviour(hang=True), required=True, timeout=timedelta(seconds=30))}
    for name in ("fast-1", "fast-2", "fast-3"):
        consumers[name] = setup.consumer(name, Behaviour(delay=0.02), required=True)
    worker = setup.worker(consumers)
    setup.queue(list(consumers))
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        stop, wake = asyncio.Event(), asyncio.Event()
        runner = asyncio.create_task(worker.run(stop, wake))
        try:
            for _ in range(500):
                rows = {r["consumer"]: r for r in await asyncio.to_thread(setup.rows)}
                if all(rows[n]["status"] == "delivered" for n in consumers if n != "slow"):
                    seen.update(rows)
                    break
                await asyncio.sleep(0.01)
            seen["slow_requests_before_release"] = len(setup.server.requests("slow"))
            setup.server.release()
            for _ in range(500):
                if (await asyncio.to_thread(setup.rows, "slow"))[0]["status"] == "delivered":
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await runner

    asyncio.run(scenario())
    assert {n: seen[n]["status"] for n in consumers if n != "slow"} == dict.fromkeys(
        ("fast-1", "fast-2", "fast-3"), "delivered"
    )
    # The slow one was in flight (its request had arrived) and not yet recorded.
    assert seen["slow"]["attempts"] == 0 and seen["slow_requests_before_release"] == 1
    assert setup.rows("slow")[0]["status"] == "delivered"
    assert worker.acknowledged(setup.rotation_id, "key.staged")
    assert_all_verified(setup.server.all_requests())


@pytest.mark.parametrize("concurrency", [2, 6])
def test_deliveries_run_concurrently_up_to_the_bound(setup: Setup, concurrency: int) -> None:
    """Receivers hold every request until released: exactly ``concurrency`` arrive, no more."""
    consumers = {f"bot-{i}": setup.consumer(f"bot-{i}", Behaviour(hang=True)) for i in range(6)}
    worker = setup.worker(consumers, concurrency=concurrency)
    setup.queue(list(consumers))
    with ThreadPoolExecutor(1) as pool:
        attempted = pool.submit(worker.deliver_pending, at(0))
        for _ in range(1000):
            if len(setup.server.all_requests()) >= concurrency:
                break
            time.sleep(0.005)
        time.sleep(0.2)  # room for a request beyond the bound to arrive, if one could
        held = len(setup.server.all_requests())
        setup.server.release()
        assert attempted.result(timeout=30) == 6
    assert held == concurrency == setup.server.max_in_flight
    assert {r["status"] for r in setup.rows()} == {"delivered"}


def test_an_endpoint_failing_for_failing_after_is_marked_and_a_success_clears_it(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    bot = setup.consumer("bot", Behaviour(then=500))
    worker = setup.worker({"bot": bot}, schedule=(timedelta(0),) * 5, failing_after=timedelta(seconds=10))
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (state,) = worker.endpoints()
    assert state["failing"] is False and state["failing_since"] is not None and state["last_error"] == "HTTP 500"
    worker.deliver_pending(at(5))
    assert worker.endpoints()[0]["failing"] is False
    with caplog.at_level("ERROR", logger="rotatord.notify"):
        worker.deliver_pending(at(11))
    assert worker.endpoints()[0]["failing"] is True
    assert [r.getMessage() for r in caplog.records if r.name == "rotatord.notify"] == [
        "webhook endpoint failing: every attempt failed for notify.failing_after"
    ]
    setup.server.behave("bot", Behaviour())
    worker.deliver_pending(at(12))
    (state,) = worker.endpoints()
    assert (state["failing"], state["failing_since"], state["last_error"]) == (False, None, None)
    assert state["last_success_at"] is not None


@pytest.mark.parametrize(
    ("status", "retry_after", "verdict", "wait"),
    [
        (200, None, "delivered", None),
        (204, None, "delivered", None),
        (301, None, "retry", None),
        (410, None, "disabled", None),
        (429, "30", "retry", 30.0),
        (503, "999999", "retry", 3600.0),  # capped
        (503, "soon", "retry", None),  # unparseable: the schedule decides
        (500, "30", "retry", None),  # only throttling statuses are honoured
    ],
)
def test_statuses_are_classified(status: int, retry_after: str | None, verdict: str, wait: float | None) -> None:
    outcome = classify(status, retry_after)
    assert (outcome.verdict, outcome.retry_after) == (verdict, wait)


def test_a_redirect_is_a_failure_and_is_never_followed(setup: Setup) -> None:
    target = setup.server.endpoint("elsewhere")
    bot = setup.consumer("bot", Behaviour(then=302, location=target))
    worker = setup.worker({"bot": bot})
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert row["status"] == "pending" and row["attempts"] == 1
    assert row["last_error"].startswith("HTTP 302: redirects are not followed")
    assert setup.server.requests("elsewhere") == []
    assert len(setup.server.requests("bot")) == 1


def test_410_disables_the_endpoint_until_replayed(setup: Setup) -> None:
    bot = setup.consumer("bot", Behaviour(statuses=(410,)))
    worker = setup.worker({"bot": bot})
    setup.queue(["bot"], "key.staged")
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert (row["status"], row["attempts"]) == ("dead", 1)
    assert worker.endpoints()[0]["disabled"] is True

    # Later events for a disabled endpoint are dead-lettered without a request.
    setup.queue(["bot"], "key.promoted")
    assert worker.deliver_pending(at(1)) == 0
    assert len(setup.server.requests("bot")) == 1
    assert {r["event_type"]: r["status"] for r in setup.rows()} == {"key.staged": "dead", "key.promoted": "dead"}

    # The operator fixed the bot: replay its dead deliveries; they keep their ids.
    ids = {r["webhook_id"] for r in setup.rows()}
    assert worker.replay(consumer="bot", now=at(2)) == 2
    assert worker.endpoints()[0]["disabled"] is False
    assert worker.deliver_pending(at(3)) == 2
    assert {r["status"] for r in setup.rows()} == {"delivered"}
    assert {r.webhook_id for r in setup.server.requests("bot")[1:]} == ids
    assert_all_verified(setup.server.requests("bot"))


def test_replay_one_delivered_message_by_id(setup: Setup) -> None:
    worker = setup.worker({"bot": setup.consumer("bot")})
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert worker.replay(row["webhook_id"], now=at(1)) == 1
    assert worker.replay("msg_unknown", now=at(1)) == 0
    worker.deliver_pending(at(2))
    assert [r.webhook_id for r in setup.server.requests("bot")] == [row["webhook_id"]] * 2
    with pytest.raises(ValueError):
        worker.replay()


# -- signing-secret rotation ---------------------------------------------------------------------


def test_during_a_signing_secret_rotation_each_secret_verifies_alone(setup: Setup) -> None:
    old, new = new_secret(), new_secret()
    setup.secrets["bot"] = [new, old]  # current first, previous while it rotates
    worker = setup.worker({"bot": setup.consumer("bot")})
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (request,) = setup.server.requests("bot")
    assert request.verified == [True, True]
    entries = request.headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    for secret, entry in zip((new, old), entries, strict=True):
        alone = {**request.headers, "webhook-signature": entry}
        Webhook(secret).verify(request.body, alone)
    # The new secret's entry does not verify with the old secret: they are really distinct.
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(old).verify(request.body, {**request.headers, "webhook-signature": entries[0]})


def test_an_unreadable_signing_secret_postpones_without_counting_an_attempt(setup: Setup) -> None:
    setup.secrets["bot"] = [new_secret()]
    bot = setup.consumer("bot")

    def broken(name: str) -> list[str]:
        raise OSError("backend down")

    worker = OutboxWorker(setup.journal, {"bot": bot}, NotifySettings(allow=LOOPBACK), broken)
    setup.queue(["bot"])
    assert worker.deliver_pending(at(0)) == 0
    (row,) = setup.rows()
    assert row["attempts"] == 0 and row["status"] == "pending"
    assert "unavailable (OSError)" in row["last_error"]
    assert setup.server.requests("bot") == []


# -- restart -------------------------------------------------------------------------------------


def test_a_new_worker_on_the_same_state_sends_pending_rows_with_their_ids(setup: Setup) -> None:
    consumers = {"a": setup.consumer("a", Behaviour(statuses=(500,))), "b": setup.consumer("b")}
    setup.queue(["a"])
    setup.worker(consumers).deliver_pending(at(0))  # "a" fails once
    setup.queue(["b"])  # then the process dies before sending it
    before = {r["consumer"]: r["webhook_id"] for r in setup.rows()}
    setup.journal.close()

    journal = Journal(f"sqlite:///{setup.db_path}")
    try:
        second = setup.worker(consumers, journal=journal)
        assert second.deliver_pending(at(1)) == 2
        rows = {r["consumer"]: r for r in rows_of(journal)}
    finally:
        journal.close()
    assert {c: r["status"] for c, r in rows.items()} == {"a": "delivered", "b": "delivered"}
    assert rows["a"]["attempts"] == 2
    assert [r.webhook_id for r in setup.server.requests("a")] == [before["a"]] * 2
    assert [r.webhook_id for r in setup.server.requests("b")] == [before["b"]]
    assert_all_verified(setup.server.all_requests())


# -- acknowledgements ----------------------------------------------------------------------------


def test_acknowledged_waits_for_every_required_subscribed_consumer(setup: Setup) -> None:
    consumers = {
        "required": setup.consumer("required", Behaviour(statuses=(500,)), required=True),
        "optional": setup.consumer("optional", Behaviour(then=500)),
        # Required, but not subscribed to key.staged: it is skipped and does not gate.
        "promotions": setup.consumer("promotions", required=True, events=("key.promoted",)),
    }
    worker = setup.worker(consumers)
    setup.queue(list(consumers))
    other = setup.new_rotation("other-secret")
    assert not worker.acknowledged(setup.rotation_id, "key.staged")

    worker.deliver_pending(at(0))
    assert not worker.acknowledged(setup.rotation_id, "key.staged")
    statuses = {r["consumer"]: r["status"] for r in setup.rows()}
    assert statuses["promotions"] == "skipped"
    assert setup.server.requests("promotions") == []

    worker.deliver_pending(at(1))
    assert worker.acknowledged(setup.rotation_id, "key.staged")  # "optional" still fails
    assert {r["consumer"]: r["status"] for r in setup.rows()}["optional"] == "pending"
    assert worker.acknowledged(other, "key.staged")  # nobody was told about that one
    assert worker.acknowledged(setup.rotation_id, "key.retired")


# -- SSRF ----------------------------------------------------------------------------------------


def test_loopback_is_refused_unless_allowed(setup: Setup) -> None:
    bot = setup.consumer("bot")
    assert config_problems({"bot": bot}, ()) == [
        "consumers.bot.url: 127.0.0.1 is a loopback address, allowed only by a network in notify.allow"
    ]
    worker = setup.worker({"bot": bot}, allow=("10.0.0.0/8",))
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert row["attempts"] == 1 and "loopback" in row["last_error"]
    assert setup.server.requests("bot") == []


def test_a_name_resolving_to_a_disallowed_address_is_refused_at_connect(setup: Setup) -> None:
    bot = setup.consumer("bot", url=setup.server.url("bot", host="localhost"))
    # A network is listed, so the name may be admitted by its addresses: only DNS can tell.
    assert config_problems({"bot": bot}, ("10.0.0.0/8",)) == []
    worker = setup.worker({"bot": bot}, allow=("10.0.0.0/8",))
    setup.queue(["bot"])
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert row["last_error"] == (
        "refused by notify.allow: 127.0.0.1 is a loopback address (of localhost), "
        "allowed only by listing the name or a network"
    )
    assert setup.server.requests("bot") == []

    # Listing the name vouches for its loopback address.
    allowed = setup.worker({"bot": bot}, allow=("localhost",))
    allowed.deliver_pending(at(1))
    assert setup.rows()[0]["status"] == "delivered"
    assert_all_verified(setup.server.requests("bot"))


def test_metadata_addresses_are_refused_even_when_listed(setup: Setup) -> None:
    setup.secrets["meta"] = [new_secret()]
    meta = ConsumerSettings(url="http://169.254.169.254/latest/meta-data/", signing_secret="meta-webhook")
    allow = ("169.254.169.254", "169.254.0.0/16", "0.0.0.0/0")
    assert config_problems({"meta": meta}, allow) == [
        "consumers.meta.url: 169.254.169.254 is a cloud metadata address, always refused"
    ]
    worker = setup.worker({"meta": meta}, allow=allow)
    setup.queue(["meta"])
    worker.deliver_pending(at(0))
    (row,) = setup.rows()
    assert "always refused" in row["last_error"] and row["attempts"] == 1


# -- what the bodies carry -----------------------------------------------------------------------


def test_no_body_carries_key_material(setup: Setup) -> None:
    setup.secrets["bot"] = [new_secret(), new_secret()]
    worker = setup.worker({"bot": setup.consumer("bot")})
    for event_type in EVENT_TYPES:
        setup.queue(["bot"], event_type)
    assert worker.deliver_pending(at(0)) == len(EVENT_TYPES)
    requests = setup.server.requests("bot")
    assert_all_verified(requests)
    material = [s for s in setup.secrets["bot"]] + [s.removeprefix("whsec_") for s in setup.secrets["bot"]]
    material += [base64.b64decode(s.removeprefix("whsec_")).hex() for s in setup.secrets["bot"]]
    for r in requests:
        text = r.body.decode()
        assert "whsec_" not in text
        assert not any(m in text for m in material)
        data = json.loads(text)
        assert set(data) == {"type", "timestamp", "data"}
        assert data["data"]["path"] == "bots/support-bot/db-key"
    assert sorted(json.loads(r.body)["type"] for r in requests) == sorted(EVENT_TYPES)
