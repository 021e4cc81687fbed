"""Conversation records: messages and who wrote them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    user_id: str
    role: Role
    content: str
    created_at: datetime
    # with RALPH_MESSAGES_BACKEND=honcho: the message's id in Honcho (None: it is kept in
    # Ralph's table until Honcho takes it; `id` is then Ralph's, else 0)
    honcho_id: str | None = None


HONCHO_REF = "honcho:"


def message_ref(message: Message) -> str:
    """How a proposal's evidence names a message: Ralph's id, or `honcho:<id>`."""
    return f"{HONCHO_REF}{message.honcho_id}" if message.honcho_id else str(message.id)
