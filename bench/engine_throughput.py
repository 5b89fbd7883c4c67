"""Raw engine throughput, in this process, on the file backend: complete rotations per second.

The engine comes from :func:`rotatord.daemon.runtime.build_runtime`, as in the daemon and in
``rotate --offline``: real SQLite journal (WAL), real hash-chained audit log, real encrypted
file backend, every write fsynced.  Each ``engine.rotate(..., emergency=True)`` with
propagation and grace 0s runs a whole rotation before it returns:

- fernet: stage + promote + reencrypt (no data stores configured) + retire: 3 backend writes;
- api_token: issue + revoke: 2 backend writes.

The secrets are created first (not timed); then every secret is rotated in turn, for
``rounds`` rounds.  No daemon, scheduler, control socket or log formatting is involved, so
this is the ceiling for what the daemon's workers can do on one core.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

from rotatord.config import load_settings
from rotatord.daemon.runtime import build_runtime
from rotatord.document import CredentialSet, FernetRing
from rotatord.interfaces import Backend
from rotatord.timeutil import utcnow

from .harness import SecretSpec, summary, workspace
from .results import Result

__all__ = ["profile", "run"]

BENCH = "engine"


def _specs(kind: str, count: int) -> list[SecretSpec]:
    short = "fernet" if kind == "fernet" else "token"
    return [SecretSpec(f"engine-{short}-{i:03d}", kind, grace="0s", propagation="0s") for i in range(count)]


def _rotate_all(
    kind: str, secrets: int, rounds: int, profiler: cProfile.Profile | None = None
) -> tuple[list[float], float]:
    """Seconds per complete rotation, one per (round, secret), and the CPU seconds of this process
    over them all; checks every result."""
    with workspace(f"engine-{kind}") as ws:
        specs = _specs(kind, secrets)
        ws.write_config(specs)
        ws.init()
        runtime = build_runtime(load_settings(ws.config))
        engine = runtime.engine
        try:
            for spec in specs:  # creation, untimed
                row = engine.rotate(spec.name, trigger="bench", emergency=True, reason="bench", now=utcnow())
                assert (row.version, row.status) == (1, "done"), (spec.name, row.version, row.status)
            latencies: list[float] = []
            cpu_start = time.process_time()
            for r in range(rounds):
                for spec in specs:
                    if profiler is not None:
                        profiler.enable()
                    start = time.perf_counter()
                    row = engine.rotate(spec.name, trigger="bench", emergency=True, reason="bench", now=utcnow())
                    latencies.append(time.perf_counter() - start)
                    if profiler is not None:
                        profiler.disable()
                    assert (row.version, row.status, row.error) == (r + 2, "done", None), (spec.name, row.version)
            cpu = time.process_time() - cpu_start
            _check_documents(runtime.backends["local"], specs, rounds + 1)
        finally:
            runtime.close()
    return latencies, cpu


def _check_documents(backend: Backend, specs: list[SecretSpec], version: int) -> None:
    """Each document ends at the last version with exactly what a finished rotation leaves."""
    for spec in specs:
        current = backend.read(f"bench/{spec.name}")
        assert current is not None, f"{spec.name}: no document"
        doc = current.document
        assert doc.version == version, f"{spec.name}: document at version {doc.version}, expected {version}"
        if isinstance(doc, FernetRing):
            # keep = 0 and emergency: only the new primary is left in the ring.
            assert [k.id for k in doc.keys] == [doc.primary], f"{spec.name}: ring holds {len(doc.keys)} keys"
        else:
            assert isinstance(doc, CredentialSet)
            assert doc.previous is None, f"{spec.name}: the previous token was not revoked"


def run(secrets: int = 20, rounds: int = 10) -> list[Result]:
    results = []
    for kind, steps in (("fernet", "stage+promote+reencrypt+retire"), ("api_token", "issue+revoke")):
        latencies, cpu = _rotate_all(kind, secrets, rounds)
        stats = summary(latencies)
        results += [
            Result(
                BENCH,
                f"{kind} complete rotations per second ({steps})",
                len(latencies) / sum(latencies),
                "/s",
                note=f"{len(latencies)} rotations over {secrets} secrets",
            ),
            Result(
                BENCH,
                f"{kind} rotation latency, in process",
                stats["median"] * 1000,
                "ms",
                note=f"median; p95 {stats['p95'] * 1000:.1f} ms; {1000 * cpu / len(latencies):.1f} ms CPU each",
            ),
        ]
    return results


def profile(secrets: int = 20, rounds: int = 5, top: int = 25) -> str:
    """cProfile of the timed fernet rotations: the functions with the most own time, then the
    rotatord functions with the most cumulative time (file:line)."""
    profiler = cProfile.Profile()
    _rotate_all("fernet", secrets, rounds, profiler)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(r"rotatord/", top)
    return out.getvalue()
