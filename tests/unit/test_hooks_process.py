"""One hook process: exactly the environment given, bounded output, every way it can end."""

from __future__ import annotations

from pathlib import Path

from rotatord.hooks.process import OUTPUT_LIMIT, run_process

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "ROTATORD_PHASE": "staged"}


def sh(directory: Path, body: str) -> str:
    path = directory / "hook.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_the_command_gets_exactly_the_environment_and_stdin_given(tmp_path: Path) -> None:
    result = run_process([sh(tmp_path, 'env; echo "cwd=$(pwd)"; cat')], ENV, b'{"phase":"staged"}', 10)
    assert result.ok and result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[-1] == '{"phase":"staged"}'
    assert lines[-2] == "cwd=/"
    assert {line.split("=", 1)[0] for line in lines[:-2]} - {"PWD", "SHLVL", "_"} == set(ENV)


def test_output_is_bounded_and_a_hook_that_ignores_stdin_does_not_hang(tmp_path: Path) -> None:
    program = sh(tmp_path, "head -c 1000000 /dev/zero | tr '\\0' x; head -c 200000 /dev/zero >&2")
    result = run_process([program], ENV, b"y" * 2_000_000, 30)
    assert result.ok
    assert result.truncated
    assert (len(result.stdout), len(result.stderr)) == (OUTPUT_LIMIT, OUTPUT_LIMIT)


def test_non_zero_exit_and_death_by_signal_are_described(tmp_path: Path) -> None:
    exited = run_process([sh(tmp_path, "echo nope >&2; exit 7")], ENV, b"", 10)
    assert (exited.outcome, exited.returncode, exited.stderr) == ("exit", 7, "nope\n")
    assert exited.describe() == "exited with status 7"
    killed = run_process([sh(tmp_path, "kill -9 $$")], ENV, b"", 10)
    assert (killed.outcome, killed.describe()) == ("exit", "killed by signal 9")


def test_a_program_that_cannot_start_is_an_error_not_an_exception(tmp_path: Path) -> None:
    result = run_process([str(tmp_path / "missing")], ENV, b"", 10)
    assert result.outcome == "error"
    assert result.describe() == f"cannot start {tmp_path / 'missing'}: No such file or directory"


def test_a_shutdown_interrupts_the_run(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    result = run_process([sh(tmp_path, f"touch {marker}; exec sleep 60")], ENV, b"", 60, marker.exists)
    assert result.outcome == "stopped"
    assert result.describe() == "interrupted: the daemon is stopping"


def test_a_hook_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    result = run_process([sh(tmp_path, "trap '' TERM; sleep 60 & wait; sleep 60")], ENV, b"", 1)
    assert result.outcome == "timeout"
    assert result.describe() == "timed out after 1s and was killed"
