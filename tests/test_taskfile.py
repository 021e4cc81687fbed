"""Tasks as files: `ralph tasks apply -f tasks.toml`, `ralph tasks export`, RALPH_TASKS_FILE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from httpx import AsyncClient
from typer.testing import CliRunner

from ralph.background.taskfile import TaskFileError, dump_tasks, parse_tasks
from ralph.cli import app
from ralph.config import Settings
from ralph.testing.clock import FakeClock
from tests.helpers import AppHarness, LiveServer, harness_for

runner = CliRunner()

TASKS = """
[tasks.nightly]
system_prompt = "Review the user's notes."
tools = ["list_memory_blocks", "edit_memory_block"]
user_ids = ["ann", "bob"]
batch_size = 10
trigger = { type = "cron", schedule = "0 3 * * *", timezone = "Europe/Berlin" }

[tasks.after-chat]
system_prompt = "Summarise the conversation."
user_ids = ["ann"]
episode_messages = 20

[tasks.after-chat.trigger]
type = "idle"
idle_minutes = 30
"""


def test_a_file_reads_as_the_api_would_and_back() -> None:
    tasks = parse_tasks(TASKS, "tasks.toml")
    assert [t.name for t in tasks] == ["nightly", "after-chat"]
    assert tasks[0].trigger.type == "cron"
    assert tasks[0].batch_size == 10
    assert tasks[1].episode_messages == 20
    assert parse_tasks(dump_tasks(tasks), "again.toml") == tasks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[tasks.x\n", "tasks.toml: not valid TOML"),
        ("[task.x]\n", "unknown top-level keys ['task']"),
        (
            '[tasks.x]\nsystem_prompt = "p"\nuser_ids = ["a"]\n'
            'trigger = { type = "cron", schedule = "0 0 31 2 *" }\nbatch_size = 0\n',
            "tasks.toml: task 'x': batch_size: Input should be greater than or equal to 1",
        ),
        (
            '[tasks.x]\nsystem_prompt = "p"\nuser_ids = ["a"]\n'
            'trigger = { type = "cron", schedule = "0 0 31 2 *" }\n',
            "tasks.toml: task 'x': trigger.cron.schedule: Value error, cron expression",
        ),
        ('[tasks.x]\nname = "y"\n', "tasks.toml: task 'x': name: comes from the table's key"),
        ("[tasks.Bad]\nsystem_prompt = 1\n", "tasks.toml: task 'Bad': name:"),
    ],
)
def test_an_invalid_file_names_the_file_the_task_and_the_field(text: str, expected: str) -> None:
    with pytest.raises(TaskFileError) as raised:
        parse_tasks(text, "tasks.toml")
    assert expected in str(raised.value)


async def apply(client: AsyncClient, text: str, **options: bool) -> list[tuple[str, str]]:
    tasks = [t.model_dump(mode="json") for t in parse_tasks(text, "t.toml")]
    answer = await client.post("/background/tasks/apply", json={"tasks": tasks, **options})
    assert answer.status_code == 200, answer.text
    return [(c["name"], c["action"]) for c in answer.json()]


async def test_apply_creates_updates_leaves_alone_and_prunes(
    harness: AppHarness, clock: FakeClock
) -> None:
    client = harness.client
    registry = harness.services.registry
    assert await apply(client, TASKS, dry_run=True) == [
        ("nightly", "created"),
        ("after-chat", "created"),
    ]
    assert await registry.list() == []
    assert await apply(client, TASKS) == [("nightly", "created"), ("after-chat", "created")]
    before = await registry.get("nightly")
    await clock.advance(3600)
    # a second apply changes nothing, and does not restart the schedule
    assert await apply(client, TASKS) == [("nightly", "unchanged"), ("after-chat", "unchanged")]
    after = await registry.get("nightly")
    assert (after.revision, after.schedule_from) == (before.revision, before.schedule_from)

    changed = TASKS.replace("batch_size = 10", "batch_size = 20")
    only_nightly = changed.split("[tasks.after-chat]")[0]
    assert await apply(client, only_nightly) == [("nightly", "updated")]
    assert (await registry.get("nightly")).definition.batch_size == 20
    assert await apply(client, only_nightly, prune=True, dry_run=True) == [
        ("nightly", "unchanged"),
        ("after-chat", "deleted"),
    ]
    assert len(await registry.list()) == 2
    assert await apply(client, only_nightly, prune=True) == [
        ("nightly", "unchanged"),
        ("after-chat", "deleted"),
    ]
    assert [t.definition.name for t in await registry.list()] == ["nightly"]


async def test_apply_checks_every_task_before_writing_any(harness: AppHarness) -> None:
    client = harness.client
    good = parse_tasks(TASKS, "t.toml")[0].model_dump(mode="json")
    bad = good | {"name": "shell", "tools": ["run_shell"]}  # off unless allowed
    answer = await client.post("/background/tasks/apply", json={"tasks": [good, bad]})
    assert answer.status_code == 422
    assert "task 'shell'" in answer.json()["detail"]
    twice = await client.post("/background/tasks/apply", json={"tasks": [good, good]})
    assert twice.status_code == 422
    assert "nightly" in twice.json()["detail"]
    assert await harness.services.registry.list() == []


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


def test_cli_apply_and_export(live: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(TASKS)
    applied = runner.invoke(app, ["tasks", "apply", "-f", str(path), "--url", live.url])
    assert applied.exit_code == 0, applied.output
    assert applied.output.split() == ["created", "nightly", "created", "after-chat"]

    exported = runner.invoke(app, ["tasks", "export", "--url", live.url])
    assert exported.exit_code == 0, exported.output
    path.write_text(exported.output)
    again = runner.invoke(app, ["tasks", "apply", "-f", str(path), "--url", live.url])
    assert again.output.split() == ["unchanged", "after-chat", "unchanged", "nightly"]

    path.write_text(TASKS.replace("batch_size = 10", "batch_size = 0"))
    broken = runner.invoke(app, ["tasks", "apply", "-f", str(path), "--url", live.url])
    assert broken.exit_code == 1
    assert f"{path}: task 'nightly': batch_size" in broken.output
    assert "nothing applied" in broken.output


async def test_the_tasks_file_is_applied_at_start(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(TASKS)
    configured = settings.model_copy(update={"tasks_file": path})
    async with harness_for(configured) as harness:
        stored = await harness.services.registry.get("nightly")
        assert [t.definition.name for t in await harness.services.registry.list()] == [
            "after-chat",
            "nightly",
        ]
    async with harness_for(configured) as harness:  # a restart: nothing changes
        again = await harness.services.registry.get("nightly")
        assert again.revision == stored.revision


def test_a_chain_reads_and_writes_back() -> None:
    text = TASKS + (
        '\n[tasks.progress]\nsystem_prompt = "Update progress from the summary."\n'
        'user_ids = ["ann"]\n'
        'trigger = { type = "after", task = "after-chat", on = ["success", "failed"] }\n'
    )
    tasks = {t.name: t for t in parse_tasks(text, "tasks.toml")}
    trigger = tasks["progress"].trigger
    assert trigger.model_dump() == {
        "type": "after",
        "task": "after-chat",
        "on": ["success", "failed"],
        "delay_seconds": 0,
    }
    assert parse_tasks(dump_tasks(list(tasks.values())), "again.toml") == list(tasks.values())
