"""Memory domain objects."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Block:
    user_id: str
    label: str
    title: str
    body: str
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class BlockVersion:
    user_id: str
    label: str
    version: int
    title: str
    body: str
    deleted: bool
    author: str
    proposal_id: str | None
    created_at: datetime
    # the Dolt commit that recorded this version (RALPH_MEMORY_VERSIONING=dolt)
    dolt_commit: str | None = None


class ProposalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    SUPERSEDED = "superseded"
    CONFLICT = "conflict"
    EXPIRED = "expired"  # pending longer than RALPH_PROPOSAL_TTL_DAYS
    PREVIEW = "preview"  # from a dry run: shown with its run, never reviewed or applied


@dataclass(frozen=True, slots=True)
class BulkDecision:
    """One proposal's outcome in a bulk approve or reject: its status after the call (None:
    not found), the version an approval wrote, and why it was not decided as asked."""

    id: str
    decided: bool
    status: ProposalStatus | None
    applied_version: int | None = None
    error: str | None = None


class ProposalKind(StrEnum):
    BODY = "body"  # replace the whole body (and optionally the title)
    REPLACE = "replace"  # replace one exact passage with another
    APPEND = "append"  # add `new_text` at the end (on a line of its own)


@dataclass(frozen=True, slots=True)
class Proposal:
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
    # who decided: "api" (a person through the API or the CLI), "system:auto" (a task whose
    # approval is auto), "system:supersede" (replaced by a newer one, or by an approval),
    # "system:expire" (pending longer than RALPH_PROPOSAL_TTL_DAYS)
    decided_by: str | None = None
    superseded_by: str | None = None  # the proposal that replaced this one
    # approved with the reviewer's version of the change (`applied_text`); the fields above
    # keep the author's
    edited: bool = False
    applied_text: str | None = None
    evidence: Evidence | None = None

    @property
    def text(self) -> str:
        """The text the change adds: the new body, the replacement or the appended text."""
        return (self.body if self.kind is ProposalKind.BODY else self.new_text) or ""

    def with_text(self, text: str) -> Proposal:
        """The same change with `text` as the text it adds (a reviewer's version)."""
        return replace(self, **{"body" if self.kind is ProposalKind.BODY else "new_text": text})

    @property
    def revision_field(self) -> str:
        """The field of an approval that carries a reviewer's version of this change."""
        return REVISION_FIELDS[self.kind]


# a proposal's evidence holds at most this many message references
MAX_EVIDENCE_MESSAGES = 50


@dataclass(frozen=True, slots=True)
class Evidence:
    """What an agent's proposal was based on: references to the user's messages it had (its
    episode, and what its `query_messages` calls returned: a Ralph message id, or
    `honcho:<id>`), and the upstream runs whose outcome a chained task was given."""

    messages: tuple[str, ...] = ()
    upstream_runs: tuple[str, ...] = ()

    def as_json(self) -> str:
        return json.dumps({"messages": self.messages, "upstream_runs": self.upstream_runs})

    @classmethod
    def from_json(cls, raw: str | None) -> Evidence | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(tuple(data.get("messages", ())), tuple(data.get("upstream_runs", ())))


# the field of an approval (`POST /proposals/{id}/approve`) that carries a reviewer's version
# of a change, by the change's kind
REVISION_FIELDS = {
    ProposalKind.BODY: "body",
    ProposalKind.REPLACE: "new_text",
    ProposalKind.APPEND: "append",
}


@dataclass(frozen=True, slots=True)
class Revision:
    """A reviewer's version of a proposal's change, approved instead of the author's: the
    new body (`body`), the replacement (`replace`) or the text to append (`append`)."""

    kind: ProposalKind
    text: str


@dataclass(frozen=True, slots=True)
class ProposalDraft:
    """What an author proposes; the service turns it into a Proposal."""

    user_id: str
    label: str
    reason: str
    author: str
    body: str | None = None
    title: str | None = None
    old_text: str | None = None
    new_text: str | None = None
    run_id: str | None = None
    append: str | None = None  # text to add at the end
    preview: bool = False  # a dry run's: recorded as a preview, never applicable
    evidence: Evidence | None = None  # an agent's: what it was based on

    @property
    def kind(self) -> ProposalKind:
        if self.body is not None:
            return ProposalKind.BODY
        if self.append is not None:
            return ProposalKind.APPEND
        return ProposalKind.REPLACE


def labels_in_order(blocks: Sequence[Block], labels: Sequence[str]) -> list[Block]:
    """`blocks` in the order of `labels` (all blocks by label when `labels` is empty)."""
    if not labels:
        return sorted(blocks, key=lambda b: b.label)
    by_label = {b.label: b for b in blocks}
    return [by_label[label] for label in labels if label in by_label]
