"""The scheduler under a fake clock: cron slots, misfires, replicas, idle episodes, recovery."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from httpx import AsyncClient
from sqlalchemy import select, update

from ralph.background.cron import due_slots
from ralph.background.models import (
    CronTrigger,
    IdleTrigger,
    RunStatus,
    TaskDefinition,
    TriggerType,
    UserStatus,
    jitter_offset,
)
from ralph.background.run_store import UnitEnd
from ralph.composition import Services
from ralph.config import Settings
from ralph.db.tables import background_tasks, task_runs
from ralph.reasons import EndReason
from ralph.testing.clock import FakeClock
from tests.helpers import AppHarness, harness_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def definition(**overrides: Any) -> TaskDefinition:
    values: dict[str, Any] = {
        "name": "nightly",
        "system_prompt": "review",
        "tools": [],
        "trigger": CronTrigger(schedule="0 3 * * *"),
        "user_ids": ["a"],
    }
    values.update(overrides)
    return TaskDefinition(**values)


async def cron_runs(services: Services) -> list[tuple[datetime | None, str]]:
    query = (
        select(task_runs.c.slot_at, task_runs.c.status)
        .where(task_runs.c.trigger_type == TriggerType.CRON.value)
        .order_by(task_runs.c.slot_at)
    )
    async with services.engine.connect() as conn:
        return [(r.slot_at, r.status) for r in (await conn.execute(query)).all()]


async def test_cron_fires_at_the_slot_and_not_before(harness: AppHarness, clock: FakeClock) -> None:
    services = harness.services
    await services.registry.create(definition())
    await clock.set(T0.replace(hour=2, minute=59, second=59))
    report = await services.scheduler.tick()
    assert report.started == []
    assert report.next_wake == T0.replace(hour=3)

    await clock.set(T0.replace(hour=3))
    report = await services.scheduler.tick()
    assert len(report.started) == 1
    await services.coordinator.drain()
    assert await cron_runs(services) == [(T0.replace(hour=3), "success")]
    # the next slot is a day away; the loop still re-ticks hourly to see other replicas' changes
    assert report.next_wake == T0.replace(hour=4)

    await clock.advance(1)
    assert (await services.scheduler.tick()).started == []  # a slot fires once


async def test_restart_after_three_missed_slots(harness: AppHarness, clock: FakeClock) -> None:
    services = harness.services
    await services.registry.create(definition(trigger=CronTrigger(schedule="0 * * * *")))
    await clock.set(T0.replace(hour=3, second=30))  # 01:00, 02:00 and 03:00 were due
    report = await services.scheduler.tick()
    await services.coordinator.drain()
    assert report.started  # the 03:00 slot; the two before it are recorded as missed:
    assert await cron_runs(services) == [
        (T0.replace(hour=1), "missed"),
        (T0.replace(hour=2), "missed"),
        (T0.replace(hour=3), "success"),
    ]


async def test_slots_outside_the_grace_window_are_all_missed(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    await services.registry.create(
        definition(trigger=CronTrigger(schedule="0 * * * *"), misfire_grace_seconds=60)
    )
    await clock.set(T0.replace(hour=2, minute=5))
    report = await services.scheduler.tick()
    assert report.started == []
    assert [s for _, s in await cron_runs(services)] == ["missed", "missed"]


async def test_new_and_reenabled_tasks_start_at_their_next_slot(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    await clock.set(T0.replace(hour=5))
    await services.registry.create(definition(trigger=CronTrigger(schedule="0 * * * *")))
    assert (await services.scheduler.tick()).started == []  # nothing from before creation
    await services.registry.set_enabled("nightly", False)
    await clock.set(T0.replace(hour=9, minute=30))
    assert (await services.scheduler.tick()).started == []
    await services.registry.set_enabled("nightly", True)
    assert (await services.scheduler.tick()).started == []  # 06:00..09:00 are not caught up
    await clock.set(T0.replace(hour=10))
    assert len((await services.scheduler.tick()).started) == 1
    await services.coordinator.drain()


async def test_two_schedulers_fire_each_of_100_slots_once(
    harness: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    services = harness.services
    await services.registry.create(
        definition(trigger=CronTrigger(schedule="* * * * *"), user_ids=["a"])
    )
    other = second_replica.scheduler
    started = 0
    for _ in range(100):
        await clock.advance(60)
        reports = await asyncio.gather(services.scheduler.tick(), other.tick())
        started += sum(len(r.started) for r in reports)
        await services.coordinator.drain()
        await second_replica.coordinator.drain()
    runs = await cron_runs(services)
    assert started == 100
    assert len(runs) == 100
    assert len({slot for slot, _ in runs}) == 100
    assert {status for _, status in runs} == {"success"}


def test_dst_spring_forward_and_fall_back() -> None:
    berlin = "Europe/Berlin"
    # 2026-03-29: 02:00-03:00 local does not exist; "30 2 * * *" fires at 03:00 local (01:00Z)
    spring = due_slots(
        "30 2 * * *",
        berlin,
        datetime(2026, 3, 28, 12, tzinfo=UTC),
        datetime(2026, 3, 30, 12, tzinfo=UTC),
    )
    assert spring == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]
    # 2026-10-25: 02:00-03:00 local happens twice; 02:30 fires once, at the first one
    fall = due_slots(
        "30 2 * * *",
        berlin,
        datetime(2026, 10, 24, 12, tzinfo=UTC),
        datetime(2026, 10, 26, 12, tzinfo=UTC),
    )
    assert fall == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]


async def test_idle_fires_once_per_episode_with_cooldown(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    scheduler = services.scheduler
    await services.registry.create(
        definition(
            name="idle-review",
            trigger=IdleTrigger(idle_minutes=30, cooldown_minutes=60),
            user_ids=["a", "b"],
        )
    )
    conversations = services.conversations
    await conversations.record_activity("a", clock.now())
    await conversations.record_activity("outsider", clock.now())  # not in the task's list

    async def fired() -> list[str]:
        report = await scheduler.tick()
        await services.coordinator.drain()
        users: list[str] = []
        for run_id in report.started:
            users += [u.user_id for u in await services.runs.users(run_id)]
        return users

    await clock.advance(timedelta(minutes=29))
    assert await fired() == []
    await clock.advance(timedelta(minutes=1))
    assert await fired() == ["a"]
    await clock.advance(timedelta(minutes=1))
    assert await fired() == []
    await clock.advance(timedelta(days=7))
    assert await fired() == []  # still the same episode: not re-run every cooldown

    await conversations.record_activity("a", clock.now())  # a new episode
    await clock.advance(timedelta(minutes=30))
    assert await fired() == ["a"]

    # a message right after that run: idle again 30 min later, but the cooldown holds it
    await clock.advance(timedelta(minutes=5))
    await conversations.record_activity("a", clock.now())
    await clock.advance(timedelta(minutes=30))
    assert await fired() == []
    await clock.advance(timedelta(minutes=25))  # 60 min since the last run
    assert await fired() == ["a"]


async def test_crashed_run_is_interrupted_and_its_users_rerun_once(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    task = definition(user_ids=["a", "b", "c"], trigger=CronTrigger(schedule="0 3 1 1 *"))
    await services.registry.create(task)
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    # a process that started the run, finished "a", then died
    assert await services.runs.mark_started(run_id, "dead-replica", clock.now())
    assert (await services.runs.start_user(run_id, task.name, "a", clock.now())).started
    await services.runs.end_unit(run_id, task.name, "a", UnitEnd(EndReason.FINISHED), clock.now())
    assert (await services.runs.start_user(run_id, task.name, "b", clock.now())).started

    await clock.advance(services.settings.run_lease_seconds - 1)
    assert (await services.scheduler.tick()).recovered == []  # lease not yet expired
    await clock.advance(2)
    report = await services.scheduler.tick()
    assert len(report.recovered) == 1
    await services.coordinator.drain()
    dead = await services.runs.get(run_id)
    assert dead.status is RunStatus.INTERRUPTED
    assert dead.counts == {"success": 1, "interrupted": 2}
    rerun = await services.runs.get(report.recovered[0])
    assert rerun.status is RunStatus.SUCCESS
    assert (rerun.trigger_type, rerun.rerun_of) == (TriggerType.RERUN, run_id)
    assert [u.user_id for u in await services.runs.users(rerun.id)] == ["b", "c"]
    assert (await services.scheduler.tick()).recovered == []  # recovered once only


async def test_reruns_stop_at_the_limit(harness: AppHarness) -> None:
    """RALPH_RERUN_INTERRUPTED_USERS (3 by default): reruns interrupted in turn are re-run
    again up to that many times in a row, so a user that keeps killing its process is not
    retried forever."""
    services = harness.services
    assert services.settings.rerun_interrupted_users == 3
    task = definition(user_ids=["a"], trigger=CronTrigger(schedule="0 3 1 1 *"))
    await services.registry.create(task)
    chain = [await services.background.create_run(task, TriggerType.MANUAL)]
    for _ in range(3):
        rerun = await services.coordinator.create_rerun(chain[-1], task, ["a"])
        assert rerun is not None
        chain.append(rerun)
    assert await services.coordinator.create_rerun(chain[-1], task, ["a"]) is None
    assert await services.coordinator.create_rerun(chain[0], task, ["a"]) is None  # one per run
    assert [await services.runs.rerun_depth(r, at_most=9) for r in chain] == [0, 1, 2, 3]


async def test_loop_sleeps_until_the_slot_and_wakes_on_changes(
    harness: AppHarness, clock: FakeClock
) -> None:
    """The real loop on the fake clock: nothing before the slot, one run at it."""
    services = harness.services
    scheduler = services.scheduler
    scheduler.start()
    try:
        await _until(lambda: clock.sleepers > 0)
        # a task created through the API wakes the sleeping loop, which plans for its slot
        await services.registry.create(definition(trigger=CronTrigger(schedule="0 1 * * *")))
        await _until(lambda: scheduler.last_tick is not None and clock.sleepers > 0)
        await clock.set(T0.replace(hour=0, minute=59, second=59))
        await asyncio.sleep(0.05)
        assert await cron_runs(services) == []
        await clock.set(T0.replace(hour=1))

        async def fired_and_finished() -> bool:
            return await cron_runs(services) == [(T0.replace(hour=1), "success")]

        await _until_async(fired_and_finished)
    finally:
        await scheduler.stop()


async def test_a_change_made_while_the_loop_ticks_is_not_lost(
    harness: AppHarness, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task created during a pass (through this process) wakes the loop once the pass
    ends: it does not wait for the hourly re-check."""
    services = harness.services
    scheduler = services.scheduler
    lease_start = services.runs.lease_start
    created: list[bool] = []

    async def creating_meanwhile(active: Any) -> datetime | None:
        if not created:  # the first pass, after it read the tasks
            created.append(True)
            await services.registry.create(definition(trigger=CronTrigger(schedule="30 0 * * *")))
        return await lease_start(active)

    monkeypatch.setattr(services.runs, "lease_start", creating_meanwhile)
    scheduler.start()
    try:
        await _until(lambda: bool(created) and clock.sleepers > 0)
        await asyncio.sleep(0.05)
        await _until(lambda: clock.sleepers > 0)
        await clock.set(T0.replace(minute=30))

        async def fired_and_finished() -> bool:
            return await cron_runs(services) == [(T0.replace(minute=30), "success")]

        await _until_async(fired_and_finished)
    finally:
        await scheduler.stop()


