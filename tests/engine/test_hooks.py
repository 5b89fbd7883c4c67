"""Lifecycle hooks run by the real engine: real subprocesses, the file backend, a SQLite journal.

Each hook is a small script written to ``tmp_path`` (its interpreter is this test's Python) that
records what it received — stdin, environment, argv — into a directory named by ``HOOK_OUT``.
``now`` is a parameter as everywhere in the engine tests; only the hook processes take real time.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rotatord.config.model import HookSettings
from rotatord.daemon.runtime import Runtime, build_runtime
from rotatord.hooks.runner import BASE_ENV, HookRunner
from rotatord.interfaces import Event
from tests.engine.conftest import (
    EVERY,
    FERNET,
    GRACE,
    PROPAGATION,
    T0,
    TOKEN,
    Harness,
    HarnessFactory,
    fernet_secret,
    materials,
    token_secret,
)
from tests.helpers import assert_no_material, wait_until

T1 = T0 + EVERY
PROMOTE_AT = T1 + PROPAGATION
RETIRE_AT = PROMOTE_AT + GRACE
FERNET_PHASES = ("staged", "promoted", "reencrypted", "retired")

RECORD = """
import json, os, sys
data = sys.stdin.read()
out = os.environ["HOOK_OUT"]
name = "{}-{}-{}".format(os.environ["ROTATORD_SECRET"], os.environ["ROTATORD_PHASE"], os.environ["ROTATORD_VERSION"])
with open(os.path.join(out, name + "." + str(os.getpid()) + ".json"), "w") as f:
    json.dump({"stdin": data, "env": dict(os.environ), "argv": sys.argv}, f)
if os.environ.get("ECHO"):
    print(data)
    print(data, file=sys.stderr)
"""

# Counts its runs; succeeds only once the flag file exists (so a test decides when it may pass).
UNTIL_FLAG = """
import os, sys
sys.stdin.read()
with open(os.environ["HOOK_OUT"] + "/count-" + os.environ["LABEL"], "a") as f:
    f.write(os.environ["ROTATORD_PHASE"] + "\\n")
if not os.path.exists(os.environ["HOOK_OUT"] + "/flag-" + os.environ["LABEL"]):
    print("upstream not ready")
    sys.exit(3)
"""


def script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def hook(program: Path, out: Path, *phases: str, **options: Any) -> HookSettings:
    env = {"HOOK_OUT": str(out), **options.pop("env", {})}
    return HookSettings(command=(str(program), *options.pop("args", ())), phases=phases, env=env, **options)


def with_global_hooks(h: Harness, *hooks: HookSettings) -> Harness:
    h.settings = h.settings.model_copy(update={"hooks": hooks})
    return h


def records(out: Path) -> dict[str, dict[str, Any]]:
    """What each hook run recorded, by ``<secret>-<phase>-<version>`` (a second run would clash)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        key = path.name.split(".")[0]
        assert key not in found, f"{key} ran twice"
        found[key] = json.loads(path.read_text())
    return found


def count(out: Path, label: str) -> int:
    path = out / f"count-{label}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def audit_events(rt: Runtime, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in rt.audit.path.read_text().splitlines()]
    return [e for e in lines if e["event"] == name]


def hook_runner(rt: Runtime) -> HookRunner:
    assert rt.engine.hooks is not None
    return rt.engine.hooks


def hook_rows(h: Harness) -> list[tuple[str, str, str, int]]:
    rows = h.sql("SELECT label, phase, state, attempts FROM hook_runs ORDER BY id")
    return [(str(a), str(b), str(c), int(d)) for a, b, c, d in rows]


# -- what a hook receives ----------------------------------------------------------------------


