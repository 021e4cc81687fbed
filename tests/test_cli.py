"""The `ralph tasks` / `ralph runs` commands against a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from ralph.cli import app
from ralph.config import Settings
from ralph.testing.model_server import Action, Fail, ModelServer, text
from tests.helpers import LiveServer, using_model_server

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

    # a dry run prints each user's proposed diff and applies nothing
    dry = ["tasks", "run", "cli-task", "--dry-run", "--user", "c", "--url", live.url]
    tried = runner.invoke(app, dry)
    assert tried.exit_code == 0, tried.output
    assert "user c: block last_reviewed" in tried.output
    assert "+Reviewed by the dev model" in tried.output
    assert "1 proposed change(s), none applied" in tried.output
    # in c's review queue: the real run's proposal only
    queue = httpx.get(f"{live.url}/users/c/proposals", params={"status": "pending"}).json()
    assert [p["run_id"] for p in queue] == [run_id]

    # each trigger kind's one-line summary
    follower = definition | {"name": "cli-next", "trigger": {"type": "after", "task": "cli-task"}}
    assert httpx.post(f"{live.url}/background/tasks", json=follower).status_code == 201
    listed = runner.invoke(app, ["tasks", "list", "--url", live.url])
    assert "after cli-task" in listed.output

    # the run's proposals, none decided yet: pending, no approval rate
    stats = runner.invoke(app, ["tasks", "stats", "cli-task", "--days", "2", "--url", live.url])
    assert stats.exit_code == 0, stats.output
    assert "approval rate - over 2 days" in stats.output
    assert "last_reviewed -" in stats.output


def test_errors_are_one_clear_line(live: LiveServer, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["tasks", "show", "nope", "--url", live.url])
    assert missing.exit_code == 1
    assert "404" in missing.output
    bracketed = runner.invoke(app, ["proposals", "show", "[red]x", "--url", live.url])
    assert bracketed.exit_code == 1
    assert "404" in bracketed.output
    assert "[red]x" in bracketed.output  # the server's message, printed as text
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    unreadable = runner.invoke(app, ["tasks", "create", "-f", str(bad), "--url", live.url])
    assert unreadable.exit_code == 1
    assert "cannot read" in unreadable.output
    down = runner.invoke(app, ["tasks", "list", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1
    assert "cannot reach" in down.output


def test_review_proposals(live: LiveServer) -> None:
    ids: list[str] = []
    for user in ("u1", "u2"):
        made = httpx.post(
            f"{live.url}/users/{user}/proposals",
            json={
                "label": "notes",
                "body": f"likes {user}",
                "reason": "said so [/not markup]",
                "run_id": "r1",
            },
        )
        ids.append(made.json()["id"])

    queue = runner.invoke(app, ["proposals", "list", "--url", live.url])
    assert queue.exit_code == 0, queue.output
    assert all(i in queue.output for i in ids)  # and a reason like "[/x]" is not markup
    mine = runner.invoke(app, ["proposals", "list", "--user", "u2", "--url", live.url])
    assert ids[1] in mine.output
    assert ids[0] not in mine.output

    shown = runner.invoke(app, ["proposals", "show", ids[0], "--url", live.url])
    assert "+likes u1" in shown.output  # the diff
    assert "reason: said so [/not markup]" in shown.output
    approved = runner.invoke(
        app, ["proposals", "approve", ids[0], "--comment", "right", "--url", live.url]
    )
    assert approved.exit_code == 0, approved.output
    assert "approved" in approved.output
    assert httpx.get(f"{live.url}/users/u1/blocks/notes").json()["body"] == "likes u1"
    again = runner.invoke(app, ["proposals", "reject", ids[0], "--url", live.url])
    assert again.exit_code == 1
    assert "409" in again.output
    rejected = runner.invoke(app, ["proposals", "reject", ids[1], "--url", live.url])
    assert "rejected" in rejected.output
    left = runner.invoke(app, ["proposals", "list", "--run", "r1", "--url", live.url])
    assert ids[0] not in left.output  # pending only, by default
    every = runner.invoke(
        app, ["proposals", "list", "--run", "r1", "--status", "all", "--url", live.url]
    )
    assert all(i in every.output for i in ids)

    # a whole run at once: r2's two pending proposals
    for i in range(2):
        proposal = {"label": f"b{i}", "reason": "r", "body": "x", "run_id": "r2"}
        httpx.post(f"{live.url}/users/u3/proposals", json=proposal).raise_for_status()
    bulk = runner.invoke(app, ["proposals", "approve", "--run", "r2", "--url", live.url])
    assert bulk.exit_code == 0, bulk.output
    assert "2 of 2 approved" in bulk.output
    both = runner.invoke(app, ["proposals", "reject", ids[1], "--run", "r2", "--url", live.url])
    assert both.exit_code == 2
    assert "not both" in both.output


def test_user_profiles(live: LiveServer) -> None:
    shown = runner.invoke(app, ["users", "show", "ann", "--url", live.url])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["timezone"] is None
    tz = ["users", "set", "ann", "--timezone", "Asia/Tokyo", "--url", live.url]
    assert runner.invoke(app, tz).exit_code == 0
    meta = ["users", "set", "ann", "--metadata", '{"plan": "pro"}', "--url", live.url]
    assert runner.invoke(app, meta).exit_code == 0
    profile = json.loads(runner.invoke(app, ["users", "show", "ann", "--url", live.url]).output)
    # each set changes only what it names
    assert (profile["timezone"], profile["metadata"]) == ("Asia/Tokyo", {"plan": "pro"})
    cleared = runner.invoke(app, ["users", "set", "ann", "--timezone", "none", "--url", live.url])
    assert json.loads(cleared.output)["timezone"] is None

    unknown = runner.invoke(
        app, ["users", "set", "ann", "--timezone", "Mars/Base", "--url", live.url]
    )
    assert unknown.exit_code == 1
    assert "unknown timezone 'Mars/Base'" in unknown.output
    broken = runner.invoke(app, ["users", "set", "ann", "--metadata", "{", "--url", live.url])
    assert broken.exit_code == 1
    assert "--metadata is not JSON" in broken.output


def test_retry_a_runs_failed_users(settings: Settings, tmp_path: Path) -> None:
    provider = {"up": False}

    def respond(_: dict[str, object]) -> Action:
        return text("done") if provider["up"] else Fail(500, "provider down")

    definition = {
        "name": "flaky",
        "system_prompt": "review",
        "trigger": {"type": "cron", "schedule": "0 3 * * *"},
        "user_ids": ["a", "b"],
        "retry": {"max_attempts": 1},
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(definition))
    with ModelServer(respond) as server, LiveServer(using_model_server(settings, server)) as live:
        assert runner.invoke(app, ["tasks", "create", "-f", str(path), "--url", live.url])
        ran = runner.invoke(app, ["tasks", "run", "flaky", "--wait", "--url", live.url])
        assert ran.exit_code == 1, ran.output
        run_id = ran.output.split("run ", 1)[1].split()[0]
        provider["up"] = True
        retry = ["runs", "retry", run_id, "--user", "b", "--wait", "--url", live.url]
        retried = runner.invoke(app, retry)
        assert retried.exit_code == 0, retried.output
        assert run_id in retried.output
        assert "success" in retried.output
        again = runner.invoke(app, ["runs", "retry", run_id, "--user", "zz", "--url", live.url])
        assert again.exit_code == 1
        assert "404" in again.output
