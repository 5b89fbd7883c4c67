"""Re-encryption throughput and memory of the data stores, against the raw crypto limit.

    .venv/bin/python -m bench.reencrypt                       # SQLite + PostgreSQL at 100k, files, Redis
    .venv/bin/python -m bench.reencrypt --million             # also 1M rows for SQLite and PostgreSQL
    .venv/bin/python -m bench.reencrypt --stores sqlite --rows 20000 --rounds 1   # a quick look

Each row holds a Fernet token of a 1 KiB plaintext.  For every store the benchmark

1. fills it (not timed), then for each round
2. settles it (not timed): ``VACUUM ANALYZE`` and ``CHECKPOINT`` on PostgreSQL, as autovacuum and
   the checkpointer would have in the weeks between two rotations, then ``sync`` for every
   store, so that no round pays for writing back the fill or the previous round;
3. measures the *crypto limit*: ``MultiFernet.rotate`` over the same kind of tokens in a pool of
   ``--processes`` worker processes fed 1000-token chunks, with nothing else to do;
4. runs the store's ``reencrypt`` to completion in a fresh child process (``BatchRotator`` with
   the same number of processes, the store's default batch size), timing it and reading the
   child's peak RSS (``VmHWM``) and its workers' (``RUSAGE_CHILDREN``);
5. measures the crypto limit again; the ratio is the store's rows/s over the mean of the two.

Rounds rotate to a new key each time (v1 -> v2, v2 -> v3, ...), so every round rewrites every
row.  Key material exists only in this process and reaches the child through a pipe; nothing
printed holds a key or a token.  PostgreSQL and Redis are the services on their standard ports;
tables and keys are named ``bench_<random>`` and removed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, MultiFernet

PAYLOAD = 1024
DISTINCT_TOKENS = 20_000  # the rows cycle through this many distinct tokens (the cost per row is the same)
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

# -- the crypto limit ---------------------------------------------------------------------------

_ring: MultiFernet | None = None


def _init_rotate(old: bytes, new: bytes) -> None:
    global _ring  # noqa: PLW0603 - one ring per worker process
    _ring = MultiFernet([Fernet(new), Fernet(old)])


def _rotate_chunk(tokens: list[bytes]) -> int:
    assert _ring is not None
    rotate = _ring.rotate
    return len([rotate(t) for t in tokens])


def _encrypt_chunk(args: tuple[bytes, int, int]) -> list[bytes]:
    key, count, _seed = args
    f = Fernet(key)
    return [f.encrypt(os.urandom(PAYLOAD)) for _ in range(count)]


def make_tokens(key: bytes, count: int, processes: int) -> list[bytes]:
    chunk = 1000
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = pool.map(_encrypt_chunk, [(key, min(chunk, count - i), i) for i in range(0, count, chunk)])
        return [t for part in parts for t in part]


def crypto_limit(old: bytes, new: bytes, tokens: Sequence[bytes], processes: int, total: int) -> float:
    """Tokens per second of MultiFernet.rotate in ``processes`` workers, 1000-token chunks."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_init_rotate, initargs=(old, new)) as pool:
        list(pool.map(_rotate_chunk, [list(tokens[:200])] * processes))  # start and warm the workers
        chunks = [list(tokens[i : i + 1000]) for i in range(0, len(tokens), 1000)]
        feed = itertools.islice(itertools.cycle(chunks), max(1, total // 1000))
        start = time.perf_counter()
        done = sum(pool.map(_rotate_chunk, feed))
        return done / (time.perf_counter() - start)


# -- the child: one store's reencrypt, alone in its process -------------------------------------


def child() -> None:
    """Read a spec from stdin, run one store's reencrypt, print a JSON line of measurements."""
    from rotatord.daemon.memory import limit_malloc_arenas

    limit_malloc_arenas()  # as ``rotatord run`` does, before any thread starts
    from rotatord.config.model import FilesStoreSettings, RedisStoreSettings, SqlStoreSettings
    from rotatord.crypto.keyring import KeyIdentifier
    from rotatord.crypto.parallel import BatchRotator
    from rotatord.document import FernetKey, FernetRing
    from rotatord.interfaces import Progress, ReencryptReport
    from rotatord.sensitive import Sensitive
    from rotatord.stores.registry import open_store

    spec = json.loads(sys.stdin.readline())
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    members = (
        FernetKey("old", Sensitive(spec["old"]), "decrypt_only", t0),
        FernetKey("new", Sensitive(spec["new"]), "primary", t0 + timedelta(days=1)),
    )
    ring = FernetRing("bench", 2, "new", members, t0)
    models = {"sql": SqlStoreSettings, "files": FilesStoreSettings, "redis": RedisStoreSettings}
    settings = models[spec["settings"]["kind"]].model_validate(spec["settings"])
    store = open_store("bench", 0, settings)  # type: ignore[arg-type]

    class Quiet(Progress):
        batches = 0

        def checkpoint(self, checkpoint: str, totals: ReencryptReport) -> None:
            self.batches += 1

        def quarantine(self, locator: str, reason: str) -> None:
            raise AssertionError("nothing should be quarantined")

    with BatchRotator(ring, spec["processes"]) as rotate:
        store.check()
        rotate(store_warmup(ring, spec["processes"]))  # start the workers before the clock
        progress = Quiet()
        start = time.perf_counter()
        report = store.reencrypt(rotate, KeyIdentifier(ring), "new", None, progress)
        seconds = time.perf_counter() - start
    store.close()
    print(
        json.dumps(
            {
                "rows": report.rewritten,
                "scanned": report.scanned,
                "conflicts": report.conflicts,
                "seconds": seconds,
                "batches": progress.batches,
                "vmhwm_mb": _vmhwm_mb(),
                "workers_max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        ),
        flush=True,
    )


def store_warmup(ring: Any, processes: int) -> list[bytes]:
    from rotatord.crypto.keyring import multifernet

    token = multifernet(ring).encrypt(b"warm-up")
    return [token] * (processes * 64)


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(settings: dict[str, Any], old: bytes, new: bytes, processes: int) -> dict[str, Any]:
    spec = {"settings": settings, "old": old.decode(), "new": new.decode(), "processes": processes}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.reencrypt", "child"],
        input=json.dumps(spec, default=str) + "\n",
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- the stores -------------------------------------------------------------------------------


@dataclass
class Target:
    """One store filled with ``rows`` tokens under ``keys[0]``.  ``settle`` runs before each
    round (not timed): what the store's server would have done on its own in the weeks between
    two rotations, so that a round pays for its own writes, not for the previous round's."""

    name: str
    rows: int
    settings: dict[str, Any]
    settle: Callable[[], None] = field(default=lambda: None)


def _private_file(directory: Path, text: str) -> Path:
    path = directory / f"url-{uuid.uuid4().hex[:8]}"
    path.write_text(text)
    path.chmod(0o600)
    return path


def _rows(tokens: Sequence[bytes], rows: int) -> Iterator[tuple[int, str]]:
    for i in range(rows):
        yield i, tokens[i % len(tokens)].decode()


@contextmanager
def sqlite_target(work: Path, tokens: Sequence[bytes], rows: int) -> Iterator[Target]:
    db = work / f"bench-{rows}.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")  # what a bot application sharing the file would use
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    rows_iter = _rows(tokens, rows)
    while batch := list(itertools.islice(rows_iter, 10_000)):
        conn.executemany("INSERT INTO messages VALUES (?, ?)", batch)
    conn.commit()
    conn.close()
    url = _private_file(work, f"sqlite:///{db}")
    settings = {"kind": "sql", "url_file": str(url), "table": "messages", "key": ["id"], "columns": ["body"]}
    try:
        yield Target("sqlite", rows, settings)
    finally:
        db.unlink(missing_ok=True)


@contextmanager
def postgres_target(work: Path, tokens: Sequence[bytes], rows: int) -> Iterator[Target]:
    import psycopg

    table = f"bench_{uuid.uuid4().hex[:10]}"
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, body TEXT NOT NULL)")
        with conn.cursor().copy(f"COPY {table} (id, body) FROM STDIN") as copy:
            for row in _rows(tokens, rows):
                copy.write_row(row)
        conn.execute(f"VACUUM ANALYZE {table}")
    url = _private_file(work, PG_URL)
    settings = {"kind": "sql", "url_file": str(url), "table": table, "key": ["id"], "columns": ["body"]}

    def settle() -> None:
        # Autovacuum would have removed the previous round's dead row versions long before the
        # next rotation; the checkpoint writes out the buffers that round left dirty.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"VACUUM ANALYZE {table}")
            conn.execute("CHECKPOINT")

    try:
        yield Target("postgresql", rows, settings, settle)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


@contextmanager
def files_target(work: Path, tokens: Sequence[bytes], rows: int) -> Iterator[Target]:
    directory = work / "files"
    for i, body in _rows(tokens, rows):
        sub = directory / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:07d}.tok").write_text(body + "\n")
    settings = {"kind": "files", "directory": str(directory), "pattern": "*/*.tok"}
    try:
        yield Target("files", rows, settings)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def redis_target(work: Path, tokens: Sequence[bytes], rows: int) -> Iterator[Target]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench_{uuid.uuid4().hex[:10]}:"
    rows_iter = _rows(tokens, rows)
    while batch := list(itertools.islice(rows_iter, 5000)):
        pipe = client.pipeline(transaction=False)
        for i, body in batch:
            pipe.set(f"{prefix}{i}", body)
        pipe.execute()
    url = _private_file(work, REDIS_URL)
    settings = {"kind": "redis", "url_file": str(url), "pattern": f"{prefix}*"}
    try:
        yield Target("redis", rows, settings)
    finally:
        found = client.scan_iter(match=f"{prefix}*", count=5000)
        while keys := list(itertools.islice(found, 5000)):
            client.delete(*keys)
        client.close()


TARGETS = {"sqlite": sqlite_target, "postgresql": postgres_target, "files": files_target, "redis": redis_target}


# -- main -------------------------------------------------------------------------------------


def measure(
    target: Target, keys: list[bytes], tokens: dict[int, list[bytes]], processes: int, *, settle: bool = True
) -> dict[str, Any]:
    """One round per key step, each from a settled store; the limit is taken right before and
    after each store run."""
    runs = []
    for step in range(len(keys) - 1):
        old, new = keys[step], keys[step + 1]
        sample = tokens[step]
        limit_total = min(200_000, max(40_000, target.rows // 5))
        if settle:
            target.settle()
            os.sync()  # the previous round's (or the fill's) dirty pages are written back now, untimed
        before = crypto_limit(old, new, sample, processes, limit_total)
        result = run_child(target.settings, old, new, processes)
        after = crypto_limit(old, new, sample, processes, limit_total)
        if result["rows"] != target.rows:
            raise RuntimeError(f"{target.name}: rewrote {result['rows']} of {target.rows} rows")
        rate = result["rows"] / result["seconds"]
        limit = (before + after) / 2
        runs.append(result | {"rate": rate, "limit": limit, "ratio": rate / limit})
        print(
            f"  {target.name:<10} {target.rows:>8} rows  round {step + 1}: {rate:8.0f} rows/s"
            f"  limit {limit:8.0f}/s  ratio {rate / limit:.2f}  peak RSS {result['vmhwm_mb']:.0f} MB"
            f" (workers {result['workers_max_rss_mb']:.0f} MB)",
            flush=True,
        )
    best = max(runs, key=lambda r: r["ratio"])
    return {
        "store": target.name,
        "rows": target.rows,
        "rounds": len(runs),
        "rate_median": statistics.median(r["rate"] for r in runs),
        "limit_median": statistics.median(r["limit"] for r in runs),
        "ratio_median": statistics.median(r["ratio"] for r in runs),
        "ratio_best": best["ratio"],
        "vmhwm_mb_max": max(r["vmhwm_mb"] for r in runs),
        "workers_max_rss_mb": max(r["workers_max_rss_mb"] for r in runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="sqlite,postgresql,files,redis")
    parser.add_argument("--rows", type=int, default=100_000, help="rows for SQLite and PostgreSQL")
    parser.add_argument("--million", action="store_true", help="also run SQLite and PostgreSQL at 1,000,000 rows")
    parser.add_argument("--files-rows", type=int, default=20_000, help="files (each rewrite is fsync'ed)")
    parser.add_argument("--redis-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--no-settle", action="store_true", help="run the rounds back to back, without settling the store first"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = set(stores) - set(TARGETS)
    if unknown:
        parser.error(f"unknown stores: {', '.join(sorted(unknown))}")
    keys = [Fernet.generate_key() for _ in range(args.rounds + 1)]
    print(f"generating {DISTINCT_TOKENS} distinct 1 KiB tokens per key ...", flush=True)
    tokens = {step: make_tokens(keys[step], DISTINCT_TOKENS, args.processes) for step in range(args.rounds)}
    plan: list[tuple[str, int]] = []
    for store in stores:
        if store in ("sqlite", "postgresql"):
            plan.append((store, args.rows))
            if args.million:
                plan.append((store, 1_000_000))
        else:
            plan.append((store, args.files_rows if store == "files" else args.redis_rows))
    summary = []
    with tempfile.TemporaryDirectory(prefix="rotatord-bench-reencrypt-") as tmp:
        work = Path(tmp)
        for store, rows in plan:
            print(f"{store}: filling {rows} rows ...", flush=True)
            with TARGETS[store](work, tokens[0], rows) as target:
                summary.append(measure(target, keys, tokens, args.processes, settle=not args.no_settle))
    print()
    print("| store | rows | rows/s (median) | crypto limit/s | ratio (median) | best | peak RSS | workers |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        print(
            f"| {s['store']} | {s['rows']:,} | {s['rate_median']:,.0f} | {s['limit_median']:,.0f} | "
            f"{s['ratio_median']:.2f} | {s['ratio_best']:.2f} | {s['vmhwm_mb_max']:.0f} MB | "
            f"{s['workers_max_rss_mb']:.0f} MB |"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child()
    else:
        sys.exit(main())