def test_each_phase_runs_its_hooks_once_with_the_event_on_stdin_and_in_the_environment(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "record.py", RECORD)
    # One global hook for both kinds: an api_token runs "promoted" hooks at issued, "retired" at revoked.
    h = with_global_hooks(make_harness(), hook(program, out, *FERNET_PHASES, args=("--from-config",)))
    rt = h.build()
    seen: set[str] = set()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY
    assert rt.engine.tick(TOKEN, T0) == T0 + EVERY
    seen |= materials(h.doc(FERNET)) | materials(h.doc(TOKEN))
    rt.engine.tick(FERNET, T1)
    rt.engine.tick(FERNET, PROMOTE_AT)
    seen |= materials(h.doc(FERNET))
    rt.engine.tick(FERNET, RETIRE_AT)

    got = records(out)
    assert sorted(got) == sorted(
        [f"{FERNET}-{p}-{v}" for p in FERNET_PHASES for v in (1, 2)] + [f"{TOKEN}-issued-1", f"{TOKEN}-revoked-1"]
    )
    second = rt.journal.latest(FERNET)
    assert second is not None and second.version == 2
    event = json.loads(got[f"{FERNET}-promoted-2"]["stdin"])
    assert event == {
        "schema": "rotatord.hook/v1",
        "type": "key.promoted",
        "phase": "promoted",
        "secret": FERNET,
        "kind": "fernet",
        "rotation_id": second.id,
        "version": 2,
        "backend": "local",
        "path": "bots/bot/db-key",
        "backend_version": event["backend_version"],
        "key_id": "v2",
        "previous_key_id": "v1",
        "emergency": False,
        "trigger": "schedule",
        "occurred_at": "2025-02-05T03:10:00.000Z",
        "detail": {"primary": "v2"},
        "hook": {"name": "hooks[0]", "attempt": 1, "on_failure": "ignore"},
    }
    assert event["backend_version"]
    assert "material" not in event
    token_event = json.loads(got[f"{TOKEN}-issued-1"]["stdin"])
    assert (token_event["type"], token_event["phase"], token_event["kind"]) == ("token.issued", "issued", "api_token")

    env = got[f"{FERNET}-retired-2"]["env"]
    assert {k: env[k] for k in BASE_ENV} == dict(BASE_ENV)
    assert env["ROTATORD_EVENT"] == "key.retired"
    assert (env["ROTATORD_PHASE"], env["ROTATORD_SECRET"], env["ROTATORD_KIND"]) == ("retired", FERNET, "fernet")
    assert (env["ROTATORD_VERSION"], env["ROTATORD_ROTATION_ID"]) == ("2", str(second.id))
    assert (env["ROTATORD_KEY_ID"], env["ROTATORD_PREVIOUS_KEY_ID"]) == ("v2", "v1")
    assert (env["ROTATORD_HOOK"], env["ROTATORD_ATTEMPT"], env["HOOK_OUT"]) == ("hooks[0]", "1", str(out))
    # Nothing of the daemon's own environment is passed on.
    stray = {k for r in got.values() for k in r["env"] if k not in BASE_ENV and k != "HOOK_OUT"}
    assert {k for k in stray if not k.startswith("ROTATORD_")} == set()
    assert "HOME" not in env and "VIRTUAL_ENV" not in env
    assert all(r["argv"] == [str(program), "--from-config"] for r in got.values())
    texts = [json.dumps(r) for r in got.values()]
    assert_no_material(seen, texts=texts)
    assert [e["hook"] for e in audit_events(rt, "hook.succeeded")] == ["hooks[0]"] * len(got)


def test_with_secret_gives_the_material_on_stdin_only_and_the_log_keeps_only_output_sizes(
    make_harness: HarnessFactory, tmp_path: Path, out: Path, log_stream: Any
) -> None:
    program = script(tmp_path, "register.py", RECORD)
    h = make_harness(token_secret(hooks=(hook(program, out, "issued", with_secret=True, env={"ECHO": "1"}),)))
    rt = h.build()
    rt.engine.tick(TOKEN, T0)
    first = h.credentials()
    rt.engine.tick(TOKEN, T1)
    second = h.credentials()
    assert second.previous is not None

    got = records(out)
    assert sorted(got) == [f"{TOKEN}-issued-1", f"{TOKEN}-issued-2"]
    given = json.loads(got[f"{TOKEN}-issued-2"]["stdin"])["material"]
    assert given["current"] == {"id": "v2", "value": second.current.value.reveal()}
    assert given["previous"] == {"id": "v1", "value": first.current.value.reveal()}
    assert json.loads(got[f"{TOKEN}-issued-1"]["stdin"])["material"]["previous"] is None
    seen = materials(first) | materials(second)
    assert_no_material(seen, texts=[json.dumps(r["env"]) + json.dumps(r["argv"]) for r in got.values()])
    # The hook printed what it got (material included): a hook given material may print it in a
    # form no redaction recognises, so the log keeps only the sizes of its output.
    logged = log_stream.getvalue()
    assert "hook succeeded" in logged and '"stdout_bytes":' in logged and '"stdout"' not in logged
    assert_no_material(seen, texts=[logged, rt.audit.path.read_text()])


