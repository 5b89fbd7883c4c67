"""The chaos suite: real daemon processes and real servers, hurt in every way the issue names, and
each case ends with :meth:`World.assert_converged` (nothing lost, exactly once, every webhook
delivered with a stable id, the audit log intact).

- SIGKILL at every named step of a fernet rotation (and mid-batch of the re-encryption);
- the backend (a persistent OpenBao) stopped mid-rotation and restarted;
- the data store's PostgreSQL connections dropped mid-batch;
- the consumer's webhook receiver down (connection refused) for the first attempts;
- the wall clock jumping forward past the grace period (libfaketime under the real daemon).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from rotatord.engine.runner import CRASH_ENV
from tests.chaos.conftest import NAME, WorldFactory
from tests.helpers import DaemonProcess, NotifyListener, wait_until
from tests.servers import free_port
from tests.servers.openbao_persistent import persistent_openbao
from tests.servers.receivers import ReceiverServer

STEP_POINTS = [
    f"{step}.{point}" for step in ("stage", "promote", "reencrypt", "retire") for point in ("intent", "acted", "done")
]


@pytest.mark.parametrize("point", [*STEP_POINTS, "reencrypt.batch"])
def test_sigkill_at_every_step(world: WorldFactory, receivers: ReceiverServer, point: str) -> None:
    w = world(receivers)
    first = w.daemon()
    try:
        w.prepare(first)
        assert first.stop() == 0
    finally:
        first.kill()
    crashing = w.daemon(env={CRASH_ENV: point})
    try:
        crashing.wait_ready()
        w.cli("rotate", NAME, "--reason", "chaos")  # its reply may be lost when the daemon dies
        code = crashing.wait(60)
    finally:
        crashing.kill()
    assert code == -9, f"the daemon should have been SIGKILLed at {point}, exit status {code}"
    resumed = w.daemon()
    try:
        resumed.wait_ready()
        w.settle()
        assert resumed.stop() == 0
    finally:
        resumed.kill()
    w.assert_converged()


def test_openbao_stopped_mid_rotation_and_restarted(
    world: WorldFactory, receivers: ReceiverServer, tmp_path: Path
) -> None:
    bao_dir = tmp_path / "bao"
    bao_dir.mkdir()
    with persistent_openbao(bao_dir) as bao:
        token = bao.token_file(tmp_path / "bao-token")
        backend = f"""
