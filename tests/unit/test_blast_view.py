"""The human rendering of the blast-radius report: each state says what it means."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rotatord.cli.blast_view import render

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def report(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "secret": "bot-db", "kind": "fernet", "version": 8, "reason": "INC-1: leaked", "trigger": "cli",
        "compromised_key": "v7", "new_key": "v8", "phase": "promoted", "next_step": "reencrypt",
        "state": "in progress", "error": None, "opened_at": "2026-01-05T11:59:00.000Z", "retired_at": None,
        "revoked_at": None, "remaining": 40, "unacknowledged": ["billing"],
        "stores": [{"store": "bot-db.stores[0]:sql:msgs(body)", "exposed": 100, "remaining": 40, "estimated": True,
                    "rewritten": 60, "unreadable": 1, "quarantined": 1}],
        "consumers": [
            {"consumer": "support", "acknowledged": True, "delivery": "delivered", "attempts": 1, "last_error": None},
            {"consumer": "billing", "acknowledged": False, "delivery": "pending", "attempts": 3,
             "last_error": "HTTP 500"},
        ],
    }  # fmt: skip
    base.update(overrides)
    return base


def test_in_progress_shows_the_step_the_estimate_and_who_did_not_acknowledge() -> None:
    text = render(report(), NOW)
    lines = text.splitlines()
    assert lines[0] == "EMERGENCY rotation 8 of bot-db: in progress, phase promoted (now: reencrypt)"
    assert "declared 1m ago by cli" in lines[1]
    assert lines[2] == "  compromised key: v7; new key: v8"
    assert "STILL UNDER v7" in lines[3]
    assert lines[4].split()[1:] == ["100", "~40", "60", "1", "1"]
    billing = next(line for line in lines if line.split()[0] == "billing")
    assert billing.split() == ["billing", "NO", "pending,", "3", "attempt(s)", "HTTP", "500"]
    assert "v7 is still valid (decrypt-only until the census is clean); 40 item(s) still under it" in text
    assert "not acknowledged: billing" in text


def test_done_says_when_the_key_was_retired() -> None:
    text = render(report(state="done", phase="retired", next_step=None, retired_at="2026-01-05T12:00:00.000Z",
                         remaining=0, unacknowledged=[]), NOW)  # fmt: skip
    assert "v7 retired at 2026-01-05T12:00:00.000Z: the census found nothing that needs it" in text
    assert "not acknowledged" not in text


def test_token_revoked_failing_and_rolled_back() -> None:
    token = render(report(kind="api_token", stores=[], revoked_at="2026-01-05T12:00:00.000Z", state="done"), NOW)
    assert "compromised token: v7; new token: v8" in token
    assert "old token v7 revoked at 2026-01-05T12:00:00.000Z: it no longer verifies" in token
    failing = render(report(state="failing", error="reencrypt: store down"), NOW)
    assert "failing: reencrypt: store down (retried automatically)" in failing
    back = render(report(state="rolled back", next_step=None), NOW)
    assert "rolled back: v7 is the primary again, although it was reported compromised" in back
    new = render(report(compromised_key=None, stores=[], consumers=[], unacknowledged=[]), NOW)
    assert "compromised key: none (the secret did not exist yet)" in new
