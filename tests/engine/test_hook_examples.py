"""The shipped hook examples, run by the real engine against real HTTP receivers.

``register_token.py`` registers each new token upstream and revokes the old one there (the one
hook meant to carry material, on stdin); ``post_to_chat.py`` posts a line per phase that holds
no material.  ``reload_consumer.sh`` needs systemd, which the tests do not have: it is checked
for syntax only.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rotatord.config.model import HookSettings
from tests.engine.conftest import (
    EVERY,
    FERNET,
    GRACE,
    PROPAGATION,
    T0,
    TOKEN,
    HarnessFactory,
    fernet_secret,
    materials,
    token_secret,
)
from tests.helpers import REPO, assert_no_material
from tests.servers.receivers import ReceiverServer, receiver_server

EXAMPLES = REPO / "examples" / "hooks"


@pytest.fixture
def server() -> Iterator[ReceiverServer]:
    with receiver_server() as running:
        yield running


def private_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_register_token_registers_each_new_token_and_revokes_the_old_one(
    make_harness: HarnessFactory, server: ReceiverServer, tmp_path: Path
) -> None:
    base = server.url("v1")
    server.endpoint("v1/tokens")
    server.endpoint("v1/tokens/v1/revoke")
    admin = private_file(tmp_path, "upstream-admin", "upstream-admin-credential")
    register = HookSettings(
        command=(str(EXAMPLES / "register_token.py"),),
        phases=("issued", "revoked"),
        with_secret=True,
        on_failure="block",
        env={"REGISTRY_URL": base, "REGISTRY_TOKEN_FILE": str(admin)},
    )
    h = make_harness(token_secret(hooks=(register,)))
    rt = h.build()
    rt.engine.tick(TOKEN, T0)
    first = h.credentials()
    revoke_at = rt.engine.tick(TOKEN, T0 + EVERY)
    second = h.credentials()
    assert revoke_at == T0 + EVERY + GRACE
    assert rt.engine.tick(TOKEN, revoke_at) == T0 + 2 * EVERY

    registered = [json.loads(r.body) for r in server.requests("v1/tokens")]
    assert registered == [
        {"id": "v1", "name": TOKEN, "token": first.current.value.reveal()},
        {"id": "v2", "name": TOKEN, "token": second.current.value.reveal()},
    ]
    (revoked,) = server.requests("v1/tokens/v1/revoke")
    assert json.loads(revoked.body) == {"id": "v1", "name": TOKEN}
    assert {r.headers.get("authorization") for r in server.all_requests()} == {"Bearer upstream-admin-credential"}
    rows = h.sql("SELECT phase, state FROM hook_runs ORDER BY id")
    assert rows == [("issued", "done"), ("revoked", "done"), ("issued", "done"), ("revoked", "done")]
    seen = materials(first) | materials(second)
    assert_no_material(seen, files=[rt.audit.path], texts=[revoked.body.decode()])


def test_register_token_failing_upstream_holds_the_rotation(
    make_harness: HarnessFactory, server: ReceiverServer, tmp_path: Path
) -> None:
    admin = private_file(tmp_path, "upstream-admin", "upstream-admin-credential")
    register = HookSettings(
        command=(str(EXAMPLES / "register_token.py"),),
        phases=("issued", "revoked"),
        with_secret=True,
        on_failure="block",
        env={"REGISTRY_URL": server.url("missing"), "REGISTRY_TOKEN_FILE": str(admin)},
    )
    h = make_harness(token_secret(hooks=(register,)))
    rt = h.build()
    rt.engine.tick(TOKEN, T0)
    rot = rt.journal.active(TOKEN)
    assert rot is not None and rot.phase == "issued"  # not revoked-and-done: held
    assert rot.error is not None and rot.error.startswith(f"held by hook {TOKEN}.hooks[0] after issued: exited")


def test_post_to_chat_posts_each_phase_without_material(
    make_harness: HarnessFactory, server: ReceiverServer, tmp_path: Path
) -> None:
    url_file = private_file(tmp_path, "chat-webhook.url", server.endpoint("chat"))
    chat = HookSettings(
        command=(str(EXAMPLES / "post_to_chat.py"),),
        phases=("promoted", "retired"),
        env={"CHAT_WEBHOOK_URL_FILE": str(url_file)},
    )
    h = make_harness(fernet_secret(), token_secret())
    h.settings = h.settings.model_copy(update={"hooks": (chat,)})
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    rt.engine.tick(TOKEN, T0)
    rt.engine.tick(FERNET, T0 + EVERY)
    rt.engine.tick(FERNET, T0 + EVERY + PROPAGATION)
    texts = [json.loads(r.body)["text"] for r in server.requests("chat")]
    assert texts == [
        f"{FERNET}: rotation 1 promoted (key v1, previous -)",
        f"{FERNET}: rotation 1 retired (key v1, previous -)",
        f"{TOKEN}: rotation 1 issued (key v1, previous -)",
        f"{TOKEN}: rotation 1 revoked (key v1, previous -)",
        f"{FERNET}: rotation 2 promoted (key v2, previous v1)",
    ]
    assert_no_material(materials(h.doc(FERNET)) | materials(h.doc(TOKEN)), texts=texts)


def test_reload_consumer_is_valid_posix_sh() -> None:
    result = subprocess.run(["/bin/sh", "-n", str(EXAMPLES / "reload_consumer.sh")], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (EXAMPLES / "reload_consumer.sh").stat().st_mode & 0o777 == 0o755