def test_with_secret_on_a_fernet_ring_gives_the_rotations_new_key(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "record.py", RECORD)
    h = make_harness(fernet_secret(hooks=(hook(program, out, "staged", with_secret=True),)))
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    rt.engine.tick(FERNET, T1)
    ring = h.ring()
    assert (ring.primary, [k.id for k in ring.keys]) == ("v1", ["v1", "v2"])
    given = json.loads(records(out)[f"{FERNET}-staged-2"]["stdin"])["material"]
    new_key = ring.key("v2")
    assert new_key is not None
    assert given == {"key_id": "v2", "key": new_key.material.reveal(), "primary": "v1"}
    assert_no_material(materials(ring), texts=[json.dumps(r["env"]) for r in records(out).values()])


# -- timeouts and failure policies ---------------------------------------------------------------

SPAWN_AND_HANG = """
import os, subprocess, sys, time
child = subprocess.Popen(["/bin/sleep", "300"])
with open(os.environ["HOOK_OUT"] + "/pids", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.fixture
def reap_leftovers(out: Path) -> Iterator[None]:
    """If the hook under test were not killed, stop its processes by PID (never by name)."""
    yield
    pids = out / "pids"
    if pids.exists():
        for pid in map(int, pids.read_text().split()):
            if alive(pid):
                os.kill(pid, 9)


def test_a_hook_that_times_out_is_killed_with_everything_it_started(
    make_harness: HarnessFactory, tmp_path: Path, out: Path, reap_leftovers: None
) -> None:
    program = script(tmp_path, "hang.py", SPAWN_AND_HANG)
    h = make_harness(fernet_secret(hooks=(hook(program, out, "staged", timeout=timedelta(seconds=1)),)))
    rt = h.build()
    assert rt.engine.tick(FERNET, T0) == T0 + EVERY  # on_failure = "ignore": the rotation goes on
    assert rt.journal.latest(FERNET).status == "done"  # type: ignore[union-attr]
    hook_pid, child_pid = map(int, (out / "pids").read_text().split())
    wait_until(lambda: not alive(hook_pid) and not alive(child_pid), timeout=10, what="the hook's group to die")
    assert hook_rows(h) == [(f"{FERNET}.hooks[0]", "staged", "failed", 1)]
    (failed,) = audit_events(rt, "hook.failed")
    assert failed["error"] == "timed out after 1s and was killed"
    assert (failed["phase"], failed["on_failure"], failed["retry_at"]) == ("staged", "ignore", None)


def test_block_holds_the_rotation_at_its_phase_until_the_hook_succeeds(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    from rotatord.engine.report import history_report, secret_status

    program = script(tmp_path, "until_flag.py", UNTIL_FLAG)
    gate = hook(program, out, "staged", on_failure="block", env={"LABEL": "gate"})
    h = make_harness(fernet_secret(hooks=(gate,)))
    rt = h.build()
    held_until = rt.engine.tick(FERNET, T0)
    assert T0 < held_until <= T0 + timedelta(seconds=5)
    rot = rt.journal.active(FERNET)
    assert rot is not None and rot.phase == "staged"
    assert rot.error == f"held by hook {FERNET}.hooks[0] after staged: exited with status 3"
    status = secret_status(rt.engine, FERNET, T0)
    assert (status["state"], status["next_step"]) == ("held", "promote")
    assert count(out, "gate") == 1
    # Before its retry time nothing runs; at it, the hook runs again and still holds.
    assert rt.engine.tick(FERNET, T0 + timedelta(milliseconds=1)) == held_until
    assert count(out, "gate") == 1
    assert rt.engine.tick(FERNET, held_until) > held_until
    assert count(out, "gate") == 2
    assert rt.journal.get(rot.id).phase == "staged"
    assert h.ring().primary == "v1"  # the first key is primary at once; only the phase waits

    (out / "flag-gate").touch()
    assert rt.engine.tick(FERNET, T0 + timedelta(hours=1)) == T0 + EVERY
    rot = rt.journal.get(rot.id)
    assert (rot.phase, rot.status, rot.error) == ("retired", "done", None)
    assert count(out, "gate") == 3
    assert hook_rows(h) == [(f"{FERNET}.hooks[0]", "staged", "done", 3)]
    (latest,) = history_report(rt.engine, FERNET)
    assert latest["hooks"] == [
        {"hook": f"{FERNET}.hooks[0]", "phase": "staged", "state": "done", "attempts": 3, "error": None}
    ]
    assert [e["attempt"] for e in audit_events(rt, "hook.failed")] == [1]
    assert [e["attempt"] for e in audit_events(rt, "hook.succeeded")] == [3]


def test_ignore_and_retry_let_the_rotation_proceed_and_retry_runs_until_it_succeeds(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "until_flag.py", UNTIL_FLAG)
    copy = script(tmp_path, "until_flag_2.py", UNTIL_FLAG)  # a second hook needs its own command
    hooks = (
        hook(program, out, "staged", on_failure="ignore", env={"LABEL": "ignore"}),
        hook(copy, out, "staged", on_failure="retry", env={"LABEL": "retry"}),
    )
    h = make_harness(fernet_secret(hooks=hooks))
    rt = h.build()
    retry_at = rt.engine.tick(FERNET, T0)
    assert rt.journal.latest(FERNET).status == "done"  # type: ignore[union-attr]
    assert T0 < retry_at <= T0 + timedelta(seconds=5)  # the next thing due is the hook's retry
    assert (count(out, "ignore"), count(out, "retry")) == (1, 1)
    retry_at = rt.engine.tick(FERNET, retry_at)
    assert (count(out, "ignore"), count(out, "retry")) == (1, 2)
    (out / "flag-retry").touch()
    assert rt.engine.tick(FERNET, retry_at) == T0 + EVERY
    assert rt.engine.tick(FERNET, T0 + timedelta(days=1)) == T0 + EVERY
    assert (count(out, "ignore"), count(out, "retry")) == (1, 3)
    assert hook_rows(h) == [
        (f"{FERNET}.hooks[0]", "staged", "failed", 1),
        (f"{FERNET}.hooks[1]", "staged", "done", 3),
    ]


def test_failed_hooks_run_once_per_failure_not_once_per_attempt(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "record.py", RECORD)
    h = make_harness(fernet_secret(hooks=(hook(program, out, "failed"),)))
    rt = h.build()
    blocker = h.backend_settings.directory / "bots"
    blocker.write_bytes(b"a regular file where a directory must be\n")
    retry_at = rt.engine.tick(FERNET, T0)
    retry_at = rt.engine.tick(FERNET, retry_at)
    assert rt.journal.active(FERNET).attempts == 2  # type: ignore[union-attr]
    blocker.unlink()
    assert rt.engine.tick(FERNET, retry_at) == T0 + EVERY
    got = records(out)
    assert list(got) == [f"{FERNET}-failed-1"]
    event = json.loads(got[f"{FERNET}-failed-1"]["stdin"])
    assert (event["type"], event["detail"]["step"]) == ("rotation.failed", "stage")
    assert event["detail"]["error"] and "material" not in event


# -- at least once, never twice ------------------------------------------------------------------

INTERRUPTED_ONCE = """
import os, sys, time
sys.stdin.read()
out = os.environ["HOOK_OUT"]
with open(out + "/count-" + os.environ["ROTATORD_PHASE"], "a") as f:
    f.write("run\\n")
