"""``verify_webhook`` and ``WebhookHandler``: a bot verifying rotatord's webhooks and acting on them.

Requests are signed by rotatord's own signer and by the ``standardwebhooks`` PyPI library;
payloads come from the real journal's outbox; key rings are published with a real
``FileBackend`` and read back through ``FileReader``.  The example apps are served by wsgiref
on a real socket (WSGI) and called with hand-written ASGI messages.  No assertion message or
captured text may contain a secret or a signature: they are compared as booleans.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import importlib.util
import json
import logging
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from rotatord.backends.file import FileBackend, init_master_key
from rotatord.client import (
    FileReader,
    Keyring,
    SigningSecrets,
    TokenCheck,
    TokenSet,
    WebhookEvent,
    WebhookHandler,
    WebhookVerificationError,
    verify_webhook,
)
from rotatord.config.model import FileBackendSettings
from rotatord.crypto.generators import ApiTokenGenerator, FernetGenerator, WebhookSecretGenerator
from rotatord.document import CredentialSet, Document, FernetRing
from rotatord.engine.journal import Journal, outbox
from rotatord.engine.transitions import issue_credential, stage_ring
from rotatord.errors import RotatordError
from rotatord.interfaces import Event
from rotatord.notify.signer import sign, webhook_headers
from tests.helpers import REPO, assert_no_material, materials

NOW = 1_741_000_000  # Unix seconds: the wall clock every verification is given
T0 = datetime.fromtimestamp(NOW, UTC)
RING = "bots/support-bot/db-key"
HOOK = "bots/support-bot/webhook"
API = "bots/support-bot/api"
SECRET = "support-bot-db"


def whsec() -> str:
    return WebhookSecretGenerator().generate().reveal()


def body_of(type_: str = "key.staged", *, secret: str = SECRET, version: int = 2, **data: object) -> bytes:
    """A payload shaped like the journal's (test_the_journals_payload_verifies_and_parses checks that)."""
    payload = {
        "type": type_,
        "timestamp": "2025-03-03T11:06:40.000Z",
        "data": {
            "secret": secret,
            "rotation_id": 7,
            "version": version,
            "phase": "staged",
            "backend": "local",
            "path": RING,
            "backend_version": "3",
            **data,
        },
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def headers_for(body: bytes, secrets: list[str], *, msg_id: str | None = None, at: int = NOW) -> dict[str, str]:
    return webhook_headers(msg_id or new_id(), at, body, secrets)


# -- verify_webhook ---------------------------------------------------------------------------------


def test_the_journals_payload_verifies_and_parses(tmp_path: Path) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'state.db'}")
    journal.create()
    rot = journal.start(
        secret=SECRET, kind="fernet", version=2, phase="pending", trigger="schedule",
        emergency=False, reason=None, now=T0,
    )  # fmt: skip
    event = Event(
        type="key.staged", secret=SECRET, rotation_id=rot.id, version=2, phase="staged", backend="vault",
        path=RING, backend_version="5", occurred_at=T0, detail={"emergency": "false"},
    )  # fmt: skip
    journal.queue_events([("support-bot", event)], T0)
    with journal.transaction() as conn:
        msg_id, payload = conn.execute(select(outbox.c.webhook_id, outbox.c.payload)).one()
    journal.close()
    body = str(payload).encode()  # what the delivery worker sends
    secret = whsec()
    headers = {k.title(): v for k, v in webhook_headers(msg_id, NOW, body, [secret]).items()}  # Webhook-Id, ...
    got = verify_webhook(body, headers, [secret], now=NOW)
    assert got == WebhookEvent(
        id=msg_id, type="key.staged", timestamp=T0, secret=SECRET, rotation_id=rot.id, version=2, phase="staged",
        backend="vault", path=RING, backend_version="5", data=got.data,
    )  # fmt: skip
    assert got.timestamp.tzinfo is not None and got.data["emergency"] == "false"
    with pytest.raises(TypeError):
        got.data["secret"] = "x"  # type: ignore[index]


