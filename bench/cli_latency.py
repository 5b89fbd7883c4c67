"""Round trips through the CLI and the control socket against a running daemon.

Each sample is a different secret, so no rotation waits for another.  Four series:

- ``rotatord status NAME --json``: the floor of any CLI command (interpreter start, imports,
  config load and validation, one socket request);
- ``rotatord rotate NAME --json``: a scheduled-style rotation; with the bench's 10 min
  propagation it returns after the ``stage`` step;
- ``rotatord rotate NAME --emergency --json``: the whole rotation (stage, promote, reencrypt,
  retire) before the reply;
- the same emergency rotation through ``call_daemon`` in this process: the daemon's share of
  the round trip, without starting a CLI process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rotatord.cli.client import call_daemon
from rotatord.config import load_settings
from tests.helpers import cli

from .harness import summary
from .results import Result

__all__ = ["measure_cli"]

BENCH = "cli"


def _timed_cli(config: Path, *args: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    result = cli(config, *args, "--json")
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"rotatord {args[0]} exited {result.returncode}: {result.stderr.strip()}")
    reply: dict[str, Any] = json.loads(result.stdout)
    return elapsed, reply


def measure_cli(config: Path, secrets: int, samples: int = 10) -> list[Result]:
    """``secrets`` is the daemon's count (names from :func:`bench.harness.mixed_secrets`)."""
    fernets = [f"bench-fernet-{i:04d}" for i in range(0, secrets, 2)]
    if len(fernets) < 3 * samples:
        raise ValueError(f"need {3 * samples} fernet secrets for {samples} samples per series")
    socket_path = load_settings(config).daemon.socket_path
    series: dict[str, list[float]] = {"status": [], "rotate": [], "emergency": [], "socket": []}

    for name in fernets[:samples]:
        elapsed, reply = _timed_cli(config, "status", name)
        assert reply["daemon"]["running"], "status fell back to the state database: no daemon answered"
        assert [s["name"] for s in reply["secrets"]] == [name], "status answered about another secret"
        series["status"].append(elapsed)
    for name in fernets[:samples]:
        elapsed, reply = _timed_cli(config, "rotate", name)
        assert (reply["version"], reply["phase"], reply["state"]) == (2, "staged", "in progress"), reply
        series["rotate"].append(elapsed)
    for name in fernets[samples : 2 * samples]:
        elapsed, reply = _timed_cli(config, "rotate", name, "--emergency", "--reason", "bench")
        assert (reply["version"], reply["phase"], reply["state"]) == (2, "retired", "done"), reply
        series["emergency"].append(elapsed)
    for name in fernets[2 * samples : 3 * samples]:
        start = time.perf_counter()
        reply = call_daemon(socket_path, {"op": "rotate", "name": name, "emergency": True, "reason": "bench"})
        series["socket"].append(time.perf_counter() - start)
        assert (reply["version"], reply["phase"], reply["state"]) == (2, "retired", "done"), reply

    labels = {
        "status": "`rotatord status NAME` round trip",
        "rotate": "`rotatord rotate NAME` round trip (returns after stage)",
        "emergency": "`rotatord rotate NAME --emergency` round trip (full rotation)",
        "socket": "control socket rotate --emergency, no CLI process",
    }
    results = []
    for key, values in series.items():
        stats = summary(values)
        results.append(
            Result(
                BENCH,
                labels[key],
                stats["median"] * 1000,
                "ms",
                note=f"median of {stats['n']}; p95 {stats['p95'] * 1000:.0f} ms; {secrets} secrets managed",
            )
        )
    return results
