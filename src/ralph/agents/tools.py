"""Tool names that task definitions list, mapped to tools bound to one user.

Every tool here is built for exactly one user and one run: nothing a tool can reach belongs
to another user. Memory tools never write a block; `edit_memory_block` creates a proposal.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agno.tools.file import FileTools
from agno.tools.function import Function
from agno.tools.shell import ShellTools

from ralph.conversations.store import ConversationStore
from ralph.errors import InvalidInput, RalphError
from ralph.memory.models import ProposalDraft
from ralph.memory.service import MemoryService
from ralph.validation import LABEL_PATTERN, check_user_id

MEMORY_TOOLS = ("list_memory_blocks", "read_memory_block", "edit_memory_block")
TOOL_NAMES: tuple[str, ...] = (
    *MEMORY_TOOLS,
    "query_messages",
    "query_honcho",  # the original plan's name for query_messages
    "file_tools",
    "shell_tools",
)


def check_tool_names(names: Sequence[str], *, allow_shell: bool) -> None:
    """Raise InvalidInput naming the unknown (or disallowed) tools and the valid ones."""
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
    conversations: ConversationStore
    data_dir: Path
    author: str = "agent"
    run_id: str | None = None
    allow_shell: bool = False
    proposal_ids: list[str] = field(default_factory=list[str])


def _error(exc: Exception) -> str:
    return f"error: {exc}"


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
            block = await ctx.memory.get_block(ctx.user_id, label)
        except RalphError as exc:
            return _error(exc)
        return json.dumps(
            {
                "label": block.label,
                "title": block.title,
                "version": block.version,
                "body": block.body,
            }
        )

    async def edit_memory_block(
        label: str,
        reason: str,
        body: str | None = None,
        old_text: str | None = None,
        new_text: str | None = None,
        title: str | None = None,
    ) -> str:
        """Propose a change to one of this user's memory blocks. Nothing changes until a person
        approves it. Give either `body` (the whole new text) or `old_text` (an exact passage of
        the current text) with `new_text`. Returns the proposal id.

        Args:
            label: the block's label (lowercase letters, digits, _ and -); a new label proposes
                a new block.
            reason: why this change is right, for the person who reviews it.
            body: the complete new body.
            old_text: exact text to replace.
            new_text: the replacement for old_text.
            title: a new title (optional).
        """

        if not re.fullmatch(LABEL_PATTERN, label):
            return _error(ValueError(f"label must match {LABEL_PATTERN}"))
        try:
            proposal, _ = await ctx.memory.propose(
                ProposalDraft(
                    user_id=ctx.user_id,
                    label=label,
                    reason=reason,
                    author=ctx.author,
                    body=body,
                    title=title,
                    old_text=old_text,
                    new_text=new_text,
                    run_id=ctx.run_id,
                )
            )
        except RalphError as exc:
            return _error(exc)
        if proposal.id not in ctx.proposal_ids:
            ctx.proposal_ids.append(proposal.id)
        return json.dumps({"proposal_id": proposal.id, "status": proposal.status.value})

    return {
        "list_memory_blocks": list_memory_blocks,
        "read_memory_block": read_memory_block,
        "edit_memory_block": edit_memory_block,
    }


def _query_messages(ctx: ToolContext) -> Callable[..., Any]:
    async def query_messages(query: str = "", limit: int = 20) -> str:
        """This user's recent messages, newest first; with `query`, only those containing it.

        Args:
            query: text to search for (case-insensitive); empty for the latest messages.
            limit: how many messages at most (1-100).
        """
        limit = max(1, min(int(limit), 100))
        store = ctx.conversations
        if query:
            found = await store.search_messages(ctx.user_id, query, limit=limit)
        else:
            found = await store.list_messages(ctx.user_id, limit=limit)
        return json.dumps(
            [
                {"role": m.role.value, "content": m.content, "at": m.created_at.isoformat()}
                for m in found
            ]
        )

    return query_messages


# Tool schemas by name, derived once from the first closure built for each name: every
# user's closure has the same signature and docstring, and deriving a schema (Agno wraps the
# callable in a pydantic validator) costs more than the rest of building an agent.
_SCHEMAS: dict[str, Function] = {}


def _bound(tool: Callable[..., Any]) -> Function:
    """`tool` as an Agno Function whose schema is shared, not derived again for this user."""
    schema = _SCHEMAS.get(tool.__name__)
    if schema is None:
        derive: Callable[[Callable[..., Any]], Function] = Function.from_callable  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        schema = _SCHEMAS[tool.__name__] = derive(tool)

    async def checked(**arguments: Any) -> str:
        # Arguments arrive as the model wrote them: a missing, unknown or mistyped one is
        # reported back to the model instead of failing the run.
        try:
            result: str = await tool(**arguments)
        except (TypeError, ValueError) as exc:
            return _error(exc)
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
            tools.append(_bound(memory[canonical]))
        elif canonical == "query_messages":
            tools.append(_bound(_query_messages(ctx)))
        elif canonical == "file_tools":
            tools.append(WorkspaceFileTools(base_dir=workspace_dir(ctx.data_dir, ctx.user_id)))
        elif canonical == "shell_tools":
            tools.append(ShellTools(base_dir=workspace_dir(ctx.data_dir, ctx.user_id)))
    return tools
