"""Proposals: how agents ask for a memory change and how a person decides."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field, model_validator

from ralph.api.deps import DeciderDep, ServicesDep
from ralph.api.params import LabelQuery, TaskQuery, UserIdPath, UserIdQuery
from ralph.api.schema import response_model
from ralph.memory.models import (
    REVISION_FIELDS,
    BulkDecision,
    Proposal,
    ProposalDraft,
    ProposalStatus,
    Revision,
)
from ralph.memory.service import MAX_REASON_CHARS, MAX_TITLE_CHARS, is_agent
from ralph.validation import Label, StrictInput

router = APIRouter(tags=["proposals"])


ProposalOut = response_model(Proposal, "ProposalOut")


class ProposalIn(StrictInput):
    label: Label
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)
    body: str | None = Field(default=None, description="The whole new body.")
    title: str | None = Field(default=None, max_length=MAX_TITLE_CHARS)
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


class Approval(Decision):
    """An approval, optionally with the reviewer's version of the change (one field, of the
    proposal's kind): applied instead of the author's, which the proposal keeps."""

    body: str | None = Field(default=None, description="A rewrite's new body, as you want it.")
    new_text: str | None = Field(
        default=None, min_length=1, description="A replacement's new text, as you want it."
    )
    append: str | None = Field(
        default=None, min_length=1, description="An append's text, as you want it."
    )

    def _given(self) -> list[Revision]:
        return [
            Revision(kind, text)
            for kind, name in REVISION_FIELDS.items()
            if (text := getattr(self, name)) is not None
        ]

    @model_validator(mode="after")
    def _one_version(self) -> Approval:
        given = [REVISION_FIELDS[r.kind] for r in self._given()]
        if len(given) > 1:
            raise ValueError(f"give one version of the change, not {' and '.join(given)}")
        return self

    def revision(self) -> Revision | None:
        given = self._given()
        return given[0] if given else None


class BulkIn(Decision):
    ids: list[Annotated[str, Field(min_length=1, max_length=36)]] | None = Field(
        default=None, min_length=1, max_length=10_000, description="These proposals, in order."
    )
    run_id: str | None = Field(
        default=None, min_length=1, max_length=36, description="Every pending one of this run."
    )

    @model_validator(mode="after")
    def _one_selection(self) -> BulkIn:
        if (self.ids is None) == (self.run_id is None):
            raise ValueError("give ids (a list of proposal ids) or run_id, not both")
        return self


BulkOut = response_model(
    BulkDecision,
    "BulkDecisionOut",
    descriptions={
        "decided": "Decided as asked by this call",
        "status": "The proposal's status after the call (null: not found)",
        "error": "Why it was not decided as asked (a conflict, decided already, not found)",
    },
)


async def _bulk(
    payload: BulkIn, services: ServicesDep, by: str, *, approve: bool
) -> list[BulkDecision]:
    return await services.memory.decide_many(
        approve=approve,
        ids=payload.ids or (),
        run_id=payload.run_id,
        comment=payload.comment,
        by=by,
    )


@router.post("/proposals/approve", response_model=list[BulkOut])
async def approve_many(
    payload: BulkIn, services: ServicesDep, by: DeciderDep
) -> list[BulkDecision]:
    """Approve many: `{"ids": [...]}` or `{"run_id": ...}` (everything pending it proposed).
    Each is decided on its own and has its result; a conflict on one does not stop the
    others (200 whatever the outcomes: read each `decided`)."""
    return await _bulk(payload, services, by, approve=True)


@router.post("/proposals/reject", response_model=list[BulkOut])
async def reject_many(payload: BulkIn, services: ServicesDep, by: DeciderDep) -> list[BulkDecision]:
    """Reject many, as `POST /proposals/approve` selects them."""
    return await _bulk(payload, services, by, approve=False)


@router.post("/users/{user_id}/proposals", response_model=ProposalOut, status_code=201)
async def create_proposal(
    user_id: UserIdPath, payload: ProposalIn, services: ServicesDep
) -> Proposal:
    """Propose a change to one block; nothing changes until it is approved."""
    proposal, _ = await services.memory.propose(
        ProposalDraft(user_id=user_id, **payload.model_dump())
    )
    return proposal


@router.get("/users/{user_id}/proposals", response_model=list[ProposalOut])
async def list_proposals(
    user_id: UserIdPath,
    services: ServicesDep,
    status: ProposalStatus | None = None,
    run_id: str | None = Query(default=None, max_length=36, description="Made by this run."),
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[Proposal]:
    """The user's proposals, newest first; `?status=pending` for the user's review queue."""
    return await services.memory.list_proposals(user_id, status=status, limit=limit, run_id=run_id)


@router.get("/proposals", response_model=list[ProposalOut])
async def review_queue(
    services: ServicesDep,
    status: ProposalStatus | None = None,
    run_id: str | None = Query(default=None, max_length=36, description="Made by this run."),
    user_id: UserIdQuery = None,
    label: LabelQuery = None,
    task: TaskQuery = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[Proposal]:
    """Every user's proposals, newest first: `?status=pending` is the review queue,
    `?run_id=` what one background run proposed; `user_id`, `label` and `task` narrow it."""
    return await services.memory.list_proposals(
        user_id, status=status, limit=limit, run_id=run_id, label=label, task=task
    )


class CitedOut(BaseModel):
    ref: str = Field(description="The message's id in Ralph, or `honcho:<id>`")
    role: str | None = None
    content: str | None = None
    created_at: datetime | None = None
    note: str | None = Field(default=None, description="Why the message cannot be shown")


ProposalDetailOut = response_model(
    Proposal,
    "ProposalDetailOut",
    extra={
        "evidence_messages": (
            list[CitedOut],
            Field(
                default_factory=list[CitedOut],
                description="The messages its evidence names, with their text",
            ),
        ),
        "transcript_url": (
            str | None,
            Field(default=None, description="The run's transcript of the user, for an agent's"),
        ),
    },
)


@router.get("/proposals/{proposal_id}", response_model=ProposalDetailOut)
async def get_proposal(proposal_id: str, services: ServicesDep) -> dict[str, Any]:
    """A proposal, with what its agent based it on: the messages (`evidence_messages`, their
    text, or a note when one is gone or lives in Honcho), the upstream runs of a chained
    task, and where its run's transcript is."""
    proposal = await services.memory.get_proposal(proposal_id)
    refs = proposal.evidence.messages if proposal.evidence else ()
    [cited] = await services.conversations.cited([(proposal.user_id, refs)])
    transcript = None
    if proposal.run_id is not None and is_agent(proposal.author):
        transcript = f"/background/runs/{proposal.run_id}/users/{proposal.user_id}"
    return {
        **dataclasses.asdict(proposal),
        "evidence_messages": [
            CitedOut(
                ref=c.ref,
                role=c.message.role.value if c.message else None,
                content=c.message.content if c.message else None,
                created_at=c.message.created_at if c.message else None,
                note=c.note,
            )
            for c in cited
        ],
        "transcript_url": transcript,
    }


@router.post("/proposals/{proposal_id}/approve", response_model=ProposalOut)
async def approve(
    proposal_id: str, services: ServicesDep, by: DeciderDep, decision: Approval | None = None
) -> Proposal:
    """Apply the change as a new block version. 409 if decided already or if it conflicts.
    With your version of the change (`body`, `new_text` or `append`, as the proposal's kind;
    422 otherwise), that is applied: the proposal keeps its author's text and records
    `edited: true` and `applied_text`."""
    comment = decision.comment if decision else None
    revised = decision.revision() if decision else None
    return await services.memory.approve(proposal_id, comment, by=by, revised=revised)


@router.post("/proposals/{proposal_id}/reject", response_model=ProposalOut)
async def reject(
    proposal_id: str, services: ServicesDep, by: DeciderDep, decision: Decision | None = None
) -> Proposal:
    comment = decision.comment if decision else None
    return await services.memory.reject(proposal_id, comment, by=by)
