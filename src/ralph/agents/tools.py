"""Tool names that task definitions list, mapped to tools bound to one user.

Every tool here is built for exactly one user and one run: nothing a tool can reach belongs
to another user. Memory tools never write a block; `edit_memory_block` creates a proposal.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from agno.tools.file import FileTools
from agno.tools.function import Function
from agno.tools.shell import ShellTools

from ralph.conversations.honcho import HistoryUnavailable
from ralph.conversations.models import Message, message_ref
from ralph.conversations.service import ConversationService
from ralph.errors import AlreadyInBlock, AlreadyRejected, Conflict, InvalidInput, RalphError
from ralph.memory.models import (
    MAX_EVIDENCE_MESSAGES,
    Evidence,
    ProposalDraft,
    ProposalStatus,
)
from ralph.memory.service import MemoryService
from ralph.validation import LABEL_PATTERN, check_user_id

MEMORY_TOOLS = (
    "list_memory_blocks",
    "read_memory_block",
    "edit_memory_block",  # any kind of change (the original plan's tool)
    "append_memory_block",  # the narrower ones: one kind each
    "replace_memory_text",
    "rewrite_memory_block",
)
# the memory tools that propose changes (the others read)
EDIT_TOOLS = frozenset(MEMORY_TOOLS) - {"list_memory_blocks", "read_memory_block"}
TOOL_NAMES: tuple[str, ...] = (
    *MEMORY_TOOLS,
    "query_messages",
    "query_honcho",  # the original plan's name for query_messages
    "file_tools",
    "shell_tools",
)


def check_tool_names(names: Sequence[str], *, allow_shell: bool, mode: str = "agent") -> None:
    """Raise InvalidInput naming the unknown (or disallowed) tools and the valid ones; in the
    `extract` mode, which offers no tools, any but the memory ones."""
    if mode == "extract":
        other = [n for n in names if n not in MEMORY_TOOLS]
        if other:
            raise InvalidInput(
                f"mode 'extract' makes one structured call and offers no tools: remove "
                f"{', '.join(map(repr, other))} (or use mode 'agent')"
            )
    unknown = [n for n in names if n not in TOOL_NAMES]
    if unknown:
        raise InvalidInput(
            f"unknown tool(s) {', '.join(map(repr, unknown))}; valid: {', '.join(TOOL_NAMES)}"
        )
    if "shell_tools" in names and not allow_shell:
        raise InvalidInput(
            "shell_tools runs arbitrary commands as the server's user and is disabled; "
            "set RALPH_ALLOW_SHELL_TOOLS=true to allow it"
        )


def _relative_paths(method: Callable[..., str]) -> Callable[..., str]:
    """`method`, with the workspace's absolute path taken out of what it returns."""

    @functools.wraps(method)  # keeps the signature and docstring the model is shown
    def wrapper(self: WorkspaceFileTools, *args: Any, **kwargs: Any) -> str:
        result = method(self, *args, **kwargs)
        base = str(self.base_dir)
        return result.replace(base + os.sep, "").replace(base, ".")

    return wrapper


class WorkspaceFileTools(FileTools):
    """Agno's `FileTools`, confined to one user's workspace, whose answers (errors included)
    name paths relative to it: the model needs no more, and the server's layout stays its own."""

    save_file = _relative_paths(FileTools.save_file)
    read_file = _relative_paths(FileTools.read_file)
    read_file_chunk = _relative_paths(FileTools.read_file_chunk)
    replace_file_chunk = _relative_paths(FileTools.replace_file_chunk)
    list_files = _relative_paths(FileTools.list_files)
    search_files = _relative_paths(FileTools.search_files)
    search_content = _relative_paths(FileTools.search_content)
    delete_file = _relative_paths(FileTools.delete_file)