if os.environ["ROTATORD_PHASE"] == "staged" and not os.path.exists(out + "/interrupted"):
    open(out + "/stopping", "w").close()   # the daemon starts to stop while this hook runs
    open(out + "/interrupted", "w").close()
    time.sleep(60)
"""


def test_a_run_cut_short_runs_again_after_a_restart_and_a_finished_one_never(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "interrupted.py", INTERRUPTED_ONCE)
    h = make_harness(fernet_secret(hooks=(hook(program, out, *FERNET_PHASES),)))
    stopping = out / "stopping"
    first = build_runtime(h.settings, should_stop=stopping.exists)
    h.runtimes.append(first)
    first.engine.tick(FERNET, T0)
    # The staged run was killed by the shutdown, and nothing else ran once it began: all pending.
    assert count(out, "staged") == 1
    assert {state for _label, _phase, state, _n in hook_rows(h)} == {"pending"}

    stopping.unlink()
    h.build().engine.tick(FERNET, T0 + timedelta(seconds=1))  # the restarted daemon
    assert [count(out, p) for p in FERNET_PHASES] == [2, 1, 1, 1]
    assert {state for _label, _phase, state, _n in hook_rows(h)} == {"done"}
    h.build().engine.tick(FERNET, T0 + timedelta(seconds=2))  # and another restart
    assert [count(out, p) for p in FERNET_PHASES] == [2, 1, 1, 1]


def test_drift_detection_fires_each_hook_once_per_observation(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    program = script(tmp_path, "record.py", RECORD)
    h = make_harness(fernet_secret(hooks=(hook(program, out, "drift"),)))
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    rot = rt.journal.latest(FERNET)
    assert rot is not None

    def drift(observed: str) -> None:
        event = Event(
            type="secret.drift_detected", secret=FERNET, rotation_id=rot.id, version=rot.version, phase=rot.phase,
            backend="local", path=h.secret(FERNET).path, backend_version=observed, occurred_at=T0,
            detail={"observed_version": observed},
        )  # fmt: skip
        hook_runner(rt).fire(FERNET, "drift", event, now=T0, occasion=f"backend-version-{observed}")

    drift("7")
    drift("7")  # the same observation again: already run
    assert [json.loads(r["stdin"])["detail"] for r in records(out).values()] == [{"observed_version": "7"}]
    drift("8")
    assert len(list(out.glob("*.json"))) == 2
    assert [row[1:] for row in hook_rows(h)] == [("drift", "done", 1), ("drift", "done", 1)]


def test_a_real_drift_detection_runs_the_drift_hooks_once(
    make_harness: HarnessFactory, tmp_path: Path, out: Path
) -> None:
    """Drift found by the engine (a version written by hand) runs the secret's drift hooks with
    the drift event; looking again at the same open drift runs nothing more."""
    program = script(tmp_path, "record.py", RECORD)
    h = make_harness(fernet_secret(hooks=(hook(program, out, "drift"),)))
    rt = h.build()
    rt.engine.tick(FERNET, T0)
    path = h.secret(FERNET).path
    current = h.reader.read(path)
    assert current is not None
    changed = replace(current.document, updated_at=current.document.updated_at + timedelta(seconds=1))
    theirs = h.reader.write(path, changed, expected=current.version, request_id="intruder")

    record = rt.engine.check_drift(FERNET, T0 + timedelta(seconds=1))
    assert record is not None and record.reason == "version_changed"
    runs = list(records(out).values())
    assert len(runs) == 1
    event = json.loads(runs[0]["stdin"])
    assert event["phase"] == "drift" and event["secret"] == FERNET
    assert event["detail"]["reason"] == "version_changed" and event["backend_version"] == theirs
    assert rt.engine.check_drift(FERNET, T0 + timedelta(seconds=2)) is not None  # still open
    assert len(records(out)) == 1
