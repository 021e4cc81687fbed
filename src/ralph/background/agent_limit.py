"""The agent process's rate limit is its server's: one limit for the server's chat and the
agents it runs in its agent process (each with its own would send up to twice the limit).

The child asks over the pipe (`{"limit": ID, "tokens": N}`), the server takes the call's turn
from its own `ModelRateLimiter` and answers `{"granted": ID, "waited": S}`, after telling the
child of each wait before it begins (`{"wait": ID, "seconds": S}`, which moves the waiting
agent's deadline, as in the server). A 429 (`{"slow_down": S}`) and a reply's extra tokens
(`{"charge": N}`) go to the server's limiter too; messages keep their order on the pipe, so a
call retried after a 429 waits for the pause it asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from ralph.agents.calls import CallRecord, current_call
from ralph.agents.ratelimit import RateLimit

Send = Callable[[dict[str, Any]], None]


class RemoteRateLimit:
    """The child's side: a `RateLimit` that asks the server."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._asked = 0
        self._waiting: dict[int, tuple[asyncio.Future[float], CallRecord | None]] = {}

    async def acquire(self, tokens: int = 0, *, foreground: bool = False) -> float:
        self._asked += 1
        ask = self._asked
        turn = asyncio.get_running_loop().create_future()
        self._waiting[ask] = (turn, current_call.get())
        try:
            self._send({"limit": ask, "tokens": tokens, "foreground": foreground})
            return await turn
        finally:
            self._waiting.pop(ask, None)

    async def charge(self, tokens: int) -> None:
        if tokens > 0:
            self._send({"charge": tokens})

    def slow_down(self, retry_after: float | None) -> None:
        self._send({"slow_down": retry_after})

    def answer(self, message: dict[str, Any]) -> bool:
        """Take the server's answer, if `message` is one (an answer to a call no longer
        waiting, cancelled meanwhile, is dropped)."""
        if "wait" in message:
            waiting = self._waiting.get(message["wait"])
            if waiting is not None and waiting[1] is not None:
                waiting[1].waited(float(message["seconds"]))
            return True
        if "granted" in message:
            waiting = self._waiting.get(message["granted"])
            if waiting is not None and not waiting[0].done():
                waiting[0].set_result(float(message["waited"]))
            return True
        return False


class LimitServer:
    """The server's side: answers the child's asks from the server's own limiter."""

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._turns: set[asyncio.Task[None]] = set()

    def handle(self, message: dict[str, Any], send: Send) -> bool:
        """Act on `message` if it is the child's (True), answering through `send`."""
        if "limit" in message:
            ask, tokens = int(message["limit"]), int(message.get("tokens", 0))
            foreground = bool(message.get("foreground", False))
            self._spawn(self._grant(ask, tokens, foreground, send))
            return True
        if "charge" in message:
            self._spawn(self._limit.charge(int(message["charge"])))
            return True
        if "slow_down" in message:
            after = message["slow_down"]
            self._limit.slow_down(None if after is None else float(after))
            return True
        return False

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        turn = asyncio.create_task(work)
        self._turns.add(turn)
        turn.add_done_callback(self._turns.discard)

    async def _grant(self, ask: int, tokens: int, foreground: bool, send: Send) -> None:
        # this task's own record: each wait is told to the child before it begins
        current_call.set(CallRecord(extend=lambda seconds: send({"wait": ask, "seconds": seconds})))
        waited = await self._limit.acquire(tokens, foreground=foreground)
        send({"granted": ask, "waited": waited})

    async def aclose(self) -> None:
        """Drop the turns still waiting (their child is gone)."""
        for turn in list(self._turns):
            turn.cancel()
        if self._turns:
            await asyncio.wait(self._turns)
