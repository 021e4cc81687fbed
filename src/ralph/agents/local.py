"""The `local` provider: a GGUF model served by llama.cpp's server in a child process on
loopback, reached through the same OpenAI-compatible path as any provider."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path

import structlog

from ralph.config import Settings, SettingsError

log = structlog.get_logger(__name__)

# loading a 1-2 GB model from a cold disk takes a while
START_TIMEOUT_SECONDS = 300.0


def check_local_settings(settings: Settings) -> None:
    """SettingsError (naming the variable) if the local model cannot be started."""
    if settings.model_path is None:
        raise SettingsError("RALPH_MODEL_PATH: required when RALPH_MODEL_PROVIDER=local")
    if not settings.model_path.is_file():
        raise SettingsError(f"RALPH_MODEL_PATH: no file at {settings.model_path}")
    template = settings.model_chat_template
    if template is not None and not template.is_file():
        raise SettingsError(f"RALPH_MODEL_CHAT_TEMPLATE: no file at {template}")
    try:
        import importlib.util

        found = importlib.util.find_spec("xllamacpp") is not None
    except ValueError:
        found = False
    if not found:
        raise SettingsError(
            "RALPH_MODEL_PROVIDER=local needs the xllamacpp package: pip install 'ralph[local]'"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def local_model(settings: Settings) -> Generator[Settings]:
    """`settings` as they are, or, for the `local` provider without a base URL, with llama.cpp's
    server started on the model (its URL as `model_base_url`) until the block ends. Its log
    goes to `<data dir>/local-model.log`."""
    if settings.model_provider != "local" or settings.model_base_url:
        yield settings
        return
    check_local_settings(settings)
    assert settings.model_path is not None
    command = [
        sys.executable,
        "-P",
        "-m",
        "ralph.agents.local_server",
        str(os.getpid()),
        "--model",
        str(settings.model_path),
        "--port",
        str(_free_port()),
        "--threads",
        str(settings.model_threads or os.cpu_count() or 1),
        "--context",
        str(settings.model_context_size),
        "--parallel",
        str(settings.model_parallel),
    ]
    if settings.model_chat_template is not None:
        command += ["--chat-template", str(settings.model_chat_template)]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "local-model.log"
    started = time.monotonic()
    with Path(log_path).open("ab") as log_file:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file)
    try:
        url = _read_url(process, log_path)
        log.info("local_model_started", url=url, seconds=round(time.monotonic() - started, 1))
        yield settings.model_copy(
            update={"model_base_url": url, "model_id": settings.model_id or "local"}
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_url(process: subprocess.Popen[bytes], log_path: Path) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline().decode().strip()
            if line.startswith("http"):
                return line
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    raise SettingsError(f"the local model server did not start (see {log_path})")
