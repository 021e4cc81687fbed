"""Who made a proposal or a change, as one value with the rules that depend on it.

Stored and shown as a string: `agent:<task>` (a task's agents), `agent:chat` (the chat
agent), `api` (a person through the API or the CLI), `user` (the user, through the product),
`reviewer` or `reviewer:<name>` (a reviewer's token or console session), `system:<what>`
(Ralph itself: `system:auto`, `system:supersede`, `system:expire`). `chat` is not a task name
(`RESERVED_TASK_NAMES`), so a task's proposals and chat's can never be confused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AuthorKind = Literal["task", "chat", "api", "user", "reviewer", "system"]

_AGENT = "agent:"
CHAT_NAME = "chat"


@dataclass(frozen=True, slots=True)
class Author:
    kind: AuthorKind
    name: str | None = None

    @classmethod
    def of_task(cls, task: str) -> Author:
        """A task's agents. ValueError for the chat agent's reserved name."""
        if task == CHAT_NAME:
            raise ValueError(f"{CHAT_NAME!r} is the chat agent, not a task")
        return cls("task", task)

    @classmethod
    def parse(cls, value: str) -> Author:
        """The author a stored string names (an unknown form is a person's: `api`)."""
        if value.startswith(_AGENT):
            name = value.removeprefix(_AGENT)
            return cls("chat") if name == CHAT_NAME else cls("task", name)
        head, _, name = value.partition(":")
        if head in ("reviewer", "system"):
            return cls(head, name or None)
        if head == "user":
            return cls("user")
        return cls("api")

    def __str__(self) -> str:
        if self.kind == "task":
            return f"{_AGENT}{self.name}"
        if self.kind == "chat":
            return f"{_AGENT}{CHAT_NAME}"
        if self.kind in ("reviewer", "system") and self.name:
            return f"{self.kind}:{self.name}"
        return self.kind

    @property
    def is_agent(self) -> bool:
        """An agent (a task's or chat's): its proposals are checked against what reviewers
        rejected."""
        return self.kind in ("task", "chat")

    @property
    def task(self) -> str | None:
        """The task whose agents this is (None: not a task's)."""
        return self.name if self.kind == "task" else None

    @property
    def supersedes_its_own(self) -> bool:
        """A new pending proposal of this author replaces its pending ones for the block from
        other runs: only a task's (a nightly task leaves one edit to review, not thirty)."""
        return self.kind == "task"


CHAT = Author("chat")
API = Author("api")
AUTO_APPROVER = Author("system", "auto")
SUPERSEDER = Author("system", "supersede")
EXPIRER = Author("system", "expire")
