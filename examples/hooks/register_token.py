#!/usr/bin/env python3
"""rotatord hook: register each new API token with an upstream service, revoke the old one there.

Configure it on an api_token secret, with the material on stdin (nowhere else):

    [[secrets.hooks]]
    command = ["/usr/local/lib/rotatord/register_token.py"]
    phases = ["issued", "revoked"]
    with_secret = true
    on_failure = "block"        # the old token is not revoked here before upstream knows the new one
    env = { REGISTRY_URL = "https://api.upstream.example/v1", REGISTRY_TOKEN_FILE = "/etc/rotatord/upstream-admin" }

At ``issued`` it POSTs ``{"id", "name", "token"}`` to ``$REGISTRY_URL/tokens``: the new token
(valid at once; the previous one stays valid for the grace period).  At ``revoked`` the previous
token has stopped being valid on rotatord's side, and it POSTs to ``$REGISTRY_URL/tokens/<id>/revoke``.
The admin credential for the upstream API is read from a file, never from the configuration.
Exit status: 0 done, 1 the upstream refused or could not be reached (rotatord retries or holds
per ``on_failure``).  Standard library only; adapt the two requests to your upstream's API.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT = 20


def call(url: str, body: dict[str, str], admin_token: str) -> None:
    request = urllib.request.Request(  # noqa: S310 - an http(s) URL from the operator (checked)
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
        response.read()


def main() -> int:
    event = json.load(sys.stdin)
    base = os.environ["REGISTRY_URL"].rstrip("/")
    if not base.startswith(("https://", "http://")):
        print("REGISTRY_URL must be an http(s) URL", file=sys.stderr)
        return 1
    with open(os.environ["REGISTRY_TOKEN_FILE"], encoding="utf-8") as f:
        admin_token = f.read().strip()
    try:
        if event["phase"] == "issued":
            current = event["material"]["current"]  # present because the hook has with_secret = true
            body = {"id": current["id"], "name": event["secret"], "token": current["value"]}
            call(f"{base}/tokens", body, admin_token)
            print(f"registered token {current['id']} of {event['secret']}")
        elif event["phase"] == "revoked":
            old = event["detail"].get("revoked") or event.get("previous_key_id")
            if not old:
                print("nothing to revoke: the rotation that created the secret has no previous token")
                return 0
            call(f"{base}/tokens/{old}/revoke", {"id": old, "name": event["secret"]}, admin_token)
            print(f"revoked token {old} of {event['secret']}")
    except urllib.error.HTTPError as exc:
        # Never print the request: it holds the token.  The status says enough.
        print(f"upstream answered {exc.code} for {exc.url}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"upstream unreachable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
