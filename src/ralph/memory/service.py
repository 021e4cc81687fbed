"""Memory use cases: edit blocks, propose and decide changes, render context for agents."""

from __future__ import annotations

import difflib
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta

import structlog

from ralph.authors import AUTO_APPROVER, CHAT, CHAT_NAME, Author
from ralph.clock import Clock
from ralph.errors import AlreadyInBlock, AlreadyRejected, Conflict, InvalidInput, NotFound
from ralph.memory.models import (
    Block,
    BlockVersion,
    BulkDecision,
    Proposal,
    ProposalDraft,
    ProposalKind,
    ProposalStatus,
    Revision,
    labels_in_order,
)
from ralph.memory.store import EditFn, MemoryStore
from ralph.memory.versioning import DoltCommit

log = structlog.get_logger(__name__)

# the same limits on every path (API, agents' tools, extraction) and every database: MariaDB
# would otherwise cut a longer title or reason where SQLite keeps it whole
MAX_TITLE_CHARS = 255
MAX_REASON_CHARS = 4000


def check_text(name: str, value: str | None, max_chars: int | None = None) -> None:
    """InvalidInput for a NUL character (stored, then shown as nothing) or text longer than
    `max_chars` characters."""
    if value is None:
        return
    if "\x00" in value:
        raise InvalidInput(f"{name}: NUL characters (\\u0000) are not allowed")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidInput(f"{name} is {len(value)} characters; the limit is {max_chars}")