def workspace_dir(data_dir: Path, user_id: str) -> Path:
    """`<data_dir>/users/<user_id>/workspace`, created; refuses ids that could escape it."""
    check_user_id(user_id)
    users = (data_dir / "users").resolve()
    path = (users / user_id / "workspace").resolve()
    if users not in path.parents:
        raise InvalidInput(f"user id {user_id!r} does not name a directory under {users}")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ToolContext:
    """What one user's tools may touch, and what they did."""

    user_id: str
    memory: MemoryService
    conversations: ConversationService
    data_dir: Path
    author: str = "agent"
    run_id: str | None = None
    allow_shell: bool = False
    # a dry run's: proposals are recorded as previews (never reviewed or applied)
    dry_run: bool = False
    # a task whose approval is auto: proposals are approved at once (by system:auto)
    auto_approve: bool = False
    proposal_ids: list[str] = field(default_factory=list[str])
    # changes refused because a reviewer had rejected the same change before
    refused: int = 0
    # each tool call's answer by (tool, arguments), this agent run's: a repeated call gets it
    # again instead of doing the work twice
    answers: dict[str, str] = field(default_factory=dict[str, str])
    # the loop guard's: every call made (tool and arguments), and how many of the latest in a
    # row repeated an earlier one
    seen: set[str] = field(default_factory=set[str])
    repeated: int = 0
    # what the agent's proposals are based on: the messages it had (its episode, what it
    # searched) and, for a chained task, the upstream runs whose outcome it was given
    messages_seen: dict[str, None] = field(default_factory=dict[str, None])
    upstream_runs: list[str] = field(default_factory=list[str])

    def saw(self, found: Iterable[Message]) -> None:
        """The agent had these messages in its input or a tool's answer."""
        for message in found:
            self.messages_seen.setdefault(message_ref(message))

    def evidence(self) -> Evidence | None:
        if not self.messages_seen and not self.upstream_runs:
            return None
        newest = list(self.messages_seen)[-MAX_EVIDENCE_MESSAGES:]
        return Evidence(tuple(newest), tuple(self.upstream_runs))


def _error(exc: Exception | str) -> str:
    return f"error: {exc}"


_EDIT_EXAMPLE = (
    "Send label and reason with one of: append (text to add at the end), old_text + new_text "
    '(replace one exact passage), or body (the whole new text). Example: {"label": "progress", '
    '"reason": "the user finished a unit", "append": "2026-11-27: finished fractions"}'
)


def _label(value: str) -> str | None:
    """The label a model meant ("Student " -> "student"), or None if it cannot be one."""
    label = value.strip().lower()
    return label if re.fullmatch(LABEL_PATTERN, label) else None


async def propose_change(
    ctx: ToolContext,
    label: str,
    reason: str,
    *,
    body: str | None = None,
    old_text: str | None = None,
    new_text: str | None = None,
    append: str | None = None,
    title: str | None = None,
) -> str:
    """Propose a change of one of `ctx`'s user's blocks, as an agent's tools (and the extract
    mode) do: the answer for the model, JSON with the proposal id and status (`unchanged`
    when the block already says it), or `error: ...` with what to send instead. Auto-approves
    for a task with `approval: auto`."""
    clean = _label(label)
    if clean is None:
        return _error(
            f"label {label!r} is not a label: use lowercase letters, digits, _ and -, "
            'e.g. "progress"'
        )
    try:
        proposal, _ = await ctx.memory.propose(
            ProposalDraft(
                user_id=ctx.user_id,
                label=clean,
                reason=reason.strip() or f"(no reason given by {ctx.author})",
                author=ctx.author,
                body=body,
                title=title,
                old_text=old_text,
                new_text=new_text,
                append=append,
                run_id=ctx.run_id,
                preview=ctx.dry_run,
                evidence=ctx.evidence(),
            )
        )
    except AlreadyInBlock as exc:
        return json.dumps({"status": "unchanged", "note": str(exc)})
    except AlreadyRejected as exc:
        ctx.refused += 1
        return json.dumps({"status": "rejected_before", "note": str(exc)})
    except RalphError as exc:
        hint = (
            " Read the block with read_memory_block and copy old_text exactly as it is "
            "there (once), or send body with the whole new text."
            if old_text is not None
            else f" {_EDIT_EXAMPLE}"
        )
        return _error(f"{exc}.{hint}")
    if proposal.id not in ctx.proposal_ids:
        ctx.proposal_ids.append(proposal.id)
    if ctx.auto_approve and proposal.status is ProposalStatus.PENDING:
        try:
            proposal = await ctx.memory.auto_approve(proposal.id)
        except Conflict as exc:
            return json.dumps(
                {
                    "proposal_id": proposal.id,
                    "status": proposal.status.value,
                    "note": f"not applied, left for a person to review: {exc}",
                }
            )
    return json.dumps({"proposal_id": proposal.id, "status": proposal.status.value})