async def _until(condition: Any) -> None:
    """Poll state owned by the loop under test (it has no event to wait on), for up to 5 s."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def _until_async(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_two_schedulers_claim_each_idle_episode_once(
    harness: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    services = harness.services
    users = [f"user-{i}" for i in range(30)]
    await services.registry.create(
        definition(name="idle-pair", trigger=IdleTrigger(idle_minutes=5), user_ids=users)
    )
    for user in users:
        await services.conversations.record_activity(user, clock.now())
    other = second_replica.scheduler
    await clock.advance(timedelta(minutes=5))
    reports = await asyncio.gather(services.scheduler.tick(), other.tick())
    claimed: list[str] = []
    for report in reports:
        for run_id in report.started:
            claimed += [u.user_id for u in await services.runs.users(run_id)]
    assert sorted(claimed) == sorted(users)
    await services.coordinator.drain()


async def test_scheduler_endpoint(harness: AppHarness, clock: FakeClock) -> None:
    services = harness.services
    await services.registry.create(
        definition(trigger=CronTrigger(schedule="0 3 * * *", timezone="Europe/Berlin"))
    )
    await services.registry.create(definition(name="idle-one", trigger=IdleTrigger(idle_minutes=5)))
    await services.scheduler.tick()
    body = (await harness.client.get("/background/scheduler")).json()
    tasks = {t["name"]: t for t in body["tasks"]}
    # 03:00 in Berlin (UTC+1 in January) is 02:00Z
    assert tasks["nightly"]["next_fire_at"] == "2026-01-01T02:00:00Z"
    assert tasks["idle-one"]["next_fire_at"] is None
    assert body["last_tick_at"] == "2026-01-01T00:00:00Z"
    assert [r["replica_id"] for r in body["replicas"]] == [body["replica_id"]]


async def test_run_created_but_never_started_is_started_after_a_lease(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    task = definition(user_ids=["a", "b"], trigger=CronTrigger(schedule="0 3 1 1 *"))
    await services.registry.create(task)
    # its creator died before starting it
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    assert (await services.scheduler.tick()).recovered == []
    await clock.advance(services.settings.run_lease_seconds + 1)
    report = await services.scheduler.tick()
    assert report.recovered == [run_id]
    await services.coordinator.drain()
    run = await services.runs.get(run_id)
    assert run.status is RunStatus.SUCCESS
    assert run.counts == {"success": 2}


@pytest.mark.parametrize("schedule", ["0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6,9,11 *"])
async def test_a_cron_expression_that_never_fires_is_refused(
    client: AsyncClient, schedule: str
) -> None:
    body = definition(name="never").model_dump(mode="json")
    body["trigger"] = {"type": "cron", "schedule": schedule}
    created = await client.post("/background/tasks", json=body)
    assert created.status_code == 422
    assert schedule in created.json()["detail"]
    assert "no fire time" in created.json()["detail"]
    body["trigger"]["schedule"] = "0 3 * * *"
    assert (await client.post("/background/tasks", json=body)).status_code == 201
    body["trigger"]["schedule"] = schedule
    assert (await client.put("/background/tasks/never", json=body)).status_code == 422
    # rare but real: Feb 29 fires every four years
    body["trigger"]["schedule"] = "0 0 29 2 *"
    assert (await client.put("/background/tasks/never", json=body)).status_code == 200


async def test_a_task_that_fails_in_a_pass_does_not_stop_the_others(
    harness: AppHarness, clock: FakeClock
) -> None:
    """A definition stored before expressions were checked (or any task whose firing raises)
    is logged and reported; the other tasks fire, and the heartbeat goes on."""
    services = harness.services
    await services.registry.create(
        definition(name="hourly", trigger=CronTrigger(schedule="0 * * * *"))
    )
    await services.registry.create(definition(name="broken"))
    async with services.engine.begin() as conn:
        row = (
            await conn.execute(
                select(background_tasks.c.definition).where(background_tasks.c.name == "broken")
            )
        ).scalar_one()
        stored = json.loads(row)
        stored["trigger"]["schedule"] = "0 0 31 2 *"
        await conn.execute(
            update(background_tasks)
            .where(background_tasks.c.name == "broken")
            .values(definition=json.dumps(stored), revision=background_tasks.c.revision + 1)
        )
    await clock.set(T0.replace(hour=1))
    report = await services.scheduler.tick()
    assert len(report.started) == 1
    assert report.next_wake == T0.replace(hour=2)
    assert "no fire time" in services.scheduler.errors["broken"]
    await services.coordinator.drain()
    assert await cron_runs(services) == [(T0.replace(hour=1), "success")]

    answer = await harness.client.get("/background/scheduler")
    assert answer.status_code == 200
    tasks = {t["name"]: t for t in answer.json()["tasks"]}
    assert tasks["broken"]["next_fire_at"] is None
    assert "0 0 31 2 *" in tasks["broken"]["error"]
    assert tasks["hourly"] == {
        "name": "hourly",
        "trigger_type": "cron",
        "next_fire_at": "2026-01-01T02:00:00Z",
        "error": None,
    }
    assert answer.json()["last_tick_at"] == "2026-01-01T01:00:00Z"
    assert [r["replica_id"] for r in answer.json()["replicas"]] == [services.scheduler.replica_id]
    # the task listing still reads the stored row
    assert (await harness.client.get("/background/tasks/broken")).status_code == 200


async def test_a_pending_run_bounds_the_sleep(harness: AppHarness, clock: FakeClock) -> None:
    """A rerun queued by a stopping server (or a run whose creator died before starting it)
    is started one lease after it was created, however far away the next slot is."""
    services = harness.services
    lease = timedelta(seconds=services.settings.run_lease_seconds)
    task = definition(user_ids=["a", "b"], trigger=CronTrigger(schedule="0 3 1 1 *"))
    await services.registry.create(task)
    created_at = clock.now()
    run_id = await services.background.create_run(task, TriggerType.RERUN)
    await clock.advance(1)
    assert (await services.scheduler.tick()).next_wake == created_at + lease

    scheduler = services.scheduler
    scheduler.start()
    try:
        await _until(lambda: clock.sleepers > 0)
        await clock.set(created_at + lease)

        async def started_and_finished() -> bool:
            return (await services.runs.get(run_id)).status is RunStatus.SUCCESS

        await _until_async(started_and_finished)
    finally:
        await scheduler.stop()


async def test_another_replicas_running_run_bounds_the_sleep(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    lease = timedelta(seconds=services.settings.run_lease_seconds)
    task = definition(user_ids=["a"], trigger=CronTrigger(schedule="0 3 1 1 *"))
    await services.registry.create(task)
    run_id = await services.background.create_run(task, TriggerType.MANUAL)
    assert await services.runs.mark_started(run_id, "other-replica", clock.now())
    await clock.advance(10)
    await services.runs.heartbeat(run_id, clock.now())
    beat = clock.now()
    await clock.advance(5)
    assert (await services.scheduler.tick()).next_wake == beat + lease
    await clock.set(beat + lease)
    assert len((await services.scheduler.tick()).recovered) == 1
    await services.coordinator.drain()


async def _ticked_at(scheduler: Any, clock: FakeClock, when: datetime) -> None:
    """Move the fake clock to `when`; return once the loop has ticked there (if its sleep
    ended) and sleeps again."""
    await clock.set(when)
    await asyncio.sleep(0.05)
    await _until(lambda: clock.sleepers > 0)


async def idle_runs(services: Services, task: str) -> list[tuple[datetime, list[str]]]:
    runs = await services.background.runs(task, None, 50)
    found: list[tuple[datetime, list[str]]] = []
    for run in reversed(runs):
        _, users = await services.background.run(run.id)
        found.append((run.created_at, [u.user_id for u in users]))
    return found


async def test_idle_fires_at_the_users_due_time_not_at_the_next_check(
    harness: AppHarness, clock: FakeClock
) -> None:
    """The loop sleeps until the earliest due time the database knows of: a user active at
    00:00:10 with `idle_minutes` 30 fires at 00:30:10, not at the next 30 s check."""
    services = harness.services
    scheduler = await _loop_with_idle_task(services, clock, idle_minutes=30)
    try:
        await clock.set(T0 + timedelta(seconds=10))
        await services.conversations.record_activity("a", clock.now())
        await _until(lambda: clock.sleepers > 0)
        due = T0 + timedelta(minutes=30, seconds=10)
        await _ticked_at(scheduler, clock, T0 + timedelta(minutes=1))  # the periodic check
        await _ticked_at(scheduler, clock, due - timedelta(seconds=1))
        assert await idle_runs(services, "idle-review") == []
        await _ticked_at(scheduler, clock, due)
        await _fired_at(services, due)
    finally:
        await scheduler.stop()


async def _loop_with_idle_task(services: Services, clock: FakeClock, idle_minutes: int) -> Any:
    """The scheduler's loop started, sleeping, with an idle task for user "a"."""
    scheduler = services.scheduler
    await services.registry.create(
        definition(
            name="idle-review", trigger=IdleTrigger(idle_minutes=idle_minutes), user_ids=["a"]
        )
    )
    scheduler.start()
    await _until(lambda: scheduler.last_tick is not None and clock.sleepers > 0)
    return scheduler