def test_the_reference_librarys_signature_verifies() -> None:
    secret, body, msg_id = whsec(), body_of(), new_id()
    # Webhook.sign replaces the tzinfo with UTC: it must be given a UTC datetime.
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(NOW, UTC), body.decode())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert verify_webhook(body, headers, [secret], now=NOW).id == msg_id
    # And a request our verifier accepts is one the reference library accepts too (its clock is real).
    at = int(datetime.now(UTC).timestamp())
    ours = headers_for(body, [secret], at=at)
    assert Webhook(secret).verify(body, ours)["data"]["version"] == 2
    assert verify_webhook(body, ours, [secret]).version == 2  # default now: the wall clock


def test_old_and_new_secrets_each_verify_alone() -> None:
    old, new, body = whsec(), whsec(), body_of()
    both = headers_for(body, [new, old])  # rotatord while the bot's signing secret rotates
    assert verify_webhook(body, both, [new], now=NOW).type == "key.staged"
    assert verify_webhook(body, both, [old], now=NOW).type == "key.staged"
    only_old = headers_for(body, [old])
    assert verify_webhook(body, only_old, [new, old], now=NOW).type == "key.staged"  # a bot holding both
    with pytest.raises(WebhookVerificationError) as info:
        verify_webhook(body, headers_for(body, [new]), [old], now=NOW)
    assert info.value.reason == "no_matching_signature"


def _v1(key_secret: str, msg_id: str, body: bytes) -> str:
    key = base64.b64decode(key_secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{NOW}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_unknown_schemes_are_skipped_and_any_v1_entry_may_match() -> None:
    secret, body, msg_id = whsec(), body_of(), new_id()
    other = _v1(whsec(), msg_id, body)
    v1a = "v1a," + base64.b64encode(bytes(64)).decode()
    header = f"{v1a} v2,whatever {other} {_v1(secret, msg_id, body)}"
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(NOW), "webhook-signature": header}
    assert verify_webhook(body, headers, [whsec(), secret], now=NOW).id == msg_id


def test_the_tolerance_is_inclusive_both_ways() -> None:
    secret, body = whsec(), body_of()
    for at in (NOW - 300, NOW + 300):
        assert verify_webhook(body, headers_for(body, [secret], at=at), [secret], now=NOW).version == 2
    for at, why in ((NOW - 301, "too old"), (NOW + 301, "too new")):
        with pytest.raises(WebhookVerificationError, match=f"timestamp outside tolerance: {why}"):
            verify_webhook(body, headers_for(body, [secret], at=at), [secret], now=NOW)
    late = headers_for(body, [secret], at=NOW - 3600)
    assert verify_webhook(body, late, [secret], now=NOW, tolerance=3600).version == 2


Mutation = Callable[[bytes, dict[str, str], str], tuple[bytes, dict[str, str]]]


def _with(**changes: str) -> Mutation:
    def mutate(body: bytes, headers: dict[str, str], _secret: str) -> tuple[bytes, dict[str, str]]:
        return body, {**headers, **{k.replace("_", "-"): v for k, v in changes.items()}}

    return mutate


def _without(name: str) -> Mutation:
    return lambda body, headers, _s: (body, {k: v for k, v in headers.items() if k != name})


def _resigned(at: int) -> Mutation:
    return lambda body, headers, secret: (body, webhook_headers(headers["webhook-id"], at, body, [secret]))


def _signature(edit: Callable[[str], str]) -> Mutation:
    return lambda body, headers, _s: (body, {**headers, "webhook-signature": edit(headers["webhook-signature"])})