def _memory_tools(ctx: ToolContext) -> dict[str, Callable[..., Any]]:
    async def list_memory_blocks() -> str:
        """List this user's memory blocks (label, title, version, size in characters)."""
        blocks = await ctx.memory.list_blocks(ctx.user_id)
        return json.dumps(
            [
                {"label": b.label, "title": b.title, "version": b.version, "chars": len(b.body)}
                for b in blocks
            ]
        )

    async def read_memory_block(label: str) -> str:
        """Read one of this user's memory blocks.

        Args:
            label: the block's label, e.g. "student".
        """
        try:
            block = await ctx.memory.get_block(ctx.user_id, _label(label) or label)
        except RalphError as exc:
            return _error(f"{exc}. Call list_memory_blocks to see the labels there are.")
        return json.dumps(
            {
                "label": block.label,
                "title": block.title,
                "version": block.version,
                "body": block.body,
            }
        )

    propose = functools.partial(propose_change, ctx)

    async def edit_memory_block(
        label: str,
        reason: str = "",
        body: str | None = None,
        old_text: str | None = None,
        new_text: str | None = None,
        title: str | None = None,
        append: str | None = None,
    ) -> str:
        """Propose a change to one of this user's memory blocks. Nothing changes until a person
        approves it. Give one of: `append` (text to add at the end), `old_text` (an exact
        passage of the current text) with `new_text`, or `body` (the whole new text). Leave
        the others out or empty. Returns the proposal id.

        Args:
            label: the block's label (lowercase letters, digits, _ and -); a new label proposes
                a new block.
            reason: why this change is right, for the person who reviews it.
            body: the complete new body.
            old_text: exact text to replace.
            new_text: the replacement for old_text.
            title: a new title (optional).
            append: text to add at the end of the block, on a line of its own.
        """
        # Models fill every parameter, empty ones included: an empty value is not given. Then,
        # in order: a passage to replace (falling back to `body` if the passage is not there),
        # the whole body, text to append; `new_text` alone is appended.
        if old_text and new_text is not None:
            answer = await propose(
                label, reason, old_text=old_text, new_text=new_text, title=title or None
            )
            if not (body and answer.startswith("error:")):
                return answer
        if body:
            return await propose(label, reason, body=body, title=title or None)
        if append or new_text:
            return await propose(label, reason, append=append or new_text)
        if old_text:
            return _error(f"old_text needs new_text (the text that replaces it). {_EDIT_EXAMPLE}")
        return _error(f"nothing to change. {_EDIT_EXAMPLE}")

    async def append_memory_block(label: str, text: str, reason: str = "") -> str:
        """Propose adding text at the end of one of this user's memory blocks (on a line of its
        own), e.g. a progress log entry. Nothing changes until a person approves it.

        Args:
            label: the block's label; a new label proposes a new block.
            text: the text to add.
            reason: why, for the person who reviews it.
        """
        if not text:
            return _error(
                'text is empty: send the text to add, e.g. {"label": "progress", '
                '"text": "2026-11-27: finished fractions", "reason": "..."}'
            )
        return await propose(label, reason, append=text)

    async def replace_memory_text(
        label: str, old_text: str, new_text: str, reason: str = ""
    ) -> str:
        """Propose replacing one exact passage of one of this user's memory blocks. Nothing
        changes until a person approves it.

        Args:
            label: the block's label.
            old_text: the passage as it is in the block now (it must occur exactly once).
            new_text: what replaces it (empty to delete the passage).
            reason: why, for the person who reviews it.
        """
        if not old_text:
            return _error("old_text is empty: copy the passage to replace from read_memory_block")
        return await propose(label, reason, old_text=old_text, new_text=new_text)

    async def rewrite_memory_block(
        label: str, body: str, reason: str = "", title: str | None = None
    ) -> str:
        """Propose a new text for a whole memory block of this user (or a new block). Nothing
        changes until a person approves it.

        Args:
            label: the block's label; a new label proposes a new block.
            body: the complete new text.
            reason: why, for the person who reviews it.
            title: a new title (optional).
        """
        if not body:
            return _error("body is empty: send the block's complete new text")
        return await propose(label, reason, body=body, title=title or None)

    return {
        "list_memory_blocks": list_memory_blocks,
        "read_memory_block": read_memory_block,
        "edit_memory_block": edit_memory_block,
        "append_memory_block": append_memory_block,
        "replace_memory_text": replace_memory_text,
        "rewrite_memory_block": rewrite_memory_block,
    }


