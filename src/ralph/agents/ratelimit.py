"""One rate limit per provider, shared by every model call of the process and, with Redis
(the worker mode), of every server and worker on the same queue.

Built on `limits`' moving-window limiter (in memory, or its Redis storage): a per-second
window of `ceil(rpm / 60)` requests keeps calls smooth (providers enforce a per-minute limit
over shorter periods too), and a per-minute window keeps the minute's total. Tokens have a
per-minute window, charged with an estimate before the call and corrected after it.

Within the second, a process spaces its calls about `60 / rpm` seconds apart (each caller
reserves the next start): a window that opens releases one call, not a second's worth at
once (which a provider takes one after another, so that the last of them fall into its next
window). Several processes sharing the limit through Redis are each spaced so; the windows
keep their sum. A chat call (`foreground`) goes ahead of the background calls waiting.

A 429 slows everyone, not just the caller that got it: every caller in the process waits out
the provider's Retry-After (or a second), and the configured rate is halved, then recovers by a
tenth every 10 s without a 429 (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from ralph.agents.calls import current_call

_RECOVER_EVERY = 10.0  # seconds without a 429 before the rate grows back by a tenth
_MIN_SCALE = 0.1
# waited past each window's reset, and a second's spaced calls fit into the second plus it:
# calls a whole window apart must not be counted in one window by the provider, whose clock
# and network are some ms off ours (20 ms drew 429s when a second's calls left together);
# between processes (Redis) the time from taking a slot to sending is less even
_MARGIN = 0.05
_SHARED_MARGIN = 0.1


class RateLimit(Protocol):
    """What a model call waits on: `ModelRateLimiter`, or the agent process's stand-in for
    its server's (`ralph.background.agent_limit`)."""

    async def acquire(self, tokens: int = 0, *, foreground: bool = False) -> float: ...

    async def charge(self, tokens: int) -> None: ...

    def slow_down(self, retry_after: float | None) -> None: ...


