"""What every user's agent is built from, for chat and for background runs alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agno.models.base import Model

from ralph.agents.models import ModelFactory
from ralph.agents.tools import ToolContext
from ralph.conversations.service import ConversationService
from ralph.memory.service import MemoryService


@dataclass(frozen=True, slots=True)
class AgentKit:
    """The model factory and the services a user's tools reach."""

    memory: MemoryService
    conversations: ConversationService
    models: ModelFactory
    data_dir: Path
    allow_shell: bool = False

    def model(self) -> Model:
        return self.models()

    def context(
        self,
        user_id: str,
        *,
        author: str,
        run_id: str | None = None,
        dry_run: bool = False,
        auto_approve: bool = False,
    ) -> ToolContext:
        """What the user's tools may touch, on behalf of `author` (in a dry run: proposals
        become previews)."""
        return ToolContext(
            user_id=user_id,
            memory=self.memory,
            conversations=self.conversations,
            data_dir=self.data_dir,
            author=author,
            run_id=run_id,
            allow_shell=self.allow_shell,
            dry_run=dry_run,
            auto_approve=auto_approve,
        )

    async def instructions(self, prompt: str, user_id: str, labels: Sequence[str] = ()) -> str:
        """`prompt` followed by the user's memory (the blocks in `labels`, or all)."""
        return await self.memory.instructions_with_memory(prompt, user_id, labels)
