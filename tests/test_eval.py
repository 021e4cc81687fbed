"""`ralph eval`: a scenario's task run in a throwaway database against the scripted model
server, its proposals scored against the facts; the bare-Agno baseline; bad scenarios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ralph.config import Settings
from ralph.evaluation import (
    ScenarioError,
    evaluate,
    evaluate_baseline,
    parse_scenario,
    read_scenario,
    totals,
)
from ralph.testing.model_server import ModelServer, call, scripted, text
from tests.helpers import using_model_server

SCENARIO = """
[task]
name = "notes"
mode = "extract"
system_prompt = "Keep the learner's notes."

[[users]]
id = "ana"
notes = "Learning Spanish."
messages = ["my exam is on 12 May", "hi"]
facts = [["exam", "may"]]
known = [["spanish"]]
"""


def reply(*texts: str) -> str:
    edits = [
        {"label": "notes", "action": "append", "old_text": "", "text": t, "reason": "r"}
        for t in texts
    ]
    return json.dumps({"new_facts": True, "edits": edits})


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_run_is_scored_against_the_facts(
    settings: Settings, model_server: ModelServer
) -> None:
    """One fact found, one repeat of the notes, one proposal matching nothing (noise)."""
    model_server.responder = scripted(
        text(reply("Has an exam in May.", "Learns Spanish.", "Said hi."))
    )
    scenario = parse_scenario(SCENARIO, "scenario")
    [score] = await evaluate(scenario, using_model_server(settings, model_server))
    assert (score.status, score.found, score.expected, score.repeats, score.noise) == (
        "success",
        1,
        1,
        1,
        1,
    )
    assert score.model_calls == 1
    assert totals([score])["recall"] == 1.0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_baseline_is_a_bare_agent_with_one_tool(
    settings: Settings, model_server: ModelServer
) -> None:
    model_server.responder = scripted(call("append_note", text="Exam in May."), text("done"))
    scenario = parse_scenario(SCENARIO, "scenario")
    [score] = await evaluate_baseline(scenario, using_model_server(settings, model_server))
    assert (score.found, score.noise, score.model_calls, score.proposals) == (
        1,
        0,
        2,
        ["Exam in May."],
    )
    assert model_server.requests[0]["tools"][0]["function"]["name"] == "append_note"


def test_the_shipped_scenario_reads(tmp_path: Path) -> None:
    scenario = read_scenario(Path(__file__).parents[1] / "evals/learners.toml", mode="agent")
    assert len(scenario.users) >= 12
    assert scenario.task.mode == "agent"
    assert sum(1 for u in scenario.users if not u.facts) >= 2  # nothing new to note
    assert sum(1 for u in scenario.users if u.known) >= 2  # the notes already say it


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[task", "not valid TOML"),
        ('[task]\nname = "x"\nsystem_prompt = "p"', r"no \[\[users\]\]"),
        ('[[users]]\nid = "a/b"', "user 1: id"),
        ('[[users]]\nid = "a"\nfacts = [[]]', "a fact is a non-empty list"),
        ('[[users]]\nid = "a"', r"no \[task\]"),
        ('[task]\nsystem_prompt = "p"\nmode = "chat"\n[[users]]\nid = "a"', "mode"),
    ],
)
def test_bad_scenarios_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem):
        parse_scenario(text, "scenario")