REFUSED: dict[str, tuple[Mutation, str]] = {
    "wrong secret": (
        lambda b, h, _s: (b, webhook_headers(h["webhook-id"], NOW, b, [whsec()])),
        "no_matching_signature",
    ),
    "tampered body": (lambda b, h, _s: (b.replace(b'"version":2', b'"version":3'), h), "no_matching_signature"),
    "re-serialised JSON": (lambda b, h, _s: (json.dumps(json.loads(b), indent=1).encode(), h), "no_matching_signature"),
    "another id": (_with(webhook_id="msg_other"), "no_matching_signature"),
    "too old": (_resigned(NOW - 301), "timestamp_outside_tolerance"),
    "too new": (_resigned(NOW + 301), "timestamp_outside_tolerance"),
    "milliseconds": (_resigned(NOW * 1000), "malformed_timestamp"),
    "fractional timestamp": (_with(webhook_timestamp=f"{NOW}.5"), "malformed_timestamp"),
    "negative timestamp": (_with(webhook_timestamp="-1"), "malformed_timestamp"),
    "no id": (_without("webhook-id"), "missing_headers"),
    "no timestamp": (_without("webhook-timestamp"), "missing_headers"),
    "no signature": (_without("webhook-signature"), "missing_headers"),
    "empty signature": (_with(webhook_signature=""), "missing_headers"),
    "entry without a comma": (_signature(lambda s: s.replace(",", "", 1)), "malformed_signature"),
    "double space": (_signature(lambda s: f"v1,{base64.b64encode(bytes(32)).decode()}  {s}"), "malformed_signature"),
    "empty scheme": (_signature(lambda s: s.removeprefix("v1")), "malformed_signature"),
    "not base64": (_signature(lambda s: s[:-4] + "!!!!"), "malformed_signature"),
    "short digest": (_signature(lambda s: "v1," + base64.b64encode(bytes(16)).decode()), "malformed_signature"),
    "v1a only": (_signature(lambda s: "v1a" + s.removeprefix("v1")), "no_matching_signature"),
    "too many entries": (_signature(lambda s: " ".join([s] * 40)), "malformed_signature"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_requests_say_why_in_general_terms(case: str) -> None:
    secret, body = whsec(), body_of()
    mutate, reason = REFUSED[case]
    sent_body, headers = mutate(body, headers_for(body, [secret]), secret)
    with pytest.raises(WebhookVerificationError) as info:
        verify_webhook(sent_body, headers, [secret], now=NOW)
    exc = info.value
    assert exc.reason == reason
    assert isinstance(exc, RotatordError) and not isinstance(exc, ValueError)
    signatures = [e.partition(",")[2] for e in headers.get("webhook-signature", "").split(" ") if "," in e]
    assert_no_material([secret, secret.removeprefix("whsec_"), *signatures], texts=[str(exc), repr(exc)])


def test_a_verified_body_that_is_not_an_event_is_a_payload_error() -> None:
    secret = whsec()
    for body, field in (
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"type": "key.staged", "timestamp": "2025-03-03T03:00:00Z"}', "'data'"),
        (body_of(version="2"), "'version'"),  # type: ignore[arg-type]
        (body_of(rotation_id=True), "'rotation_id'"),
        (body_of(secret=""), "'secret'"),
        (body_of(backend_version=[1]), "'backend_version'"),
        (body_of().replace(b"11:06:40.000Z", b"11:06:40"), "time zone"),
        (body_of().replace(b"2025-03-03", b"yesterday"), "ISO 8601"),
    ):
        with pytest.raises(WebhookVerificationError, match=field) as info:
            verify_webhook(body, headers_for(body, [secret]), [secret], now=NOW)
        assert info.value.reason == "malformed_payload"
    # A numeric backend version (Vault's are numbers) is read as text.
    body = body_of(backend_version=12)
    assert verify_webhook(body, headers_for(body, [secret]), [secret], now=NOW).backend_version == "12"


def test_misuse_raises_type_or_value_errors_quoting_nothing() -> None:
    secret, body = whsec(), body_of()
    headers = headers_for(body, [secret])
    with pytest.raises(TypeError):
        verify_webhook(body.decode(), headers, [secret], now=NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        verify_webhook(body, headers, secret, now=NOW)
    with pytest.raises(ValueError, match="at least one"):
        verify_webhook(body, headers, [], now=NOW)
    with pytest.raises(ValueError, match="tolerance"):
        verify_webhook(body, headers, [secret], now=NOW, tolerance=-1)
    for bad in (secret.removeprefix("whsec_"), "whsec_" + "*" * 20, "whsec_"):
        with pytest.raises(ValueError) as info:
            verify_webhook(body, headers, [bad], now=NOW)
        assert_no_material([secret.removeprefix("whsec_")], texts=[str(info.value)])


# -- WebhookHandler over a real file backend --------------------------------------------------------


class CountingReader:
    """A real FileReader, counted; while ``gate`` is clear, reads wait for it (a slow backend)."""

    def __init__(self, inner: FileReader) -> None:
        self.inner = inner
        self.reads = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def read(self) -> Document:
        self.reads += 1
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        return self.inner.read()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Bot:
    """The daemon's side (a FileBackend writing documents) and a bot's views reading them."""

    settings: FileBackendSettings
    backend: FileBackend
    clock: Clock
    ring: FernetRing
    hook: CredentialSet

    def publish(self, doc: Document, path: str) -> None:
        current = self.backend.read(path)
        self.backend.write(path, doc, expected=None if current is None else current.version, request_id=new_id())

    def reader(self, path: str) -> CountingReader:
        assert self.settings.master_key_file is not None
        return CountingReader(FileReader(self.settings.directory, path, master_key_file=self.settings.master_key_file))

    def pointer(self, path: str) -> Path:
        return self.settings.directory.joinpath(*path.split("/"), "current")

    def stage(self, version: int) -> FernetRing:
        ring = stage_ring(self.ring, self.ring.name, version, FernetGenerator().generate, T0)
        assert ring is not None
        self.publish(ring, RING)
        self.ring = ring
        return ring

    def issue(
        self, path: str, kind: str, version: int, previous: CredentialSet | None, grace: timedelta
    ) -> CredentialSet:
        generate = ApiTokenGenerator().generate if kind == "api_token" else WebhookSecretGenerator().generate
        cs = issue_credential(
            previous, name=f"bot-{kind}", kind=kind, version=version, generate=generate,  # type: ignore[arg-type]
            now=T0, valid_until=T0 + grace, ttl=None,
        )  # fmt: skip
        assert cs is not None
        self.publish(cs, path)
        return cs

    def signing(self) -> list[str]:
        """The secrets rotatord signs with right now (the document's current one)."""
        return [self.hook.current.value.reveal()]

    def views(self, ttl: float = 3600.0) -> tuple[Keyring, CountingReader, SigningSecrets, CountingReader]:
        ring_reader, hook_reader = self.reader(RING), self.reader(HOOK)
        keyring = Keyring(ring_reader, ttl=ttl, clock=self.clock, min_interval=3600)
        secrets = SigningSecrets(hook_reader, ttl=ttl, clock=self.clock, now=lambda: T0, min_interval=3600)
        return keyring, ring_reader, secrets, hook_reader


@pytest.fixture
def bot(tmp_path: Path) -> Bot:
    settings = FileBackendSettings(kind="file", directory=tmp_path / "store", master_key_file=tmp_path / "master.key")
    assert init_master_key(settings)
    backend = FileBackend("daemon", settings)
    ring = stage_ring(None, SECRET, 1, FernetGenerator().generate, T0)
    assert ring is not None
    made = Bot(settings, backend, Clock(), ring, None)  # type: ignore[arg-type]
    made.publish(ring, RING)
    made.hook = made.issue(HOOK, "webhook_secret", 1, None, timedelta(days=7))
    return made


def handler_for(bot: Bot, keyring: Keyring, secrets: SigningSecrets, **kwargs: Any) -> WebhookHandler:
    return WebhookHandler(secrets, {SECRET: keyring}, now=lambda: NOW, clock=bot.clock, **kwargs)


def test_key_staged_makes_the_keyring_see_the_new_key_before_acknowledging(bot: Bot) -> None:
    keyring, ring_reader, secrets, _ = bot.views()
    assert keyring.key_ids == ("v1",)
    bot.stage(2)
    assert keyring.key_ids == ("v1",)  # the cache alone would not see it for an hour
    seen_by_on_event: list[tuple[str, tuple[str, ...]]] = []
    handler = handler_for(bot, keyring, secrets, on_event=lambda e: seen_by_on_event.append((e.type, keyring.key_ids)))
    body = body_of("key.staged", version=2)
    headers = headers_for(body, bot.signing())
    assert handler.handle(body, headers) == 204
    assert keyring.key_ids == ("v1", "v2")
    assert seen_by_on_event == [("key.staged", ("v1", "v2"))]  # on_event runs after the re-read
    assert ring_reader.reads == 2

    # A redelivery of the same id: 200, no second read, no second on_event.
    assert handler.handle(body, headers) == 200
    assert ring_reader.reads == 2 and len(seen_by_on_event) == 1


def test_a_failing_reader_answers_503_and_the_retry_acts(bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    keyring, ring_reader, secrets, _ = bot.views()
    assert keyring.primary_id == "v1"
    ring = bot.stage(2)
    good = bot.pointer(RING).read_bytes()
    bot.pointer(RING).write_bytes(b"garbage\n")  # the backend now fails every read
    handler = handler_for(bot, keyring, secrets)
    body = body_of("key.staged", version=2)
    headers = headers_for(body, bot.signing())
    with caplog.at_level(logging.WARNING, logger="rotatord.client"):
        assert handler.handle(body, headers) == 503
    assert ring_reader.reads == 2 and keyring.key_ids == ("v1",)
    assert "answering 503" in caplog.text
    assert_no_material(materials(ring) | set(bot.signing()), texts=[caplog.text])

    bot.pointer(RING).write_bytes(good)
    assert handler.handle(body, headers) == 204  # not remembered as seen: rotatord's retry acts
    assert keyring.key_ids == ("v1", "v2")


def test_a_backend_behind_the_event_answers_503(bot: Bot) -> None:
    keyring, _, secrets, _ = bot.views()
    bot.stage(2)
    handler = handler_for(bot, keyring, secrets)
    body = body_of("key.staged", version=3)  # the document still says version 2
    headers = headers_for(body, bot.signing())
    assert handler.handle(body, headers) == 503
    bot.stage(3)
    assert handler.handle(body, headers) == 204
    assert keyring.key_ids == ("v1", "v2", "v3")


@pytest.mark.parametrize("event_type", ["key.promoted", "key.retired", "rotation.rolled_back"])
def test_every_key_event_rereads_the_ring(bot: Bot, event_type: str) -> None:
    keyring, ring_reader, secrets, _ = bot.views()
    assert keyring.key_ids == ("v1",)
    bot.stage(2)
    handler = handler_for(bot, keyring, secrets)
    body = body_of(event_type, version=2)
    assert handler.handle(body, headers_for(body, bot.signing())) == 204
    assert ring_reader.reads == 2 and keyring.key_ids == ("v1", "v2")


def test_a_rollback_rereads_without_waiting_for_its_version(bot: Bot) -> None:
    keyring, ring_reader, secrets, _ = bot.views()
    assert keyring.key_ids == ("v1",)
    handler = handler_for(bot, keyring, secrets)
    # Rotation 2 rolled back before it staged anything: the document stays at version 1.
    body = body_of("rotation.rolled_back", version=2)
    assert handler.handle(body, headers_for(body, bot.signing())) == 204
    assert ring_reader.reads == 2
    # A stage event for that version would wait for it (see the test above).
    staged = body_of("key.staged", version=2)
    assert handler.handle(staged, headers_for(staged, bot.signing())) == 503


def test_token_events_refresh_the_token_set(bot: Bot) -> None:
    _, _, secrets, _ = bot.views()
    v1 = bot.issue(API, "api_token", 1, None, timedelta(days=7))
    tokens = TokenSet(bot.reader(API), ttl=3600, clock=bot.clock, now=lambda: T0, min_interval=3600)
    assert tokens.verify(v1.current.value.reveal()) is TokenCheck.VALID
    v2 = bot.issue(API, "api_token", 2, v1, timedelta(days=7))
    assert tokens.verify(v2.current.value.reveal()) is TokenCheck.UNKNOWN  # cached, and too fresh to re-read
    handler = WebhookHandler(secrets, token_sets={"bot-api": tokens}, now=lambda: NOW, clock=bot.clock)
    body = body_of("token.issued", secret="bot-api", version=2)
    assert handler.handle(body, headers_for(body, bot.signing())) == 204
    assert tokens.verify(v2.current.value.reveal()) is TokenCheck.VALID


def test_a_rotated_signing_secret_is_reread_once_rate_limited(bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    keyring, _, secrets, hook_reader = bot.views()
    old = bot.signing()
    assert secrets.version == 1 and hook_reader.reads == 1
    # The signing secret rotates with no grace: rotatord now signs with the new one only.
    bot.hook = bot.issue(HOOK, "webhook_secret", 2, bot.hook, timedelta(0))
    handler = handler_for(bot, keyring, secrets, signing_secret="support-bot-webhook", refresh_interval=5)
    with caplog.at_level(logging.DEBUG, logger="rotatord.client"):
        body = body_of("rotation.failed", version=2)
        assert handler.handle(body, headers_for(body, bot.signing())) == 204
        assert hook_reader.reads == 2 and secrets.version == 2
        # Forged requests right after: refused without reading again, until refresh_interval passed.
        for _ in range(5):
            assert handler.handle(body, headers_for(body, old)) == 401
        assert hook_reader.reads == 2
        bot.clock.t += 5
        assert handler.handle(body, headers_for(body, old)) == 401
        assert hook_reader.reads == 3
        # Its own token.issued event re-reads the signing secrets, like a key event re-reads a ring.
        token_event = body_of("token.issued", secret="support-bot-webhook", version=2)
        assert handler.handle(token_event, headers_for(token_event, bot.signing())) == 204
        assert hook_reader.reads == 4
        # A stale timestamp is not a rotated secret: no read for it.
        bot.clock.t += 5
        assert handler.handle(body, headers_for(body, bot.signing(), at=NOW - 3600)) == 401
        assert hook_reader.reads == 4
    assert_no_material([*old, *bot.signing()], texts=[caplog.text])


def test_a_callable_secret_source_and_events_for_others(bot: Bot) -> None:
    keyring, ring_reader, _, _ = bot.views()
    assert keyring.primary_id == "v1"
    events: list[WebhookEvent] = []
    handler = WebhookHandler(bot.signing, {SECRET: keyring}, on_event=events.append, now=lambda: NOW)
    for body in (body_of("rotation.failed"), body_of("key.staged", secret="another-bot-db"), body_of("key.x")):
        assert handler.handle(body, headers_for(body, bot.signing())) == 204
    assert [e.type for e in events] == ["rotation.failed", "key.staged", "key.x"]
    assert ring_reader.reads == 1  # none of them was about a ring this bot holds
    forged = body_of("key.staged")
    assert handler.handle(forged, headers_for(forged, [whsec()])) == 401
    assert handler.handle(b"[]", headers_for(b"[]", bot.signing())) == 400  # verified, but not an event


def test_a_failing_on_event_answers_500_and_is_retried(bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    keyring, _, secrets, _ = bot.views()
    calls: list[str] = []

    def on_event(event: WebhookEvent) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise RuntimeError("the bot's own bug")

    handler = handler_for(bot, keyring, secrets, on_event=on_event)
    body = body_of("rotation.failed")
    headers = headers_for(body, bot.signing())
    with caplog.at_level(logging.ERROR, logger="rotatord.client"):
        assert handler.handle(body, headers) == 500
    assert "on_event failed" in caplog.text
    assert handler.handle(body, headers) == 204
    assert handler.handle(body, headers) == 200
    assert len(calls) == 2


def test_the_seen_ids_are_bounded_least_recently_used_first(bot: Bot) -> None:
    keyring, _, secrets, _ = bot.views()
    calls: list[str] = []
    handler = handler_for(bot, keyring, secrets, on_event=lambda e: calls.append(e.id), seen=2)
    sent = {}
    for name in ("a", "b", "c"):
        body = body_of("rotation.failed")
        sent[name] = (body, headers_for(body, bot.signing(), msg_id=f"msg_{name}"))
        assert handler.handle(*sent[name]) == 204
    assert handler.handle(*sent["c"]) == 200 and handler.handle(*sent["b"]) == 200
    assert handler.handle(*sent["a"]) == 204  # forgotten: acted on again
    assert calls == ["msg_a", "msg_b", "msg_c", "msg_a"]
    with pytest.raises(ValueError, match="seen"):
        WebhookHandler(secrets, seen=0)
    with pytest.raises(TypeError):
        WebhookHandler("whsec_x")  # type: ignore[arg-type]


def test_a_redelivery_while_the_first_is_in_progress_answers_409(bot: Bot) -> None:
    keyring, ring_reader, secrets, _ = bot.views()
    assert keyring.primary_id == "v1"
    bot.stage(2)
    handler = handler_for(bot, keyring, secrets)
    body = body_of("key.staged", version=2)
    headers = headers_for(body, bot.signing())
    ring_reader.gate.clear()  # the backend is slow
    ring_reader.entered.clear()
    first: list[int] = []
    worker = threading.Thread(target=lambda: first.append(handler.handle(body, headers)))
    worker.start()
    try:
        assert ring_reader.entered.wait(10)
        assert handler.handle(body, headers) == 409  # not acknowledged: rotatord retries later
    finally:
        ring_reader.gate.set()
        worker.join(10)
    assert first == [204]
    assert handler.handle(body, headers) == 200


# -- the example apps -------------------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wsgi_bot = load_example("wsgi_bot")
asgi_bot = load_example("asgi_bot")


@dataclass(frozen=True)
class Request:
    method: str
    body: bytes
    headers: Mapping[str, str]


def scenario(bot: Bot) -> list[tuple[str, Request, int]]:
    """The same requests for both apps, and what each must answer."""
    staged = body_of("key.staged", version=2)
    staged_headers = headers_for(staged, bot.signing(), msg_id="msg_staged")
    other = body_of("rotation.failed")
    return [
        ("key.staged", Request("POST", staged, staged_headers), 204),
        ("redelivery", Request("POST", staged, staged_headers), 200),
        ("tampered", Request("POST", staged.replace(b"staged", b"staged "), staged_headers), 401),
        ("unknown secret", Request("POST", other, headers_for(other, [whsec()])), 401),
        ("stale", Request("POST", other, headers_for(other, bot.signing(), at=NOW - 301)), 401),
        ("not an event", Request("POST", b"{}", headers_for(b"{}", bot.signing())), 400),
        ("GET", Request("GET", b"", {}), 405),
    ]


def post_urllib(url: str, request: Request) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = request.body if request.method == "POST" else None
    assert url.startswith("http://127.0.0.1:")
    req = urllib.request.Request(url, data=data, headers=dict(request.headers), method=request.method)  # noqa: S310
    try:
        with opener.open(req, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


def call_asgi(app: Any, request: Request, chunk: int = 7, *, announce: bool = True) -> int:
    """One request through the ASGI app, its body in small chunks, as a server would pass it."""

    async def run() -> list[dict[str, Any]]:
        pieces = [request.body[i : i + chunk] for i in range(0, len(request.body), chunk)] or [b""]
        messages = [
            {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1} for i, piece in enumerate(pieces)
        ]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        if announce:
            headers.append((b"content-length", str(len(request.body)).encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
                 "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"", "headers": headers}  # fmt: skip
        await app(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return int(sent[0]["status"])


@pytest.fixture
def wsgi_server(bot: Bot) -> Iterator[tuple[str, Keyring]]:
    keyring, _, secrets, _ = bot.views()
    server = wsgi_bot.make_server(wsgi_bot.make_app(handler_for(bot, keyring, secrets)), "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/", keyring
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_wsgi_and_asgi_apps_answer_the_same_statuses(bot: Bot, wsgi_server: tuple[str, Keyring]) -> None:
    url, wsgi_keyring = wsgi_server
    assert wsgi_keyring.key_ids == ("v1",)
    keyring, _, secrets, _ = bot.views()
    assert keyring.key_ids == ("v1",)
    asgi_app = asgi_bot.make_app(handler_for(bot, keyring, secrets))
    bot.stage(2)
    cases = scenario(bot)
    expected = [status for _, _, status in cases]
    assert [post_urllib(url, request) for _, request, _ in cases] == expected
    assert [call_asgi(asgi_app, request) for _, request, _ in cases] == expected
    assert wsgi_keyring.key_ids == ("v1", "v2") and keyring.key_ids == ("v1", "v2")


def test_both_apps_refuse_bodies_over_64_kib_without_reading_them(bot: Bot, wsgi_server: tuple[str, Keyring]) -> None:
    url, _ = wsgi_server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # Only the headers are sent: the app must answer from Content-Length alone.
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", str(64 * 1024 + 1))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    big = Request("POST", b"x" * (64 * 1024 + 1), headers_for(b"", bot.signing()))
    keyring, _, secrets, _ = bot.views()
    app = asgi_bot.make_app(handler_for(bot, keyring, secrets))
    assert call_asgi(app, big, chunk=4096) == 413  # refused from content-length
    assert call_asgi(app, big, chunk=4096, announce=False) == 413  # refused while reading
    exact = body_of("rotation.failed")
    assert call_asgi(app, Request("POST", exact, headers_for(exact, bot.signing())), chunk=1) == 204


def test_the_asgi_app_speaks_lifespan() -> None:
    app = asgi_bot.make_app(WebhookHandler(lambda: [whsec()]))

    async def run() -> list[str]:
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
        return sent

    assert asyncio.run(run()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize("name", ["wsgi_bot", "asgi_bot"])
def test_the_examples_document_their_arguments(name: str) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / f"{name}.py"), "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in (
        "--port",
        "--backend",
        "--directory",
        "--master-key-file",
        "--address",
        "--signing-secret",
        "--keyring",
    ):
        assert flag in out.stdout


def test_the_wsgi_example_runs_as_a_process(bot: Bot) -> None:
    assert bot.settings.master_key_file is not None
    args = [
        sys.executable, str(REPO / "examples" / "wsgi_bot.py"), "--port", "0",
        "--directory", str(bot.settings.directory), "--master-key-file", str(bot.settings.master_key_file),
        "--signing-secret", HOOK, "--keyring", f"{SECRET}={RING}",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(30, proc.kill)  # a hung example fails the test instead of hanging it
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on http://127.0.0.1:"), proc.stderr.read() if proc.stderr else ""
        url = first.split()[-1]
        bot.stage(2)
        now = int(datetime.now(UTC).timestamp())  # the process uses the real wall clock
        body = body_of("key.staged", version=2)
        assert post_urllib(url, Request("POST", body, headers_for(body, bot.signing(), at=now))) == 204
        assert proc.stdout.readline().strip() == f"key.staged {SECRET} version 2; keys v1,v2"
    finally:
        watchdog.cancel()
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert_no_material(materials(bot.ring) | set(bot.signing()), texts=[out, err])


def test_secrets_never_reach_a_repr() -> None:
    secret = whsec()
    handler = WebhookHandler(lambda: [secret])
    body = body_of()
    event = verify_webhook(body, headers_for(body, [secret]), [secret], now=NOW)
    assert_no_material([secret, secret.removeprefix("whsec_")], texts=[repr(handler), repr(event), str(event)])


def test_sign_and_verify_agree_on_many_secrets() -> None:
    secrets = [whsec() for _ in range(3)]
    body, msg_id = body_of(), new_id()
    header = sign(msg_id, NOW, body, secrets)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(NOW), "webhook-signature": header}
    for secret in secrets:
        assert verify_webhook(body, headers, [whsec(), secret], now=NOW).id == msg_id
