"""Task definitions as the service sees them: the database is the truth, this is a cache.

Every change made through this registry bumps the task's revision in the database; `refresh`
reloads when the table's fingerprint differs, so changes made through another replica are
seen at that replica's next refresh (each scheduler tick, and before every lookup).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from ralph.agents.tools import check_tool_names
from ralph.background.models import StoredTask, TaskDefinition
from ralph.background.task_store import TaskStore
from ralph.background.triggers.after import check_chains, check_delete
from ralph.clock import Clock
from ralph.errors import NotFound


class TaskRegistry:
    def __init__(self, store: TaskStore, clock: Clock, *, allow_shell: bool = False) -> None:
        self._store = store
        self._clock = clock
        self._allow_shell = allow_shell
        self._tasks: dict[str, StoredTask] = {}
        self._fingerprint: frozenset[tuple[str, int, datetime]] | None = None
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every change made through this registry (wakes a scheduler)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        self._fingerprint = None
        for listener in self._listeners:
            listener()

    async def refresh(self) -> dict[str, StoredTask]:
        """Reload from the database if anything changed since the last load."""
        async with self._lock:
            fingerprint = await self._store.fingerprint()
            if fingerprint != self._fingerprint:
                self._tasks = {t.definition.name: t for t in await self._store.list()}
                self._fingerprint = fingerprint
            return self._tasks

    async def list(self) -> list[StoredTask]:
        return list((await self.refresh()).values())

    async def get(self, name: str) -> StoredTask:
        task = (await self.refresh()).get(name)
        if task is None:
            raise NotFound(f"task '{name}' not found")
        return task

    def check(self, task: TaskDefinition) -> None:
        """InvalidInput if the task cannot be stored here (a tool this server does not
        offer)."""
        check_tool_names(task.tools, allow_shell=self._allow_shell, mode=task.mode)

    async def _check_with(self, task: TaskDefinition) -> None:
        """InvalidInput if the tasks with `task` added (or replaced) would not chain (an
        `after` trigger following no task, a cycle, a chain too long)."""
        tasks = {name: t.definition for name, t in (await self.refresh()).items()}
        check_chains({**tasks, task.name: task}, task.name)

    async def create(self, task: TaskDefinition) -> StoredTask:
        self.check(task)
        await self._check_with(task)
        stored = await self._store.create(task, self._clock.now())
        self._changed()
        return stored

    async def replace(self, task: TaskDefinition) -> StoredTask:
        self.check(task)
        await self._check_with(task)
        stored = await self._store.replace(task, self._clock.now())
        self._changed()
        return stored

    async def set_enabled(self, name: str, enabled: bool) -> StoredTask:
        stored = await self._store.set_enabled(name, enabled, self._clock.now())
        self._changed()
        return stored

    async def delete(self, name: str) -> None:
        """Conflict if another task follows it."""
        check_delete({n: t.definition for n, t in (await self.refresh()).items()}, name)
        await self._store.delete(name)
        self._changed()
