"""The unit of work: one user of one run. Everything it needs is read from the database (the
run's task snapshot, the user's memory), so any process can execute it: the server itself
(`inprocess`), its agent process (`subprocess`, the default) or an ARQ worker (`arq`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

import structlog

from ralph.agents.extract import extract_edits, grounded
from ralph.agents.kit import AgentKit
from ralph.agents.runner import AgentOutcome, TokenBudget, cap_transcript, run_agent
from ralph.agents.tools import EDIT_TOOLS, ToolContext, propose_change
from ralph.authors import Author
from ralph.background.chain_store import ChainStore
from ralph.background.inflight import InFlight
from ralph.background.models import AfterTrigger, TaskDefinition, unit_status
from ralph.background.run_store import RunStore, UnitEnd, UserStart
from ralph.background.triggers.after import outcome_context
from ralph.clock import Clock
from ralph.conversations.honcho import HistoryUnavailable
from ralph.conversations.models import Message, Role
from ralph.db.retry import is_unreachable, until_reachable
from ralph.memory.models import Proposal, labels_in_order
from ralph.memory.service import rejections_context, with_memory
from ralph.observability.events import UnitStats, observe_unit
from ralph.reasons import EndReason

log = structlog.get_logger(__name__)

MAX_ERROR_CHARS = 4000


def agent_prompt(labels: Sequence[str], tools: Sequence[str], episode: bool) -> str:
    """The agent's input before the user's messages: what to do first (a small model asked
    to report what it did answers at once, having done nothing), and what it already has (it
    otherwise reads and searches for it again)."""
    parts: list[str] = []
    if EDIT_TOOLS & set(tools):
        labelled = f" (labels: {', '.join(labels)})" if labels else ""
        source = "in their messages below" if episode else "you find"
        parts.append(
            f"Do your background task for this user now: for each new fact {source}, call a "
            f"tool to propose it{labelled}."
        )
    else:
        parts.append("Do your background task for this user now.")
    had = [
        *(["their memory blocks are in your instructions above"] if labels else []),
        *(["their messages since this task last ran for them are below"] if episode else []),
    ]
    if had:
        parts.append(f"You have them already: {' and '.join(had)}; do not read them again.")
    parts.append("After your tool calls, answer with one line saying what you proposed.")
    return " ".join(parts)


# the episode's messages in an agent's input stop at this many characters (the newest kept)
EPISODE_MAX_CHARS = 20_000


def _newest_lines(messages: Sequence[Message], line: Callable[[Message], str]) -> list[str]:
    """Each message as `line` makes it, oldest first; the newest are kept when they exceed
    `EPISODE_MAX_CHARS` in all."""
    kept: list[str] = []
    total = 0
    for message in reversed(messages):
        text = line(message)[:EPISODE_MAX_CHARS]
        if kept and total + len(text) > EPISODE_MAX_CHARS:
            break
        kept.append(text)
        total += len(text)
    return list(reversed(kept))


def compact_episode(messages: Sequence[Message]) -> str:
    """The user's messages as short lines, oldest first (the extract mode: a small model's
    tokens go to what was said, not to timestamps)."""

    def line(message: Message) -> str:
        who = "" if message.role is Role.USER else f"({message.role.value}) "
        return f"- {who}{message.content}"

    return "\n".join(_newest_lines(messages, line)) or "(no new messages)"


def with_episode(prompt: str, messages: Sequence[Message]) -> str:
    """`prompt` followed by the user's messages since the task last ran for them, oldest
    first, each with its time and role."""

    def line(message: Message) -> str:
        at = message.created_at.isoformat(timespec="seconds")
        return f"[{at}] {message.role.value}: {message.content}"

    kept = _newest_lines(messages, line)
    if not kept:
        return prompt
    header = f"The user's messages since this task last ran for them ({len(kept)}, oldest first):"
    return "\n".join([prompt, "", header, *kept])


class UnitRunner:
    """Runs the task's agent for one user of a run and records the result.

    It is also the `inprocess` mode's dispatch: the coordinator awaits `run_user` directly,
    `cancel` and `stop` reach the agents through the shared `InFlight`."""

    def __init__(
        self,
        *,
        runs: RunStore,
        chains: ChainStore,
        kit: AgentKit,
        clock: Clock,
        inflight: InFlight,
        transcript_max_chars: int = 200_000,
    ) -> None:
        self._runs = runs
        self._chains = chains
        self._kit = kit
        self._clock = clock
        self.inflight = inflight
        self._transcript_max_chars = transcript_max_chars
        # where each unit's figures go: this process's metrics, or (in an agent process) the
        # answer to the server
        self.on_unit: Callable[[str, str, UnitStats], None] = lambda _r, _u, stats: observe_unit(
            stats
        )
        # task snapshots of the runs this process executes units of, the newest 1,000
        self._snapshots: dict[str, TaskDefinition] = {}
        # per run: the users whose rejected proposals its agents are shown
        self._rejected: dict[str, set[str]] = {}

    async def __call__(self, run_id: str, task: TaskDefinition, user_id: str) -> None:
        await self.run_user(run_id, task, user_id)

    def cancel(self, run_id: str) -> None:
        self.inflight.cancel(run_id)

    async def stop(self) -> None:
        self.inflight.stop_all()

    async def run_delivered(self, run_id: str, user_id: str, *, where: str) -> int:
        """`run_user` for a unit delivered from another process (an agent process, an ARQ
        worker): the run's task is read from the database (cached). If this fails, the user
        is recorded as failed ("<where> error: ..."), so nobody waits for it, and the error
        is raised. Returns the tokens recorded."""
        task: TaskDefinition | None = None
        try:
            task = self._snapshots.get(run_id)
            if task is None:
                task = self._snapshots[run_id] = await self._runs.snapshot(run_id)
                if len(self._snapshots) > 1000:
                    self._snapshots.pop(next(iter(self._snapshots)))
            return await self.run_user(run_id, task, user_id)
        except Exception as exc:
            log.exception("unit_error", run_id=run_id, user_id=user_id)
            if task is not None:
                error = f"{where} error: {exc!r}"
                await self._runs.end_unit(
                    run_id,
                    task.name,
                    user_id,
                    UnitEnd(EndReason.INTERNAL, error),
                    self._clock.now(),
                    policy=task.retry,
                    running_only=False,
                )
            raise

    async def run_user(self, run_id: str, task: TaskDefinition, user_id: str) -> int:
        """Execute the unit at most once: a user no longer pending (a duplicate delivery, a
        user cancelled or interrupted while queued) is left alone. The (task, user) lock makes
        a second concurrent run of the same user in another run impossible: that user is
        recorded as `skipped`. Returns the tokens the user's result records (0: not run)."""
        now = self._clock.now()
        attempts = 0

        async def claim() -> UserStart:
            # after a failed attempt, its commit may have happened: the retry recognises it
            nonlocal attempts
            attempts += 1
            return await self._runs.start_user(run_id, task.name, user_id, now, retry=attempts > 1)

        start = await until_reachable(claim, what="user start")
        if not start.started:
            if start.held_by is not None:
                log.info("user_skipped", run_id=run_id, user_id=user_id, running_in=start.held_by)
            else:
                log.info("user_not_pending", run_id=run_id, user_id=user_id)
            return 0
        outcome = AgentOutcome()
        context = self._kit.context(
            user_id,
            author=str(Author.of_task(task.name)),
            run_id=run_id,
            dry_run=start.dry_run,
            auto_approve=task.approval == "auto",
        )
        agent = asyncio.create_task(self._agent(task, context, start.spent))
        self.inflight.add(run_id, agent)
        started = asyncio.get_running_loop().time()
        try:
            outcome = await agent
        except asyncio.CancelledError:
            if not agent.cancelled():
                raise  # this bookkeeping task itself was cancelled: not ours to swallow
            cancelled = self.inflight.is_cancelled(run_id)
            outcome.reason = EndReason.CANCELLED if cancelled else EndReason.INTERRUPTED
            outcome.error = "cancelled" if cancelled else "interrupted by shutdown"
        except Exception as exc:
            log.exception("user_run_error", run_id=run_id, user_id=user_id)
            outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.reason = EndReason.INTERNAL
            if is_unreachable(exc):
                # not the user's fault: tried again at once (within the task's max_attempts)
                outcome.reason = EndReason.INTERRUPTED
                outcome.error = f"interrupted: the database was unreachable ({outcome.error})"
        finally:
            self.inflight.discard(run_id, agent)
        figures = {
            "turns_used": outcome.turns_used,
            "tool_calls": outcome.tool_calls,
            # the proposal rows this user's tools stored (or found stored, on a retry); kept
            # even when the agent was cancelled half-way
            "proposals_created": len(context.proposal_ids),
            "proposals_refused": context.refused,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "total_tokens": outcome.total_tokens,
            "transcript": json.dumps(outcome.transcript, default=str),
            "rate_limit_wait_seconds": round(outcome.rate_limit_wait_seconds, 3),
            "tokens_estimated": outcome.tokens_estimated,
            "cost_usd": outcome.cost_usd,
            "stopped_by": outcome.stopped_by,
        }
        ended = UnitEnd(
            outcome.reason,
            # a provider's or a model's error text may be any size: keep its start
            error=outcome.error[:MAX_ERROR_CHARS] if outcome.error else None,
            figures=figures,
            retry_after=outcome.retry_after,
        )
        status = await until_reachable(
            lambda: self._runs.end_unit(
                run_id, task.name, user_id, ended, self._clock.now(), policy=task.retry
            ),
            what="user result",
        )
        if status is None:
            # recovery took the user over while the database was away: its rerun decides
            log.warning("user_result_superseded", run_id=run_id, user_id=user_id)
        self.on_unit(
            run_id,
            user_id,
            {
                "task": task.name,
                "status": (status or unit_status(outcome.reason, proposals=0)).value,
                "seconds": asyncio.get_running_loop().time() - started,
                "model_call_seconds": outcome.model_call_seconds,
                "rate_limited": outcome.rate_limited_responses,
                "retries": outcome.model_retries,
                "stopped_by": outcome.stopped_by,
                "reason": outcome.reason.value,
            },
        )
        self.inflight.settle(run_id)
        return outcome.total_tokens if status is not None else 0

    async def _rejected_users(self, run_id: str, author: str) -> set[str]:
        """The users with rejected proposals of `author`, read once per run (cached like the
        snapshots: the newest 1,000 runs)."""
        found = self._rejected.get(run_id)
        if found is None:
            found = self._rejected[run_id] = await self._kit.memory.rejected_users(author)
            if len(self._rejected) > 1000:
                self._rejected.pop(next(iter(self._rejected)))
        return found

    async def _agent(self, task: TaskDefinition, context: ToolContext, spent: int) -> AgentOutcome:
        run_id = context.run_id or ""
        user_id = context.user_id
        # the blocks are read once: the labels a task without `memory_blocks` may edit are the
        # user's, and they are the memory in its instructions
        blocks = await self._kit.memory.list_blocks(user_id)
        labels = list(task.memory_blocks) or sorted(block.label for block in blocks)
        instructions = with_memory(task.system_prompt, labels_in_order(blocks, labels))
        # what reviewers rejected of this task's proposals for the user: not proposed again
        # (read for the users the run's one read found with rejections)
        rejected: list[Proposal] = []
        if user_id in await self._rejected_users(run_id, context.author):
            rejected = await self._kit.memory.rejections(user_id, context.author)
        if rejected:
            instructions = f"{instructions}\n\n---\n\n{rejections_context(rejected)}"
        if isinstance(task.trigger, AfterTrigger):
            # what the task this one follows did for the user
            outcomes = await self._chains.upstream_outcomes(run_id, user_id)
            context.upstream_runs = [o.run_id for o in outcomes]
            made = {
                o.run_id: list(
                    reversed(await self._kit.memory.list_proposals(user_id, run_id=o.run_id))
                )
                for o in outcomes
            }
            if outcomes:
                instructions = f"{instructions}\n\n---\n\n{outcome_context(outcomes, made)}"
        budget = TokenBudget(
            per_user=task.budget.max_tokens_per_user if task.budget else None,
            run=await self.inflight.run_tokens(
                run_id, task, lambda: self._runs.tokens_used(run_id)
            ),
            earlier=spent,
        )
        episode: list[Message] = []
        unavailable = ""
        if task.episode_messages:
            since = await self._runs.last_started(task.name, user_id, run_id)
            try:
                episode = await self._kit.conversations.since(
                    user_id, since, self._clock.now(), task.episode_messages
                )
            except HistoryUnavailable as exc:  # the agent works without it, and is told so
                log.warning("episode_unavailable", run_id=run_id, user_id=user_id, error=str(exc))
                unavailable = f"\n\nThe user's recent messages are unavailable ({exc})."
        context.saw(episode)
        if task.mode == "extract":
            prompt = compact_episode(episode)
            said = [m.content for m in episode if m.role is Role.USER]
            return await self._extract(
                task, context, instructions, prompt + unavailable, labels, budget, said
            )
        prompt = with_episode(agent_prompt(labels, task.tools, bool(episode)), episode)
        return await run_agent(
            budget=budget,
            model=self._kit.model(),
            tools=task.tools,
            context=context,
            instructions=instructions,
            prompt=prompt + unavailable,
            max_turns=task.max_turns,
            timeout_seconds=task.timeout_seconds,
            transcript_max_chars=self._transcript_max_chars,
        )

    async def _extract(
        self,
        task: TaskDefinition,
        context: ToolContext,
        instructions: str,
        prompt: str,
        labels: list[str],
        budget: TokenBudget,
        said: Sequence[str],
    ) -> AgentOutcome:
        """The `extract` mode: one structured call, then each edit proposed through the same
        path as the tools' (rules, dedupe, superseding, auto-approval, dry runs). An edit of
        a label the task does not list is refused, and so is one whose text and reason are
        both not what the user said (`said`, the episode's user messages: a small model
        copies its examples' facts, or makes one up)."""
        if not labels and not task.new_blocks:
            return AgentOutcome(
                error="nothing to edit: the task lists no memory_blocks, the user has no "
                "blocks, and new_blocks is false"
            )
        extraction = await extract_edits(
            model=self._kit.model(),
            instructions=instructions,
            prompt=prompt,
            labels=labels,
            new_blocks=task.new_blocks,
            timeout_seconds=task.timeout_seconds,
            budget=budget,
        )
        outcome = extraction.outcome
        for number, edit in enumerate(extraction.edits, start=1):
            if not task.new_blocks and edit.label.strip().lower() not in labels:
                answer = (
                    f"error: label {edit.label!r} is not one of this task's blocks "
                    f"({', '.join(labels)}); the task does not allow new blocks"
                )
            elif not (grounded(edit.reason, said) or grounded(edit.text, said)):
                answer = (
                    f"error: neither the text nor the reason ({edit.reason!r}) is in the "
                    "user's messages"
                )
            else:
                outcome.tool_calls += 1
                answer = await propose_change(context, edit.label, edit.reason, **edit.change())
            outcome.transcript.append(
                {"role": "edit", "number": number, "edit": edit.model_dump(), "result": answer}
            )
        outcome.transcript = cap_transcript(outcome.transcript, self._transcript_max_chars)
        return outcome
