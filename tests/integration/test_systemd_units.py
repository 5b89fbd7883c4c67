"""The unit files under systemd/ pass systemd's own checks (systemd-analyze, systemd-sysusers).

No running systemd is needed: ``verify`` and ``security --offline=yes`` only parse the files.
Without the tools the tests skip, except in CI (``CI=true``), which must have them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.servers import require

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
MAX_EXPOSURE = 1.5
# systemd-analyze's --threshold is on its internal 0-100 scale: 15 means an exposure of 1.5.
THRESHOLD = "15"
# Plain, uncoloured, unpaged output we can parse.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} not found: apt-get install systemd")
    assert path is not None
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=TOOL_ENV, timeout=60, check=False)


def _directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit or config file (all sections, every occurrence, in order)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of rotatord.socket and rotatord.service whose ExecStart= binary exists.

    ``systemd-analyze verify`` fails a unit whose ExecStart= executable is missing, and
    /usr/bin/rotatord is not installed where tests run.  So we copy the units and point
    ExecStart= at a stub script in tmp_path; the rest of each file is checked as shipped.
    """
    stub = tmp_path / "bin" / "rotatord"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    socket_unit = tmp_path / "rotatord.socket"
    shutil.copyfile(UNIT_DIR / "rotatord.socket", socket_unit)
    service_text = (UNIT_DIR / "rotatord.service").read_text()
    assert service_text.count("ExecStart=/usr/bin/rotatord ") == 1
    service_unit = tmp_path / "rotatord.service"
    service_unit.write_text(service_text.replace("ExecStart=/usr/bin/rotatord ", f"ExecStart={stub} "))
    return socket_unit, service_unit


def test_verify_passes_with_recursive_errors(units: tuple[Path, Path]) -> None:
    analyze = _tool("systemd-analyze")
    result = _run(analyze, "verify", "--recursive-errors=yes", *map(str, units))
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if "rotatord" in line]
    assert result.returncode == 0, output
    assert ours == [], output


def test_verify_catches_a_typo(units: tuple[Path, Path]) -> None:
    """The check has teeth: a misspelt key fails it (plain ``verify`` would exit 0)."""
    analyze = _tool("systemd-analyze")
    socket_unit, service_unit = units
    service_unit.write_text(service_unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = _run(analyze, "verify", "--recursive-errors=yes", str(socket_unit), str(service_unit))
    assert result.returncode != 0
    assert "ProtectSytem" in result.stdout + result.stderr


def test_security_exposure_is_at_most_1_5(units: tuple[Path, Path]) -> None:
    analyze = _tool("systemd-analyze")
    _, service_unit = units
    result = _run(analyze, "security", "--offline=yes", f"--threshold={THRESHOLD}", str(service_unit))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for rotatord\.service: (\d+\.\d+)", output)
    assert match is not None, output
    assert float(match.group(1)) <= MAX_EXPOSURE


def test_sysusers_file_is_valid(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "root" / "etc").mkdir(parents=True)
    result = _run(sysusers, "--dry-run", f"--root={tmp_path / 'root'}", str(UNIT_DIR / "rotatord.sysusers.conf"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "rotatord-admin" in output


def test_units_agree_with_each_other() -> None:
    """Facts that span files, which no systemd tool cross-checks."""
    service = _directives(UNIT_DIR / "rotatord.service")
    socket_ = _directives(UNIT_DIR / "rotatord.socket")
    sysusers = (UNIT_DIR / "rotatord.sysusers.conf").read_text().split("\n")
    env = dict(item.split("=", 1) for line in service["Environment"] for item in line.split())

    # The daemon's configured socket path is the one systemd listens on (the CLI uses it).
    assert socket_["ListenStream"] == [env["ROTATORD_DAEMON__CONTROL_SOCKET"]]
    assert socket_["FileDescriptorName"] == ["control"]
    # The socket's group is created by sysusers.d.
    (group,) = socket_["SocketGroup"]
    assert f"g {group} -" in sysusers
    # RuntimeDirectory=rotatord would delete the listening socket's directory on every stop.
    assert "rotatord" not in service.get("RuntimeDirectory", [])
    # State lives where StateDirectory= puts it, and 252 knows no Type=notify-reload.
    assert service["StateDirectory"] == ["rotatord"]
    assert env["ROTATORD_DAEMON__STATE_DIR"] == "%S/rotatord"
    assert service["Type"] == ["notify"]
    assert service["ExecStart"] == ["/usr/bin/rotatord run --config %d/config.toml"]
    assert "config.toml:/etc/rotatord/config.toml" in service["LoadCredential"]
