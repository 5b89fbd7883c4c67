"""Failover of several instances: the leader SIGKILLed mid-rotation, the standby finishes it.

    .venv/bin/python -m bench.failover [--runs 3] [--ttl 3] [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]

Each run creates a fresh database on the PostgreSQL server, two real daemons ``a`` and ``b`` on
it (separate state directories, one file backend), seeds version 1 of every secret, starts ``a``
with ``ROTATORD_TEST_CRASH_AT=promote.intent`` and ``b`` as its standby, asks ``a`` to rotate
``demo-bot-db`` and times, from the moment ``a`` is dead (SIGKILLed by its crash point):
``b``'s ``STATUS=`` showing it leads, and the rotation recorded ``done`` (promote + retire after
the 2 s grace; propagation 1 s).  Takeover is bounded by ``lease_ttl`` after ``a``'s last
renewal (every ``lease_ttl / 3``), so expect ``2/3 ttl .. ttl``.  It checks the rotation
completed exactly once (journal rows and backend versions) and drops the database afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from rotatord.engine.runner import CRASH_ENV
from tests.helpers import DaemonProcess, NotifyListener, cli, wait_until
from tests.integration import test_instances as scenario
from tests.servers.databases import database_url

from .harness import summary


def one_run(server: str, ttl: float) -> tuple[float, float]:
    name = f"rtd_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = database_url(server, name)
    root = Path(tempfile.mkdtemp(prefix="rtd-bench-"))
    sockets: list[str] = []
    listeners = {n: NotifyListener() for n in ("a", "b")}
    daemons: list[DaemonProcess] = []
    try:
        scenario.TTL = ttl
        configs = scenario._configs(root, sockets, {"a": url, "b": url})
        scenario._seed(configs["a"])
        a = DaemonProcess(configs["a"], root / "a.log", listeners["a"], env={CRASH_ENV: "promote.intent"})
        daemons.append(a)
        a.wait_ready()
        scenario._wait_role(listeners["a"], "leader a")
        b = DaemonProcess(configs["b"], root / "b.log", listeners["b"])
        daemons.append(b)
        b.wait_ready()
        scenario._wait_role(listeners["b"], "standby b (leader: a)")
        if cli(configs["a"], "rotate", scenario.SECRET).returncode != 0:
            raise SystemExit("rotate on the leader failed")
        if a.wait(30) != -9:
            raise SystemExit("the leader did not die at its crash point")
        killed = time.monotonic()
        leading = scenario._wait_role(listeners["b"], "leader b", timeout=ttl + 10)
        wait_until(lambda: scenario._rows(url)[-1] == (2, "retired", "done"), timeout=60, interval=0.02)
        done = time.monotonic()
        if scenario._rows(url) != [(1, "retired", "done"), (2, "retired", "done")]:
            raise SystemExit(f"not exactly once: {scenario._rows(url)}")
        if scenario._history(configs["a"]) != ["1", "2", "3", "4"]:
            raise SystemExit("the backend was written more than once per phase")
        return leading - killed, done - killed
    finally:
        for daemon in daemons:
            daemon.kill()
        for listener in listeners.values():
            listener.close()
        for directory in sockets:
            shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ttl", type=float, default=3.0, help="lease_ttl in seconds")
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    takeovers, completions = [], []
    for i in range(args.runs):
        takeover, complete = one_run(args.pg, args.ttl)
        takeovers.append(takeover)
        completions.append(complete)
        print(f"run {i + 1}: SIGKILL -> standby leads {takeover:.2f} s -> rotation done {complete:.2f} s")
    for what, values in (("takeover", takeovers), ("rotation done", completions)):
        stats = summary(values)
        print(f"lease_ttl {args.ttl:g} s, {what}: min {stats['min']:.2f} / median {stats['median']:.2f}"
              f" / max {stats['max']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
