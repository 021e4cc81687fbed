"""What a process has in flight for the runs it works on: the agents running per run, the runs
cancelled here, and each budgeted run's token counter. One object, shared by the coordinator
and the unit runner of one process (in the `inprocess` mode they are the same process)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ralph.agents.runner import AgentOutcome, RunTokens
from ralph.background.models import TaskDefinition


class InFlight:
    def __init__(self) -> None:
        # Cancelling targets these agents, never the bookkeeping around them, so a user's row
        # is always written to its final state.
        self._agents: dict[str, set[asyncio.Task[AgentOutcome]]] = {}
        self._cancelled: set[str] = set()
        self._tokens: dict[str, RunTokens] = {}
        self._stopping = False

    def add(self, run_id: str, agent: asyncio.Task[AgentOutcome]) -> None:
        self._agents.setdefault(run_id, set()).add(agent)
        if self._stopping:
            # a unit that starts after the stop (delivered before it, read after it) is
            # interrupted at once, not run to its end while the process waits for it
            agent.cancel()

    def discard(self, run_id: str, agent: asyncio.Task[AgentOutcome]) -> None:
        agents = self._agents.get(run_id)
        if agents is None:
            return
        agents.discard(agent)
        if not agents:
            del self._agents[run_id]  # a worker sees many runs: keep no empty sets behind

    def has_agents(self, run_id: str) -> bool:
        return run_id in self._agents

    def cancel(self, run_id: str) -> None:
        """A cancel was requested: the run's agents here stop, its users end `cancelled`."""
        self._cancelled.add(run_id)
        for agent in self._agents.get(run_id, set()):
            agent.cancel()

    def is_cancelled(self, run_id: str) -> bool:
        return run_id in self._cancelled

    def stop_all(self) -> None:
        """Shutdown: every agent here stops, and every agent added from now on; its user ends
        `interrupted` (not cancelled)."""
        self._stopping = True
        for agents in self._agents.values():
            for agent in agents:
                agent.cancel()

    async def run_tokens(
        self, run_id: str, task: TaskDefinition, spent: Callable[[], Awaitable[int]]
    ) -> RunTokens | None:
        """The run's token counter here (None without a `max_tokens_per_run`), starting from
        what `spent` says its users have used so far (a worker joining a run mid-way)."""
        if task.budget is None or task.budget.max_tokens_per_run is None:
            return None
        tokens = self._tokens.get(run_id)
        if tokens is None:
            used = await spent()
            limit = task.budget.max_tokens_per_run
            tokens = self._tokens.setdefault(run_id, RunTokens(limit, used))
        return tokens

    def spent(self, run_id: str, tokens: int) -> None:
        """A unit of the run that ran elsewhere (the agent process) recorded `tokens`: count
        them against the run's budget here. (A counter made later reads them from the
        database with the rest.)"""
        counter = self._tokens.get(run_id)
        if counter is not None:
            counter.used += tokens

    def settle(self, run_id: str) -> None:
        """A unit of the run ended: with none of its agents left here, its users' rows now
        count all its tokens, so the counter is read again next time."""
        if run_id not in self._agents:
            self._tokens.pop(run_id, None)

    def forget(self, run_id: str) -> None:
        """The run is over here: drop its cancel mark and token counter."""
        self._cancelled.discard(run_id)
        self._tokens.pop(run_id, None)