def estimate_tokens(request_bytes: int, max_output_tokens: int | None) -> int:
    """Tokens a request may use before the provider says: about 4 bytes of JSON per token of
    prompt, plus the output cap (or as much again as the prompt)."""
    prompt = max(1, request_bytes // 4)
    return prompt + (max_output_tokens if max_output_tokens is not None else prompt)


def _extend_deadline(seconds: float) -> None:
    record = current_call.get()
    if record is not None:
        record.waited(seconds)


class ModelRateLimiter:
    """Waits until a model call may be sent. Without a configured rate it only spreads the
    pause a 429 asks for."""

    def __init__(
        self,
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        redis_url: str | None = None,
        namespace: str = "ralph",
    ) -> None:
        storage: Storage = (
            RedisStorage(
                f"async+{redis_url}",  # redis:// or rediss://, on redis-py's asyncio client
                implementation="redispy",
                key_prefix=f"{namespace}:model-rate",
            )
            if redis_url
            else MemoryStorage()
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._margin = _SHARED_MARGIN if redis_url else _MARGIN
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self._scale = 1.0
        self._changed_at = time.monotonic()
        self._paused_until = 0.0
        # starts reserved by callers still waiting for them, and the last start taken
        # (monotonic): the next start is one spacing after the latest of them
        self._reserved: list[float] = []
        self._last_start = -math.inf
        self._foreground = 0  # foreground calls waiting

    @property
    def configured(self) -> bool:
        return self._rpm is not None or self._tpm is not None

    @property
    def scale(self) -> float:
        """The share of the configured rate in force (1.0 unless 429s lowered it)."""
        return self._scale

    async def acquire(self, tokens: int = 0, *, foreground: bool = False) -> float:
        """Wait until one call of about `tokens` tokens may start; return the seconds waited.
        Each wait is added to the caller's `current_call`, whose deadline moves by as much
        before the wait begins (so a wait for the limit never runs into a timeout).

        A `foreground` call (a person waits for it: chat) reserves no start and goes first:
        while one waits, a background call whose turn comes takes the next turn after the
        ones reserved."""
        waited = 0.0
        paced = foreground
        reserved: float | None = None  # this caller's start, while it waits for it
        self._foreground += foreground
        try:
            while True:
                pause = self._paused_until - time.monotonic()
                if pause <= 0 and (not paced or (self._foreground and not foreground)):
                    paced = True
                    if reserved is not None:
                        self._reserved.remove(reserved)
                    reserved, pause = self._reserve_start()
                if pause <= 0:
                    pause = await self._take(tokens)
                    if pause <= 0:
                        if reserved is not None:
                            self._last_start = max(self._last_start, reserved)
                        return waited
                _extend_deadline(pause)
                await asyncio.sleep(pause)
                waited += pause
        finally:
            # done, or cancelled while it waits: its start is no longer reserved (a run
            # cancelled with its agents queued does not hold back the calls after them)
            if reserved is not None:
                self._reserved.remove(reserved)
            self._foreground -= foreground

    async def charge(self, tokens: int) -> None:
        """Count `tokens` more against the minute's token window (a reply used more than was
        estimated); never waits."""
        if self._tpm is not None and tokens > 0:
            item = RateLimitItemPerMinute(self._tokens_per_minute())
            await self._limiter.hit(item, "tokens", cost=min(tokens, item.amount))

    def slow_down(self, retry_after: float | None) -> None:
        """A provider answered 429: everyone pauses for `retry_after` (or a second), and the
        configured rate is halved."""
        now = time.monotonic()
        self._paused_until = max(self._paused_until, now + (retry_after or 1.0))
        if self.configured:
            self._scale = max(_MIN_SCALE, self._scale / 2)
        self._changed_at = now

    def _recover(self) -> None:
        now = time.monotonic()
        while self._scale < 1.0 and now - self._changed_at >= _RECOVER_EVERY:
            self._scale = min(1.0, self._scale + 0.1)
            self._changed_at += _RECOVER_EVERY

    def _reserve_start(self) -> tuple[float | None, float]:
        """Reserve the next start, one spacing after the latest reserved or taken; return it
        (None: no rate, nothing reserved) and how long until it (0: now). The spacing fits a
        second's calls into the second plus the margin (the 21st of 20 a second starts after
        the first has left the provider's window), and a minute's into the minute."""
        if self._rpm is None:
            return None, 0.0
        self._recover()
        rate = self._rpm * self._scale
        spacing = max((1.0 + self._margin) / max(1, math.ceil(rate / 60)), 60.0 / rate)
        now = time.monotonic()
        start = max(now, max([self._last_start, *self._reserved]) + spacing)
        self._reserved.append(start)
        return start, start - now

    def _tokens_per_minute(self) -> int:
        assert self._tpm is not None
        return max(1, math.floor(self._tpm * self._scale))

    def _items(self, tokens: int) -> list[tuple[RateLimitItem, str, int]]:
        items: list[tuple[RateLimitItem, str, int]] = []
        if self._rpm is not None:
            rate = self._rpm * self._scale
            items.append((RateLimitItemPerSecond(max(1, math.ceil(rate / 60))), "requests", 1))
            items.append((RateLimitItemPerMinute(max(1, math.floor(rate))), "requests", 1))
        if self._tpm is not None:
            item = RateLimitItemPerMinute(self._tokens_per_minute())
            items.append((item, "tokens", max(1, min(tokens, item.amount))))
        return items

    async def _take(self, tokens: int) -> float:
        """Take one call's share of every window, or return how long to wait before trying
        again (a window already taken stays taken: the limit errs on the slow side)."""
        self._recover()
        for item, key, cost in self._items(tokens):
            if not await self._limiter.hit(item, key, cost=cost):
                stats = await self._limiter.get_window_stats(item, key)
                return max(0.01, stats.reset_time - time.time()) + self._margin
        return 0.0
