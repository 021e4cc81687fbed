"""Small helpers shared by the long-lived loops and processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended, its cancellation swallowed."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def freeze_startup_heap() -> None:
    """Move what a process allocated to start (its imports: Agno, the OpenAI client,
    SQLAlchemy, ...) out of the garbage collector's sight: a full collection then no longer
    walks it, which took about 0.1 s of a server's event loop (`bench/gc_pause.py`), longer
    than the rate limiter's margin between a call's turn and its send."""
    gc.collect()
    gc.freeze()
