"""Group commit: writes that arrive together share one transaction.

Every user message of a product's chat records activity, so these writes come many at a time
and each is tiny; a transaction each spends most of its time in BEGIN, COMMIT and (SQLite)
the wait for the database's one write lock. A `GroupCommit` keeps one writer: while it
commits a batch, new writes queue; the next batch takes all of them (up to `max_batch`) in
one transaction. A write's caller is answered only after its batch has committed, so nothing
acknowledged is lost on a crash; if a batch fails, its writes are tried again one
transaction each, so one bad write fails alone.

`GroupRead` does the same for point reads (a user's latest activity, read on every chat
turn): the reads queued together are one statement on one connection. A read that arrives
while a batch is being read waits for the next one, so it never answers with data older than
the moment it was asked.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ralph.db.engine import one_statement

W = TypeVar("W")
R = TypeVar("R")

# what a batch writes: each write's result, in the writes' order
WriteBatch = Callable[[AsyncConnection, Sequence[W]], Awaitable[Sequence[R]]]


Queued = tuple[W, "asyncio.Future[R]"]


class GroupCommit(Generic[W, R]):
    """Runs `write(connection, writes)` for the writes queued together, in one transaction."""

    def __init__(self, engine: AsyncEngine, write: WriteBatch[W, R], *, max_batch: int = 500):
        self._engine = engine
        self._write = write
        self._max_batch = max_batch
        # None: stop once what is queued before it is committed
        self._queue: asyncio.Queue[Queued[W, R] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # committed, for tests and benchmarks

    async def submit(self, write: W) -> R:
        """Queue `write`; its result once its batch has committed (or its error)."""
        if self._queue is None or self._writer is None or self._writer.done():
            self._queue = asyncio.Queue()  # of this event loop
            # a context of its own: not the first caller's (its request id, for one)
            self._writer = asyncio.create_task(
                self._run(self._queue), name="group-commit", context=contextvars.Context()
            )
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, done))
        return await done

    async def _run(self, queue: asyncio.Queue[Queued[W, R] | None]) -> None:
        while (first := await queue.get()) is not None:
            batch = [first]
            while len(batch) < self._max_batch and not queue.empty():
                queued = queue.get_nowait()
                if queued is None:
                    await self._commit(batch)
                    return
                batch.append(queued)
            await self._commit(batch)

    def _connection(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return self._engine.begin()

    async def _commit(self, batch: list[Queued[W, R]]) -> None:
        try:
            async with self._connection() as connection:
                results = await self._write(connection, [write for write, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():  # its caller may have gone (a cancelled request)
                    batch[0][1].set_exception(exc)
                return
            for one in batch:  # each alone: the bad write fails, the others commit
                await self._commit([one])
            return
        self.batches += 1
        for (_, done), result in zip(batch, results, strict=True):
            if not done.done():
                done.set_result(result)

    async def aclose(self) -> None:
        """Stop the writer once the writes queued so far are committed."""
        if self._queue is None or self._writer is None or self._writer.done():
            return
        self._queue.put_nowait(None)
        await self._writer


class GroupRead(GroupCommit[W, R]):
    """Runs `read(connection, keys)` for the reads queued together, as one statement (no
    transaction: `ralph.db.engine.one_statement`)."""

    def _connection(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return one_statement(self._engine)
