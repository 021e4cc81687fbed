"""Run the scripted model server in its own process, so it does not share the GIL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

import httpx


@contextmanager
def model_server_process(latency: float, sigma: float, *steps: str) -> Generator[str]:
    """Yields the server's base URL; stops the process on exit."""
    command = [
        sys.executable,
        "-m",
        "ralph.testing.model_server",
        "--latency",
        str(latency),
        "--sigma",
        str(sigma),
        *steps,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http"):
            raise RuntimeError("model server did not start")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=10)


def server_stats(base_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    return stats
