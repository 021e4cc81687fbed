"""Pure rules over what models write: tool calls found in text, replies that look like calls,
a unit's status from its agent's outcome, message search's words and ranking."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ralph.agents.calls import CallRecord
from ralph.agents.extract import parse_reply
from ralph.agents.runner import AgentOutcome
from ralph.agents.textcalls import TextCall, calls_in_text, looks_like_a_call
from ralph.background.models import UserStatus, unit_status
from ralph.conversations.models import Message, Role
from ralph.conversations.search import query_words, ranked
from ralph.reasons import EndReason

READ = TextCall("read_memory_block", {"label": "notes"})


@pytest.mark.parametrize(
    ("content", "calls"),
    [
        ('{"name": "read_memory_block", "arguments": {"label": "notes"}}', [READ]),
        ('```json\n{"name": "read_memory_block", "arguments": {"label": "notes"}}\n```', [READ]),
        (
            '<tool_call>\n{"name": "read_memory_block", "arguments": {"label": "notes"}}'
            "\n</tool_call>",
            [READ],
        ),
        ('{"name": "read_memory_block", "parameters": {"label": "notes"}}', [READ]),
        ('{"name": "read_memory_block", "arguments": "{\\"label\\": \\"notes\\"}"}', [READ]),
        ('{"function": {"name": "read_memory_block", "arguments": {"label": "notes"}}}', [READ]),
        ('[{"name": "a", "arguments": {}}, {"name": "b"}]', [TextCall("a", {}), TextCall("b", {})]),
        (
            '{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {"x": 1}}',
            [TextCall("a", {}), TextCall("b", {"x": 1})],
        ),
        # not calls: prose around one, JSON that is an answer, a broken call
        ('Sure: {"name": "read_memory_block", "arguments": {}}', []),
        ('{"name": "Ann", "age": 3}', []),
        ('{"name": "a", "arguments": [1]}', []),
        ('{"name": "a", "arguments": {', []),
        ("Done: I added the exam date.", []),
        ("", []),
    ],
)
def test_calls_in_text(content: str, calls: list[TextCall]) -> None:
    assert calls_in_text(content) == calls


@pytest.mark.parametrize(
    ("content", "looks"),
    [
        ('I will call {"name": "read_memory_block", "arguments": {"label": "x"}}', True),
        ("<tool_call>read it</tool_call>", True),
        ('The user is called {"name": "Ann"}.', False),
        ("Added two notes.", False),
        (None, False),
    ],
)
def test_looks_like_a_call(content: str | None, looks: bool) -> None:
    assert looks_like_a_call(content) is looks


@pytest.mark.parametrize(
    ("reason", "proposals", "status"),
    [
        (EndReason.FINISHED, 0, UserStatus.SUCCESS),
        (EndReason.FINISHED, 2, UserStatus.SUCCESS),
        (EndReason.MAX_TURNS, 1, UserStatus.SUCCESS),
        (EndReason.MAX_TURNS, 0, UserStatus.FAILED),
        (EndReason.REPEATING, 1, UserStatus.SUCCESS),
        (EndReason.REPEATING, 0, UserStatus.FAILED),
        (EndReason.TIMEOUT, 3, UserStatus.SUCCESS),
        (EndReason.TIMEOUT, 0, UserStatus.FAILED),
        (EndReason.BUDGET_EXCEEDED, 2, UserStatus.BUDGET_EXCEEDED),
        (EndReason.PROVIDER_ERROR, 2, UserStatus.FAILED),
        (EndReason.RATE_LIMITED, 0, UserStatus.FAILED),
        (EndReason.INVALID_REPLY, 0, UserStatus.FAILED),
        (EndReason.WORKER_LOST, 0, UserStatus.FAILED),
        (EndReason.INTERNAL, 1, UserStatus.FAILED),
        (EndReason.CANCELLED, 1, UserStatus.CANCELLED),
        (EndReason.INTERRUPTED, 0, UserStatus.INTERRUPTED),
    ],
)
def test_unit_status(reason: EndReason, proposals: int, status: UserStatus) -> None:
    assert unit_status(reason, proposals=proposals) is status


@pytest.mark.parametrize(
    ("stopped_by", "error", "failure", "invalid", "reason"),
    [
        (None, None, None, False, EndReason.FINISHED),
        ("max_turns", "stopped after 6 model calls", None, False, EndReason.MAX_TURNS),
        ("timeout", "timed out", None, False, EndReason.TIMEOUT),
        ("budget", "budget exceeded", None, False, EndReason.BUDGET_EXCEEDED),
        (None, "rate limited: 429", "rate_limited", False, EndReason.RATE_LIMITED),
        (None, "HTTP 500", "provider_error", False, EndReason.PROVIDER_ERROR),
        (None, "the last reply is a call", None, True, EndReason.INVALID_REPLY),
        (None, "KeyError: 'x'", None, False, EndReason.INTERNAL),
    ],
)
def test_an_agents_end_reason(
    stopped_by: str | None, error: str | None, failure: str | None, invalid: bool, reason: EndReason
) -> None:
    outcome = AgentOutcome(error=error, stopped_by=stopped_by)
    outcome.conclude(CallRecord(failure=failure), invalid=invalid)
    assert outcome.reason is reason


def test_search_words_and_ranking() -> None:
    assert query_words("What is the cat's name? Miso the cat") == ["cat", "s", "name", "miso"]
    at = datetime(2026, 12, 6, tzinfo=UTC)
    said = [
        Message(1, "u", Role.USER, "I have a cat named Miso", at),
        Message(2, "u", Role.USER, "my cat is grey", at),
        Message(3, "u", Role.USER, "exams next week", at),
        Message(4, "u", Role.USER, "the cat sleeps", at),
    ]
    found = ranked(said, ["miso", "cat"], limit=10)
    assert [m.id for m in found] == [1, 4, 2]  # both words, then newest first
    assert [m.id for m in ranked(said, ["miso", "cat"], limit=2)] == [1, 4]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("", "it is empty"),
        ("Sure! Here are the facts.", "it is not JSON"),
        ('{"facts": []}', "edits: Field required"),
        ('{"edits": [{"label": "notes", "action": "delete", "text": "x"}]}', "edits.0.action"),
    ],
)
def test_invalid_extract_replies_say_what_is_wrong(content: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_reply(content)


def test_extract_replies_as_models_write_them() -> None:
    edit = '{"label": "notes", "action": "append", "text": "x"}'
    fenced = f'```json\n{{"new_facts": true, "edits": [{edit}]}}\n```'
    assert [e.text for e in parse_reply(fenced).edits] == ["x"]
    bare = '[{"label": "notes", "action": "append", "text": "y", "reason": "r"}]'
    assert [e.text for e in parse_reply(bare).edits] == ["y"]
    assert parse_reply('{"new_facts": false, "edits": []}').new_facts is False
