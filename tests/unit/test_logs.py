"""JSON log lines, and redaction of every kind of key material wherever it appears in them."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import string
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from rotatord.logs import NOISY_LOGGERS, JsonFormatter, json_safe, redact_text, setup_logging
from rotatord.sensitive import MASK, Sensitive

BASE62 = string.digits + string.ascii_letters


def fernet_key() -> str:
    return Fernet.generate_key().decode()


def api_token(prefix: str = "rtd") -> str:
    return f"{prefix}_" + "".join(secrets.choice(BASE62) for _ in range(49))


def whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def stream(log_stream: io.StringIO) -> io.StringIO:
    """Logging configured onto a StringIO (tests/conftest.py restores the root logger after)."""
    return log_stream


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_one_json_object_per_line_with_core_fields(stream: io.StringIO) -> None:
    logging.getLogger("rotatord.test").info("staged %s at version %d", "support-bot-db", 7)
    logging.getLogger("rotatord.other").warning("second line")
    first, second = lines(stream)
    assert first["msg"] == "staged support-bot-db at version 7"
    assert first["level"] == "info"
    assert first["logger"] == "rotatord.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["ts"]))
    assert second["level"] == "warning"
    assert "exc" not in first


def test_extras_are_present_and_json_safe(stream: io.StringIO) -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    logging.getLogger("rotatord.test").info(
        "rotated",
        extra={
            "secret": "support-bot-db",
            "version": 3,
            "path": Path("/var/lib/rotatord/x"),
            "when": when,
            "tags": ("a", "b"),
            "ratio": float("nan"),
            "ts": "caller's own ts",
        },
    )
    (line,) = lines(stream)
    assert line["secret"] == "support-bot-db"
    assert line["version"] == 3
    assert line["path"] == "/var/lib/rotatord/x"
    assert line["when"] == "2025-01-02T03:04:05.678Z"
    assert line["tags"] == ["a", "b"]
    assert line["ratio"] == "nan"
    # A colliding extra neither replaces the core field nor is dropped.
    assert line["ts"] != "caller's own ts"
    assert line["extra_ts"] == "caller's own ts"


def material() -> dict[str, str]:
    return {
        "sensitive": Sensitive("hunter2-" + secrets.token_hex(12)).reveal(),
        "fernet": fernet_key(),
        "token": api_token(),
        "whsec": whsec(),
    }


def assert_clean(text: str, values: dict[str, str]) -> None:
    for kind, value in values.items():
        assert value not in text, f"{kind} material leaked"


def test_material_in_message_is_redacted(stream: io.StringIO) -> None:
    values = material()
    logging.getLogger("rotatord.test").info("values: %s", " ".join(values.values()))
    assert_clean(stream.getvalue(), values)
    (line,) = lines(stream)
    assert line["msg"] == "values: " + " ".join([MASK] * len(values))


def test_material_in_extras_is_redacted(stream: io.StringIO) -> None:
    values = material()
    logging.getLogger("rotatord.test").info(
        "extras", extra={"flat": values["fernet"], "nested": {"k": [values["token"], values["whsec"]]}, **values}
    )
    assert_clean(stream.getvalue(), values)
    (line,) = lines(stream)
    assert line["flat"] == MASK
    assert line["nested"] == {"k": [MASK, MASK]}


def test_material_in_a_traceback_is_redacted(stream: io.StringIO) -> None:
    values = material()
    try:
        raise ValueError("bad material:\n" + "\n".join(values.values()))
    except ValueError:
        logging.getLogger("rotatord.test").exception("failed for %r", list(values.values()))
    assert_clean(stream.getvalue(), values)
    (line,) = lines(stream)
    assert "Traceback" in str(line["exc"])
    assert "ValueError: bad material:" in str(line["exc"])
    assert str(line["exc"]).count(MASK) == len(values)


def test_material_after_escape_sequences_is_redacted_and_json_stays_valid() -> None:
    key, token = fernet_key(), api_token()
    for text in (f"a\n{key}\t{token}", f"\x1b{token}\x1b{key}", f"\\{token} \\\\{key}", f"é{token}é{key}"):
        for serialised in (json.dumps(text), json.dumps(text, ensure_ascii=False), repr(text)):
            redacted = redact_text(serialised)
            assert key not in redacted
            assert token not in redacted
            if not serialised.startswith("'"):
                assert json.loads(redacted).count(MASK) == 2


def test_every_generated_fernet_key_is_recognised() -> None:
    for _ in range(500):
        key = fernet_key()
        assert redact_text(f"key={key};") == f"key={MASK};"


def test_token_glued_to_an_underscore_word_is_redacted() -> None:
    token = api_token("sk2")
    assert token not in redact_text(f"bearer_token_{token}")


def test_ordinary_text_survives_untouched() -> None:
    fernet_token = Fernet(Fernet.generate_key()).encrypt(b"a stored datum").decode()
    texts = [
        "The quick brown fox rotated support-bot-db to version 7 and told 3 consumers, as planned.",
        "Supercalifragilisticexpialidociousnessesxyz=",  # 44 characters, but no Fernet key
        "sha256=" + "ab" * 32,
        "id=2b1f6c3e-8f0a-4c7d-9e61-0d5a4b3c2e1f",
        f"stored datum: {fernet_token}",
        "path bots/support-bot/db-key via vault_backend_primary at 2025-01-01T03:00:00.000Z",
        "whsec_ without a secret",
        repr(Sensitive("a-value-to-hide")),
    ]
    for text in texts:
        assert redact_text(text) == text


def test_sensitive_repr_stays_as_is(stream: io.StringIO) -> None:
    secret = Sensitive(fernet_key())
    logging.getLogger("rotatord.test").info("holding %r", secret, extra={"value": secret})
    (line,) = lines(stream)
    assert line["msg"] == f"holding Sensitive({MASK!r})"
    assert line["value"] == f"Sensitive({MASK!r})"


def test_bad_format_arguments_still_log_redacted_without_stderr_leak(
    stream: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    key = fernet_key()
    # Only our handler: pytest's own capture handler would raise on the bad format first.
    (ours,) = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    log = logging.getLogger("rotatord.test.badformat")
    log.propagate = False
    log.addHandler(ours)
    try:
        log.info("two %s %s", key)  # noqa: PLE1206 - the mismatch is the point
    finally:
        log.removeHandler(ours)
        log.propagate = True
    (line,) = lines(stream)
    assert "did not match" in str(line["msg"])
    assert key not in stream.getvalue()
    assert key not in capsys.readouterr().err


def test_setup_is_idempotent_and_changes_level(stream: io.StringIO) -> None:
    log = logging.getLogger("rotatord.test")
    setup_logging("warning", stream=stream)
    setup_logging("WARNING", stream=stream)
    assert len(logging.getLogger().handlers) == 1
    log.info("hidden")
    log.warning("shown")
    assert [line["msg"] for line in lines(stream)] == ["shown"]
    setup_logging("debug", stream=stream)
    log.debug("now shown")
    assert [line["msg"] for line in lines(stream)] == ["shown", "now shown"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="loud"):
        setup_logging("loud", stream=io.StringIO())


def test_noisy_third_party_loggers_are_quiet(stream: io.StringIO) -> None:
    logging.getLogger("apscheduler.scheduler").info("Added job")
    logging.getLogger("urllib3.connectionpool").debug("Starting new HTTPS connection")
    logging.getLogger("botocore.credentials").warning("credentials expire soon")
    assert [line["logger"] for line in lines(stream)] == ["botocore.credentials"]
    for name in NOISY_LOGGERS:
        assert logging.getLogger(name).level == logging.WARNING


def test_records_propagated_from_children_respect_the_configured_level(stream: io.StringIO) -> None:
    setup_logging("error", stream=stream)
    logging.getLogger("hvac.adapters").warning("retrying")
    logging.getLogger("rotatord.child").warning("below error")
    assert stream.getvalue() == ""


def test_json_safe_masks_keys_and_falls_back_to_str() -> None:
    key = fernet_key()

    class Opaque:
        def __str__(self) -> str:
            return f"opaque({key})"

    assert json_safe({key: Opaque(), "n": 1, "b": True, "none": None}) == {
        MASK: f"opaque({MASK})",
        "n": 1,
        "b": True,
        "none": None,
    }