def _query_messages(ctx: ToolContext, name: str = "query_messages") -> Callable[..., Any]:
    """The message search tool, named as the task asked for it (`query_honcho`, the original
    plan's name, is the same tool)."""

    async def query_messages(query: str = "", limit: int = 20) -> str:
        """Search this user's messages by words, or list the latest ones (newest first).

        Args:
            query: words to look for, e.g. "exam date"; messages with more of them come
                first. Empty for the latest messages.
            limit: how many messages at most (1-100).
        """
        limit = max(1, min(int(limit), 100))
        try:
            found = await ctx.conversations.messages(ctx.user_id, limit=limit, text=query or None)
        except HistoryUnavailable as exc:  # the agent goes on without it
            return f"error: conversation history is unavailable ({exc})"
        ctx.saw(found)
        return json.dumps(
            [
                {"role": m.role.value, "content": m.content, "at": m.created_at.isoformat()}
                for m in found
            ]
        )

    query_messages.__name__ = name
    return query_messages


# Tool schemas by name, derived once from the first closure built for each name: every
# user's closure has the same signature and docstring, and deriving a schema (Agno wraps the
# callable in a pydantic validator) costs more than the rest of building an agent.
_SCHEMAS: dict[str, Function] = {}


def _types(spec: dict[str, Any]) -> set[str]:
    """The JSON types a parameter's schema allows ("string", "integer", "null" ...)."""
    declared = spec.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {str(t) for t in cast("list[Any]", declared)}
    found: set[str] = set()
    for option in cast("list[dict[str, Any]]", spec.get("anyOf", [])):
        found |= _types(option)
    return found


_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


def _as_model_meant(value: Any, types: set[str]) -> Any:
    """A value as a model wrote it, in the type the parameter takes where the intent is plain:
    "5" for a number, "true" for a boolean, 5 for a string. Anything else is left as it is."""
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if "integer" in types and "string" not in types:
            with contextlib.suppress(ValueError):
                return int(float(text)) if float(text).is_integer() else value
        if "number" in types and "string" not in types:
            with contextlib.suppress(ValueError):
                return float(text)
        if "boolean" in types and "string" not in types and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
    if isinstance(value, int | float) and not isinstance(value, bool) and types == {"string"}:
        return str(value)
    return value


