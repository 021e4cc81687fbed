"""The `ralph tasks` / `ralph runs` commands against a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ralph.cli import app
from ralph.config import Settings
from tests.conftest import LiveServer

runner = CliRunner()


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as server:
        yield server


def test_create_run_wait_and_list(live: LiveServer, tmp_path: Path) -> None:
    definition = {
        "name": "cli-task",
        "system_prompt": "review",
        "tools": ["list_memory_blocks", "edit_memory_block"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *", "timezone": "Europe/Berlin"},
        "user_ids": ["a", "b", "c"],
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(definition))

    created = runner.invoke(app, ["tasks", "create", "-f", str(path), "--url", live.url])
    assert created.exit_code == 0, created.output
    assert "cli-task" in created.output
    duplicate = runner.invoke(app, ["tasks", "create", "-f", str(path), "--url", live.url])
    assert duplicate.exit_code == 1
    assert "409" in duplicate.output

    listed = runner.invoke(app, ["tasks", "list", "--url", live.url])
    assert "cli-task" in listed.output
    assert "Europe/Berlin" in listed.output

    ran = runner.invoke(app, ["tasks", "run", "cli-task", "--wait", "--url", live.url])
    assert ran.exit_code == 0, ran.output
    assert "success" in ran.output
    run_id = ran.output.split("run ", 1)[1].split()[0]

    runs = runner.invoke(app, ["runs", "list", "cli-task", "--url", live.url])
    assert run_id in runs.output
    shown = runner.invoke(app, ["runs", "show", run_id, "--user", "b", "--url", live.url])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["user_id"] == "b"


def test_errors_are_one_clear_line(live: LiveServer, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["tasks", "show", "nope", "--url", live.url])
    assert missing.exit_code == 1
    assert "404" in missing.output
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    unreadable = runner.invoke(app, ["tasks", "create", "-f", str(bad), "--url", live.url])
    assert unreadable.exit_code == 1
    assert "cannot read" in unreadable.output
    down = runner.invoke(app, ["tasks", "list", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1
    assert "cannot reach" in down.output
