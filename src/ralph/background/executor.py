"""Run a task for its users: at most `batch_size` agents in flight, each slot refilled as it
frees (a sliding window), every user's result stored in its own row."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog

from ralph.agents.models import ModelFactory
from ralph.agents.runner import AgentOutcome, RunTokens, TokenBudget, run_agent
from ralph.agents.tools import ToolContext
from ralph.background.models import (
    RunStatus,
    TaskDefinition,
    TaskRun,
    TriggerType,
    UserStatus,
)
from ralph.background.store import RERUN_PREFIX, RunStore
from ralph.clock import Clock
from ralph.conversations.store import ConversationStore
from ralph.db.retry import is_unreachable, until_reachable
from ralph.errors import InvalidInput
from ralph.memory.service import MemoryService

log = structlog.get_logger(__name__)

# Executes one (run id, task snapshot, user id) unit and records its result.
Dispatch = Callable[[str, TaskDefinition, str], Coroutine[Any, Any, None]]

BACKGROUND_PROMPT = (
    "Execute your background task now. Review the user's context and take appropriate action."
)


def replica_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Executor:
    """Executes runs. The unit of work is (run id, user id): everything needed to execute it
    is read from the database, so another process could pick it up."""

    def __init__(
        self,
        *,
        runs: RunStore,
        memory: MemoryService,
        conversations: ConversationStore,
        models: ModelFactory,
        clock: Clock,
        data_dir: Path,
        allow_shell: bool = False,
        transcript_max_chars: int = 200_000,
        heartbeat_seconds: float = 5.0,
        owner: str | None = None,
        dispatch: Dispatch | None = None,
        cancel_poll_seconds: float | None = None,
        rerun_limit: int = 1,
    ) -> None:
        """`dispatch` hands a (run, user) unit to whatever executes it: by default this
        process's `run_user`; the ARQ mode enqueues it for worker processes. Workers pass
        `cancel_poll_seconds` to notice cancels requested elsewhere. Users a crash or a
        shutdown interrupts are re-run in a new run, `rerun_limit` times in a row at most."""
        self.runs = runs
        self._memory = memory
        self._conversations = conversations
        self._models = models
        self._clock = clock
        self._data_dir = data_dir
        self._allow_shell = allow_shell
        self._transcript_max_chars = transcript_max_chars
        self._heartbeat_seconds = heartbeat_seconds
        self.owner = owner or replica_id()
        self._active: dict[str, asyncio.Task[TaskRun]] = {}
        # The agents in flight per run: cancelling targets these, never the bookkeeping
        # around them, so a user's row is always written to its final state.
        self._agents: dict[str, set[asyncio.Task[AgentOutcome]]] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        self._dispatch: Dispatch = dispatch or self.run_user
        # Units handed to another process, per run: a shutdown stops waiting for them (their
        # workers finish them) instead of cancelling agents here.
        self._remote = dispatch is not None
        self._units: dict[str, set[asyncio.Task[None]]] = {}
        self._cancel_poll_seconds = cancel_poll_seconds
        self._rerun_limit = rerun_limit
        # tokens spent per run with a `max_tokens_per_run` budget, by this process's agents
        self._run_tokens: dict[str, RunTokens] = {}

    # --- starting runs --------------------------------------------------------------------

    async def create_run(
        self,
        task: TaskDefinition,
        trigger: TriggerType,
        user_ids: Sequence[str] | None = None,
    ) -> str:
        """Record a pending run for `user_ids` (default: all the task's users; any others are
        InvalidInput) and return its id; `start` or `execute` runs it."""
        users = list(task.user_ids if user_ids is None else user_ids)
        if user_ids is not None:
            allowed = set(task.user_ids)
            outside = [u for u in users if u not in allowed]
            if outside:
                raise InvalidInput(f"user ids not in task '{task.name}': {', '.join(outside[:5])}")
        run_id = await self.runs.create(task, trigger, users, self._clock.now())
        assert run_id is not None  # only a slot claim can lose, and this run claims none
        return run_id

    async def create_rerun(
        self, run_id: str, task: TaskDefinition, user_ids: Sequence[str]
    ) -> str | None:
        """Record a pending run of `user_ids` that a crash or a shutdown left unfinished in
        `run_id`. At most one per interrupted run (keyed on it), and no deeper than the rerun
        limit (a user that keeps killing its process is not re-run forever): None if none
        was made."""
        if not user_ids or await self.runs.rerun_depth(run_id, self._rerun_limit) >= (
            self._rerun_limit
        ):
            return None
        return await self.runs.create(
            task,
            TriggerType.RERUN,
            list(user_ids),
            self._clock.now(),
            slot_key=f"{RERUN_PREFIX}{run_id}",
        )

    def start(self, run_id: str) -> asyncio.Task[TaskRun]:
        """Execute the run in the background; the returned task finishes with the run."""
        task = asyncio.create_task(self.execute(run_id), name=f"run:{run_id}")
        self._active[run_id] = task
        task.add_done_callback(lambda _: self._active.pop(run_id, None))
        return task

    async def execute_task(
        self,
        task: TaskDefinition,
        trigger: TriggerType,
        user_ids: Sequence[str] | None = None,
    ) -> TaskRun:
        """Create a run and execute it to the end (the plan's `execute_task`)."""
        return await self.execute(await self.create_run(task, trigger, user_ids))

    @property
    def active_runs(self) -> list[str]:
        return list(self._active)

    async def cancel(self, run_id: str) -> TaskRun:
        """Request cancellation: pending users become `cancelled`, running agents are stopped."""
        run = await self.runs.request_cancel(run_id)
        self._cancel_in_flight(run_id)
        return run

    def _cancel_in_flight(self, run_id: str) -> None:
        self._cancelled.add(run_id)
        for agent in self._agents.get(run_id, set()):
            agent.cancel()

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop starting users; give in-flight agents `grace_seconds`, then cancel them (their
        users are marked `interrupted`, as are the run's users not started yet). Those users
        are queued in a pending run, which any replica's recovery starts once the run lease
        has passed (the restarted server's too).

        With units dispatched to workers, the workers finish the units they have started;
        units still queued find their users `interrupted` and do nothing."""
        self._stopping = True
        runs = list(self._active.values())
        if not runs:
            return
        _, still_running = await asyncio.wait(runs, timeout=grace_seconds)
        for agents in self._agents.values():
            for agent in agents:
                agent.cancel()
        if self._remote:
            for units in self._units.values():
                for unit in units:
                    unit.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=10)

    # --- executing ------------------------------------------------------------------------

    async def execute(self, run_id: str) -> TaskRun:
        """Execute a pending run to the end and return its final state."""
        task = await self.runs.snapshot(run_id)
        if not await self.runs.mark_started(run_id, self.owner, self._clock.now()):
            return await self.runs.get(run_id)
        log.info("run_started", run_id=run_id, task=task.name, batch_size=task.batch_size)
        in_flight: set[asyncio.Task[None]] = set()
        self._agents[run_id] = set()
        self._units[run_id] = in_flight
        heartbeat = asyncio.create_task(self._heartbeat(run_id))
        error: str | None = None
        try:
            await self._window(run_id, task, in_flight)
        except Exception as exc:  # a storage failure: record it instead of leaving "running"
            log.exception("run_failed", run_id=run_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._agents.pop(run_id, None)
            self._run_tokens.pop(run_id, None)
            self._units.pop(run_id, None)
            self._cancelled.discard(run_id)
        # the end of a run must not be lost to a database outage: wait for it to come back
        run = await until_reachable(lambda: self.runs.get(run_id), what="run")
        leftover = UserStatus.CANCELLED if run.cancel_requested else UserStatus.INTERRUPTED
        if self._stopping or run.cancel_requested or error:
            await until_reachable(
                lambda: self.runs.cancel_pending_users(run_id, self._clock.now(), leftover),
                what="run",
            )
        run = await until_reachable(
            lambda: self.runs.finish(run_id, self._clock.now(), error), what="run"
        )
        log.info("run_finished", run_id=run_id, task=task.name, status=run.status, **run.counts)
        if run.status is RunStatus.INTERRUPTED:
            await self._rerun_interrupted(run_id, task)
        return run

    async def _rerun_interrupted(self, run_id: str, task: TaskDefinition) -> None:
        """This server is stopping (the rerun waits for recovery, here or on another
        replica), or a worker stopped mid-unit (the rerun starts now)."""
        users = await self.runs.user_ids(run_id, UserStatus.INTERRUPTED)
        rerun = await self.create_rerun(run_id, task, users)
        if rerun is None:
            return
        log.info("run_rerun_queued", run_id=run_id, rerun_id=rerun, users=len(users))
        if not self._stopping:
            self.start(rerun)

    async def _window(
        self, run_id: str, task: TaskDefinition, in_flight: set[asyncio.Task[None]]
    ) -> None:
        page = max(task.batch_size * 2, 100)
        after = -1
        while not self._stopping:
            batch = await until_reachable(
                functools.partial(self.runs.pending_users, run_id, after, page),
                what="pending users",
            )
            if not batch:
                break
            for position, user_id in batch:
                while len(in_flight) >= task.batch_size:
                    done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight.difference_update(done)
                if self._stopping or run_id in self._cancelled:
                    break
                tokens = await self._run_budget(run_id, task)
                if tokens is not None and tokens.exhausted:
                    # the run's budget is spent: nobody else starts
                    await until_reachable(
                        lambda: self.runs.cancel_pending_users(
                            run_id, self._clock.now(), UserStatus.BUDGET_EXCEEDED
                        ),
                        what="pending users",
                    )
                    break
                job = asyncio.create_task(self._dispatch(run_id, task, user_id))
                in_flight.add(job)
                after = position
            else:
                continue
            break
        if in_flight:
            await asyncio.wait(in_flight)

    async def _run_budget(self, run_id: str, task: TaskDefinition) -> RunTokens | None:
        """The run's token counter in this process, starting from what its finished users
        spent (a worker joining a run mid-way counts those too)."""
        if task.budget is None or task.budget.max_tokens_per_run is None:
            return None
        tokens = self._run_tokens.get(run_id)
        if tokens is None:
            spent = await self.runs.tokens_used(run_id)
            tokens = self._run_tokens.setdefault(
                run_id, RunTokens(task.budget.max_tokens_per_run, spent)
            )
        return tokens

    async def _heartbeat(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_seconds)
            try:
                # a cancel requested through another replica reaches this one here
                if await self.runs.heartbeat(run_id, self._clock.now()):
                    self._cancel_in_flight(run_id)
            except Exception:  # the database is away: beat again next time
                log.warning("heartbeat_failed", run_id=run_id, exc_info=True)

    async def run_user(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        """The unit of work: run the task's agent for one user of a run and record the result.

        Everything it needs is in the database (the run's task snapshot, the user's memory),
        so any process can do it, and it executes at most once: a user no longer pending (a
        duplicate delivery, a user cancelled or interrupted while queued) is left alone. The
        (task, user) lock makes a second concurrent run of the same user in another run
        impossible: that user is recorded as `skipped`.
        """
        start = await until_reachable(
            lambda: self.runs.start_user(run_id, task.name, user_id, self._clock.now()),
            what="user start",
        )
        if not start.started:
            if start.held_by is not None:
                log.info("user_skipped", run_id=run_id, user_id=user_id, running_in=start.held_by)
            else:
                log.info("user_not_pending", run_id=run_id, user_id=user_id)
            return
        status = UserStatus.FAILED
        outcome = AgentOutcome()
        context = ToolContext(
            user_id=user_id,
            memory=self._memory,
            conversations=self._conversations,
            data_dir=self._data_dir,
            author=f"agent:{task.name}",
            run_id=run_id,
            allow_shell=self._allow_shell,
        )
        agent = asyncio.create_task(self._agent(task, context))
        agents = self._agents.setdefault(run_id, set())
        agents.add(agent)
        watcher = (
            asyncio.create_task(self._watch_cancel(run_id))
            if self._cancel_poll_seconds is not None
            else None
        )
        try:
            outcome = await agent
            status = UserStatus.SUCCESS if outcome.ok else UserStatus.FAILED
            if outcome.stopped_by == "budget":
                status = UserStatus.BUDGET_EXCEEDED
        except asyncio.CancelledError:
            if not agent.cancelled():
                raise  # this bookkeeping task itself was cancelled: not ours to swallow
            cancelled = run_id in self._cancelled
            status = UserStatus.CANCELLED if cancelled else UserStatus.INTERRUPTED
            outcome.error = "cancelled" if cancelled else "interrupted by shutdown"
        except Exception as exc:
            log.exception("user_run_error", run_id=run_id, user_id=user_id)
            outcome.error = f"{type(exc).__name__}: {exc}"
            if is_unreachable(exc):
                # not the user's fault: re-run them (within the rerun limit) once it is back
                status = UserStatus.INTERRUPTED
                outcome.error = f"interrupted: the database was unreachable ({outcome.error})"
        finally:
            agents.discard(agent)
            if not agents and self._agents.get(run_id) is agents:
                del self._agents[run_id]  # a worker sees many runs: keep no empty sets behind
            if watcher is not None:
                watcher.cancel()
        # ids of the proposal rows this user's tools stored (or found stored, on a retry); kept
        # even when the agent was cancelled half-way
        proposals = len(context.proposal_ids)
        result = {
            "status": status.value,
            "completed_at": self._clock.now(),
            "turns_used": outcome.turns_used,
            "tool_calls": outcome.tool_calls,
            "proposals_created": proposals,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "total_tokens": outcome.total_tokens,
            "error": outcome.error,
            "transcript": json.dumps(outcome.transcript, default=str),
            "rate_limit_wait_seconds": round(outcome.rate_limit_wait_seconds, 3),
            "tokens_estimated": outcome.tokens_estimated,
            "cost_usd": outcome.cost_usd,
        }
        recorded = await until_reachable(
            lambda: self.runs.finish_user(run_id, task.name, user_id, result),
            what="user result",
        )
        if not recorded:
            # recovery took the user over while the database was away: its rerun decides
            log.warning("user_result_superseded", run_id=run_id, user_id=user_id)
        if run_id not in self._agents:
            # nothing of the run in flight here: its users' rows now count all its tokens
            self._run_tokens.pop(run_id, None)

    async def _watch_cancel(self, run_id: str) -> None:
        """In a worker process: notice a cancel requested through the coordinator."""
        assert self._cancel_poll_seconds is not None
        while True:
            await asyncio.sleep(self._cancel_poll_seconds)
            if await self.runs.get_cancel_flag(run_id):
                self._cancel_in_flight(run_id)
                return

    async def _agent(self, task: TaskDefinition, context: ToolContext) -> AgentOutcome:
        instructions = await self._memory.instructions_with_memory(
            task.system_prompt, context.user_id, task.memory_blocks
        )
        budget = TokenBudget(
            per_user=task.budget.max_tokens_per_user if task.budget else None,
            run=await self._run_budget(context.run_id or "", task),
        )
        return await run_agent(
            budget=budget,
            model=self._models(),
            tools=task.tools,
            context=context,
            instructions=instructions,
            prompt=BACKGROUND_PROMPT,
            max_turns=task.max_turns,
            timeout_seconds=task.timeout_seconds,
            transcript_max_chars=self._transcript_max_chars,
        )
