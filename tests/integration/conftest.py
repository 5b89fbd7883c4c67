"""Fixtures for tests that run the real daemon: a private config, state directory and notify socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, NotifyListener, cli

FAST = {
    'every = "1m"': 'every = "1h"',
    'grace = "30s"': 'grace = "2s"',
    'grace = "20s"': 'grace = "2s"',
    'propagation = "10s"': 'propagation = "1s"',
    'startup_jitter = "2s"': 'startup_jitter = "0s"',
    'step_retry_initial = "5s"': 'step_retry_initial = "1s"',
}


def write_config(directory: Path, socket_dir: str, replacements: dict[str, str] | None = None, extra: str = "") -> Path:
    """The example config with short timings, its paths inside ``directory``, mode 0600."""
    text = (REPO / "config.example.toml").read_text()
    socket_line = '# control_socket = "/run/rotatord/control.sock"'
    fast = {**FAST, socket_line: f'control_socket = "{socket_dir}/control.sock"'}
    for old, new in {**fast, **(replacements or {})}.items():
        assert old in text, f"config.example.toml no longer contains {old!r}"
        text = text.replace(old, new)
    text += extra
    path = directory / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short directory for the control socket (sun_path holds 107 bytes; tmp_path can be longer)."""
    directory = tempfile.mkdtemp(prefix="rtd-s-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, socket_dir: str) -> Path:
    path = write_config(tmp_path, socket_dir)
    result = cli(path, "init")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    yield listener
    listener.close()
