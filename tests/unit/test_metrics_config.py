"""``daemon.metrics``: "host:port" or "off", validated at load with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotatord.config import load_settings
from rotatord.config.model import DaemonSettings
from rotatord.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
SHIPPED = 'metrics = "127.0.0.1:9464"'


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/conftest.py switches metrics off for every daemon a test starts; here the file counts.
    monkeypatch.delenv("ROTATORD_DAEMON__METRICS", raising=False)


def load(tmp_path: Path, line: str) -> DaemonSettings:
    text = EXAMPLE.read_text()
    assert SHIPPED in text
    path = tmp_path / "config.toml"
    path.write_text(text.replace(SHIPPED, line))
    path.chmod(0o600)
    return load_settings(path).daemon


def test_loopback_is_the_default_and_what_the_example_ships(tmp_path: Path) -> None:
    assert DaemonSettings().metrics_address == ("127.0.0.1", 9464)
    assert load(tmp_path, SHIPPED).metrics_address == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("line", "address"),
    [
        ('metrics = "off"', None),
        ('metrics = "localhost:9100"', ("127.0.0.1", 9100)),
        ('metrics = "[::1]:9464"', ("::1", 9464)),
        ('metrics = "10.1.2.3:9464"', ("10.1.2.3", 9464)),
        ('metrics = "0.0.0.0:9464"', ("0.0.0.0", 9464)),
    ],
)
def test_good_addresses(tmp_path: Path, line: str, address: tuple[str, int] | None) -> None:
    assert load(tmp_path, line).metrics_address == address


@pytest.mark.parametrize(
    "bad", ["", "9464", ":9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:9464", "metrics.internal:9464",
            "OFF", "false", "127.0.0.1:94x4"],
)  # fmt: skip
def test_bad_addresses_name_the_field(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f'metrics = "{bad}"')
    assert caught.value.problems == [
        'daemon.metrics: must be "host:port" (an IP address or localhost, IPv6 in brackets, port 1-65535) '
        f'or "off", not {bad!r}'
    ]
    assert caught.value.exit_code == 78


def test_the_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROTATORD_DAEMON__METRICS", "off")
    assert load(tmp_path, SHIPPED).metrics_address is None
    monkeypatch.setenv("ROTATORD_DAEMON__METRICS", "nowhere")
    with pytest.raises(ConfigError, match=r"^daemon.metrics \(from \$ROTATORD_DAEMON__METRICS\): must be"):
        load(tmp_path, SHIPPED)
