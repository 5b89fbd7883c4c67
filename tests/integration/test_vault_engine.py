"""The rotation engine against a real OpenBao: full rotations, crashes, a sealed server, least
privilege with the shipped policies, and the example bot across two rotations.

The engine runs in process, exactly as the daemon wires it (build_runtime), with ``now`` passed
to every tick; only OpenBao is real time.  Each test has its own KV version 2 mount.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import hvac.exceptions
import pytest

from rotatord.client.vault import VaultReader
from rotatord.config import load_settings
from rotatord.config.model import DaemonSettings, Settings, VaultBackendSettings
from rotatord.crypto.keyring import multifernet
from rotatord.daemon.runtime import Runtime, build_runtime
from rotatord.document import FernetRing, digest
from rotatord.engine.runner import CRASH_ENV
from rotatord.interfaces import Versioned
from rotatord.timeutil import utcnow
from tests.engine.conftest import EVERY, FERNET, GRACE, PROPAGATION, SECOND, T0, fernet_secret
from tests.engine.test_lifecycle import reset_step
from tests.helpers import DaemonProcess, NotifyListener, assert_no_material, cli, materials, status_json, wait_until
from tests.servers.openbao import OpenBao

REPO = Path(__file__).resolve().parents[2]
PREFIX = "rotatord"
SECRET_PATH = "bots/support-bot/db-key"
T1 = T0 + EVERY
PROMOTE_AT = T1 + PROPAGATION
RETIRE_AT = PROMOTE_AT + GRACE


@dataclass
class VaultHarness:
    """One state directory and one KV mount, the runtimes built on them, and a root view of the mount."""

    server: OpenBao
    mount: str
    root: Path
    settings: Settings
    runtimes: list[Runtime] = field(default_factory=list)

    @property
    def full_path(self) -> str:
        return f"{PREFIX}/{SECRET_PATH}"

    @property
    def db_path(self) -> Path:
        return self.settings.daemon.state_dir / "state.db"

    def build(self) -> Runtime:
        runtime = build_runtime(self.settings)
        self.runtimes.append(runtime)
        return runtime

    def reader(self, token: str | None = None) -> VaultReader:
        return VaultReader(self.server.address, self.full_path, mount=self.mount, token=token or self.server.root_token)

    def read(self, version: int | None = None) -> Versioned:
        with self.reader() as reader:
            return reader.read_versioned(version)

    def ring(self) -> FernetRing:
        doc = self.read().document
        assert isinstance(doc, FernetRing)
        return doc

    def kv_versions(self) -> list[int]:
        meta = self.server.client().secrets.kv.v2.read_secret_metadata(self.full_path, mount_point=self.mount)
        return sorted(int(v) for v in meta["data"]["versions"])

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        import sqlite3

        conn = sqlite3.connect(self.db_path, timeout=10)
        try:
            with conn:
                return conn.execute(statement, params).fetchall()
        finally:
            conn.close()

    def recorded(self) -> set[tuple[str, int]]:
        """(request_id, backend_version) of every completed step that names a KV version.  A step
        that found its effect already there names the version an earlier step wrote."""
        rows = self.sql("SELECT request_id, result FROM steps WHERE state = 'done'")
        out = set()
        for request_id, result in rows:
            facts = json.loads(result or "{}")
            if "backend_version" in facts:
                out.add((str(request_id), int(facts["backend_version"])))
        return out

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.close()


@pytest.fixture
def make_harness(openbao: OpenBao, tmp_path: Path) -> Iterator[Any]:
    """``make_harness(token=None, retries=0, mount=None)``: settings with one fernet secret on a
    fresh mount (or ``mount``), the root token unless ``token`` is given."""
    made: list[VaultHarness] = []

    def make(*, token: str | None = None, retries: int = 0, mount: str | None = None) -> VaultHarness:
        root = tmp_path / f"h{len(made)}"
        root.mkdir()
        mount = mount or openbao.new_kv_mount("engine")
        backend = VaultBackendSettings(
            kind="vault",
            address=openbao.address,
            mount=mount,
            path_prefix=PREFIX,
            token_file=openbao.token_file(root / "vault-token", token),
            transient_retries=retries,
        )
        settings = Settings(
            daemon=DaemonSettings(state_dir=root / "state", step_retry_initial=timedelta(seconds=5)),
            backends={"vault": backend},
            # No consumers: webhooks are another suite's business; the engine runs the same without.
            secrets=(fernet_secret(backend="vault", path=SECRET_PATH, consumers=()),),
        )
        harness = VaultHarness(openbao, mount, root, settings)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()
        openbao.drop_mount(harness.mount)


def rotate_fully(rt: Runtime, started: datetime) -> datetime:
    """Run one rotation started at ``started`` through stage, promote and retire; its retire time."""
    promote_at = rt.engine.tick(FERNET, started)
    assert promote_at == started + PROPAGATION
    retire_at = rt.engine.tick(FERNET, promote_at)
    assert retire_at == promote_at + GRACE
    assert rt.engine.tick(FERNET, retire_at) == started + EVERY
    return retire_at


def assert_journal_matches_kv(h: VaultHarness) -> None:
    """Each KV version was written by one journal step (its request id) that recorded it; no
    step wrote twice; no recorded version is missing; the latest rotation names the current one."""
    recorded = h.recorded()
    versions = h.kv_versions()
    assert {v for _rid, v in recorded} == set(versions), "a KV version is missing or not in the journal"
    writers = [h.read(v).request_id for v in versions]
    assert len(set(writers)) == len(writers), "one step wrote two KV versions"
    for version, request_id in zip(versions, writers, strict=True):
        assert (request_id, version) in recorded
    latest = h.sql("SELECT backend_version FROM rotations ORDER BY id DESC LIMIT 1")[0][0]
    current = h.read()
    assert current.version == latest


# -- full rotation, crash and resume ---------------------------------------------------------------


def test_full_fernet_rotation_on_openbao(make_harness: Any) -> None:
    h = make_harness()
    rt = h.build()
    rt.backends["vault"].check()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    first = h.ring()
    assert (first.primary, [k.id for k in first.keys]) == ("v1", ["v1"])
    under_v1 = multifernet(first).encrypt(b"datum")

    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    staged = h.ring()
    assert {k.id: k.state for k in staged.keys} == {"v1": "primary", "v2": "decrypt_only"}
    assert rt.engine.tick(FERNET, PROMOTE_AT - SECOND) == PROMOTE_AT  # waits for the propagation window
    assert rt.engine.tick(FERNET, PROMOTE_AT) == RETIRE_AT
    promoted = h.ring()
    assert promoted.primary == "v2"
    assert multifernet(promoted).decrypt(under_v1) == b"datum"
    assert rt.engine.tick(FERNET, RETIRE_AT) == T1 + EVERY
    assert [k.id for k in h.ring().keys] == ["v2"]

    # One KV version per write: the creation, then stage, promote and retire.
    assert h.kv_versions() == [1, 2, 3, 4]
    row = rt.journal.latest(FERNET)
    assert row is not None and (row.status, row.backend_version) == ("done", "4")
    assert_journal_matches_kv(h)
    meta = h.server.client().secrets.kv.v2.read_secret_metadata(h.full_path, mount_point=h.mount)["data"]
    assert (meta["cas_required"], meta["max_versions"]) == (True, 20)


def test_crash_between_steps_then_resume_neither_duplicates_nor_loses_a_version(make_harness: Any) -> None:
    h = make_harness()
    a = h.build()
    assert a.engine.tick(FERNET, T0) == T0 + EVERY
    # Crash 1: the stage acted on OpenBao, then the process died before recording it.
    assert a.engine.tick(FERNET, T1) == PROMOTE_AT
    rot = a.journal.active(FERNET)
    assert rot is not None
    staged = h.read()
    reset_step(h, rot.id, "stage", "pending", new_key=None, previous_key=None, promote_after=None,
               backend_version=None)  # fmt: skip
    a.close()

    b = h.build()
    resumed = T1 + timedelta(minutes=1)
    assert b.engine.tick(FERNET, resumed) == resumed + PROPAGATION
    again = h.read()
    assert (again.version, digest(again.document)) == (staged.version, digest(staged.document))  # no second write
    assert b.journal.get(rot.id).backend_version == staged.version

    # Crash 2: the promote recorded its intent, then the process died before acting.
    intent = b.journal.begin_step(rot.id, "promote", resumed + PROPAGATION)
    b.close()
    c = h.build()
    assert c.engine.tick(FERNET, resumed + PROPAGATION) == resumed + PROPAGATION + GRACE
    assert h.read().request_id == intent.request_id
    assert c.engine.tick(FERNET, resumed + PROPAGATION + GRACE) == T1 + EVERY
    assert [(r.version, r.status) for r in c.journal.history(FERNET)] == [(2, "done"), (1, "done")]
    assert h.kv_versions() == [1, 2, 3, 4]
    assert_journal_matches_kv(h)


def test_sealed_server_mid_rotation_fails_the_step_transiently_then_completes(make_harness: Any) -> None:
    h = make_harness(retries=0)
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    assert rt.engine.tick(FERNET, T1) == PROMOTE_AT
    with h.server.sealed():
        retry_at = rt.engine.tick(FERNET, PROMOTE_AT)
        assert PROMOTE_AT < retry_at <= PROMOTE_AT + timedelta(seconds=5)
        row = rt.journal.active(FERNET)
        assert row is not None
        assert (row.phase, row.attempts, row.next_attempt_at) == ("staged", 1, retry_at)
        assert row.error is not None and row.error.startswith("promote: ") and "sealed" in row.error
        assert rt.engine.tick(FERNET, PROMOTE_AT + SECOND) == retry_at  # waits for the retry time
    assert h.ring().primary == "v1"  # the bots' view did not move while the step failed
    assert rt.engine.tick(FERNET, retry_at) == retry_at + GRACE
    row = rt.journal.get(row.id)
    assert (row.phase, row.error, row.attempts, row.next_attempt_at) == ("reencrypted", None, 0, None)
    assert h.ring().primary == "v2"
    assert_journal_matches_kv(h)


# -- least privilege -------------------------------------------------------------------------------


def policy(name: str, mount: str) -> str:
    """A shipped policy with its example mount replaced by the test's."""
    return (REPO / "contrib" / "vault" / name).read_text().replace('"secret/', f'"{mount}/')


