"""config.example.toml is the embedded default and documents every key of every section."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from rotatord.config import load_settings
from rotatord.config.model import (
    AwsBackendSettings,
    ConsumerSettings,
    DaemonSettings,
    FileBackendSettings,
    FilesStoreSettings,
    HookSettings,
    NotifySettings,
    RedisStoreSettings,
    SecretSettings,
    SqlStoreSettings,
    VaultBackendSettings,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
MODELS: list[type[BaseModel]] = [
    DaemonSettings,
    FileBackendSettings,
    VaultBackendSettings,
    AwsBackendSettings,
    NotifySettings,
    ConsumerSettings,
    SecretSettings,
    SqlStoreSettings,
    FilesStoreSettings,
    RedisStoreSettings,
    HookSettings,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_key_is_documented(model: type[BaseModel]) -> None:
    text = EXAMPLE.read_text()
    missing = [f for f in model.model_fields if not re.search(rf"^\s*#?\s*{re.escape(f)}\s*=", text, re.MULTILINE)]
    assert missing == [], f"config.example.toml does not document {model.__name__}: {missing}"


def test_the_example_is_valid_as_shipped(tmp_path: Path) -> None:
    copy = tmp_path / "config.toml"
    copy.write_text(EXAMPLE.read_text())
    settings = load_settings(copy)
    assert [s.name for s in settings.secrets] == ["demo-bot-db", "demo-bot-api"]
    assert settings.daemon.state_dir == tmp_path / "var"
