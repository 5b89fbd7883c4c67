"""Retirement waits for the census: a key leaves the ring only when no stored datum needs it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.fernet import Fernet

from rotatord.crypto.keyring import multifernet
from tests.engine.conftest import (
    EVERY,
    FERNET,
    GRACE,
    PROPAGATION,
    SECOND,
    T0,
    HarnessFactory,
    bot_db_store,
    fernet_secret,
)
from tests.helpers import unwritable


def test_retire_is_refused_while_data_still_needs_the_old_key(make_harness: HarnessFactory, tmp_path: Path) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,)), consumers=())
    runtime = h.build()
    engine = runtime.engine
    try:
        engine.tick(FERNET, T0)  # v1 created
        v1 = multifernet(h.ring())
        with sqlite3.connect(db) as conn:
            conn.executemany(
                "INSERT INTO msgs VALUES (?, ?)", [(i, v1.encrypt(b"row %d" % i).decode()) for i in range(50)]
            )
        t1 = T0 + EVERY
        engine.tick(FERNET, t1)  # stage v2
        engine.tick(FERNET, t1 + PROPAGATION)  # promote, then re-encrypt everything to v2
        assert h.sql("SELECT phase FROM rotations WHERE version = 2") == [("reencrypted",)]
        # A bot with a stale ring writes under v1 again, and the store can no longer be written.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE msgs SET body = ? WHERE id = 7", (v1.encrypt(b"late write").decode(),))
        with unwritable(db):
            engine.tick(FERNET, t1 + PROPAGATION + GRACE + SECOND)
            ring = h.ring()
            assert {k.id for k in ring.keys} == {"v1", "v2"}, "v1 must stay while a datum needs it"
            status = h.sql("SELECT phase, status, error FROM rotations WHERE version = 2")
            assert status[0][0] == "reencrypted" and status[0][1] == "active"
            assert status[0][2] and "stores[0]" in status[0][2]
        # Writable again: the retry's final sweep moves the late write, the census is clean, v1 goes.
        engine.tick(FERNET, t1 + PROPAGATION + GRACE + 3600 * SECOND)
        assert [k.id for k in h.ring().keys] == ["v2"]
        only_v2 = Fernet(h.ring().primary_key.material.reveal())
        with sqlite3.connect(db) as conn:
            bodies = dict(conn.execute("SELECT id, body FROM msgs"))
        assert only_v2.decrypt(bodies[7].encode()) == b"late write"
        assert all(only_v2.decrypt(bodies[i].encode()) == b"row %d" % i for i in range(50) if i != 7)
    finally:
        runtime.close()


def test_quarantine_keeps_only_what_the_last_complete_pass_found_unreadable(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    db, store = bot_db_store(tmp_path)
    h = make_harness(fernet_secret(stores=(store,)), consumers=())
    runtime = h.build()
    engine = runtime.engine
    quarantined = "SELECT locator, rotation_id, found_at FROM quarantine ORDER BY locator"
    try:
        engine.tick(FERNET, T0)  # v1 created
        v1 = multifernet(h.ring())
        with sqlite3.connect(db) as conn:
            rows = [(i, v1.encrypt(b"row %d" % i).decode()) for i in range(10)]
            conn.executemany("INSERT INTO msgs VALUES (?, ?)", [*rows, (10, "corrupt"), (11, "also corrupt")])
        t1 = T0 + EVERY
        engine.tick(FERNET, t1)  # stage v2
        engine.tick(FERNET, t1 + PROPAGATION)  # promote, re-encrypt: 10 and 11 quarantined
        first = h.sql(quarantined)
        assert [locator for locator, _, _ in first] == ["msgs.body(id=10)", "msgs.body(id=11)"]
        first_rotation = first[0][1]
        engine.tick(FERNET, t1 + PROPAGATION + GRACE + SECOND)  # v1 retired: the census is clean
        # A bot rewrites one of them with a token of the current ring, and deletes another row.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE msgs SET body = ? WHERE id = 11", (multifernet(h.ring()).encrypt(b"fixed").decode(),))
            conn.execute("DELETE FROM msgs WHERE id = 3")
        t2 = t1 + EVERY
        engine.tick(FERNET, t2)  # stage v3
        engine.tick(FERNET, t2 + PROPAGATION)  # promote, re-encrypt: a complete pass in the new rotation
        (still,) = h.sql(quarantined)
        assert still[0] == "msgs.body(id=10)"  # still unreadable: kept, first found in the first rotation
        assert still[1] != first_rotation and still[2] == first[0][2]
        with sqlite3.connect(db) as conn:
            fixed = dict(conn.execute("SELECT id, body FROM msgs"))[11]
        assert multifernet(h.ring()).decrypt(fixed.encode()) == b"fixed"  # and re-encrypted, not quarantined
    finally:
        runtime.close()