def test_daemon_policy_suffices_and_the_bot_policy_only_reads(make_harness: Any, openbao: OpenBao) -> None:
    root = openbao.client()
    mount = openbao.new_kv_mount("engine")
    root.sys.create_or_update_policy(f"{mount}-daemon", policy("rotatord-daemon.hcl", mount))
    root.sys.create_or_update_policy(f"{mount}-bot", policy("rotatord-bot-readonly.hcl", mount))
    # Exactly the daemon policy: not root, not even "default".  Periodic, as a daemon's should be.
    daemon = root.auth.token.create(policies=[f"{mount}-daemon"], no_default_policy=True, period="1h")
    daemon_token = daemon["auth"]["client_token"]
    bot_token = root.auth.token.create(policies=[f"{mount}-bot"], ttl="10m")["auth"]["client_token"]

    h = make_harness(token=daemon_token, mount=mount)
    rt = h.build()
    rt.backends["vault"].check()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    rotate_fully(rt, T1)
    assert [k.id for k in h.ring().keys] == ["v2"]
    assert h.kv_versions() == [1, 2, 3, 4]

    with h.reader(bot_token) as reader:
        got = reader.read_versioned()
    assert (got.version, digest(got.document)) == ("4", digest(h.ring()))
    bot = openbao.client(bot_token)
    with pytest.raises(hvac.exceptions.Forbidden):
        bot.secrets.kv.v2.create_or_update_secret(h.full_path, secret={"document": "x"}, cas=4, mount_point=mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        bot.secrets.kv.v2.read_secret_metadata(h.full_path, mount_point=mount)
    with pytest.raises(hvac.exceptions.Forbidden):
        bot.secrets.kv.v2.read_secret_version("rotatord/bots/other-bot/db-key", mount_point=mount,
                                              raise_on_deleted_version=True)  # fmt: skip
    # The daemon's token reaches nothing outside its prefix either.
    with pytest.raises(hvac.exceptions.Forbidden):
        openbao.client(daemon_token).secrets.kv.v2.create_or_update_secret(
            "elsewhere/x", secret={"a": "b"}, cas=0, mount_point=mount
        )


# -- the example bot -------------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vault_bot_example", REPO / "examples" / "vault_bot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_example_bot_keeps_every_record_readable_across_two_rotations(make_harness: Any, tmp_path: Path) -> None:
    example = load_example()
    h = make_harness()
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    db_path = tmp_path / "bot.db"
    # Two instances of the bot on one database, each with its own reader; no restart below.
    a = example.Bot(h.reader(), example.open_db(db_path), ttl=3600)
    b = example.Bot(h.reader(), example.open_db(db_path), ttl=3600)
    texts: dict[int, str] = {}

    def write(bot: Any, label: str) -> None:
        text = f"{label}: a customer message"
        texts[bot.store(text)] = text

    def everyone_reads_everything() -> None:
        for bot in (a, b):
            assert bot.load_all() == texts

    write(a, "before any rotation")
    started = T1
    for rotation in (2, 3):
        promote_at = rt.engine.tick(FERNET, started)
        b.refresh()  # b learns of the staged key; a still holds the ring it read earlier
        write(b, f"rotation {rotation} staged")
        everyone_reads_everything()
        retire_at = rt.engine.tick(FERNET, promote_at)
        b.refresh()
        assert b.ring.primary == f"v{rotation}"
        write(b, f"rotation {rotation} promoted")  # under a key a's copy of the ring may lack
        everyone_reads_everything()  # a re-reads the ring on its first miss
        assert a.ring.primary == f"v{rotation}"
        assert a.rewrap() >= 1  # moves the records still under the old key, inside the grace period
        assert b.rewrap() == 0
        assert rt.engine.tick(FERNET, retire_at) == started + EVERY
        assert [k.id for k in h.ring().keys] == [f"v{rotation}"]
        everyone_reads_everything()
        write(a, f"rotation {rotation} retired")
        everyone_reads_everything()
        started += EVERY
    assert len(texts) == 7
    assert_journal_matches_kv(h)


# -- the real daemon, killed with SIGKILL mid-rotation ----------------------------------------------


def daemon_config(directory: Path, socket_dir: str, server: OpenBao, mount: str) -> Path:
    """A config of our own (not config.example.toml): OpenBao only, short timings, mode 0600."""
    token = server.token_file(directory / "vault-token")
    text = f"""
[daemon]
state_dir = "var"
control_socket = "{socket_dir}/control.sock"
startup_jitter = "0s"
step_retry_initial = "1s"

[backends.vault]
kind = "vault"
address = "{server.address}"
mount = "{mount}"
path_prefix = "{PREFIX}"
token_file = "{token}"
transient_retries = 1

[[secrets]]
name = "{FERNET}"
kind = "fernet"
backend = "vault"
path = "{SECRET_PATH}"
every = "1h"
grace = "1s"
propagation = "1s"
"""
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_daemon_killed_after_promote_on_openbao_resumes_exactly_once(
    openbao: OpenBao, tmp_path: Path, socket_dir: str, notify: NotifyListener
) -> None:
    mount = openbao.new_kv_mount("daemon")
    config = daemon_config(tmp_path, socket_dir, openbao, mount)
    full = f"{PREFIX}/{SECRET_PATH}"
    runtime = build_runtime(load_settings(config))
    try:
        runtime.engine.tick(FERNET, utcnow())  # version 1, in this process: saves a daemon start
    finally:
        runtime.close()
    reader = VaultReader(openbao.address, full, mount=mount, token=openbao.root_token)
    first = reader.read()
    assert isinstance(first, FernetRing)
    datum = multifernet(first).encrypt(b"record before the rotation")

    crashing = DaemonProcess(config, tmp_path / "daemon.log", notify, env={CRASH_ENV: "promote.acted"})
    try:
        crashing.wait_ready()
        cli(config, "rotate", FERNET, timeout=30)  # its reply may be lost when the daemon dies
        assert crashing.wait(30) == -9
    finally:
        crashing.kill()
    mid = reader.read_versioned()
    assert isinstance(mid.document, FernetRing) and mid.document.primary == "v2"  # promoted, not recorded
    assert multifernet(mid.document).decrypt(datum) == b"record before the rotation"

    resumed = DaemonProcess(config, tmp_path / "daemon.log", notify)
    try:
        resumed.wait_ready()
        wait_until(lambda: status_json(config)[FERNET]["phase"] == "retired" and
                   status_json(config)[FERNET]["version"] == 2, timeout=30, what="rotation 2 to finish")  # fmt: skip
        assert resumed.stop() == 0
    finally:
        resumed.kill()
    meta = openbao.client().secrets.kv.v2.read_secret_metadata(full, mount_point=mount)["data"]
    # v1 created, v2 staged, v3 promoted (before the kill, and never again), v4 retired.
    assert sorted(int(v) for v in meta["versions"]) == [1, 2, 3, 4]
    final = reader.read_versioned()
    assert final.version == "4" and isinstance(final.document, FernetRing)
    assert [k.id for k in final.document.keys] == ["v2"]
    reader.close()
    assert_no_material(materials(first) | materials(mid.document), files=[tmp_path / "daemon.log"])
    openbao.drop_mount(mount)
