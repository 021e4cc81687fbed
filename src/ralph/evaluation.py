"""`ralph eval`: run a task over a scenario of users against the configured model, in a
throwaway database, and score what it proposed against the facts each user's messages hold.

A scenario (TOML) has a `[task]` table (the fields of a tasks file's task; `name` included,
`user_ids` and `trigger` filled in) and `[[users]]`, each with `id`, `notes` (their notes
block), `messages` (what they said since the task last ran) and `facts`: groups of words, one
group per fact, all of whose words must appear in one proposed text (case-insensitive) for the
fact to count as found. `known` lists facts the notes already hold: proposing one again is a
repeat. A proposal matching no fact (nor a known one) is noise.

`--baseline` runs, in the same process and on the same model, a bare Agno agent per user with
the task's prompt, the notes and the messages in its input and one tool that appends a note:
what a team would write without Ralph.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from ralph.background.models import TaskDefinition, TriggerType
from ralph.config import Settings
from ralph.conversations.models import Role
from ralph.memory.models import Proposal, ProposalKind
from ralph.validation import check_user_id

NOTES = "notes"


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message says where and what."""


@dataclass(frozen=True, slots=True)
class ScenarioUser:
    id: str
    notes: str
    messages: list[str]
    facts: list[list[str]]
    known: list[list[str]] = field(default_factory=list[list[str]])


@dataclass(frozen=True, slots=True)
class Scenario:
    task: TaskDefinition
    users: list[ScenarioUser]


@dataclass
class UserScore:
    """What a run did for one user, and how it scores."""

    user: str
    status: str
    expected: int
    found: int = 0
    noise: int = 0
    repeats: int = 0
    proposals: list[str] = field(default_factory=list[str])
    model_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stopped_by: str | None = None
    error: str | None = None
    # the agent's last words (its final answer, or the extract reply)
    final: str | None = None


def _words(group: Any, where: str) -> list[str]:
    if not isinstance(group, list) or not group:
        raise ScenarioError(f"{where}: a fact is a non-empty list of words")
    words = cast("list[Any]", group)
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ScenarioError(f"{where}: a fact's words are non-empty strings")
    return [str(w).strip().lower() for w in words]


def parse_scenario(text: str, source: str, mode: str | None = None) -> Scenario:
    """The scenario `text` holds (`mode` overrides its task's); ScenarioError otherwise."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    raw_users = document.get("users")
    if not isinstance(raw_users, list) or not raw_users:
        raise ScenarioError(f"{source}: no [[users]]")
    users: list[ScenarioUser] = []
    for index, raw in enumerate(cast("list[Any]", raw_users), start=1):
        where = f"{source}: user {index}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: must be a table")
        entry = cast("dict[str, Any]", raw)
        try:
            user_id = check_user_id(str(entry.get("id", "")))
        except ValueError as exc:
            raise ScenarioError(f"{where}: id: {exc}") from None
        messages = entry.get("messages", [])
        if not isinstance(messages, list) or not all(
            isinstance(m, str) for m in cast("list[Any]", messages)
        ):
            raise ScenarioError(f"{where}: messages is a list of strings")
        users.append(
            ScenarioUser(
                id=user_id,
                notes=str(entry.get("notes", "")),
                messages=[str(m) for m in cast("list[Any]", messages)],
                facts=[_words(f, where) for f in cast("list[Any]", entry.get("facts", []))],
                known=[_words(f, where) for f in cast("list[Any]", entry.get("known", []))],
            )
        )
    table = document.get("task")
    if not isinstance(table, dict):
        raise ScenarioError(f"{source}: no [task]")
    values: dict[str, Any] = {
        "name": "eval",
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "memory_blocks": [NOTES],
        **cast("dict[str, Any]", table),
        "user_ids": [u.id for u in users],
    }
    if mode is not None:
        values["mode"] = mode
    if values.get("mode") == "extract":  # no tools in that mode: the memory ones are ignored
        values["tools"] = []
    try:
        task = TaskDefinition.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ScenarioError(f"{source}: [task]: {problems}") from None
    return Scenario(task, users)


def read_scenario(path: Path, mode: str | None = None) -> Scenario:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return parse_scenario(text, str(path), mode)


def _matches(text: str, fact: Sequence[str]) -> bool:
    lowered = text.lower()
    return all(word in lowered for word in fact)


def score(user: ScenarioUser, texts: Sequence[str], result: UserScore) -> UserScore:
    """Fill `result`'s found, noise and repeats from the proposed `texts`."""
    result.proposals = list(texts)
    result.found = sum(1 for fact in user.facts if any(_matches(t, fact) for t in texts))
    for text in texts:
        if any(_matches(text, fact) for fact in user.facts):
            continue
        if any(_matches(text, fact) for fact in user.known):
            result.repeats += 1
        else:
            result.noise += 1
    return result