async def _fired_at(services: Services, due: datetime) -> None:
    async def fired() -> bool:
        return await idle_runs(services, "idle-review") == [(due, ["a"])]

    await _until_async(fired)


async def test_activity_through_this_server_wakes_a_loop_that_sleeps_longer(
    settings: Settings, clock: FakeClock
) -> None:
    """With a periodic check longer than `idle_minutes`, activity recorded through this
    server brings the loop's wake forward to the user's due time."""
    async with harness_for(settings.model_copy(update={"idle_check_seconds": 3600}), clock) as h:
        services = h.services
        scheduler = await _loop_with_idle_task(services, clock, idle_minutes=1)
        try:
            await clock.set(T0 + timedelta(seconds=5))
            answer = await h.client.post("/users/a/activity")
            assert answer.status_code == 200, answer.text
            await _until(lambda: scheduler.last_tick == T0 + timedelta(seconds=5))
            await _until(lambda: clock.sleepers > 0)
            due = T0 + timedelta(minutes=1, seconds=5)
            await _ticked_at(scheduler, clock, due)
            await _fired_at(services, due)
        finally:
            await scheduler.stop()


async def test_upcoming_fire_times_and_idle_outlook(harness: AppHarness, clock: FakeClock) -> None:
    client = harness.client
    services = harness.services
    await clock.set(datetime(2026, 3, 27, 12, tzinfo=UTC))
    berlin = definition(
        name="berlin", trigger=CronTrigger(schedule="0 3 * * *", timezone="Europe/Berlin")
    )
    await services.registry.create(berlin)
    answer = await client.get("/background/tasks/berlin/upcoming?limit=3")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["trigger_type"] == "cron"
    # 03:00 in Berlin: 02:00 UTC before the DST change of March 29, 01:00 UTC after it
    assert [f["at"] for f in body["fires"]] == [
        "2026-03-28T02:00:00Z",
        "2026-03-29T01:00:00Z",
        "2026-03-30T01:00:00Z",
    ]
    assert {(f["timezone"], f["users"]) for f in body["fires"]} == {("Europe/Berlin", 1)}
    assert len((await client.get("/background/tasks/berlin/upcoming")).json()["fires"]) == 5

    idle = definition(name="idle", trigger=IdleTrigger(idle_minutes=30), user_ids=["a", "b", "c"])
    await services.registry.create(idle)
    start = clock.now()
    await services.conversations.record_activity("a", start)
    await services.conversations.record_activity("outsider", start)
    await clock.advance(timedelta(minutes=10))
    await services.conversations.record_activity("b", clock.now())
    await clock.advance(timedelta(minutes=5))
    body = (await client.get("/background/tasks/idle/upcoming")).json()
    assert (body["fires"], body["armed_users"]) == ([], 2)
    assert body["next_due_at"] == "2026-03-27T12:30:00Z"

    assert (await client.get("/background/tasks/nope/upcoming")).status_code == 404
    assert (await client.get("/background/tasks/idle/upcoming?limit=0")).status_code == 422


