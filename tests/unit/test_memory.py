"""limit_malloc_arenas: the daemon's threads share one glibc malloc arena.

Each case runs a fresh interpreter (an arena limit only affects arenas not created yet), starts
four threads that allocate while all are alive, and counts the arenas glibc reports.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are a glibc feature")

SCRIPT = r"""
import ctypes, sys, threading
from rotatord.daemon.memory import limit_malloc_arenas

took = limit_malloc_arenas() if sys.argv[1] == "limit" else None
barrier = threading.Barrier(4)
held = []

def work():
    blocks = [bytearray(4096) for _ in range(64)]  # > 512 bytes: glibc malloc, not pymalloc
    barrier.wait()  # every thread alive and holding memory: none can hand its arena on
    held.append(blocks)

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
sys.stderr.flush()
ctypes.CDLL(None).malloc_stats()  # to stderr: one "Arena N:" section per arena
print(took)
"""


def _arenas(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        env=clean | env,
        check=True,
        timeout=60,
    )
    arenas = sum(1 for line in proc.stderr.splitlines() if line.startswith("Arena "))
    return proc.stdout.strip(), arenas


def test_without_the_limit_threads_get_arenas_of_their_own() -> None:
    took, arenas = _arenas("default")
    assert took == "None"
    assert arenas >= 3  # the main thread's and one per allocating thread (up to 8 per core)


def test_the_limit_keeps_every_thread_in_one_arena() -> None:
    took, arenas = _arenas("limit")
    assert took == "True"
    assert arenas == 1


def test_an_operator_setting_in_the_environment_stands() -> None:
    took, arenas = _arenas("limit", MALLOC_ARENA_MAX="2")
    assert took == "False"
    assert arenas == 2
