"""The request path at chat scale: `wrk` (32 connections, 8 s) against `ralph serve` and,
as the baseline of the same run, a bare FastAPI + SQLAlchemy app doing the same work on the
same database (a commit per request, no middleware, no validation beyond FastAPI's own).

- read: `GET /users/{id}/activity` for one user (a one-row read);
- write: `POST /users/{id}/activity`, a new user each request (an upsert and a commit);
- message: `POST /users/{id}/messages`, a user message among 1,000 users per wrk thread (an
  insert, an upsert of the user's activity, a commit).

Prints requests per second, p99 latency and Ralph's rate as a ratio of the bare app's, on
SQLite (a fresh file for each server) and, when reachable, PostgreSQL and MariaDB.

    uv run python bench/requests.py [seconds] [databases]   e.g. 8 sqlite,postgres
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

os.environ.setdefault("AGNO_TELEMETRY", "false")

from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.testing.databases import SERVERS, DatabaseServer, Unreachable
from ralph.testing.processes import free_port, start_server_process

CONNECTIONS = 32
THREADS = 2

# the bare app: the same table, the same statements, nothing else
BARE_APP = """
import os
from datetime import UTC, datetime
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from ralph.db.dialects import backend
from ralph.db.tables import messages, user_activity

url = os.environ["BARE_DATABASE_URL"]
engine = create_async_engine(url, pool_size=10, max_overflow=10)
upsert = backend(url).upsert(
    user_activity, lambda proposed: {"last_message_at": proposed.last_message_at}
)
app = FastAPI()


@app.get("/users/{user_id}/activity")
async def read(user_id: str):
    async with engine.connect() as conn:
        at = (await conn.execute(
            select(user_activity.c.last_message_at).where(user_activity.c.user_id == user_id)
        )).scalar()
    return {"user_id": user_id, "last_message_at": at}


@app.post("/users/{user_id}/activity")
async def write(user_id: str):
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(upsert.values(user_id=user_id, last_message_at=now))
    return {"user_id": user_id, "last_message_at": now}


@app.post("/users/{user_id}/messages", status_code=201)
async def message(user_id: str, payload: dict):
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        result = await conn.execute(messages.insert().values(
            user_id=user_id, role="user", content=payload["content"], created_at=now
        ))
        await conn.execute(upsert.values(user_id=user_id, last_message_at=now))
    (message_id,) = result.inserted_primary_key
    return {"id": message_id, "user_id": user_id, "role": "user",
            "content": payload["content"], "created_at": now}
"""

# each request a new user: wrk's Lua, one counter per thread
NEW_USER_LUA = """
local n = 0
local prefix = tostring(math.random(1, 1000000000))
request = function()
  n = n + 1
  return wrk.format("POST", "/users/u" .. prefix .. "-" .. n .. "/activity")
end
"""

# a chat: user messages among 1,000 users per thread
MESSAGE_LUA = """
local n = 0
local prefix = tostring(math.random(1, 1000000000))
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"content": "I have an exam on Friday and I am a bit nervous about it"}'
request = function()
  n = n + 1
  return wrk.format("POST", "/users/m" .. prefix .. "-" .. (n % 1000) .. "/messages")
end
"""


@contextmanager
def bare_app(url: str, port: int, folder: Path) -> Generator[None]:
    (folder / "bare_app.py").write_text(BARE_APP)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bare_app:app",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=folder,
        env={**os.environ, "BARE_DATABASE_URL": url, "PYTHONPATH": str(folder)},
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/users/x/activity", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait()


@contextmanager
def ralph(url: str, port: int, folder: Path) -> Generator[None]:
    env = {
        "RALPH_DATABASE_URL": url,
        "RALPH_DATA_DIR": str(folder / "data"),
        "RALPH_SCHEDULER_ENABLED": "false",
        "RALPH_WORKER_MODE": "inprocess",
        "RALPH_LOG_LEVEL": "warning",
    }
    process = start_server_process(port, env)
    try:
        yield
    finally:
        process.terminate()
        process.wait()


def wrk(port: int, seconds: int, script: Path | None, path: str) -> tuple[float, float]:
    """(requests per second, p99 in ms) of one wrk run."""
    command = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency"]
    if script is not None:
        command += ["-s", str(script)]
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"requests failed on port {port}: {out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return rate, float(p99.group(1)) * scale


async def migrated(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


def measure(name: str, make_url: Iterator[str], seconds: int, folder: Path) -> None:
    script = folder / "new_user.lua"
    script.write_text(NEW_USER_LUA)
    chat = folder / "message.lua"
    chat.write_text(MESSAGE_LUA)
    figures: dict[str, dict[str, tuple[float, float]]] = {}
    for server in ("bare", "ralph"):
        url = next(make_url)
        asyncio.run(migrated(url))
        port = free_port()
        starting = bare_app if server == "bare" else ralph
        with starting(url, port, folder):
            httpx.post(f"http://127.0.0.1:{port}/users/one/activity")
            figures[server] = {
                "read": wrk(port, seconds, None, "/users/one/activity"),
                "write": wrk(port, seconds, script, "/"),
                "message": wrk(port, seconds, chat, "/"),
            }
    for kind in ("read", "write", "message"):
        (bare, bare_p99), (mine, mine_p99) = figures["bare"][kind], figures["ralph"][kind]
        print(
            f"  {name:8} {kind:7}  ralph {mine:8.0f} req/s p99 {mine_p99:6.1f} ms   "
            f"bare {bare:8.0f} req/s p99 {bare_p99:6.1f} ms   ratio {mine / bare:.2f}x"
        )


def main(seconds: int, databases: set[str]) -> None:
    print(f"wrk -t{THREADS} -c{CONNECTIONS} -d{seconds}s; ralph's rate / the bare app's")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        def sqlite_urls() -> Iterator[str]:
            while True:
                yield f"sqlite+aiosqlite:///{folder / uuid.uuid4().hex}.db"

        if "sqlite" in databases:
            measure("sqlite", sqlite_urls(), seconds, folder)
        for name in (s for s in SERVERS if s in databases):
            server = SERVERS[name]
            made: list[str] = []

            def urls(server: DatabaseServer = server, made: list[str] = made) -> Iterator[str]:
                while True:
                    made.append(asyncio.run(server.create_database("ralph_bench")))
                    yield made[-1]

            try:
                measure(name, urls(), seconds, folder)
            except Unreachable:
                print(f"  {name:8} not reachable, skipped")
            finally:
                for url in made:
                    asyncio.run(server.drop_database(url))


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 8,
        set(sys.argv[2].split(",")) if len(sys.argv) > 2 else {"sqlite", *SERVERS},
    )
