"""Webhooks: signed events about runs and decisions, delivered at least once to a real HTTP
receiver, through its outages and a restart of Ralph, each event under one id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import select

from ralph.config import Settings
from ralph.db.tables import webhook_outbox
from ralph.errors import Conflict
from ralph.memory.models import ProposalDraft
from ralph.testing.clock import FakeClock
from ralph.testing.model_server import ModelServer, call, scripted, text
from ralph.testing.webhook_receiver import WebhookReceiver
from ralph.webhooks.sender import backoff_seconds
from tests.helpers import AppHarness, harness_for, notes_task, using_model_server

SECRET = "webhook-secret"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def hooked(settings: Settings, receiver: WebhookReceiver) -> Settings:
    return settings.model_copy(
        update={
            "webhook_url": receiver.url,
            "webhook_secret": SecretStr(SECRET),
            "public_url": None,
        }
    )


async def received(receiver: WebhookReceiver, count: int, seconds: float = 20.0) -> None:
    """Wait (real time: delivery is real HTTP) until `count` distinct events arrived."""
    async with asyncio.timeout(seconds):
        while len({event["id"] for event in receiver.events()}) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def verify(secret: str, body: bytes, header: str) -> bool:
    """The verification the README shows a receiver."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


async def test_a_run_and_a_decision_arrive_signed(
    settings: Settings, clock: FakeClock, model_server: ModelServer, receiver: WebhookReceiver
) -> None:
    settings = using_model_server(hooked(settings, receiver), model_server)
    async with harness_for(settings, clock, server=model_server) as harness:
        client = harness.client
        assert (await client.post("/background/tasks", json=notes_task())).status_code == 201
        model_server.responder = scripted(
            call("edit_memory_block", label="notes", append="likes maths", reason="said so"),
            text("done"),
        )
        run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
        await received(receiver, 2)
        [proposal] = (await client.get(f"/proposals?run_id={run['id']}")).json()
        approved = await client.post(f"/proposals/{proposal['id']}/approve", json={})
        assert approved.status_code == 200, approved.text
        await received(receiver, 3)

    for delivery in receiver.deliveries:
        assert verify(SECRET, delivery.body, delivery.headers["X-Ralph-Signature"])
        assert not verify("another secret", delivery.body, delivery.headers["X-Ralph-Signature"])
        assert delivery.headers["X-Ralph-Event-Id"] == delivery.event["id"]
        assert delivery.headers["X-Ralph-Event"] == delivery.event["type"]
    events = {event["type"]: event["data"] for event in receiver.events()}
    assert set(events) == {"run.finished", "proposals.pending", "proposal.decided"}
    finished = events["run.finished"]
    assert (finished["run_id"], finished["task"], finished["status"]) == (
        run["id"],
        "nightly",
        "success",
    )
    assert finished["counts"] == {"success": 1}
    assert finished["reasons"] == {"finished": 1}
    assert finished["tokens"]["total_tokens"] == run["total_tokens"] > 0
    assert events["proposals.pending"] == {
        "run_id": run["id"],
        "task": "nightly",
        "pending": 1,
        "console_url": f"/console?run_id={run['id']}",
    }
    decided = events["proposal.decided"]
    assert (decided["proposal_id"], decided["status"], decided["decided_by"]) == (
        proposal["id"],
        "approved",
        "api",
    )
    assert (decided["user_id"], decided["label"], decided["applied_version"]) == ("u1", "notes", 1)
    assert decided["edited"] is False


async def outbox_rows(harness: AppHarness) -> list[Any]:
    async with harness.services.engine.connect() as conn:
        return list((await conn.execute(select(webhook_outbox))).all())


async def until(condition: Callable[[], Any], seconds: float = 20.0) -> None:
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def draft(label: str) -> ProposalDraft:
    return ProposalDraft(user_id="u1", label=label, reason="r", author="api", append=label)


async def test_every_event_arrives_once_through_an_outage_and_a_restart(
    settings: Settings, clock: FakeClock, receiver: WebhookReceiver
) -> None:
    receiver.down()
    settings = hooked(settings, receiver)
    async with harness_for(settings, clock) as first:
        memory = first.services.memory
        decided: list[str] = []
        for label in ("goals", "notes", "plans"):
            proposal, _ = await memory.propose(draft(label))
            await (memory.approve if label != "plans" else memory.reject)(proposal.id)
            decided.append(proposal.id)

        async def all_tried(attempts: int) -> bool:
            rows = await outbox_rows(first)
            return len(rows) == 3 and all(row.attempts == attempts for row in rows)

        await until(lambda: all_tried(1))  # refused at once: the receiver is down
        rows = await outbox_rows(first)
        assert {row.status for row in rows} == {"pending"}
        assert all("Connect" in row.last_error for row in rows)
        # the next try waits for the backoff (2 s), on the injected clock
        assert {row.next_attempt_at - clock.now() for row in rows} == {timedelta(seconds=2)}
        await clock.advance(2)
        await until(lambda: all_tried(2))
    # Ralph restarts while the receiver is still down; it comes back before the next try
    receiver.up()
    async with harness_for(settings, clock) as second:
        await clock.advance(4)
        await received(receiver, 3)

        async def all_delivered() -> bool:
            return {row.status for row in await outbox_rows(second)} == {"delivered"}

        await until(all_delivered)
        exposition = (await second.client.get("/metrics")).text
        events = {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(exposition)
            if family.name == "ralph_webhook_events"
            for sample in family.samples
        }
        assert events == {"pending": 0, "delivered": 3, "failed": 0}
        # a rolled back change records nothing: an auto approval that conflicts stays pending
        rewrite = ProposalDraft(user_id="u1", label="notes", reason="r", author="x", body="b")
        conflicting, _ = await second.services.memory.propose(rewrite)
        await second.client.put("/users/u1/blocks/notes", json={"title": "N", "body": "v3"})
        with pytest.raises(Conflict):
            await second.services.memory.auto_approve(conflicting.id)
        assert len(await outbox_rows(second)) == 3

    events = receiver.events()
    ids = [event["id"] for event in events]
    by_proposal: dict[str, set[str]] = {}
    for event in events:
        by_proposal.setdefault(event["data"]["proposal_id"], set()).add(event["id"])
    # every decision arrived, each under exactly one id (a redelivery would repeat that id)
    assert sorted(by_proposal) == sorted(decided)
    assert all(len(event_ids) == 1 for event_ids in by_proposal.values())
    assert len(set(ids)) == 3
    statuses = {event["data"]["proposal_id"]: event["data"]["status"] for event in events}
    assert statuses == dict(zip(decided, ["approved", "approved", "rejected"], strict=True))
    attempts = {
        d.headers["X-Ralph-Event-Id"]: d.headers["X-Ralph-Delivery-Attempt"]
        for d in receiver.deliveries
    }
    assert set(attempts.values()) == {"3"}


def test_backoff_doubles_up_to_ten_minutes() -> None:
    assert [backoff_seconds(n, 2.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_seconds(30, 2.0) == 600.0
