"""The `subprocess` worker mode (the default): the server's units run in one child process,
so the agents' CPU time (Agno, the model client, their database work) never delays the
server's own requests, which keep an event loop of their own.

The server starts the child as it starts (`python -m ralph.background.agent_child`), and
again on the next unit if the child died. They speak in JSON lines: the server writes
`{"run": RUN, "user": USER}`, `{"cancel": RUN}` and `{"stop": true}` to the child's stdin;
the child answers `{"done": [RUN, USER], "tokens": N}` on stdout once the unit's result is
recorded (the tokens count against the run's budget in the server's window). The child's
model calls wait on the server's rate limit, asked over the same pipe
(`ralph.background.agent_limit`).
Everything else a unit needs is in the database. A child that reads the end of its input
without `stop` (its server is gone) exits at once, leaving its runs to crash recovery, as if
it had died with the server. A child that dies while units are in flight has them failed
("agent process exited"); the next unit starts a new child.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, cast

import structlog
from pydantic import SecretStr
from pydantic_core import to_jsonable_python

from ralph.agents.ratelimit import RateLimit
from ralph.background.agent_limit import LimitServer
from ralph.background.inflight import InFlight
from ralph.background.models import TaskDefinition
from ralph.background.run_store import RunStore, UnitEnd
from ralph.clock import Clock
from ralph.config import Settings
from ralph.observability.events import UnitStats, observe_unit
from ralph.reasons import EndReason

log = structlog.get_logger(__name__)


def _revealed(value: object) -> object:
    """`value` with every secret in it, however deep (the reviewers' tokens), in the clear."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {key: _revealed(item) for key, item in cast("dict[str, object]", value).items()}
    if isinstance(value, list | tuple):
        return [_revealed(item) for item in cast("list[object]", value)]
    return value


def _settings_line(settings: Settings) -> bytes:
    """`settings` as one JSON line, secrets included (it goes down a pipe to the child)."""
    values = _revealed(settings.model_dump())
    return json.dumps(to_jsonable_python(values)).encode() + b"\n"


class AgentProcess:
    """The server's side: a coordinator's dispatch that hands each unit to the child."""

    def __init__(
        self,
        settings: Settings,
        runs: RunStore,
        clock: Clock,
        inflight: InFlight,
        limit: RateLimit,
    ) -> None:
        """`inflight`: the coordinator's, to count the tokens of each finished unit against
        its run's budget; `limit`: the server's rate limit, which the child's calls share."""
        self._settings = settings
        self._runs = runs
        self._clock = clock
        self._inflight = inflight
        self._child: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._waiting: dict[tuple[str, str], tuple[asyncio.Future[None], str]] = {}
        self._limit = LimitServer(limit)
        self._stopping = False

    async def __call__(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        child = await self._ensure_child()
        done = asyncio.get_running_loop().create_future()
        self._waiting[(run_id, user_id)] = (done, task.name)
        try:
            self._send(child, {"run": run_id, "user": user_id})
            await done
        finally:
            self._waiting.pop((run_id, user_id), None)

    async def start(self) -> None:
        """Start the child now (it takes seconds to import what agents need), so that the
        first unit does not wait for it."""
        await self._ensure_child()

    def cancel(self, run_id: str) -> None:
        if self._child is not None and self._child.returncode is None:
            self._send(self._child, {"cancel": run_id})

    async def stop(self) -> None:
        """Ask the child to stop its agents (their users end `interrupted`) and to exit once
        it has recorded them."""
        self._stopping = True
        child = self._child
        if child is None:
            return
        if child.returncode is None:
            self._send(child, {"stop": True})
            try:
                await asyncio.wait_for(child.wait(), timeout=30)
            except TimeoutError:
                child.kill()
                await child.wait()
        if self._reader is not None:
            await self._reader
        await self._limit.aclose()

    async def aclose(self) -> None:
        await self.stop()

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        child = self._child
        return child.pid if child is not None and child.returncode is None else None

    async def _ensure_child(self) -> asyncio.subprocess.Process:
        async with self._starting:
            if self._child is None or self._child.returncode is not None:
                if self._reader is not None:
                    await self._reader  # the old child's units are settled first
                self._child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    # -P: the server's working directory is not on the child's import path
                    # (a `limits.py` there would shadow the library of that name)
                    "-P",
                    "-m",
                    "ralph.background.agent_child",
                    str(os.getpid()),  # the child dies with this process
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, "AGNO_TELEMETRY": "false"},
                    # signals to the server's process group (Ctrl-C) are the server's to handle
                    start_new_session=True,
                )
                assert self._child.stdin is not None
                self._child.stdin.write(_settings_line(self._settings))
                self._reader = asyncio.create_task(self._read(self._child))
                log.info("agent_process_started", pid=self._child.pid)
            return self._child

    @staticmethod
    def _send(child: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
        assert child.stdin is not None
        if not child.stdin.is_closing():
            child.stdin.write(json.dumps(message).encode() + b"\n")

    async def _read(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None

        def reply(message: dict[str, Any]) -> None:  # to this child's rate-limit asks
            self._send(child, message)

        while line := await child.stdout.readline():
            try:
                answer = json.loads(line)
                if self._limit.handle(answer, reply):
                    continue
                run_id, user_id = answer["done"]
                tokens = int(answer["tokens"])
            except (ValueError, KeyError, TypeError):
                # something in the child printed to its stdout: not an answer
                log.warning("agent_process_noise", line=line[:200].decode(errors="replace"))
                continue
            self._inflight.spent(run_id, tokens)
            figures = answer.get("stats")
            if isinstance(figures, dict):
                observe_unit(cast("UnitStats", figures))
            self._resolve(run_id, user_id)
        code = await child.wait()
        lost = list(self._waiting.items())
        if lost:
            log.error("agent_process_exited", pid=child.pid, code=code, units=len(lost))
        # units the child had not finished when it was stopped are interrupted (re-run), not
        # failed
        reason = EndReason.INTERRUPTED if self._stopping else EndReason.WORKER_LOST
        for (run_id, user_id), (_, task_name) in lost:
            await self._runs.end_unit(
                run_id,
                task_name,
                user_id,
                UnitEnd(reason, f"agent process exited ({code})"),
                self._clock.now(),
                running_only=False,
            )
            self._resolve(run_id, user_id)

    def _resolve(self, run_id: str, user_id: str) -> None:
        waiting = self._waiting.get((run_id, user_id))
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(None)
