"""Test-suite-wide plugins and fixtures: the real servers some suites need, captured logs."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

import pytest

from rotatord.logs import NOISY_LOGGERS, setup_logging
from tests.servers.receivers import ReceiverServer, receiver_server

pytest_plugins = ["tests.servers.openbao", "tests.servers.moto", "tests.servers.databases"]

# Daemons started by tests serve no metrics unless a test asks for them: config.example.toml
# binds 127.0.0.1:9464, and test runs in parallel (or a local Prometheus exporter) would collide.
# The environment override beats the TOML, and every child process inherits it.
os.environ.setdefault("ROTATORD_DAEMON__METRICS", "off")


@pytest.fixture
def receivers() -> Iterator[ReceiverServer]:
    """Real webhook receivers on a free port (tests/servers/receivers.py), stopped after the test."""
    with receiver_server() as server:
        yield server


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Logging set up as the daemon does it, onto a StringIO; the root logger is restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    buffer = io.StringIO()
    setup_logging("debug", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_noisy.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)
