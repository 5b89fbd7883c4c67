"""Cost of one Prometheus scrape (``Metrics.render``) on a state database holding 1,000 secrets.

The state is written straight into a real SQLite state database (WAL, ``synchronous=FULL``)
in the shape a year of rotations leaves: ``--secrets`` secrets with ``--history`` finished
rotations each (one in 20 with an active, failing one), per fernet secret a census of two
stores and the checkpoints of its latest rotation, and per rotation two webhook rows for each
of 10 consumers.  Then :meth:`rotatord.metrics.Metrics.render` runs as the daemon's /metrics
runs it (in a thread of the same process); the numbers are wall time per scrape and the
number of SQL statements it sent (it must not grow with the number of secrets).

Run: ``python -m bench.metrics_scrape [--secrets 1000] [--history 12] [--rounds 20]``.
Nothing here asserts a timing; the asserts check the scrape saw every secret.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import event, insert

from rotatord.backends.file import init_master_key
from rotatord.config.model import ConsumerSettings, DaemonSettings, FileBackendSettings, SecretSettings, Settings
from rotatord.daemon.runtime import build_runtime
from rotatord.engine.journal import outbox, rotations
from rotatord.engine.ledger import census_counts, checkpoints
from rotatord.metrics import Metrics

from .results import Result, markdown_table

__all__ = ["run"]

BENCH = "metrics"
T0 = datetime(2025, 1, 6, tzinfo=UTC)
CONSUMERS = 10


def _settings(root: Path, count: int) -> Settings:
    consumers = tuple(f"bot-{i}" for i in range(CONSUMERS))
    secrets = tuple(
        SecretSettings(name=f"s-{i:04d}", kind="fernet" if i % 2 else "api_token", backend="local",
                       path=f"bench/s{i}", every=timedelta(days=30), consumers=consumers)
        for i in range(count)
    )  # fmt: skip
    return Settings(
        daemon=DaemonSettings(state_dir=root / "state", metrics="off"),
        backends={"local": FileBackendSettings(kind="file", directory=root / "secrets",
                                               master_key_file=root / "master.key")},
        consumers={c: ConsumerSettings(url=f"http://127.0.0.1:9/{c}", signing_secret="unused") for c in consumers},
        secrets=secrets,
    )  # fmt: skip


def _fill(runtime: object, settings: Settings, history: int) -> None:
    journal = runtime.journal  # type: ignore[attr-defined]
    rows, hooks, census, points = [], [], [], []
    rid = 0
    for i, s in enumerate(settings.secrets):
        for v in range(1, history + 1):
            rid += 1
            active = v == history and i % 20 == 0
            at = T0 + timedelta(days=30 * v)
            rows.append({"id": rid, "secret": s.name, "version": v, "kind": s.kind, "trigger": "schedule",
                         "phase": "staged" if active else "retired", "status": "active" if active else "done",
                         "emergency": False, "started_at": at, "updated_at": at, "attempts": 3 if active else 0,
                         "error": "stage: backend unavailable" if active else None})  # fmt: skip
            for c in settings.consumers:
                for n in range(2):
                    hooks.append({"webhook_id": f"msg_{rid}_{c}_{n}", "rotation_id": rid, "consumer": c,
                                  "event_type": "key.staged", "payload": "{}", "attempts": 1, "created_at": at,
                                  "status": "pending" if active else "delivered"})  # fmt: skip
        if s.kind == "fernet":
            for store in range(2):
                label = f"{s.name}.stores[{store}]:sql:t{store}(body)"
                census += [{"secret": s.name, "store": label, "key_id": f"v{history}", "count": 5000, "taken_at": T0},
                           {"secret": s.name, "store": label, "key_id": "", "count": 1, "taken_at": T0}]  # fmt: skip
                points.append({"rotation_id": rid, "step": "reencrypt/0", "store": label, "done": True,
                               "checkpoint": None, "estimate": 5000, "updated_at": T0,
                               "totals": json.dumps({"scanned": 5000, "rewritten": 4990, "skipped": 10,
                                                     "conflicts": 0, "quarantined": 0})})  # fmt: skip
    with journal.transaction() as conn:
        for table, values in ((rotations, rows), (outbox, hooks), (census_counts, census), (checkpoints, points)):
            for start in range(0, len(values), 5000):
                conn.execute(insert(table), values[start : start + 5000])


def run(secrets: int, history: int, rounds: int) -> list[Result]:
    root = Path(tempfile.mkdtemp(prefix="rotatord-bench-metrics-"))
    try:
        settings = _settings(root, secrets)
        init_master_key(settings.backends["local"])
        runtime = build_runtime(settings)
        try:
            _fill(runtime, settings, history)
            metrics = Metrics(lambda: runtime)
            statements: list[str] = []
            event.listen(runtime.journal._engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
            text = metrics.render()[0].decode()
            assert text.count("rotatord_rotation_version{") == secrets, "the scrape must see every secret"
            per_scrape = len(statements)
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                body, _type = metrics.render()
                times.append(time.perf_counter() - start)
        finally:
            runtime.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    note = f"{secrets} secrets x {history} rotations, {CONSUMERS} consumers, {len(body) // 1024} KiB of text"
    return [
        Result(BENCH, "scrape wall time, median", statistics.median(times) * 1000, "ms", note=note),
        Result(BENCH, "scrape wall time, max", max(times) * 1000, "ms", note=f"{rounds} scrapes"),
        Result(BENCH, "SQL statements per scrape", per_scrape, "", note="independent of the number of secrets"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__.splitlines()[0])
    parser.add_argument("--secrets", type=int, default=1000)
    parser.add_argument("--history", type=int, default=12, help="finished rotations per secret (default 12)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(markdown_table(run(args.secrets, args.history, args.rounds)))


if __name__ == "__main__":
    main()
