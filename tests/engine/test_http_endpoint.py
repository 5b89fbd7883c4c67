"""``open_endpoint``: /healthz through the daemon's phases, a broken state database, the off switch.

A real listener on 127.0.0.1 and a real runtime (SQLite state, file backend); requests are
real HTTP (urllib in a thread, while the event loop serves).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path

from rotatord.daemon.endpoint import open_endpoint
from rotatord.daemon.runtime import Runtime
from rotatord.engine.journal import Journal
from tests.engine.conftest import FERNET, T0, Harness
from tests.servers import free_port


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - http://127.0.0.1 only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_healthz_follows_the_daemon_phase_and_the_state_database(harness: Harness, tmp_path: Path) -> None:
    runtime = harness.build()
    current: dict[str, Runtime | None] = {"runtime": None}
    state = {"phase": "starting", "role": "single"}
    port = free_port()
    daemon = harness.settings.daemon.model_copy(update={"metrics": f"127.0.0.1:{port}"})
    base = f"http://127.0.0.1:{port}"
    seen: list[tuple[int, dict[str, object]]] = []

    async def main() -> None:
        endpoint = await open_endpoint(
            daemon, runtime=lambda: current["runtime"], role=lambda: state["role"], phase=lambda: state["phase"]
        )
        assert endpoint is not None
        try:
            seen.append(await asyncio.to_thread(get, base + "/healthz"))
            seen.append(await asyncio.to_thread(get, base + "/healthz/live"))
            current["runtime"] = runtime
            state["phase"] = "ready"
            seen.append(await asyncio.to_thread(get, base + "/healthz"))
            state["role"] = "standby"
            seen.append(await asyncio.to_thread(get, base + "/healthz"))
            missing = Journal(f"sqlite:///{tmp_path / 'absent' / 'state.db'}")
            current["runtime"] = dataclasses.replace(runtime, journal=missing)
            seen.append(await asyncio.to_thread(get, base + "/healthz"))
            current["runtime"] = runtime
            state["phase"] = "stopping"
            seen.append(await asyncio.to_thread(get, base + "/healthz"))
        finally:
            await endpoint.close()

    asyncio.run(main())
    assert seen == [
        (503, {"status": "starting", "role": "single", "ready": False}),
        (200, {"status": "alive", "role": "single"}),
        (200, {"status": "ok", "role": "single", "ready": True, "state_db": "ok"}),
        (200, {"status": "ok", "role": "standby", "ready": True, "state_db": "ok"}),
        (503, {"status": "unavailable", "role": "standby", "ready": False, "state_db": "error"}),
        (503, {"status": "stopping", "role": "standby", "ready": False}),
    ]


def test_failed_steps_reach_the_served_metrics(harness: Harness) -> None:
    runtime = harness.build()
    port = free_port()
    daemon = harness.settings.daemon.model_copy(update={"metrics": f"127.0.0.1:{port}"})

    async def main() -> str:
        endpoint = await open_endpoint(daemon, runtime=lambda: runtime, role=lambda: "single", phase=lambda: "ready")
        assert endpoint is not None
        endpoint.observe(runtime)
        try:
            # The backend fails for real: a file stands where it must create the secret's directory.
            directory = harness.backend_settings.directory
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "bots").write_text("not a directory")
            await asyncio.to_thread(runtime.engine.tick, FERNET, T0)

            def scrape() -> str:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                    return str(resp.read().decode())

            return await asyncio.to_thread(scrape)
        finally:
            await endpoint.close()

    text = asyncio.run(main())
    assert f'rotatord_rotation_failing{{secret="{FERNET}"}} 1.0' in text
    assert f'rotatord_step_failures_total{{error="BackendUnavailable",secret="{FERNET}",step="stage"}} 1.0' in text
    assert 'rotatord_backend_errors_total{backend="local",error="BackendUnavailable"} 1.0' in text


def test_off_serves_nothing(harness: Harness) -> None:
    daemon = harness.settings.daemon.model_copy(update={"metrics": "off"})

    async def main() -> object:
        return await open_endpoint(daemon, runtime=lambda: None, role=lambda: "single", phase=lambda: "ready")

    assert asyncio.run(main()) is None
