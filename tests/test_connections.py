"""Clients that open connections and send half a request cannot take the server's file
descriptors: the headers' time is bounded and so is the number of connections. A real
`ralph serve` process with a limit of 256 descriptors (a common default is 1,024)."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ralph.testing.processes import free_port

pytestmark = pytest.mark.slow

DESCRIPTORS = 256


def _limit_descriptors() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (DESCRIPTORS, DESCRIPTORS))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "AGNO_TELEMETRY": "false",
        "RALPH_PORT": str(port),
        "RALPH_DATA_DIR": str(tmp_path / "data"),
        "RALPH_HTTP_HEADER_TIMEOUT_SECONDS": "2",
        "RALPH_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ralph.cli", "serve"],
        env=env,
        preexec_fn=_limit_descriptors,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("ralph serve did not start")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def half_requests(url: str, count: int) -> list[socket.socket]:
    """`count` connections that each send a request's first lines and nothing more."""
    port = int(url.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        held.append(sock)
    return held


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def test_half_open_connections_are_closed_and_health_answers(server: str) -> None:
    """300 half requests against 256 descriptors: /health still answers at once (new
    connections beyond the limit are closed at once), and after the header timeout the
    server has closed every half request (1,100 of them held 1,002 descriptors for good)."""
    held = half_requests(server, 300)
    try:
        health = httpx.get(f"{server}/health", timeout=5)
        assert health.status_code == 200
        time.sleep(3)
        still_open = [sock for sock in held if not closed_by_server(sock)]
        assert still_open == []
        assert httpx.get(f"{server}/health", timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_a_request_the_parser_refuses_gets_a_json_error(server: str) -> None:
    """10,000 query parameters are past what the HTTP parser reads: a 400 in the API's error
    shape (it was uvicorn's plain text)."""
    query = "&".join(f"a{i}=1" for i in range(10_000))
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /users/u1/messages?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head
    assert json.loads(body)["detail"].startswith("the request could not be read")
