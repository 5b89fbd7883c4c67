"""Drift on a real OpenBao: a KV version written by hand, a destroyed version, removed metadata
marks, a document failing the schema.  The engine runs in process as the daemon wires it
(build_runtime), with ``now`` passed to every call; each test has its own KV version 2 mount.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.client.vault import VaultReader
from rotatord.config.model import DaemonSettings, Settings, VaultBackendSettings
from rotatord.daemon.runtime import Runtime, build_runtime
from rotatord.document import dump_document
from rotatord.engine.drift_store import DriftLedger
from rotatord.engine.report import secret_status
from rotatord.errors import DocumentInvalid
from tests.engine.conftest import EVERY, FERNET, SECOND, T0, fernet_secret
from tests.servers.openbao import OpenBao

PREFIX = "rotatord"
SECRET_PATH = "bots/support-bot/db-key"
FULL = f"{PREFIX}/{SECRET_PATH}"
T1 = T0 + EVERY
HOLD = timedelta(minutes=5)


class Setup:
    def __init__(self, openbao: OpenBao, root: Path) -> None:
        self.openbao = openbao
        self.mount = openbao.new_kv_mount("drift")
        backend = VaultBackendSettings(
            kind="vault", address=openbao.address, mount=self.mount, path_prefix=PREFIX,
            token_file=openbao.token_file(root / "vault-token"), transient_retries=0,
        )  # fmt: skip
        self.settings = Settings(
            daemon=DaemonSettings(state_dir=root / "state"),
            backends={"vault": backend},
            secrets=(fernet_secret(backend="vault", path=SECRET_PATH, consumers=()),),
        )
        self.runtime: Runtime = build_runtime(self.settings)
        self.kv: Any = openbao.client().secrets.kv.v2

    def current(self) -> int:
        return int(self.kv.read_secret_metadata(FULL, mount_point=self.mount)["data"]["current_version"])

    def versions(self) -> list[int]:
        return sorted(int(v) for v in self.kv.read_secret_metadata(FULL, mount_point=self.mount)["data"]["versions"])

    def write_by_hand(self, document: str) -> int:
        """A new KV version, written as an operator with a root token would (check-and-set)."""
        response = self.kv.create_or_update_secret(
            path=FULL, secret={"document": document, "request_id": "by-hand"}, cas=self.current(),
            mount_point=self.mount,
        )  # fmt: skip
        return int(response["data"]["version"])

    def edited_document(self) -> str:
        with VaultReader(self.openbao.address, FULL, mount=self.mount, token=self.openbao.root_token) as reader:
            doc = reader.read_versioned().document
        return dump_document(replace(doc, updated_at=doc.updated_at + SECOND)).decode()


@pytest.fixture
def setup(openbao: OpenBao, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(openbao, tmp_path)
    yield s
    s.runtime.close()
    openbao.drop_mount(s.mount)


def test_a_kv_version_written_by_hand_pauses_rotation_until_adopted(setup: Setup) -> None:
    engine = setup.runtime.engine
    assert engine.tick(FERNET, T0) == T0 + EVERY
    ours = setup.current()
    theirs = setup.write_by_hand(setup.edited_document())
    assert engine.tick(FERNET, T1) == T1 + HOLD
    assert setup.current() == theirs  # nothing written over it
    (record,) = setup.runtime.journal.drift_all()
    assert (record.reason, record.observed_version, record.baseline_version) == (
        "version_changed", str(theirs), str(ours),
    )  # fmt: skip
    assert secret_status(engine, FERNET, T1)["drift"]["reason"] == "version_changed"
    engine.adopt(FERNET, actor="cli", reason=None, now=T1 + SECOND)
    assert setup.runtime.journal.drift_all() == []
    engine.tick(FERNET, T1 + SECOND)
    assert setup.current() == theirs + 1  # the rotation staged its key on top of the adopted version


def test_a_destroyed_version_is_drift_and_adopt_accepts_it(setup: Setup) -> None:
    engine = setup.runtime.engine
    engine.tick(FERNET, T0)
    engine.rotate(FERNET, trigger="cli", emergency=True, reason="drill", now=T0 + SECOND)
    assert len(setup.versions()) >= 2
    first = setup.versions()[0]
    setup.kv.destroy_secret_versions(FULL, [first], mount_point=setup.mount)
    record = engine.check_drift(FERNET, T0 + 2 * SECOND)
    assert record is not None and record.reason == "version_destroyed"
    assert str(first) in record.message
    result = engine.adopt(FERNET, actor="cli", reason="cleanup", now=T0 + 3 * SECOND)
    assert result["drift_cleared"] and result["reason"] == "version_destroyed"
    assert engine.check_drift(FERNET, T0 + 4 * SECOND) is None


def test_destroyed_current_version_is_drift_and_cannot_be_adopted(setup: Setup) -> None:
    engine = setup.runtime.engine
    engine.tick(FERNET, T0)
    setup.kv.destroy_secret_versions(FULL, [setup.current()], mount_point=setup.mount)
    record = engine.check_drift(FERNET, T0 + SECOND)
    assert record is not None and record.reason == "version_destroyed"
    with pytest.raises(DocumentInvalid, match="destroyed; nothing was changed"):
        engine.adopt(FERNET, actor="cli", reason=None, now=T0 + 2 * SECOND)
    assert [d.id for d in setup.runtime.journal.drift_all()] == [record.id]


def test_removed_metadata_marks_are_drift_and_adopt_puts_them_back(setup: Setup) -> None:
    engine = setup.runtime.engine
    engine.tick(FERNET, T0)
    setup.kv.update_metadata(
        FULL, cas_required=False, custom_metadata={"owner": "someone"}, delete_version_after="0s",
        mount_point=setup.mount,
    )  # fmt: skip
    record = engine.check_drift(FERNET, T0 + SECOND)
    assert record is not None and record.reason == "marks_removed"
    engine.adopt(FERNET, actor="cli", reason=None, now=T0 + 2 * SECOND)
    meta = setup.kv.read_secret_metadata(FULL, mount_point=setup.mount)["data"]
    assert meta["cas_required"] is True
    assert meta["custom_metadata"] == {"owner": "someone", "managed-by": "rotatord"}
    assert engine.check_drift(FERNET, T0 + 3 * SECOND) is None


def test_adopt_refuses_a_document_failing_the_schema_and_changes_nothing(setup: Setup) -> None:
    engine = setup.runtime.engine
    engine.tick(FERNET, T0)
    broken = json.loads(setup.edited_document())
    del broken["primary"]
    theirs = setup.write_by_hand(json.dumps(broken))
    record = engine.check_drift(FERNET, T0 + SECOND)
    assert record is not None and record.reason == "document_invalid"
    ledger = DriftLedger(setup.runtime.journal)
    baseline = ledger.baseline(FERNET)
    with pytest.raises(DocumentInvalid, match="document schema") as info:
        engine.adopt(FERNET, actor="cli", reason=None, now=T0 + 2 * SECOND)
    assert info.value.exit_code != 0
    assert ledger.baseline(FERNET) == baseline
    assert [d.id for d in setup.runtime.journal.drift_all()] == [record.id]
    assert setup.current() == theirs
    assert setup.runtime.journal.latest(FERNET).version == 1  # type: ignore[union-attr]


def test_emergency_rotation_clears_drift_from_a_version_written_by_hand(setup: Setup) -> None:
    engine = setup.runtime.engine
    engine.tick(FERNET, T0)
    theirs = setup.write_by_hand(setup.edited_document())
    assert engine.check_drift(FERNET, T0 + SECOND) is not None
    row = engine.rotate(FERNET, trigger="cli", emergency=True, reason="leak", now=T0 + 2 * SECOND)
    assert row.status == "done"
    assert setup.runtime.journal.drift_all() == []
    assert setup.current() > theirs
    assert engine.check_drift(FERNET, T0 + 3 * SECOND) is None
