"""Start `ralph worker` processes configured like a given `Settings` (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import os
import sys

from ralph.config import Settings


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
    }
    env.update({name: value for name, value in optional.items() if value is not None})
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
