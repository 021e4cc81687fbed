"""`POST /chat/stream`: a chat turn as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from ralph.api.conversations import MAX_MESSAGE_CHARS
from ralph.api.deps import ServicesDep
from ralph.validation import StrictInput, UserId

router = APIRouter(tags=["chat"])


class ChatIn(StrictInput):
    user_id: UserId
    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)


@router.post(
    "/chat/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_stream(payload: ChatIn, services: ServicesDep) -> StreamingResponse:
    """Events: `{"type":"token","content":...}`, then `{"type":"done",...}` or
    `{"type":"error","detail":...}`. Messages and activity are stored once the answer is done."""

    async def events() -> AsyncIterator[bytes]:
        async for event in services.chat.stream(payload.user_id, payload.message):
            yield f"data: {json.dumps(event)}\n\n".encode()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