async def test_jitter_spreads_the_users_starts_after_the_slot(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    users = [f"user-{i:02d}" for i in range(20)]
    task = definition(
        trigger=CronTrigger(schedule="0 3 * * *", jitter_seconds=600), user_ids=users
    ).model_copy(update={"batch_size": 20})
    await services.registry.create(task)
    slot = T0.replace(hour=3)
    await clock.set(slot)
    [run_id] = (await services.scheduler.tick()).started
    expected = {u: jitter_offset("nightly", slot, u, 600) for u in users}
    assert all(0 <= d < 600 for d in expected.values())
    assert len(set(expected.values())) > 15  # spread, not bunched

    async def started_by(elapsed: float) -> None:
        due = {u for u, d in expected.items() if d <= elapsed}

        async def settled() -> bool:
            _, results = await services.background.run(run_id)
            return {r.user_id for r in results if r.status is not UserStatus.PENDING} == due

        await _until_async(settled)

    for elapsed in (0, 150, 300, 450, 599):
        await clock.set(slot + timedelta(seconds=elapsed))
        await started_by(elapsed)
    await clock.set(slot + timedelta(seconds=600))
    await services.coordinator.drain()
    run, results = await services.background.run(run_id)
    assert run.counts == {"success": 20}
    assert {r.user_id: r.jitter_seconds for r in results} == expected
    answer = await harness.client.get(f"/background/runs/{run_id}/users/user-03")
    assert answer.json()["jitter_seconds"] == expected["user-03"]

    too_long = definition(name="too-long").model_dump(mode="json")
    too_long["trigger"]["jitter_seconds"] = 3601
    assert (await harness.client.post("/background/tasks", json=too_long)).status_code == 422


async def test_a_cancel_reaches_a_run_waiting_for_jittered_starts(
    harness: AppHarness, clock: FakeClock
) -> None:
    services = harness.services
    task = definition(
        trigger=CronTrigger(schedule="0 3 * * *", jitter_seconds=3600), user_ids=["a", "b"]
    )
    await services.registry.create(task)
    await clock.set(T0.replace(hour=3))
    [run_id] = (await services.scheduler.tick()).started
    await asyncio.sleep(0.05)
    await services.background.cancel(run_id)
    run = await services.coordinator.wait(run_id, 5)
    assert run is not None
    assert run.status is RunStatus.CANCELLED


async def test_max_wait_fires_a_user_who_never_goes_idle(
    harness: AppHarness, clock: FakeClock, second_replica: Services
) -> None:
    """`idle_minutes` 5, `max_wait_minutes` 10: a user writing every minute fires 10 minutes
    into each episode; with a 15-minute cooldown, when the cooldown ends. A quiet user fires
    on going idle, as before. Two schedulers tick throughout."""
    services = harness.services
    start = datetime(2026, 6, 1, 9, tzinfo=UTC)
    await clock.set(start)
    for name, cooldown in (("eager", 0), ("patient", 15)):
        trigger = IdleTrigger(idle_minutes=5, cooldown_minutes=cooldown, max_wait_minutes=10)
        await services.registry.create(
            definition(name=name, trigger=trigger, user_ids=["chatty", "quiet"])
        )
    await services.conversations.record_activity("quiet", start)
    due: list[datetime | None] = []
    for minute in range(31):
        await clock.set(start + timedelta(minutes=minute))
        await services.conversations.record_activity("chatty", clock.now())
        await asyncio.gather(services.scheduler.tick(), second_replica.scheduler.tick())
        due.append((await services.background.upcoming("eager", 1)).next_due_at)
        await services.coordinator.drain()
        await second_replica.coordinator.drain()

    def at(minutes: int) -> datetime:
        return start + timedelta(minutes=minutes)

    assert await idle_runs(services, "eager") == [
        (at(5), ["quiet"]),
        (at(10), ["chatty"]),  # the episode that started at 0
        (at(21), ["chatty"]),  # the next one started at 11, the first message after the run
    ]
    assert await idle_runs(services, "patient") == [
        (at(5), ["quiet"]),
        (at(10), ["chatty"]),
        (at(25), ["chatty"]),  # due at 21, held by the cooldown until 25
    ]
    # the earliest due time (which bounds the loop's sleep) is the max wait, not the idle
    # time, which keeps moving away
    assert (due[0], due[9], due[11], due[20]) == (at(5), at(10), at(16), at(21))


async def test_max_wait_counts_from_the_first_message_heard(
    harness: AppHarness, clock: FakeClock
) -> None:
    """`idle_minutes` 1, `max_wait_minutes` 2, a message every 20 s from 0 s, ticks every 30 s
    from 25 s (and at each planned wake): the episode started with the message at 0 s, which
    this server heard, so it fires at 2:00, not at 2:20 (120 s after the last message the
    tick at 25 s read)."""
    services = harness.services
    start = datetime(2026, 6, 1, 9, tzinfo=UTC)
    await clock.set(start - timedelta(seconds=5))
    trigger = IdleTrigger(idle_minutes=1, cooldown_minutes=0, max_wait_minutes=2)
    await services.registry.create(definition(name="digest", trigger=trigger, user_ids=["ann"]))
    wake = (await services.scheduler.tick()).next_wake
    for second in range(0, 181):
        await clock.set(start + timedelta(seconds=second))
        if second % 20 == 0:
            await services.conversations.record_activity("ann", clock.now())
        if second % 30 == 25 or clock.now() >= wake:
            wake = (await services.scheduler.tick()).next_wake
            await services.coordinator.drain()
    assert await idle_runs(services, "digest") == [(start + timedelta(minutes=2), ["ann"])]


async def test_max_wait_must_cover_idle_minutes(harness: AppHarness) -> None:
    body = {
        "name": "impatient",
        "system_prompt": "x",
        "user_ids": ["a"],
        "trigger": {"type": "idle", "idle_minutes": 30, "max_wait_minutes": 10},
    }
    answer = await harness.client.post("/background/tasks", json=body)
    assert answer.status_code == 422
    assert "max_wait_minutes (10) must be at least idle_minutes (30)" in answer.text
