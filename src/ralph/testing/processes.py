"""Ralph in processes of its own, for tests and benchmarks: `ralph serve` on a free port,
`ralph worker` processes configured like a given `Settings`, and the scripted model server
(so that it does not share the GIL with what it measures)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ralph.config import Settings


def free_port() -> int:
    """A loopback TCP port nobody listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scripted_model_env(data_dir: Path, model_url: str, **extra: str) -> dict[str, str]:
    """The environment of a `ralph serve` on the scripted model server at `model_url` (no
    retries), its data in `data_dir`, with `extra` settings (RALPH_ variables)."""
    return {
        "RALPH_DATA_DIR": str(data_dir),
        "RALPH_MODEL_PROVIDER": "openai",
        "RALPH_MODEL_BASE_URL": model_url,
        "RALPH_MODEL_ID": "scripted",
        "RALPH_MODEL_MAX_RETRIES": "0",
        **extra,
    }


def start_server_process(
    port: int, env: Mapping[str, str], timeout_seconds: float = 60.0
) -> subprocess.Popen[bytes]:
    """`ralph serve` on 127.0.0.1:`port` with `env` added to this process's environment,
    returned once its /health answers 200 (RuntimeError if it never does)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "ralph.cli", "serve"],
        env={**os.environ, "AGNO_TELEMETRY": "false", **env, "RALPH_PORT": str(port)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.kill()
    server.wait()
    raise RuntimeError(f"ralph serve did not become healthy on port {port}")


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment that makes `ralph worker` use `settings`' database, queue and model."""
    env = {
        **os.environ,
        "AGNO_TELEMETRY": "false",
        "RALPH_DATABASE_URL": settings.effective_database_url,
        "RALPH_DATA_DIR": str(settings.data_dir),
        "RALPH_REDIS_URL": settings.redis_url,
        "RALPH_QUEUE_NAME": settings.queue_name,
        "RALPH_WORKER_HEARTBEAT_SECONDS": str(settings.worker_heartbeat_seconds),
        "RALPH_MODEL_MAX_RETRIES": str(settings.model_max_retries),
        "RALPH_LOG_LEVEL": "warning",
    }
    optional = {
        "RALPH_MODEL_PROVIDER": settings.model_provider,
        "RALPH_MODEL_BASE_URL": settings.model_base_url,
        "RALPH_MODEL_ID": settings.model_id,
        "RALPH_MODEL_REQUESTS_PER_MINUTE": settings.model_requests_per_minute,
        "RALPH_MODEL_TOKENS_PER_MINUTE": settings.model_tokens_per_minute,
        "RALPH_MODEL_MAX_OUTPUT_TOKENS": settings.model_max_output_tokens,
        "RALPH_WORKER_METRICS_PORT": settings.worker_metrics_port,
    }
    env.update({name: str(value) for name, value in optional.items() if value is not None})
    return env


async def start_worker_process(settings: Settings) -> asyncio.subprocess.Process:
    """A `ralph worker` process for `settings`, its output discarded."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ralph.cli",
        "worker",
        env=worker_environment(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@contextmanager
def model_server_process(
    latency: float, sigma: float, *steps: str, per_second: int = 0
) -> Generator[str]:
    """`python -m ralph.testing.model_server` answering `steps` (see there); yields its base
    URL and stops the process on exit. `per_second`: 429 beyond that many requests a second."""
    command = [
        sys.executable,
        "-m",
        "ralph.testing.model_server",
        "--latency",
        str(latency),
        "--sigma",
        str(sigma),
        "--per-second",
        str(per_second),
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
    """The model server process's counters: calls, max_in_flight, connections, failures."""
    stats: dict[str, Any] = httpx.get(base_url.removesuffix("/v1") + "/stats").json()
    return stats
