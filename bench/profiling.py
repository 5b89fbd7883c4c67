"""Where the time goes (``python -m bench.run --profile``): hot spots with their file:line.

- start-up: the real daemon under ``python -m cProfile`` on a warm state, from exec to READY=1
  (cProfile sees the main thread only, which is where start-up happens);
- the creation wave of a first start, sampled with py-spy when it is installed
  (``pip install py-spy``; not a dependency): ``--gil`` keeps only the thread holding the GIL,
  which is what limits a CPU-bound Python daemon, across every thread;
- the engine's complete rotations: :func:`bench.engine_throughput.profile`.
"""

from __future__ import annotations

import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .harness import TimedNotifyListener, Workspace, mixed_secrets, running, wait_for_rotations, workspace

__all__ = ["creation_wave_pyspy", "startup_cprofile"]


def _create_all(ws: Workspace, listener: TimedNotifyListener, secrets: int) -> None:
    daemon, _t0 = ws.start(listener)
    with running(daemon):
        daemon.wait_ready(timeout=120)
        wait_for_rotations(ws.state_db, secrets, min_version=1, timeout=900)


def startup_cprofile(secrets: int = 1000, top: int = 30) -> str:
    """cProfile of ``rotatord run`` from exec to READY=1, on a state where every secret exists."""
    with workspace("profile-startup") as ws:
        ws.write_config(mixed_secrets(secrets))
        ws.init()
        listener = TimedNotifyListener()
        try:
            _create_all(ws, listener, secrets)
            out_file = ws.root / "startup.prof"
            mark = len(listener.messages)
            start = time.monotonic()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cProfile",
                    "-o",
                    str(out_file),
                    "-m",
                    "rotatord.cli.main",
                    "run",
                    "--config",
                    str(ws.config),
                ],
                env={**os.environ, "NOTIFY_SOCKET": listener.path},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                pid, _fields = listener.wait_for("READY", "1", timeout=120, since=mark)
                assert pid == proc.pid, "READY=1 from another process"
                ready = time.monotonic() - start
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
                proc.wait(60)
            out = io.StringIO()
            out.write(f"spawn -> READY under cProfile: {ready:.2f} s (the profiler slows it down)\n")
            stats = pstats.Stats(str(out_file), stream=out)
            stats.sort_stats("cumulative").print_stats(r"rotatord/", top)
            return out.getvalue()
        finally:
            listener.close()


def creation_wave_pyspy(secrets: int = 1000, seconds: int = 15, top: int = 20) -> str:
    """py-spy ``--gil`` samples of a first start while it creates ``secrets`` secrets."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return "py-spy is not installed (pip install py-spy): creation-wave profile skipped\n"
    with workspace("profile-wave") as ws:
        ws.write_config(mixed_secrets(secrets))
        ws.init()
        listener = TimedNotifyListener()
        try:
            daemon, _t0 = ws.start(listener, env={"WATCHDOG_USEC": "2000000"})
            with running(daemon):
                raw = ws.root / "wave.txt"
                spy = subprocess.run(
                    [
                        pyspy,
                        "record",
                        "--pid",
                        str(daemon.pid),
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                        "--duration",
                        str(seconds),
                        "--rate",
                        "200",
                        "--gil",
                        "--nonblocking",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=False,
                )
            if spy.returncode != 0 or not raw.exists():
                return f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}\n"
            return _summarise_collapsed(raw, top)
        finally:
            listener.close()


def _summarise_collapsed(raw: Path, top: int) -> str:
    """Own time per frame, and time per innermost rotatord frame, from py-spy's collapsed stacks."""
    total = 0
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue  # a frame name broken over two lines
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        ours_frames = [f for f in frames if "rotatord/" in f]
        if ours_frames:
            ours[ours_frames[-1]] += n
        for frame in set(ours_frames):
            inclusive[frame] += n
    if total == 0:
        return "py-spy recorded no samples\n"
    lines = [f"py-spy --gil: {total} samples of the thread holding the GIL, creation wave"]
    for title, counter in (
        ("own time", own),
        ("innermost rotatord frame", ours),
        ("inclusive, rotatord frames", inclusive),
    ):
        lines.append(f"-- {title}")
        lines += [f"{100 * c / total:5.1f}%  {frame}" for frame, c in counter.most_common(top)]
    return "\n".join(lines) + "\n"
