"""The scan's finder (shapes in raw bytes) and index (managed material by keyed digest).

The index is built from a real file backend holding several versions of each kind of secret.
"""

from __future__ import annotations

import base64
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.fernet import Fernet

from rotatord.backends.file import FileBackend, init_master_key
from rotatord.config.model import FileBackendSettings, SecretSettings
from rotatord.crypto.generators import WebhookSecretGenerator
from rotatord.crypto.tokens import fingerprint, make_token
from rotatord.document import Credential, CredentialSet, sha256_hex
from rotatord.errors import BackendUnavailable
from rotatord.interfaces import Backend
from rotatord.scan.finder import find_candidates
from rotatord.scan.index import build_index
from rotatord.sensitive import Sensitive
from tests.helpers import assert_no_material

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_tokens_are_found_where_they_sit_and_only_with_a_valid_checksum() -> None:
    token = make_token("demo").reveal()
    other = make_token("rtd").reveal()
    broken = token[:-1] + ("x" if token[-1] != "x" else "y")
    data = (
        f"line one\nBearer {token}\n"  # line 2
        f"glued:abc{other} and url=x%3D{token}\n"  # line 3: two, both glued to other text
        f"broken {broken}\n"  # line 4: same shape, wrong checksum
        f"too long {token}Z\n"  # line 5: glued on the right: not a token
    ).encode()
    found = find_candidates(data)
    assert [(c.kind, c.line, c.prefix, c.fingerprint) for c in found] == [
        ("api_token", 2, "demo", fingerprint(token)),
        ("api_token", 3, "rtd", fingerprint(other)),
        ("api_token", 3, "demo", fingerprint(token)),
    ]
    assert_no_material([token, other], texts=[repr(found)])


def test_key_shapes_in_binary_data() -> None:
    key = Fernet.generate_key().decode()
    whsec = WebhookSecretGenerator().generate().reveal()
    junk = bytes(b for b in os.urandom(500) if b != ord("\n"))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    noncanonical = key[:42] + alphabet[alphabet.index(key[42]) | 1] + "="  # stray low bits: not a key
    data = junk + b"\0" + key.encode() + b"\n" + f"SECRET={whsec}\n{noncanonical}\n".encode() + junk
    found = find_candidates(data)
    assert [(c.kind, c.line) for c in found] == [("fernet", 1), ("webhook_secret", 2)]
    assert found[0].material == key and found[1].material == whsec


def _store(tmp_path: Path) -> tuple[FileBackend, FileBackendSettings]:
    settings = FileBackendSettings(kind="file", directory=tmp_path / "s", master_key_file=tmp_path / "mk")
    assert init_master_key(settings)
    return FileBackend("local", settings), settings


def _secret(name: str, kind: str, path: str) -> SecretSettings:
    return SecretSettings(name=name, kind=kind, backend="local", path=path, every=timedelta(days=1))  # type: ignore[arg-type]


def _cred(n: int, value: str, **times: datetime) -> Credential:
    return Credential(f"v{n}", Sensitive(value), sha256_hex(value), NOW - timedelta(days=3), **times)


def test_the_index_places_webhook_secrets_and_expired_tokens(tmp_path: Path) -> None:
    backend, _settings = _store(tmp_path)
    w1, w2, w3 = (WebhookSecretGenerator().generate().reveal() for _ in range(3))
    t1, t2 = make_token("rtd").reveal(), make_token("rtd").reveal()
    hooks = [
        CredentialSet("hooks", "webhook_secret", 1, _cred(1, w1), NOW),
        CredentialSet("hooks", "webhook_secret", 2, _cred(2, w2), NOW, previous=_cred(1, w1)),
        CredentialSet("hooks", "webhook_secret", 3, _cred(3, w3), NOW, previous=_cred(2, w2)),
    ]
    expected: str | None = None
    for n, doc in enumerate(hooks, 1):
        expected = backend.write("hooks", doc, expected=expected, request_id=f"h{n}")
    tokens = CredentialSet(
        "api", "api_token", 2, _cred(2, t2, expires_at=NOW - timedelta(days=1)), NOW,
        previous=_cred(1, t1, valid_until=NOW + timedelta(hours=1)),
    )  # fmt: skip
    backend.write("api", tokens, expected=None, request_id="a1")
    index = build_index(
        [_secret("hooks", "webhook_secret", "hooks"), _secret("api", "api_token", "api")], lambda _n: backend, NOW
    )
    assert index.problems == [] and index.secrets_indexed == 2

    def place(value: str) -> tuple[str, str, str] | None:
        known = index.lookup(value)
        return None if known is None else (known.secret, known.credential, known.state)

    assert place(w3) == ("hooks", "v3", "valid")
    assert place(w2) == ("hooks", "v2", "accepted")
    assert place(w1) == ("hooks", "v1", "revoked")  # only older versions hold it
    assert place(t2) == ("api", "v2", "expired")
    assert place(t1) == ("api", "v1", "accepted")
    assert place(WebhookSecretGenerator().generate().reveal()) is None
    assert place("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()) is None


class _Down(Backend):
    kind = "file"

    def read(self, path: str) -> None:
        raise BackendUnavailable("backend 'vault': connection refused")

    def write(self, *args: object, **kwargs: object) -> str:
        raise AssertionError("a scan never writes")

    def history(self, path: str) -> list[object]:  # type: ignore[override]
        return []

    def observe(self, path: str) -> None:
        raise BackendUnavailable("backend 'vault': connection refused")


def test_an_unreachable_backend_is_a_problem_not_a_crash() -> None:
    key = Fernet.generate_key().decode()
    index = build_index([_secret("db", "fernet", "db")], lambda _n: _Down(), NOW)
    assert index.secrets_indexed == 0 and len(index.problems) == 1
    assert "secret 'db'" in index.problems[0] and "connection refused" in index.problems[0]
    assert index.lookup(key) is None