def proposed_text(proposal: Proposal, notes: str) -> str:
    """What a proposal adds: its appended or replacing text, or the lines of a rewrite that
    the notes did not have."""
    if proposal.kind is ProposalKind.BODY:
        before = {line.strip() for line in notes.splitlines()}
        body = proposal.body or ""
        return "\n".join(line for line in body.splitlines() if line.strip() not in before)
    return proposal.new_text or ""


def _isolated(settings: Settings, directory: Path) -> Settings:
    """`settings` on a database of their own in `directory`, everything in this process."""
    return settings.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{directory / 'eval.db'}",
            "data_dir": directory / "data",
            "worker_mode": "inprocess",
            "scheduler_enabled": False,
            "webhook_url": None,
            "messages_backend": "ralph",
            "memory_versioning": "none",
            "tasks_file": None,
        }
    )


async def evaluate(scenario: Scenario, settings: Settings) -> list[UserScore]:
    """Run the scenario's task once over its users in a throwaway database; score each."""
    from ralph.composition import open_services

    with tempfile.TemporaryDirectory(prefix="ralph-eval-") as directory:
        isolated = _isolated(settings, Path(directory))
        async with open_services(isolated) as services:
            for user in scenario.users:
                if user.notes:
                    await services.memory.put_block(
                        user.id, NOTES, title="Notes", body=user.notes, author="api"
                    )
                for message in user.messages:
                    await services.conversations.add_message(user.id, Role.USER, message)
            task = await services.registry.create(scenario.task)
            run_id = await services.background.create_run(task.definition, TriggerType.MANUAL)
            await services.coordinator.execute(run_id)
            scores: list[UserScore] = []
            for user in scenario.users:
                unit = await services.runs.user(run_id, user.id)
                made = await services.memory.list_proposals(user.id, run_id=run_id)
                seconds = 0.0
                if unit.started_at is not None and unit.completed_at is not None:
                    seconds = (unit.completed_at - unit.started_at).total_seconds()
                result = UserScore(
                    user=user.id,
                    status=unit.status.value,
                    expected=len(user.facts),
                    model_calls=unit.turns_used,
                    tokens=unit.total_tokens,
                    seconds=seconds,
                    stopped_by=unit.stopped_by,
                    error=unit.error,
                )
                said = [
                    str(entry.get("content") or "")
                    for entry in json.loads(unit.transcript or "[]")
                    if entry.get("role") == "assistant"
                ]
                result.final = said[-1][:2000] if said else None
                texts = [proposed_text(p, user.notes) for p in made]
                scores.append(score(user, texts, result))
            return scores


