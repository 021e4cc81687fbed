"""Messages and activity: `/users/{user_id}/messages`, `/users/{user_id}/activity`."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from ralph.api.deps import ServicesDep
from ralph.api.params import UserIdPath
from ralph.api.schema import response_model
from ralph.clock import utc
from ralph.conversations.models import Message, Role
from ralph.validation import MAX_INT64, JsonTime, StrictInput

router = APIRouter(prefix="/users/{user_id}", tags=["conversations"])

MAX_MESSAGE_CHARS = 64 * 1024


class MessageIn(StrictInput):
    role: Role = Field(default=Role.USER, strict=False)
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


MessageOut = response_model(Message, "MessageOut")


class ActivityIn(StrictInput):
    at: JsonTime | None = Field(
        default=None,
        description=(
            "When the user was active; defaults to now. At most 5 minutes ahead of the "
            "server's clock. A time older than the previous one leaves it as it is."
        ),
    )


class ActivityOut(BaseModel):
    user_id: str
    last_message_at: datetime | None


@router.post("/messages", response_model=MessageOut, status_code=201)
async def add_message(user_id: UserIdPath, payload: MessageIn, services: ServicesDep) -> Message:
    """Store a message; a `user` message also records the user's activity."""
    return await services.conversations.add_message(user_id, payload.role, payload.content)


@router.get("/messages", response_model=list[MessageOut])
async def list_messages(
    user_id: UserIdPath,
    services: ServicesDep,
    limit: int = Query(default=50, ge=1, le=500),
    before: int | None = Query(
        default=None, ge=1, le=MAX_INT64, description="Only messages older than this id."
    ),
    q: str | None = Query(
        default=None,
        min_length=1,
        max_length=200,
        description="Search by words: messages with any of them, more first, then newest",
    ),
) -> list[Message]:
    """Newest first; page with `before=<smallest id seen>`."""
    return await services.conversations.messages(user_id, limit=limit, before=before, text=q)


@router.post("/activity", response_model=ActivityOut)
async def record_activity(
    user_id: UserIdPath, services: ServicesDep, payload: ActivityIn | None = None
) -> ActivityOut:
    """Record that the user was active (for chat front ends that keep messages elsewhere)."""
    at = utc(payload.at) if payload and payload.at else None
    latest = await services.conversations.record_activity(user_id, at)
    return ActivityOut(user_id=user_id, last_message_at=latest)


@router.get("/activity", response_model=ActivityOut)
async def get_activity(user_id: UserIdPath, services: ServicesDep) -> ActivityOut:
    return ActivityOut(
        user_id=user_id, last_message_at=await services.conversations.last_activity(user_id)
    )