[backends.bao]
kind = "vault"
address = "{bao.address}"
mount = "secret"
token_file = "{token}"
timeout = "2s"
transient_retries = 0
"""
        w = world(receivers, backend="bao", backend_toml=backend, propagation="3s")
        daemon = w.daemon()
        try:
            w.prepare(daemon)
            assert w.cli("rotate", NAME, "--reason", "chaos").returncode == 0
            wait_until(lambda: w.status()["phase"] == "staged", what="the new key staged")
            bao.stop()  # the backend is gone while the rotation waits to promote
            wait_until(lambda: bool(w.status().get("error")), timeout=30, what="the promotion to fail")
            assert w.status()["phase"] == "staged"  # nothing advanced without the backend
            bao.start()
            w.settle()
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        w.assert_converged()


def test_postgres_connections_dropped_mid_batch(
    world: WorldFactory, receivers: ReceiverServer, postgres_url: str
) -> None:
    app = f"rtd-chaos-{uuid.uuid4().hex[:8]}"
    separator = "&" if "?" in postgres_url else "?"
    store_url = f"{postgres_url}{separator}application_name={app}"
    # 300 rows at 100 rows/s: the re-encryption lasts about three seconds, in batches of 50.
    w = world(receivers, store_url=store_url, store_extra="  rate_limit = 100\n")
    admin = sa.create_engine(postgres_url)
    daemon = w.daemon()
    try:
        w.prepare(daemon)
        assert w.cli("rotate", NAME, "--reason", "chaos").returncode == 0
        wait_until(
            lambda: (
                w.rows(
                    "SELECT count(*) FROM store_checkpoints c JOIN rotations r ON r.id = c.rotation_id "
                    "WHERE r.secret = ? AND r.version = 2",
                    NAME,
                )[0][0]
                > 0
            ),
            timeout=60,
            what="a first batch checkpointed",
        )
        # Catch the store mid-batch for certain: lock its table, wait until the store's session
        # is blocked on that lock (inside a batch), and terminate exactly that session.
        sessions = sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :a AND wait_event_type = 'Lock'")
        with admin.connect() as locker:
            locker.execute(sa.text(f"LOCK TABLE {w.table} IN ACCESS EXCLUSIVE MODE"))
            blocked = wait_until(
                lambda: locker.execute(sessions, {"a": app}).scalars().all(),
                timeout=30,
                interval=0.02,
                what="the store blocked inside a batch",
            )
            locker.execute(sa.text("SELECT pg_terminate_backend(pid) FROM unnest(:p) AS pid"), {"p": list(blocked)})
            locker.rollback()  # releases the lock
        wait_until(
            lambda: '"step":"reencrypt"' in daemon.log_text() and "step failed" in daemon.log_text(),
            timeout=30,
            what="the batch to fail on its dropped connection",
        )
        w.settle()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        admin.dispose()
    w.assert_converged()


def test_webhook_receivers_down_for_the_first_attempts(world: WorldFactory, tmp_path: Path) -> None:
    port = free_port()
    receivers = ReceiverServer(port)
    receivers.start()
    try:
        w = world(receivers)
        daemon = w.daemon()
        try:
            w.prepare(daemon)
            receivers.stop()  # the bot's host is down: connections are refused
            assert w.cli("rotate", NAME, "--reason", "chaos").returncode == 0
            pending = "SELECT max(attempts) FROM outbox WHERE consumer = 'bot' AND status = 'pending'"
            wait_until(
                lambda: (w.rows(pending)[0][0] or 0) >= 2,
                timeout=30,
                what="failed delivery attempts",
            )
            back = ReceiverServer(port)
            back.start()
            w.receivers = back
            w.listen_as_bot()
            receivers = back
            w.settle()
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        w.assert_converged()
    finally:
        receivers.stop()


def _faketime_library() -> str | None:
    try:
        import libfaketime
    except ImportError:
        return None
    path = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    return str(path) if path.is_file() else None


def test_wall_clock_jumps_forward_past_the_grace_period(
    world: WorldFactory, receivers: ReceiverServer, tmp_path: Path
) -> None:
    library = _faketime_library()
    assert library is not None, "libfaketime is a test dependency (pyproject [test])"
    offset = tmp_path / "faketime"
    offset.write_text("+0s\n")
    env = {
        "LD_PRELOAD": library,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    w = world(receivers, grace="3d")
    daemon = w.daemon(env=env)
    try:
        w.prepare(daemon)
        assert w.cli("rotate", NAME, "--reason", "chaos").returncode == 0
        wait_until(lambda: w.status()["phase"] == "reencrypted", timeout=60, what="the data moved to the new key")
        ring = w.ring()
        assert {k.id for k in ring.keys} == {"v1", "v2"}  # the old key stays for its 3-day grace
        offset.write_text("+4d\n")  # the wall clock jumps four days ahead
        w.settle()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert "clock" in daemon.log_text()
    w.assert_converged()
    assert os.environ.get("LD_PRELOAD") is None  # only the daemon ran under the fake clock


def test_leader_killed_mid_rotation_with_a_standby_running(
    world: WorldFactory, receivers: ReceiverServer, pg_state: str
) -> None:
    """Two instances on one PostgreSQL state database: the leader dies (SIGKILL) right after
    re-encrypting, the standby takes the lease, resumes from the journal and finishes; the
    rotation happened once, every row decrypts, every webhook was delivered."""
    w = world(receivers, state_url=pg_state)
    b_notify = NotifyListener()
    first = w.daemon()
    try:
        first.wait_ready()
        wait_until(lambda: w.status().get("state") == "done", timeout=60, what="the secrets created")
        w.listen_as_bot()
        w.fill()
        assert first.stop() == 0
    finally:
        first.kill()
    leader = w.daemon(env={CRASH_ENV: "reencrypt.acted"})
    standby: DaemonProcess | None = None
    try:
        leader.wait_ready()
        wait_until(lambda: json.loads(w.cli("status", "--json").stdout)["daemon"]["role"] == "leader", what="a leader")
        standby = w.daemon(config=w.others[0], notify=b_notify)  # started second, so it stands by
        standby.wait_ready()
        w.cli("rotate", NAME, "--reason", "chaos")  # its reply may be lost when the leader dies
        assert leader.wait(60) == -9
        w.settle()
        assert standby.stop() == 0
    finally:
        leader.kill()
        if standby is not None:
            standby.kill()
        b_notify.close()
    w.assert_converged()
    taken_over = [json.loads(line) for line in (w.others[0].parent / "var" / "audit.log").read_text().splitlines()]
    assert {(a.get("event"), a.get("version")) for a in taken_over if a.get("secret") == NAME} >= {
        ("rotation.reencrypted", 2),
        ("rotation.retired", 2),
    }, "the standby did not finish the rotation"
