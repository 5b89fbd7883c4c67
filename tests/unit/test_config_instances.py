"""The ``[daemon]`` keys of several instances: instance_name, lease_ttl, lease_renew."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from rotatord.config import load_settings
from rotatord.errors import ConfigError
from tests.unit.test_config import EXAMPLE, edited, write

TTL_LINE = '# lease_ttl = "15s"'
RENEW_LINE = '# lease_renew = "5s"'
NAME_LINE = '# instance_name = "rotatord-a"'


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("ROTATORD_"):
            monkeypatch.delenv(name)


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_defaults_the_host_name_and_a_third_of_the_ttl(tmp_path: Path) -> None:
    daemon = load_settings(write(tmp_path, EXAMPLE.read_text())).daemon
    assert daemon.lease_ttl == timedelta(seconds=15) and daemon.lease_renew_every == timedelta(seconds=5)
    assert daemon.instance == socket.gethostname()  # a plain host name is kept as it is


def test_explicit_values(tmp_path: Path) -> None:
    text = edited(TTL_LINE, 'lease_ttl = "30s" #').replace(RENEW_LINE, 'lease_renew = "4s" #')
    text = text.replace(NAME_LINE, 'instance_name = "rotatord-b" #')
    daemon = load_settings(write(tmp_path, text)).daemon
    assert (daemon.instance, daemon.lease_ttl, daemon.lease_renew_every) == (
        "rotatord-b",
        timedelta(seconds=30),
        timedelta(seconds=4),
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (TTL_LINE, 'lease_ttl = "1s" #', "daemon.lease_ttl: must be at least 2s"),
        (RENEW_LINE, 'lease_renew = "10s" #', "daemon.lease_renew: must be more than 0s and at most half"),
        (RENEW_LINE, 'lease_renew = "0s" #', "daemon.lease_renew: must be more than 0s"),
        (NAME_LINE, 'instance_name = "no spaces" #', "daemon.instance_name"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    found = _problems(write(tmp_path, edited(old, new)))
    assert any(p.startswith(expected) for p in found), found
