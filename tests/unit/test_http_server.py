"""The daemon's HTTP server: a real listener on 127.0.0.1, real HTTP requests (urllib)."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from rotatord.daemon.http import HttpServer, json_response
from rotatord.errors import ListenError
from tests.servers import free_port


def request(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http://127.0.0.1 only
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def serve(server: HttpServer, body: Callable[[str], Any]) -> Any:
    """Start ``server`` on a free port, run ``body(base_url)`` in a thread, close the server."""

    async def main() -> Any:
        await server.start("127.0.0.1", 0)
        assert server.address is not None
        host, port = server.address
        try:
            return await asyncio.to_thread(body, f"http://{host}:{port}")
        finally:
            await server.close()

    return asyncio.run(main())


def test_routes_methods_and_unknown_paths() -> None:
    server = HttpServer()
    seen: list[tuple[bytes, str]] = []

    async def hello(body: bytes, peer: str) -> tuple[int, bytes, str]:
        return 200, b"hello\n", "text/plain"

    async def report(body: bytes, peer: str) -> tuple[int, bytes, str]:
        seen.append((body, peer))
        return json_response(202, {"accepted": len(body)})

    server.add_route("GET", "/hello", hello)
    server.add_route("post", "/v1/report", report)

    def check(base: str) -> None:
        assert request(base + "/hello")[0::2] == (200, b"hello\n")
        assert request(base + "/hello?x=1")[0] == 200
        status, _headers, body = request(base + "/v1/report", "POST", b'{"token_id": "v7"}')
        assert (status, body) == (202, b'{"accepted": 18}\n')
        assert request(base + "/nothing")[0] == 404
        status, headers, _ = request(base + "/hello", "POST", b"x")
        assert status == 405 and headers["Allow"] == "GET"
        assert request(base + "/hello", "HEAD")[0] == 200

    serve(server, check)
    assert seen == [(b'{"token_id": "v7"}', "127.0.0.1")]


def test_a_body_over_the_cap_is_refused_before_the_handler() -> None:
    server = HttpServer(max_body=1024)
    called: list[int] = []

    async def report(body: bytes, peer: str) -> tuple[int, bytes, str]:
        called.append(len(body))
        return 204, b"", "text/plain"

    server.add_route("POST", "/v1/report", report)

    def check(base: str) -> None:
        assert request(base + "/v1/report", "POST", b"x" * 1024)[0] == 204
        assert request(base + "/v1/report", "POST", b"x" * 1025)[0] == 413

    serve(server, check)
    assert called == [1024]


def test_a_failing_handler_answers_500_and_the_server_goes_on(log_stream: Any) -> None:
    server = HttpServer()

    async def broken(body: bytes, peer: str) -> tuple[int, bytes, str]:
        raise RuntimeError("bug")

    async def fine(body: bytes, peer: str) -> tuple[int, bytes, str]:
        return 200, b"ok", "text/plain"

    server.add_route("GET", "/broken", broken)

    def check(base: str) -> None:
        status, _headers, body = request(base + "/broken")
        assert status == 500 and b"bug" not in body
        # Routes can be added while serving.
        server.add_route("GET", "/late", fine)
        assert request(base + "/late")[0::2] == (200, b"ok")

    serve(server, check)
    assert "HTTP handler failed" in log_stream.getvalue()


def test_duplicate_and_relative_routes_are_refused() -> None:
    server = HttpServer()

    async def handler(body: bytes, peer: str) -> tuple[int, bytes, str]:
        return 200, b"", "text/plain"

    server.add_route("GET", "/metrics", handler)
    with pytest.raises(ValueError, match="already served"):
        server.add_route("get", "/metrics", handler)
    with pytest.raises(ValueError, match="must start with '/'"):
        server.add_route("GET", "metrics", handler)


def test_an_address_in_use_is_a_listen_error_naming_the_setting() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        server = HttpServer()

        async def main() -> None:
            await server.start("127.0.0.1", port, setting="daemon.metrics")

        with pytest.raises(ListenError) as caught:
            asyncio.run(main())
    assert str(caught.value) == (
        f"daemon.metrics: cannot listen on 127.0.0.1:{port}: address already in use (another process listens there)"
    )
    assert caught.value.exit_code == 69
    assert server.address is None


def test_an_address_of_another_host_is_a_listen_error() -> None:
    async def main() -> None:
        await HttpServer().start("192.0.2.1", free_port(), setting="daemon.metrics")  # TEST-NET-1

    with pytest.raises(ListenError, match=r"^daemon.metrics: cannot listen on 192.0.2.1:\d+: address not available"):
        asyncio.run(main())