async def evaluate_baseline(scenario: Scenario, settings: Settings) -> list[UserScore]:
    """A bare Agno agent per user (the task's prompt, the notes and the messages in its input,
    one tool that appends a note), on the same model, `batch_size` at a time."""
    from agno.agent import Agent
    from agno.models.openai.like import OpenAILike

    from ralph.agents.models import ModelFactory

    factory = ModelFactory(settings)
    gate = asyncio.Semaphore(scenario.task.batch_size)

    async def one(user: ScenarioUser) -> UserScore:
        notes: list[str] = []

        def append_note(text: str) -> str:
            """Add a note about the user to their notes.

            Args:
                text: the note to add.
            """
            notes.append(text)
            return "added"

        if settings.model_base_url and settings.model_id:
            model: Any = OpenAILike(
                id=settings.model_id, base_url=settings.model_base_url, api_key="not-needed"
            )
        else:
            model = factory()
        agent = Agent(
            model=model,
            tools=[append_note],
            instructions=f"{scenario.task.system_prompt}\n\nTheir notes:\n{user.notes}",
            telemetry=False,
        )
        prompt = "Their recent messages:\n" + "\n".join(f"- {m}" for m in user.messages)
        result = UserScore(user=user.id, status="success", expected=len(user.facts))
        async with gate:
            started = time.perf_counter()
            try:
                output = await asyncio.wait_for(
                    agent.arun(prompt),  # pyright: ignore[reportUnknownMemberType]
                    scenario.task.timeout_seconds,
                )
            except Exception as exc:  # the baseline's failure is its result, not the eval's
                result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
            else:
                messages = [m for m in output.messages or [] if m.role == "assistant"]
                result.model_calls = len(messages)
                result.tokens = output.metrics.total_tokens if output.metrics else 0
                if str(output.status.value) == "ERROR":
                    result.status, result.error = "failed", str(output.content)
            result.seconds = time.perf_counter() - started
        return score(user, notes, result)

    try:
        return list(await asyncio.gather(*(one(user) for user in scenario.users)))
    finally:
        await factory.aclose()


def totals(scores: Sequence[UserScore]) -> dict[str, Any]:
    """The figures over all users: facts found of expected, noise, repeats, statuses, and per
    user the model calls, tokens and seconds."""
    count = max(len(scores), 1)
    expected = sum(s.expected for s in scores)
    statuses: dict[str, int] = {}
    for s in scores:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    return {
        "users": len(scores),
        "facts_expected": expected,
        "facts_found": sum(s.found for s in scores),
        "recall": round(sum(s.found for s in scores) / expected, 3) if expected else None,
        "noise": sum(s.noise for s in scores),
        "repeats": sum(s.repeats for s in scores),
        "statuses": statuses,
        "model_calls_per_user": round(sum(s.model_calls for s in scores) / count, 2),
        "tokens_per_user": round(sum(s.tokens for s in scores) / count),
        "seconds_per_user": round(sum(s.seconds for s in scores) / count, 2),
    }


def report(label: str, scores: Sequence[UserScore]) -> str:
    """A table of `scores` with their totals, for a terminal."""
    lines = [
        f"== {label}",
        f"{'user':<10} {'status':<16} {'found':>7} {'noise':>5} {'rep':>4} "
        f"{'calls':>5} {'tokens':>7} {'secs':>6}",
    ]
    for s in scores:
        status = s.status + (f"/{s.stopped_by}" if s.stopped_by else "")
        lines.append(
            f"{s.user:<10} {status:<16} {f'{s.found}/{s.expected}':>7} {s.noise:>5} "
            f"{s.repeats:>4} {s.model_calls:>5} {s.tokens:>7} {s.seconds:>6.1f}"
        )
    t = totals(scores)
    lines.append(
        f"total: {t['facts_found']}/{t['facts_expected']} facts (recall {t['recall']}), "
        f"{t['noise']} noise, {t['repeats']} repeats, statuses {t['statuses']}; per user "
        f"{t['model_calls_per_user']} calls, {t['tokens_per_user']} tokens, "
        f"{t['seconds_per_user']} s"
    )
    return "\n".join(lines)


def as_json(results: Mapping[str, Sequence[UserScore]]) -> str:
    return json.dumps(
        {
            label: {"totals": totals(scores), "users": [asdict(s) for s in scores]}
            for label, scores in results.items()
        },
        indent=2,
    )
