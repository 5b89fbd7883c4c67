"""Hook configuration: ``[[hooks]]`` and ``[[secrets.hooks]]`` validated whole, each problem named
by its TOML path; the programs they name checked with the other referenced files."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from rotatord.config import check_references, load_settings
from rotatord.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("ROTATORD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def program(directory: Path, name: str = "hook.sh", mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def config(directory: Path, global_hooks: str = "", secret_hooks: str = "", token_hooks: str = "") -> Path:
    """The example with hooks added: global ones at the end, per-secret ones after each secret."""
    text = EXAMPLE.read_text()
    marker = '\n[[secrets]]\nname = "demo-bot-api"'
    assert text.count(marker) == 1
    text = text.replace(marker, f"\n{secret_hooks}\n{marker}")
    text += f"\n{token_hooks}\n{global_hooks}\n"
    path = directory / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_hooks_load_with_their_defaults_and_relative_programs_resolve_to_the_config_dir(tmp_path: Path) -> None:
    program(tmp_path)
    path = config(
        tmp_path,
        global_hooks='[[hooks]]\ncommand = ["./hook.sh", "--flag"]\nphases = ["promoted", "failed"]\n',
        secret_hooks='[[secrets.hooks]]\nname = "reload"\ncommand = ["/usr/bin/systemctl", "reload", "bot.service"]\n'
        'phases = ["promoted"]\non_failure = "block"\ntimeout = "5s"\nenv = { UNIT = "bot.service" }\n',
    )
    settings = load_settings(path)
    (glob,) = settings.hooks
    assert glob.command == (str(tmp_path / "hook.sh"), "--flag")
    assert (glob.timeout, glob.on_failure, glob.with_secret, dict(glob.env), glob.name) == (
        timedelta(seconds=60), "ignore", False, {}, None,
    )  # fmt: skip
    (reload,) = settings.secrets[0].hooks
    assert (reload.name, reload.on_failure, reload.timeout, dict(reload.env)) == (
        "reload", "block", timedelta(seconds=5), {"UNIT": "bot.service"},
    )  # fmt: skip
    assert [p for p in check_references(settings, path) if "hooks[" in p] == []


@pytest.mark.parametrize(
    ("hooks", "expected"),
    [
        ('command = ["hook.sh"]\nphases = ["staged"]', "hooks[0].command: the program must be a path, not 'hook.sh'"),
        ('command = []\nphases = ["staged"]', "hooks[0].command: Tuple should have at least 1 item"),
        ('command = ["/bin/true"]\nphases = ["rotated"]', "hooks[0].phases[0]: Input should be 'staged'"),
        ('command = ["/bin/true"]\nphases = []', "hooks[0].phases: Tuple should have at least 1 item"),
        ('command = ["/bin/true"]\nphases = ["staged"]\ntimeout = "0s"', "hooks[0].timeout: must be between 1s and 1h"),
        ('command = ["/bin/true"]\nphases = ["staged"]\non_failure = "abort"', "hooks[0].on_failure: Input should be"),
        ('command = ["/bin/true"]\nphases = ["staged"]\nenv = { ROTATORD_X = "x" }', "hooks[0].env: names starting"),
        ('command = ["/bin/true"]\nphases = ["staged"]\nenv = { "A-B" = "x" }', "hooks[0].env.A-B.[key]: must be an"),
        ('command = ["/bin/true"]\nphases = ["staged"]\nshell = true', "hooks[0].shell: unknown key"),
        (
            'command = ["/bin/true"]\nphases = ["staged"]\nenv = { KEY = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" }',
            "hooks[0].env.KEY: looks like key material",
        ),
    ],
)
def test_bad_hook_settings_are_named_by_their_toml_path(tmp_path: Path, hooks: str, expected: str) -> None:
    found = problems(config(tmp_path, global_hooks=f"[[hooks]]\n{hooks}\n"))
    assert any(p.startswith(expected) for p in found), found


def test_per_secret_problems_name_the_secret_and_phases_must_fit_its_kind(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        secret_hooks='[[secrets.hooks]]\ncommand = ["/bin/true"]\nphases = ["issued"]\n',
        token_hooks='[[secrets.hooks]]\ncommand = ["/bin/true"]\nphases = ["staged", "promoted", "revoked"]\n'
        '[[secrets.hooks]]\ncommand = ["/bin/true"]\nphases = ["failed"]\n',
    )
    assert problems(path) == [
        "secrets[0].hooks[0].phases (secret 'demo-bot-db'): not a phase of a fernet secret: issued",
        "secrets[1].hooks[1].command (secret 'demo-bot-api'): the same command as hooks[0]; merge their phases",
        "secrets[1].hooks[0].phases (secret 'demo-bot-api'): not a phase of a api_token secret: staged",
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d: d / "missing.sh", "does not exist"),
        (lambda d: program(d, mode=0o644), "is not executable (chmod 755 it)"),
        (lambda d: program(d, mode=0o777), "is writable by group or others (mode 0777); chmod 755 it"),
        (lambda d: d, "is not a regular file"),
    ],
    ids=["missing", "not-executable", "world-writable", "directory"],
)
def test_a_hook_program_that_cannot_be_run_safely_is_a_reference_problem(
    tmp_path: Path, make: Callable[[Path], Path], expected: str
) -> None:
    (tmp_path / "bin").mkdir()
    target = make(tmp_path / "bin")
    path = config(
        tmp_path,
        global_hooks=f'[[hooks]]\ncommand = ["{target}"]\nphases = ["failed"]\n',
        secret_hooks=f'[[secrets.hooks]]\ncommand = ["{target}"]\nphases = ["staged"]\n',
    )
    assert [p for p in check_references(load_settings(path), path) if "hooks[" in p] == [
        f"secrets[0].hooks[0].command (secret 'demo-bot-db'): {target} {expected}",
        f"hooks[0].command: {target} {expected}",
    ]
