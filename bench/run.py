"""Run every benchmark and print one Markdown table (``python -m bench.run --help``).

Never run by the test suite; nothing here asserts a timing.  The asserts in the benchmarks are
sanity checks (the rotations really happened, READY came from the daemon), and a benchmark that
fails one stops the run rather than reporting a number about something that did not happen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from . import engine_throughput, profiling, startup, watchdog
from .results import Result, markdown_table

REPO = Path(__file__).resolve().parent.parent
ALL = ("engine", "watchdog", "startup")


def _commit() -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _environment() -> dict[str, str]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(),
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "load": _load(),
    }


def _load() -> str:
    """The 1-minute load average: other work on the machine inflates every number here."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=ALL, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--secrets", type=int, default=1000, help="secrets in the start-up benchmark (default 1000)")
    parser.add_argument("--idle", type=float, default=30, help="idle measurement, seconds (default 30)")
    parser.add_argument("--quick", action="store_true", help="200 secrets, 5 s idle, fewer samples: a smoke run")
    parser.add_argument("--profile", action="store_true", help="also print the hot spots (cProfile; py-spy if on PATH)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.secrets, args.idle = min(args.secrets, 200), min(args.idle, 5)
    chosen = args.only or list(ALL)

    env = _environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    results: list[Result] = []
    began = time.monotonic()
    for name in chosen:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        if name == "engine":
            results += engine_throughput.run(rounds=3 if args.quick else 10)
        elif name == "watchdog":
            results += watchdog.run()
        else:
            results += startup.run(
                secrets=args.secrets,
                warm_runs=2 if args.quick else 3,
                idle_seconds=args.idle,
                cli_samples=3 if args.quick else 10,
            )
        print(f"   {name}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    print()
    print(markdown_table(results))
    missed = [r for r in results if r.met is False]
    print(
        f"\n{len(results)} numbers, {sum(r.met is True for r in results)} targets met, {len(missed)} missed; "
        f"{time.monotonic() - began:.0f} s; load average at the end {_load()}"
    )

    if args.profile:
        print("\n## engine: cProfile of complete fernet rotations\n")
        print(engine_throughput.profile())
        print(f"## daemon start-up ({args.secrets} secrets, warm): cProfile of the main thread\n")
        print(profiling.startup_cprofile(args.secrets))
        print(f"## daemon first start ({args.secrets} secrets to create): py-spy\n")
        print(profiling.creation_wave_pyspy(args.secrets))

    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": [r.as_dict() for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
