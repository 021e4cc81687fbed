"""Memory blocks and their history: `/users/{user_id}/blocks...`."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from ralph.api.deps import ServicesDep
from ralph.api.params import LabelPath, UserIdPath
from ralph.api.schema import response_model
from ralph.memory.models import Block, BlockVersion
from ralph.memory.service import MAX_TITLE_CHARS
from ralph.memory.versioning import DoltCommit
from ralph.validation import LABEL_PATTERN, MAX_INT32, StrictInput

router = APIRouter(prefix="/users/{user_id}/blocks", tags=["memory"])
# the Dolt log of a user's memory (RALPH_MEMORY_VERSIONING=dolt)
log_router = APIRouter(prefix="/users/{user_id}/memory", tags=["memory"])


BlockOut = response_model(Block, "BlockOut")
VersionSummary = response_model(
    BlockVersion, "VersionSummary", exclude=frozenset({"user_id", "label", "body"})
)
VersionOut = response_model(BlockVersion, "VersionOut", exclude=frozenset({"user_id"}))


class BlockIn(StrictInput):
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
    body: str
    expected_version: int | None = Field(
        default=None,
        ge=0,
        le=MAX_INT32,
        description="Apply only if the block is at this version (0: new).",
    )
    author: Literal["user", "api"] = "api"


class RevertIn(StrictInput):
    version: int = Field(ge=1, le=MAX_INT32, description="The earlier version to go back to.")
    expected_version: int | None = Field(
        default=None, ge=1, le=MAX_INT32, description="Apply only if the block is at this version."
    )
    author: Literal["user", "api"] = "api"


class Deleted(BaseModel):
    deleted: bool
    version: int


@router.get("", response_model=list[BlockOut])
async def list_blocks(user_id: UserIdPath, services: ServicesDep) -> list[Block]:
    """All of the user's blocks, by label."""
    return await services.memory.list_blocks(user_id)


@router.get("/{label}", response_model=BlockOut)
async def get_block(user_id: UserIdPath, label: LabelPath, services: ServicesDep) -> Block:
    return await services.memory.get_block(user_id, label)


@router.put("/{label}", response_model=BlockOut)
async def put_block(
    user_id: UserIdPath, label: LabelPath, payload: BlockIn, services: ServicesDep
) -> Block:
    """Create or replace a block. With `expected_version`, a mismatch is 409."""
    return await services.memory.put_block(
        user_id,
        label,
        title=payload.title,
        body=payload.body,
        author=payload.author,
        expected_version=payload.expected_version,
    )


@router.post("/{label}/revert", response_model=BlockOut)
async def revert_block(
    user_id: UserIdPath, label: LabelPath, payload: RevertIn, services: ServicesDep
) -> Block:
    """Undo: an earlier version's title and body become the next version (also brings back a
    deleted block). 404 for an unknown version, 422 for a deletion, 409 on `expected_version`
    mismatch."""
    return await services.memory.revert_block(
        user_id,
        label,
        payload.version,
        author=payload.author,
        expected_version=payload.expected_version,
    )


@router.delete("/{label}", response_model=Deleted)
async def delete_block(
    user_id: UserIdPath,
    label: LabelPath,
    services: ServicesDep,
    expected_version: int | None = Query(default=None, ge=1, le=MAX_INT32),
) -> Deleted:
    """Delete a block; its history stays readable."""
    version = await services.memory.delete_block(
        user_id, label, author="api", expected_version=expected_version
    )
    return Deleted(deleted=True, version=version)


@router.get("/{label}/history", response_model=list[VersionSummary])
async def history(
    user_id: UserIdPath, label: LabelPath, services: ServicesDep
) -> list[BlockVersion]:
    """Every version, newest first, with author and time."""
    return await services.memory.history(user_id, label)


@router.get("/{label}/history/{version}", response_model=VersionOut)
async def get_version(
    user_id: UserIdPath,
    label: LabelPath,
    version: Annotated[int, Path(ge=1, le=MAX_INT32)],
    services: ServicesDep,
) -> BlockVersion:
    return await services.memory.get_version(user_id, label, version)


CommitOut = response_model(DoltCommit, "DoltCommitOut")


@log_router.get("/log", response_model=list[CommitOut])
async def dolt_log(
    user_id: UserIdPath,
    services: ServicesDep,
    label: Annotated[str | None, Query(pattern=LABEL_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[DoltCommit]:
    """The Dolt commits of the user's memory (one block's with `label`), newest first: one per
    change that landed. 409 unless RALPH_MEMORY_VERSIONING=dolt."""
    return await services.memory.dolt_log(user_id, label, limit)