def unified_diff(label: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"{label} (current)",
        tofile=f"{label} (proposed)",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def appended(body: str, text: str) -> str:
    """`body` with `text` added at the end, on a line of its own."""
    if body and not body.endswith("\n"):
        body += "\n"
    return body + text


def _replace_once(body: str, old: str, new: str, label: str) -> str:
    count = body.count(old)
    if count == 0:
        raise Conflict(f"the text to replace is no longer in block '{label}'")
    if count > 1:
        raise Conflict(f"the text to replace occurs {count} times in block '{label}'")
    return body.replace(old, new, 1)


def _after(draft: ProposalDraft, before: str) -> str:
    """The block's body once `draft` is applied to `before` (Conflict if it cannot be)."""
    if draft.body is not None:
        return draft.body
    if draft.append is not None:
        return appended(before, draft.append)
    return _replace_once(before, draft.old_text or "", draft.new_text or "", draft.label)


def _lines(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.strip()}


def _changes_nothing(draft: ProposalDraft, current: Block | None, after: str) -> bool:
    """Whether `draft` would leave the block as it is: the same text (and title), or an
    append whose every line is a line of the block already."""
    if current is None:
        return False
    if draft.kind is ProposalKind.APPEND:
        return _lines(draft.append or "") <= _lines(current.body)
    return after == current.body and draft.title in (None, current.title)


def _task_author(task: str) -> Author:
    """The author a review filter `task` names: a task's agents, or `chat`: the chat agent."""
    return CHAT if task == CHAT_NAME else Author.of_task(task)


def is_agent(author: str) -> bool:
    """Whether `author` is an agent's (a task's or chat's)."""
    return Author.parse(author).is_agent


def _change_of(
    change: ProposalDraft | Proposal,
) -> tuple[str, str | None, str | None, str | None, str | None]:
    """What a proposal changes, comparable between a draft and a stored proposal (a stored
    append keeps its text in `new_text`)."""
    if isinstance(change, ProposalDraft):
        new_text = change.append if change.kind is ProposalKind.APPEND else change.new_text
    else:
        new_text = change.new_text
    return (change.kind.value, change.title, change.body, change.old_text, new_text)


# the rejected changes shown to an agent stop at this many characters
REJECTIONS_MAX_CHARS = 4000


def _quoted(text: str | None, limit: int = 300) -> str:
    text = (text or "").strip()
    return json.dumps(text if len(text) <= limit else text[:limit] + "...", ensure_ascii=False)


def rejections_context(rejected: Sequence[Proposal]) -> str:
    """The changes reviewers rejected, for an agent's instructions: newest first, each with
    its block, what it changed and the reviewer's comment; at most `REJECTIONS_MAX_CHARS`."""
    if not rejected:
        return ""
    lines = [
        "# Changes a reviewer rejected or corrected for this user",
        "",
        "Do not propose the rejected ones again; learn from the reviewers' comments and from "
        "how they corrected the others.",
    ]
    total = sum(len(line) for line in lines)
    for proposal in rejected:
        if proposal.kind is ProposalKind.APPEND:
            what = f"append {_quoted(proposal.new_text)}"
        elif proposal.kind is ProposalKind.REPLACE:
            what = f"replace {_quoted(proposal.old_text)} with {_quoted(proposal.new_text)}"
        else:
            what = f"rewrite as {_quoted(proposal.body)}"
        when = (proposal.decided_at or proposal.created_at).date().isoformat()
        comment = f" (reviewer: {_quoted(proposal.comment)})" if proposal.comment else ""
        if proposal.status is ProposalStatus.APPROVED:
            what = f"{what}, approved as {_quoted(proposal.applied_text)} instead"
        line = f"- {when}, block {proposal.label}: {what}{comment}"
        if total + len(line) > REJECTIONS_MAX_CHARS:
            break
        lines.append(line)
        total += len(line)
    return "\n".join(lines)


def memory_context(blocks: Sequence[Block]) -> str:
    """`blocks` as markdown for a system prompt, in their order."""
    sections = [
        f"## {b.title} (`{b.label}`, version {b.version})\n\n{b.body.strip()}\n" for b in blocks
    ]
    return "\n".join(sections)


def with_memory(instructions: str, blocks: Sequence[Block]) -> str:
    """`instructions` followed by `blocks` as the agent's memory context (if any)."""
    memory = memory_context(blocks)
    if not memory:
        return instructions
    return f"{instructions}\n\n---\n\n# What you know about the user\n\n{memory}"


class MemoryService:
    """Blocks with history; proposals that a person approves before anything changes."""

    def __init__(
        self, store: MemoryStore, clock: Clock, max_body_bytes: int, *, remember_days: float = 30
    ) -> None:
        self.store = store
        self._clock = clock
        self._max_body_bytes = max_body_bytes
        self._remember = timedelta(days=remember_days)

    def _check_body(self, body: str) -> None:
        size = len(body.encode("utf-8"))
        if size > self._max_body_bytes:
            raise InvalidInput(f"body is {size} bytes; the limit is {self._max_body_bytes} bytes")

    # --- blocks ---------------------------------------------------------------------------

    async def list_blocks(self, user_id: str) -> list[Block]:
        return await self.store.list_blocks(user_id)

    async def get_block(self, user_id: str, label: str) -> Block:
        block = await self.store.get_block(user_id, label)
        if block is None:
            raise NotFound(f"block '{label}' not found for user '{user_id}'")
        return block

    async def put_block(
        self,
        user_id: str,
        label: str,
        *,
        title: str | None,
        body: str,
        author: str,
        expected_version: int | None = None,
        why: str = "put",
    ) -> Block:
        """Create or replace a block; `expected_version` makes it conditional (409 on mismatch).
        `why`: what the change is, for its Dolt commit when versioning is on."""
        self._check_body(body)
        check_text("title", title, MAX_TITLE_CHARS)
        check_text("body", body)

        def edit(current: Block | None) -> tuple[str, str]:
            if title is not None:
                return title, body
            return (current.title if current else label.replace("_", " ").title()), body

        return await self.store.write_block(
            user_id,
            label,
            edit,
            author=author,
            now=self._clock.now(),
            expected_version=expected_version,
            why=why,
        )

    async def delete_block(
        self, user_id: str, label: str, *, author: str, expected_version: int | None = None
    ) -> int:
        return await self.store.delete_block(
            user_id, label, author=author, now=self._clock.now(), expected_version=expected_version
        )

    async def revert_block(
        self,
        user_id: str,
        label: str,
        version: int,
        *,
        author: str,
        expected_version: int | None = None,
    ) -> Block:
        """Undo: write the title and body of an earlier `version` as the block's next version
        (history keeps everything in between). A deletion is not a version to go back to."""
        earlier = await self.get_version(user_id, label, version)
        if earlier.deleted:
            raise InvalidInput(f"version {version} of block '{label}' is its deletion")
        return await self.put_block(
            user_id,
            label,
            title=earlier.title,
            body=earlier.body,
            author=author,
            expected_version=expected_version,
            why=f"revert to v{version}:",
        )

    async def history(self, user_id: str, label: str) -> list[BlockVersion]:
        versions = await self.store.history(user_id, label)
        if not versions:
            raise NotFound(f"block '{label}' has no history for user '{user_id}'")
        commits = await self.store.version_commits(user_id, label)
        if commits:
            versions = [replace(v, dolt_commit=commits.get(v.version)) for v in versions]
        return versions

    async def dolt_log(self, user_id: str, label: str | None, limit: int) -> list[DoltCommit]:
        """The Dolt commits of the user's memory, newest first (409 without versioning)."""
        return await self.store.dolt_log(user_id, label, limit)

    async def get_version(self, user_id: str, label: str, version: int) -> BlockVersion:
        found = await self.store.get_version(user_id, label, version)
        if found is None:
            raise NotFound(f"block '{label}' has no version {version}")
        return found

    async def build_memory_context(self, user_id: str, labels: Sequence[str] = ()) -> str:
        """The chosen blocks as markdown for a system prompt, in `labels` order.

        With no labels, every block of the user in label order. Missing blocks are skipped.
        """
        return memory_context(labels_in_order(await self.store.list_blocks(user_id), labels))

    async def instructions_with_memory(
        self, instructions: str, user_id: str, labels: Sequence[str] = ()
    ) -> str:
        """`instructions` followed by the user's memory context (if any), for an agent."""
        blocks = labels_in_order(await self.store.list_blocks(user_id), labels)
        return with_memory(instructions, blocks)

    # --- proposals ------------------------------------------------------------------------

    async def propose(self, draft: ProposalDraft) -> tuple[Proposal, bool]:
        """Record a pending proposal; returns it and whether it is new.

        Exactly one kind of change: `body` (rewrite), `old_text` + `new_text` (replace one
        exact passage, which must occur once in the block as it is now) or `append`. While a
        proposal is pending, the same author proposing the same change to the same block gets
        it back instead of a second one (whatever run it comes from); once it is decided, the
        same change may be proposed again. InvalidInput for anything that cannot apply.
        """
        if not draft.reason.strip():
            raise InvalidInput("a proposal needs a reason")
        check_text("reason", draft.reason, MAX_REASON_CHARS)
        check_text("title", draft.title, MAX_TITLE_CHARS)
        for name in ("body", "old_text", "new_text", "append"):
            check_text(name, getattr(draft, name))
        given = [
            draft.body is not None,
            draft.old_text is not None or draft.new_text is not None,
            draft.append is not None,
        ]
        if sum(given) != 1:
            raise InvalidInput(
                "give one of: body (the whole new text), old_text with new_text (replace a "
                "passage), or append (text to add at the end)"
            )
        if draft.kind is ProposalKind.REPLACE and (not draft.old_text or draft.new_text is None):
            raise InvalidInput("give a non-empty old_text with new_text")
        if draft.kind is ProposalKind.APPEND and not draft.append:
            raise InvalidInput("append needs the text to add")

        current = await self.store.get_block(draft.user_id, draft.label)
        before = current.body if current else ""
        try:
            after = _after(draft, before)
        except Conflict as exc:
            raise InvalidInput(str(exc)) from None
        self._check_body(after)
        if _changes_nothing(draft, current, after):
            # an agent's next attempt (a rerun after a shutdown) proposing again what its
            # auto-approved first attempt applied, or a note the block already holds
            raise AlreadyInBlock(f"block '{draft.label}' already says this: nothing to change")
        if is_agent(draft.author):
            await self._check_not_rejected(draft)

        # The same author proposing the same change to a block that already has it pending
        # gets that proposal back (the key is cleared once the proposal is decided); a
        # preview, the same preview of its dry run.
        new_text = draft.append if draft.kind is ProposalKind.APPEND else draft.new_text
        status = ProposalStatus.PREVIEW if draft.preview else ProposalStatus.PENDING
        content = json.dumps(
            [
                *([status.value, draft.run_id] if draft.preview else []),
                draft.user_id,
                draft.label,
                draft.author,
                draft.kind.value,
                draft.title,
                draft.body,
                draft.old_text,
                new_text,
            ],
        )
        key = hashlib.sha256(content.encode()).hexdigest()
        values = {
            "id": str(uuid.uuid4()),
            "user_id": draft.user_id,
            "label": draft.label,
            "kind": draft.kind.value,
            "title": draft.title,
            "body": draft.body,
            "old_text": draft.old_text,
            "new_text": new_text,
            "reason": draft.reason,
            "author": draft.author,
            "run_id": draft.run_id,
            "base_version": current.version if current else 0,
            "status": status.value,
            "diff": unified_diff(draft.label, before, after),
            "idempotency_key": key,
            "created_at": self._clock.now(),
            "evidence": draft.evidence.as_json() if draft.evidence else None,
        }
        return await self.store.insert_proposal(values)

    async def rejections(self, user_id: str, author: str, limit: int = 10) -> list[Proposal]:
        """The proposals of `author` for the user that reviewers rejected, or approved with
        their own version, in the remembered window (RALPH_REJECTIONS_REMEMBERED_DAYS),
        newest first."""
        if not self._remember:
            return []
        return await self.store.list_proposals(
            user_id,
            author=author,
            decided_since=self._clock.now() - self._remember,
            limit=limit,
            corrected=True,
        )

    async def rejected_users(self, author: str) -> set[str]:
        """The users `author` has proposals of that reviewers rejected or edited in the
        remembered window (one read for a whole run: only they need `rejections`)."""
        if not self._remember:
            return set()
        since = self._clock.now() - self._remember
        return await self.store.corrected_users(author, since)

    async def _check_not_rejected(self, draft: ProposalDraft) -> None:
        """AlreadyRejected when a reviewer rejected this same change of the block, proposed by
        the same author, in the remembered window (a person may still propose it)."""
        if not self._remember:
            return
        rejected = await self.store.list_proposals(
            draft.user_id,
            status=ProposalStatus.REJECTED,
            label=draft.label,
            author=draft.author,
            decided_since=self._clock.now() - self._remember,
            limit=50,
        )
        change = _change_of(draft)
        for proposal in rejected:
            if _change_of(proposal) == change and proposal.decided_at is not None:
                said = f': "{proposal.comment}"' if proposal.comment else ""
                raise AlreadyRejected(
                    f"a reviewer rejected this same change of block '{draft.label}' on "
                    f"{proposal.decided_at.date().isoformat()}{said}; do not propose it again"
                )

    async def get_proposal(self, proposal_id: str) -> Proposal:
        proposal = await self.store.get_proposal(proposal_id)
        if proposal is None:
            raise NotFound(f"proposal '{proposal_id}' not found")
        return proposal

    async def list_proposals(
        self,
        user_id: str | None,
        status: ProposalStatus | None = None,
        limit: int = 100,
        run_id: str | None = None,
        *,
        label: str | None = None,
        task: str | None = None,
    ) -> list[Proposal]:
        """Newest first: one user's, or with `user_id` None everyone's (the review queue);
        narrowed to one run, block label, or task (the proposals its agents wrote)."""
        return await self.store.list_proposals(
            user_id,
            status=status,
            run_id=run_id,
            label=label,
            author=None if task is None else str(_task_author(task)),
            limit=limit,
        )

    async def previews(
        self, proposals: Sequence[Proposal]
    ) -> list[tuple[str, str | None, str | None]]:
        """For each proposal (the block's current body, what approving would make it or None,
        why not): the change a reviewer is asked to approve, against the text as it is now.
        The blocks are read at once."""
        blocks = await self.store.get_blocks([(p.user_id, p.label) for p in proposals])
        previews: list[tuple[str, str | None, str | None]] = []
        for proposal in proposals:
            current = blocks.get((proposal.user_id, proposal.label))
            body = current.body if current else ""
            try:
                previews.append((body, self._edit_for(proposal)(current)[1], None))
            except Conflict as conflict:
                previews.append((body, None, str(conflict)))
        return previews

    async def approve(
        self,
        proposal_id: str,
        comment: str | None = None,
        *,
        by: str = "api",
        revised: Revision | None = None,
    ) -> Proposal:
        """Apply the proposal as a new block version (409 if not pending or if it conflicts).
        `revised`: the reviewer's version of the change, of the proposal's kind (InvalidInput
        otherwise), applied instead of the author's."""
        text: str | None = None
        if revised is not None:
            proposal = await self.get_proposal(proposal_id)
            if revised.kind is not proposal.kind:
                raise InvalidInput(
                    f"proposal '{proposal_id}' is of kind {proposal.kind.value}: give your "
                    f"version as `{proposal.revision_field}`"
                )
            text = revised.text
            if proposal.kind is ProposalKind.BODY:
                self._check_body(text)
        return await self._decide(proposal_id, True, comment, by, revised=text)

    async def auto_approve(self, proposal_id: str) -> Proposal:
        """Approve as `system:auto` (a task whose approval is auto), through the same path as
        a person's approval; a proposal that conflicts stays pending for a person (Conflict
        is raised, nothing changes)."""
        return await self._decide(
            proposal_id, True, None, str(AUTO_APPROVER), keep_on_conflict=True
        )

    async def reject(
        self, proposal_id: str, comment: str | None = None, *, by: str = "api"
    ) -> Proposal:
        return await self._decide(proposal_id, False, comment, by)

    async def _decide(
        self,
        proposal_id: str,
        approve: bool,
        comment: str | None,
        by: str,
        *,
        keep_on_conflict: bool = False,
        revised: str | None = None,
    ) -> Proposal:
        return await self.store.decide(
            proposal_id,
            approve=approve,
            comment=comment,
            now=self._clock.now(),
            edit_for=self._edit_for,
            by=by,
            conflict_stays_pending=keep_on_conflict,
            revised=revised,
        )

    async def expire_pending(self, ttl_days: float) -> int:
        """Pending proposals older than `ttl_days` end `expired`: returns how many."""
        now = self._clock.now()
        expired = await self.store.expire(now - timedelta(days=ttl_days), now)
        if expired:
            log.info("proposals_expired", count=expired, ttl_days=ttl_days)
        return expired

    async def decide_many(
        self,
        *,
        approve: bool,
        ids: Sequence[str] = (),
        run_id: str | None = None,
        comment: str | None = None,
        by: str = "api",
    ) -> list[BulkDecision]:
        """Approve or reject each of `ids`, or every pending proposal `run_id` made, each on
        its own (one that conflicts or was decided already does not stop the others), in
        order (a run's oldest first, as an agent made them); decided `by`."""
        if run_id is not None:
            ids = await self.store.pending_ids_of_run(run_id)
        decisions: list[BulkDecision] = []
        for proposal_id in ids:
            try:
                stored = await self._decide(proposal_id, approve, comment, by)
            except NotFound as exc:
                decisions.append(BulkDecision(proposal_id, False, None, error=str(exc)))
            except Conflict as exc:
                # every refusal of a decision names the status the proposal is left in
                status = ProposalStatus(str(exc.details["status"]))
                decisions.append(BulkDecision(proposal_id, False, status, error=str(exc)))
            else:
                decisions.append(
                    BulkDecision(proposal_id, True, stored.status, stored.applied_version)
                )
        return decisions

    def _edit_for(self, proposal: Proposal) -> EditFn:
        def edit(current: Block | None) -> tuple[str, str]:
            current_version = current.version if current else 0
            default_title = proposal.label.replace("_", " ").title()
            title = proposal.title or (current.title if current else default_title)
            if proposal.kind is ProposalKind.BODY:
                if current_version != proposal.base_version:
                    raise Conflict(
                        f"block '{proposal.label}' changed since the proposal "
                        f"(version {proposal.base_version} -> {current_version})"
                    )
                assert proposal.body is not None
                return title, proposal.body
            if proposal.kind is ProposalKind.APPEND:
                body = appended(current.body if current else "", proposal.new_text or "")
                self._check_body(body)
                return title, body
            body = _replace_once(
                current.body if current else "",
                proposal.old_text or "",
                proposal.new_text or "",
                proposal.label,
            )
            self._check_body(body)
            return title, body

        return edit
