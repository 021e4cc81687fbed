"""Where a run's (run, user) units execute, as the coordinator sees it: this process's
`UnitRunner`, the server's agent process (`AgentProcess`) or ARQ workers (`ArqDispatcher`)."""

from __future__ import annotations

from typing import Protocol

from ralph.background.models import TaskDefinition


class Dispatch(Protocol):
    """Executes (run id, task snapshot, user id) units somewhere and records their results."""

    async def __call__(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        """Return once the unit is done (or nobody executes it any more)."""
        ...

    def cancel(self, run_id: str) -> None:
        """A cancel of the run was requested: stop its agents wherever they run."""
        ...

    async def stop(self) -> None:
        """The shutdown's grace is over: stop the agents in flight (their users end
        `interrupted`), or stop waiting for those another process finishes."""
        ...
