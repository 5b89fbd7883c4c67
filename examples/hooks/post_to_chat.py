#!/usr/bin/env python3
"""rotatord hook: post one line per lifecycle phase to a chat channel's incoming webhook.

Slack, Mattermost and Rocket.Chat incoming webhooks all take ``{"text": ...}``.  The message
names the secret, the phase, the version and the key ids, never material (this hook runs
without ``with_secret``, so it never has any).  The webhook URL is a credential of its own: it
is read from a 0600 file, not written in the configuration.

    [[hooks]]
    command = ["/usr/local/lib/rotatord/post_to_chat.py"]
    phases = ["promoted", "retired", "failed", "drift"]
    env = { CHAT_WEBHOOK_URL_FILE = "/etc/rotatord/chat-webhook.url" }

Exit status: 0 posted, 1 the chat service refused or could not be reached.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT = 10


def message(event: dict[str, object]) -> str:
    detail = event.get("detail") or {}
    assert isinstance(detail, dict)
    name, phase, version = event["secret"], event["phase"], event["version"]
    if phase == "failed":
        return f":warning: rotation {version} of {name} failed at {detail.get('step')}: {detail.get('error')}"
    if phase == "drift":
        return f":rotating_light: {name} changed outside rotatord ({json.dumps(detail, sort_keys=True)})"
    keys = f" (key {event.get('key_id')}, previous {event.get('previous_key_id') or '-'})"
    extra = " [emergency]" if event.get("emergency") else ""
    return f"{name}: rotation {version} {phase}{keys}{extra}"


def main() -> int:
    event = json.load(sys.stdin)
    with open(os.environ["CHAT_WEBHOOK_URL_FILE"], encoding="utf-8") as f:
        url = f.read().strip()
    body = json.dumps({"text": message(event)}).encode()
    if not url.startswith(("https://", "http://")):
        print("CHAT_WEBHOOK_URL_FILE must hold an http(s) URL", file=sys.stderr)
        return 1
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)  # noqa: S310 - checked above
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            response.read()
    except urllib.error.HTTPError as exc:
        print(f"chat webhook answered {exc.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"chat webhook unreachable: {exc.__class__.__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
