"""Proposals: how agents ask for a memory change and how a person decides."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, model_validator

from ralph.api.deps import ServicesDep
from ralph.api.params import UserIdPath
from ralph.memory.models import Proposal, ProposalDraft, ProposalKind, ProposalStatus
from ralph.validation import Label, StrictInput

router = APIRouter(tags=["proposals"])


class ProposalOut(BaseModel):
    id: str
    user_id: str
    label: str
    kind: ProposalKind
    title: str | None
    body: str | None
    old_text: str | None
    new_text: str | None
    reason: str
    author: str
    run_id: str | None
    base_version: int
    status: ProposalStatus
    diff: str
    comment: str | None
    applied_version: int | None
    created_at: datetime
    decided_at: datetime | None

    @classmethod
    def of(cls, proposal: Proposal) -> ProposalOut:
        return cls.model_validate(proposal, from_attributes=True)


class ProposalIn(StrictInput):
    label: Label
    reason: str = Field(min_length=1, max_length=4000)
    body: str | None = Field(default=None, description="The whole new body.")
    title: str | None = Field(default=None, max_length=255)
    old_text: str | None = Field(default=None, description="Exact passage to replace.")
    new_text: str | None = Field(default=None, description="What replaces it.")
    append: str | None = Field(
        default=None, min_length=1, description="Text to add at the end, on a line of its own."
    )
    author: str = Field(default="api", pattern=r"^(api|user|agent:[a-z0-9][a-z0-9_-]{0,63})$")
    run_id: str | None = Field(default=None, max_length=36)

    @model_validator(mode="after")
    def _one_kind(self) -> ProposalIn:
        kinds = [self.body is not None, self.old_text is not None, self.append is not None]
        if sum(kinds) != 1:
            raise ValueError("give one of: body, old_text and new_text, or append")
        if (self.old_text is None) != (self.new_text is None):
            raise ValueError("old_text and new_text go together")
        return self


class Decision(StrictInput):
    comment: str | None = Field(default=None, max_length=4000)


@router.post("/users/{user_id}/proposals", response_model=ProposalOut, status_code=201)
async def create_proposal(
    user_id: UserIdPath, payload: ProposalIn, services: ServicesDep
) -> ProposalOut:
    """Propose a change to one block; nothing changes until it is approved."""
    proposal, _ = await services.memory.propose(
        ProposalDraft(user_id=user_id, **payload.model_dump())
    )
    return ProposalOut.of(proposal)


@router.get("/users/{user_id}/proposals", response_model=list[ProposalOut])
async def list_proposals(
    user_id: UserIdPath,
    services: ServicesDep,
    status: ProposalStatus | None = None,
    run_id: str | None = Query(default=None, max_length=36, description="Made by this run."),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[ProposalOut]:
    """The user's proposals, newest first; `?status=pending` for the user's review queue."""
    found = await services.memory.list_proposals(user_id, status=status, limit=limit, run_id=run_id)
    return [ProposalOut.of(p) for p in found]


@router.get("/proposals", response_model=list[ProposalOut])
async def review_queue(
    services: ServicesDep,
    status: ProposalStatus | None = None,
    run_id: str | None = Query(default=None, max_length=36, description="Made by this run."),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[ProposalOut]:
    """Every user's proposals, newest first: `?status=pending` is the review queue,
    `?run_id=` what one background run proposed."""
    found = await services.memory.list_proposals(None, status=status, limit=limit, run_id=run_id)
    return [ProposalOut.of(p) for p in found]


@router.get("/proposals/{proposal_id}", response_model=ProposalOut)
async def get_proposal(proposal_id: str, services: ServicesDep) -> ProposalOut:
    return ProposalOut.of(await services.memory.get_proposal(proposal_id))


@router.post("/proposals/{proposal_id}/approve", response_model=ProposalOut)
async def approve(
    proposal_id: str, services: ServicesDep, decision: Decision | None = None
) -> ProposalOut:
    """Apply the change as a new block version. 409 if decided already or if it conflicts."""
    comment = decision.comment if decision else None
    return ProposalOut.of(await services.memory.approve(proposal_id, comment))


@router.post("/proposals/{proposal_id}/reject", response_model=ProposalOut)
async def reject(
    proposal_id: str, services: ServicesDep, decision: Decision | None = None
) -> ProposalOut:
    comment = decision.comment if decision else None
    return ProposalOut.of(await services.memory.reject(proposal_id, comment))
