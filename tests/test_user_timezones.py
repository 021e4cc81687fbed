"""Cron in each user's local time: profiles, one run per distinct instant, DST, moves."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from ralph.background.models import CronTrigger, TaskDefinition, TriggerType
from ralph.background.slots import due_instants, ran_this_local_day, upcoming_instants
from ralph.composition import Services
from ralph.db.tables import task_run_users, task_runs
from ralph.testing.clock import FakeClock
from ralph.users.models import ProfileIn
from tests.helpers import AppHarness

ZONES = {
    "tokyo": "Asia/Tokyo",
    "berlin": "Europe/Berlin",
    "paris": "Europe/Paris",  # the same instants as Berlin: shares its runs
    "ny": "America/New_York",
}


def local_task(user_ids: Sequence[str], **trigger: Any) -> TaskDefinition:
    return TaskDefinition(
        name="nightly",
        system_prompt="review",
        trigger=CronTrigger(schedule="0 3 * * *", timezone="user", **trigger),
        user_ids=list(user_ids),
    )


async def runs_by_slot(services: Services) -> dict[datetime, dict[str, str]]:
    """Each cron run's slot -> its users' statuses."""
    query = (
        select(task_runs.c.slot_at, task_run_users.c.user_id, task_run_users.c.status)
        .select_from(task_runs.join(task_run_users, task_run_users.c.run_id == task_runs.c.id))
        .where(task_runs.c.trigger_type == TriggerType.CRON.value)
    )
    found: dict[datetime, dict[str, str]] = defaultdict(dict)
    async with services.engine.connect() as conn:
        for slot, user_id, status in (await conn.execute(query)).all():
            found[slot][user_id] = status
    return dict(found)


async def follow_schedule(replicas: Sequence[Services], clock: FakeClock, until: datetime) -> int:
    """Tick every replica at once, as their loops would, from wake to wake until `until`;
    returns how many runs they started."""
    started = 0
    while clock.now() <= until:
        reports = await asyncio.gather(*(r.scheduler.tick() for r in replicas))
        started += sum(len(report.started) for report in reports)
        for replica in replicas:
            await replica.coordinator.drain()
        await clock.set(min(report.next_wake for report in reports))
    return started


async def test_profiles_through_the_api(harness: AppHarness, clock: FakeClock) -> None:
    client = harness.client
    empty = (await client.get("/users/ann")).json()
    assert empty == {
        "user_id": "ann",
        "timezone": None,
        "metadata": {},
        "timezone_changed_at": None,
        "updated_at": None,
    }
    put = await client.put("/users/ann", json={"timezone": "Asia/Tokyo", "metadata": {"plan": 1}})
    assert put.status_code == 200, put.text
    moved_at = put.json()["timezone_changed_at"]
    assert moved_at is not None
    assert (await client.get("/users/ann")).json() == put.json()

    await clock.advance(60)
    same = await client.put("/users/ann", json={"timezone": "Asia/Tokyo", "metadata": {}})
    assert same.json()["timezone_changed_at"] == moved_at  # the timezone did not change
    assert same.json()["updated_at"] != put.json()["updated_at"]
    await clock.advance(60)
    cleared = (await client.put("/users/ann", json={"timezone": None})).json()
    assert cleared["timezone"] is None
    assert cleared["timezone_changed_at"] not in (None, moved_at)  # back to the default: a move

    bob = (await client.put("/users/bob", json={"metadata": {"x": 1}})).json()
    assert bob["timezone_changed_at"] is None  # no timezone ever: never moved

    bad: list[tuple[dict[str, Any], str]] = [
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"timezone": "../etc/passwd"}, "unknown timezone"),
        ({"metadata": []}, "dictionary"),
        ({"metadata": {"x": "y" * 20_000}}, "at most 16384"),
        ({"tz": "UTC"}, "Extra inputs"),
    ]
    for body, words in bad:
        answer = await client.put("/users/ann", json=body)
        assert answer.status_code == 422, (body, answer.text)
        assert words in answer.text, answer.text
    # the client resolves /users/.. to / (which opens the console): never a user's profile
    dotted = await client.get("/users/..")
    assert dotted.status_code in (404, 422, 307)
    assert dotted.headers.get("location", "/console") == "/console"


async def test_a_default_timezone_only_with_per_user_schedules(harness: AppHarness) -> None:
    client = harness.client
    body: dict[str, Any] = {
        "name": "nightly",
        "system_prompt": "review",
        "user_ids": ["a"],
        "trigger": {"type": "cron", "schedule": "0 3 * * *", "default_timezone": "Asia/Tokyo"},
    }
    answer = await client.post("/background/tasks", json=body)
    assert answer.status_code == 422
    assert "default_timezone applies to timezone 'user' only" in answer.text
    body["trigger"]["timezone"] = "user"
    body["trigger"]["default_timezone"] = "Nowhere/Land"
    assert "unknown timezone" in (await client.post("/background/tasks", json=body)).text
    body["trigger"]["default_timezone"] = "Asia/Tokyo"
    assert (await client.post("/background/tasks", json=body)).status_code == 201


async def test_each_user_runs_at_their_own_0300_once_across_dst(
    harness: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    """Tokyo, Berlin, Paris and New York users, and one without a timezone (the task's
    default, Asia/Tokyo), over the twelve days in which Berlin (Oct 25) and New York (Nov 1)
    leave summer time; two schedulers tick together throughout."""
    services = harness.services
    for user_id, zone in ZONES.items():
        await services.users.put(user_id, ProfileIn(timezone=zone))
    users = [*ZONES, "nobody-knows"]
    await clock.set(datetime(2026, 10, 22, 12, tzinfo=UTC))
    await services.registry.create(local_task(users, default_timezone="Asia/Tokyo"))
    end = datetime(2026, 11, 3, 12, tzinfo=UTC)
    started = await follow_schedule([services, second_replica], clock, end)
    assert services.scheduler.errors == {}

    runs = await runs_by_slot(services)
    assert started == len(runs)  # every slot claimed once across the two replicas
    zones = {**ZONES, "nobody-knows": "Asia/Tokyo"}
    for user_id, zone in zones.items():
        tz = ZoneInfo(zone)
        slots = sorted(slot for slot, statuses in runs.items() if user_id in statuses)
        local = [slot.astimezone(tz) for slot in slots]
        assert {t.timetz().replace(tzinfo=None) for t in local} == {time(3)}, (user_id, local)
        days = [t.date() for t in local]
        first = date(2026, 10, 23)
        assert days == [first + timedelta(days=i) for i in range(len(days))], (user_id, days)
        assert days[-1] in (date(2026, 11, 3), date(2026, 11, 4)), (user_id, days)
        assert {runs[slot][user_id] for slot in slots} == {"success"}
    # Berlin and Paris share each run; the instants follow the DST changes
    berlin = sorted(slot for slot, statuses in runs.items() if "berlin" in statuses)
    assert all(set(runs[slot]) == {"berlin", "paris"} for slot in berlin)
    assert datetime(2026, 10, 24, 1, tzinfo=UTC) in berlin  # CEST
    assert datetime(2026, 10, 25, 2, tzinfo=UTC) in berlin  # CET from 03:00 CEST that night
    ny = sorted(slot for slot, statuses in runs.items() if "ny" in statuses)
    assert datetime(2026, 10, 31, 7, tzinfo=UTC) in ny  # EDT
    assert datetime(2026, 11, 1, 8, tzinfo=UTC) in ny  # EST
    assert all(status == "success" for statuses in runs.values() for status in statuses.values())


async def test_a_move_never_runs_a_user_twice_in_one_local_day(
    harness: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    services = harness.services
    await clock.set(datetime(2026, 5, 31, 12, tzinfo=UTC))
    await services.users.put("east", ProfileIn(timezone="Asia/Tokyo"))
    await services.users.put("west", ProfileIn(timezone="America/New_York"))
    await services.registry.create(local_task(["east", "west"]))
    # Tokyo's 03:00 on June 2 is 18:00 UTC on June 1
    await follow_schedule(
        [services, second_replica], clock, datetime(2026, 6, 1, 18, 30, tzinfo=UTC)
    )
    # east moves to Bangkok, where that run was at 01:00 on June 2: Bangkok's 03:00 of June 2
    # (20:00 UTC) would be a second run that local day, so east is skipped there (and says
    # why); west moves to Tokyo after New York's 03:00 of June 1 (07:00 UTC), 10:00 in Tokyo:
    # the next Tokyo slot (June 2 03:00, a different local day there) already passed, so
    # west's next run is Tokyo's 03:00 of June 3
    await services.users.put("east", ProfileIn(timezone="Asia/Bangkok"))
    await services.users.put("west", ProfileIn(timezone="Asia/Tokyo"))
    await follow_schedule([services, second_replica], clock, datetime(2026, 6, 3, 12, tzinfo=UTC))

    runs = await runs_by_slot(services)
    east = {slot: s["east"] for slot, s in runs.items() if "east" in s}
    west = {slot: s["west"] for slot, s in runs.items() if "west" in s}
    assert east == {
        datetime(2026, 5, 31, 18, tzinfo=UTC): "success",  # Tokyo June 1
        datetime(2026, 6, 1, 18, tzinfo=UTC): "success",  # Tokyo June 2
        datetime(2026, 6, 1, 20, tzinfo=UTC): "skipped",  # Bangkok June 2: ran already
        datetime(2026, 6, 2, 20, tzinfo=UTC): "success",  # Bangkok June 3
    }
    assert west == {
        datetime(2026, 6, 1, 7, tzinfo=UTC): "success",  # New York June 1
        datetime(2026, 6, 2, 18, tzinfo=UTC): "success",  # Tokyo June 3
    }
    skipped = await services.runs.list("nightly", limit=10)
    reasons = [
        u.error
        for run in skipped
        if run.slot_at == datetime(2026, 6, 1, 20, tzinfo=UTC)
        for u in (await services.background.run(run.id))[1]
    ]
    assert reasons == ["already ran on this local day (Asia/Bangkok) before the timezone changed"]


async def test_upcoming_lists_each_timezone_and_its_users(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    await clock.set(datetime(2026, 6, 1, 12, tzinfo=UTC))
    for user_id in ("b1", "b2"):
        await services.users.put(user_id, ProfileIn(timezone="Europe/Berlin"))
    await services.users.put("p", ProfileIn(timezone="Europe/Paris"))
    await services.users.put("t", ProfileIn(timezone="Asia/Tokyo"))
    await services.registry.create(local_task(["b1", "b2", "p", "t", "u"]))
    body = (await harness.client.get("/background/tasks/nightly/upcoming?limit=3")).json()
    assert [(f["at"], f["timezone"], f["users"]) for f in body["fires"]] == [
        ("2026-06-01T18:00:00Z", "Asia/Tokyo", 1),
        ("2026-06-02T01:00:00Z", "Europe/Berlin", 2),
        ("2026-06-02T01:00:00Z", "Europe/Paris", 1),
        ("2026-06-02T03:00:00Z", "UTC", 1),
    ]
    state = (await harness.client.get("/background/scheduler")).json()
    assert [t["next_fire_at"] for t in state["tasks"]] == ["2026-06-01T18:00:00Z"]


def test_due_instants_coalesce_per_timezone() -> None:
    zones = ["Asia/Tokyo", "Europe/Berlin"]
    after = datetime(2026, 6, 1, 0, tzinfo=UTC)
    # two days down: each zone runs its newest slot if inside the grace window
    now = datetime(2026, 6, 3, 1, 2, tzinfo=UTC)
    plan = due_instants("0 3 * * *", zones, after, now, timedelta(minutes=5))
    assert [(d.at, d.zones) for d in plan] == [
        (datetime(2026, 6, 1, 1, tzinfo=UTC), []),
        (datetime(2026, 6, 1, 18, tzinfo=UTC), []),
        (datetime(2026, 6, 2, 1, tzinfo=UTC), []),
        (datetime(2026, 6, 2, 18, tzinfo=UTC), []),  # Tokyo's newest, 7 hours late: missed
        (datetime(2026, 6, 3, 1, tzinfo=UTC), ["Europe/Berlin"]),
    ]
    pairs = upcoming_instants("0 3 * * *", ["Europe/Paris", "Europe/Berlin"], now, 2)
    assert [at for at, _ in pairs] == [datetime(2026, 6, 4, 1, tzinfo=UTC)] * 2 + [
        datetime(2026, 6, 5, 1, tzinfo=UTC)
    ] * 2


def test_the_move_rule_leaves_several_slots_a_day_alone() -> None:
    # every 6 hours: the New York slots are the Berlin slots' instants (6 hours apart), so a
    # user who ran at Berlin's 06:00 and moved to New York runs at New York's 06:00 too
    last = datetime(2026, 6, 1, 4, tzinfo=UTC)  # 06:00 Berlin, 00:00 New York
    moved = last + timedelta(minutes=30)
    slot = datetime(2026, 6, 1, 10, tzinfo=UTC)  # 06:00 New York
    assert not ran_this_local_day("0 */6 * * *", last, moved, slot, "America/New_York")
    # daily: Tokyo's 03:00 is 01:00 in Bangkok: Bangkok's 03:00 that day is held back
    last = datetime(2026, 6, 1, 18, tzinfo=UTC)
    bangkok = datetime(2026, 6, 1, 20, tzinfo=UTC)
    assert ran_this_local_day(
        "0 3 * * *", last, last + timedelta(minutes=5), bangkok, "Asia/Bangkok"
    )
    # but not if the move came before that run (the run was already in the new zone's day)
    assert not ran_this_local_day(
        "0 3 * * *", last, last - timedelta(minutes=5), bangkok, "Asia/Bangkok"
    )
