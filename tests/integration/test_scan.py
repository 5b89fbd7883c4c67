"""``rotatord scan``: planted tokens and keys are found and placed; look-alikes are not.

Documents are written to the real file backend as three rotations would leave them, then a
temporary tree gets copies of current, previous and retired material, plus random base64 of the
same shape, a token with a broken checksum and a symlink to material outside the tree.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.fernet import Fernet

from rotatord.backends.file import FileBackend
from rotatord.config import load_settings
from rotatord.crypto.tokens import fingerprint, make_token
from rotatord.document import Credential, CredentialSet, Document, FernetKey, FernetRing, Revoked, sha256_hex
from rotatord.sensitive import Sensitive
from tests.helpers import assert_no_material, cli

NOW = datetime.now(UTC)
DB_PATH = "bots/demo-bot/db-key"
API_PATH = "bots/demo-bot/api-token"


def _write_versions(config: Path, path: str, docs: list[Document]) -> None:
    settings = load_settings(config)
    backend = FileBackend("local", settings.backends["local"])
    expected = None
    for n, doc in enumerate(docs, start=1):
        expected = backend.write(path, doc, expected=expected, request_id=f"test-{n}")


def _cred(n: int, token: str, *, valid_until: datetime | None = None) -> Credential:
    return Credential(f"v{n}", Sensitive(token), sha256_hex(token), NOW - timedelta(hours=4 - n), None, valid_until)


def _plant(config: Path) -> dict[str, str]:
    """Three versions of each demo secret; returns the material by role (never printed)."""
    t = {f"token{n}": make_token("demo").reveal() for n in (1, 2, 3, 4)}
    k = {f"key{n}": Fernet.generate_key().decode() for n in (1, 2, 3)}
    api = [
        CredentialSet("demo-bot-api", "api_token", 1, _cred(1, t["token1"]), NOW),
        CredentialSet(
            "demo-bot-api", "api_token", 2, _cred(2, t["token2"]), NOW,
            previous=_cred(1, t["token1"], valid_until=NOW - timedelta(hours=1)),
        ),
        # token1 is only a revoked hash now; token2 is previous and still accepted for an hour.
        CredentialSet(
            "demo-bot-api", "api_token", 3, _cred(3, t["token3"]), NOW,
            previous=_cred(2, t["token2"], valid_until=NOW + timedelta(hours=1)),
            revoked=(Revoked("v1", sha256_hex(t["token1"]), NOW),),
        ),
    ]  # fmt: skip

    def key(n: int, state: str) -> FernetKey:
        return FernetKey(f"v{n}", Sensitive(k[f"key{n}"]), state, NOW - timedelta(hours=4 - n))  # type: ignore[arg-type]

    ring = [
        FernetRing("demo-bot-db", 1, "v1", (key(1, "primary"),), NOW),
        FernetRing("demo-bot-db", 2, "v2", (key(1, "decrypt_only"), key(2, "primary")), NOW),
        # key1 was retired (only older versions hold it); key3 is staged decrypt-only.
        FernetRing("demo-bot-db", 3, "v2", (key(2, "primary"), key(3, "decrypt_only")), NOW),
    ]
    _write_versions(config, API_PATH, list(api))
    _write_versions(config, DB_PATH, list(ring))
    return {**t, **k}


def _tree(root: Path, m: dict[str, str]) -> dict[str, str]:
    """The planted files; returns the look-alikes too (for the leak scan)."""
    random_key = Fernet.generate_key().decode()
    good = make_token("demo").reveal()
    broken = good[:-1] + ("A" if good[-1] != "A" else "B")  # same shape, checksum no longer matches
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "app.log").write_text(
        "starting\n"
        f"auth ok token={m['token3']}\n"
        f"Authorization: Bearer {m['token2']}\n"
        f'{{"presented": "{m["token1"]}"}}\n'
        f"x=3Ddemo_ignored and glued: abc{m['token3']}\n"
    )
    (root / "repo").mkdir()
    (root / "repo" / ".env").write_text(f"FERNET_KEY={m['key2']}\nOLD_KEYS={m['key3']},{random_key}\n")
    junk = bytes(b for b in os.urandom(600) if b != ord("\n"))  # binary, on one "line"
    (root / "repo" / "core.dump").write_bytes(junk + b"\0" + m["key1"].encode() + b"\0" + junk)
    (root / "noise.txt").write_text(f"random {random_key}\nbroken {broken}\nunknown {m['token4']}\n")
    outside = root.parent / "outside.txt"
    outside.write_text(f"{m['token3']}\n")
    (root / "repo" / "link.txt").symlink_to(outside)
    return {"random_key": random_key, "broken": broken}


def test_scan_finds_and_places_planted_material(config: Path, tmp_path: Path) -> None:
    m = _plant(config)
    root = tmp_path / "leak"
    extra = _tree(root, m)
    values = [*m.values(), *extra.values()]

    result = cli(config, "scan", str(root), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    found = {
        (Path(f["path"]).relative_to(root).as_posix(), f["line"], f["kind"], f["secret"], f["credential"], f["state"])
        for f in report["findings"]
    }
    assert found == {
        ("logs/app.log", 2, "api_token", "demo-bot-api", "v3", "valid"),
        ("logs/app.log", 3, "api_token", "demo-bot-api", "v2", "accepted"),
        ("logs/app.log", 4, "api_token", "demo-bot-api", "v1", "revoked"),
        ("logs/app.log", 5, "api_token", "demo-bot-api", "v3", "valid"),
        ("repo/.env", 1, "fernet", "demo-bot-db", "v2", "valid"),
        ("repo/.env", 2, "fernet", "demo-bot-db", "v3", "accepted"),
        ("repo/core.dump", 1, "fernet", "demo-bot-db", "v1", "retired"),
        ("noise.txt", 3, "api_token", None, None, "unknown"),
    }
    # Findings name material by fingerprint and prefix only.
    by_line = {(Path(f["path"]).name, f["line"]): f for f in report["findings"]}
    assert by_line[("app.log", 2)]["fingerprint"] == fingerprint(m["token3"])
    assert by_line[("app.log", 2)]["prefix"] == "demo"
    assert {s["reason"] for s in report["skipped"]} == {"symbolic link (not followed)"}
    assert report["problems"] == [] and report["secrets_checked"] == 2

    human = cli(config, "scan", str(root))
    assert human.returncode == 1
    assert "app.log:4: api_token demo_… fingerprint" in human.stdout
    assert "demo-bot-api v1  revoked" in human.stdout
    assert "core.dump:1: fernet key fingerprint" in human.stdout and "retired" in human.stdout
    assert "VALID" in human.stdout and "8 finding(s), 5 still live" in human.stderr
    assert_no_material(values, texts=[result.stdout, result.stderr, human.stdout, human.stderr])


def test_scan_of_clean_files_exits_zero(config: Path, tmp_path: Path) -> None:
    m = _plant(config)
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.txt").write_text(f"nothing here but {Fernet.generate_key().decode()}\n")
    result = cli(config, "scan", str(clean / "a.txt"), str(clean))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "0 finding(s)" in result.stderr
    assert_no_material(m.values(), texts=[result.stdout, result.stderr])


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_scan_of_a_missing_path_scans_nothing_and_says_so(config: Path, tmp_path: Path) -> None:
    m = _plant(config)
    planted = tmp_path / "planted.log"
    planted.write_text(f"{m['token3']}\n")
    state = config.parent / "var"
    before = _snapshot(state)
    missing = tmp_path / "no-such-dir"
    result = cli(config, "scan", str(planted), str(missing))
    assert result.returncode == 64
    assert f"{missing}: no such file or directory" in result.stderr
    assert result.stdout == ""  # the existing path was not scanned either
    assert _snapshot(state) == before
    assert_no_material(m.values(), texts=[result.stdout, result.stderr])


def test_scan_reports_an_unreadable_backend_and_still_finds_tokens(config: Path, tmp_path: Path) -> None:
    m = _plant(config)
    (config.parent / "var" / "master.key").write_text("not a key\n")
    planted = tmp_path / "planted.log"
    planted.write_text(f"{m['token3']}\n")
    result = cli(config, "scan", str(planted), "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [f["state"] for f in report["findings"]] == ["unknown"]
    assert len(report["problems"]) == 2 and "demo-bot-db" in report["problems"][0]
    assert_no_material(m.values(), texts=[result.stdout, result.stderr])