def normalize_arguments(arguments: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Arguments as a model meant them, for a tool with the JSON schema `parameters`: keys the
    tool does not have are dropped; an optional one that is empty (null, "", [], {}, 0) is
    left out, so the tool's default applies; numbers and booleans sent as strings (and numbers
    sent for strings) are converted."""
    properties = cast("dict[str, dict[str, Any]]", parameters.get("properties", {}))
    required = set(cast("list[str]", parameters.get("required", [])))
    meant: dict[str, Any] = {}
    for name, value in arguments.items():
        spec = properties.get(name)
        if spec is None:
            continue
        types = _types(spec)
        value = _as_model_meant(value, types)
        empty = value is None or value in ("", [], {}) or (value == 0 and "boolean" not in types)
        if empty and name not in required:
            continue
        meant[name] = value
    return meant


ALREADY_CALLED = (
    "(You already called {name} with these arguments; this is its earlier answer. Do not call "
    "it again: use the answer, or do the next thing.)"
)


def _bound(tool: Callable[..., Any], ctx: ToolContext) -> Function:
    """`tool` as an Agno Function whose schema is shared, not derived again for this user.
    `ctx.answers`: the agent run's earlier answers, by call (an edit forgets the reading tools':
    what they read may have changed); `ctx.repeated` counts the calls in a row that repeat one made
    before (the runner's loop guard stops an agent that keeps doing so)."""
    answers = ctx.answers
    schema = _SCHEMAS.get(tool.__name__)
    if schema is None:
        derive: Callable[[Callable[..., Any]], Function] = Function.from_callable  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        schema = _SCHEMAS[tool.__name__] = derive(tool)
    parameters: dict[str, Any] = schema.parameters
    required = cast("list[str]", parameters.get("required", []))

    async def checked(**arguments: Any) -> str:
        # Arguments arrive as the model wrote them: what it evidently meant is done, and what
        # cannot be done is reported back to it with what to send instead.
        meant = normalize_arguments(arguments, parameters)
        missing = [name for name in required if name not in meant]
        if missing:
            names = ", ".join(missing)
            return _error(f"missing {names}: {schema.name} needs {', '.join(required)}")
        key = f"{schema.name}:{json.dumps(meant, sort_keys=True, default=str)}"
        ctx.repeated = ctx.repeated + 1 if key in ctx.seen else 0
        ctx.seen.add(key)
        earlier = answers.get(key)
        if earlier is not None:
            return f"{earlier}\n{ALREADY_CALLED.format(name=schema.name)}"
        try:
            result: str = await tool(**meant)
        except (TypeError, ValueError) as exc:
            return _error(exc)
        if schema.name in EDIT_TOOLS:
            # what the reading tools answered may have changed; an edit's own answer stands
            # (proposing it again gets the same proposal), whichever of parallel calls ends last
            for earlier_key in [k for k in answers if k.split(":", 1)[0] not in EDIT_TOOLS]:
                del answers[earlier_key]
        answers[key] = result
        return result

    return Function(
        name=schema.name,
        description=schema.description,
        parameters=schema.parameters,
        entrypoint=checked,
        skip_entrypoint_processing=True,
    )


def build_tools(names: Sequence[str], ctx: ToolContext) -> list[Any]:
    """The tools for `names`, bound to `ctx.user_id`. Names must have passed check_tool_names."""
    check_tool_names(names, allow_shell=ctx.allow_shell)
    memory = _memory_tools(ctx)
    tools: list[Any] = []
    seen: set[str] = set()
    for name in names:
        canonical = "query_messages" if name == "query_honcho" else name
        if canonical in seen:
            continue
        seen.add(canonical)
        if canonical in memory:
            tools.append(_bound(memory[canonical], ctx))
        elif canonical == "query_messages":
            tools.append(_bound(_query_messages(ctx, name), ctx))
        elif canonical == "file_tools":
            tools.append(WorkspaceFileTools(base_dir=workspace_dir(ctx.data_dir, ctx.user_id)))
        elif canonical == "shell_tools":
            tools.append(ShellTools(base_dir=workspace_dir(ctx.data_dir, ctx.user_id)))
    return tools
