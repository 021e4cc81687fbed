"""The console (`/console`) in a real browser (Playwright driving Debian's Chromium) against
a real server, plus its access rules over HTTP.

The browser tests skip without Chromium unless RALPH_REQUIRE_BROWSER=1 (set by `.ci/run`,
which installs it). With RALPH_UPDATE_SCREENSHOTS=1 they refresh `docs/console/*.png`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from pydantic import SecretStr

from ralph.config import Settings
from ralph.console.sessions import COOKIE
from ralph.testing.model_server import Fail, ModelServer, call, scripted, text
from tests.helpers import LiveServer, harness_for, notes_task, using_model_server

API_TOKEN = "api-token-for-console-tests"
REVIEWER_TOKEN = "reviewer-token-for-console"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
REQUIRE_BROWSER = os.environ.get("RALPH_REQUIRE_BROWSER") == "1"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "console"


def console_settings(tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'ralph.db'}",
        "data_dir": tmp_path / "data",
        "scheduler_enabled": False,
        "worker_mode": "inprocess",
        "api_token": SecretStr(API_TOKEN),
        "reviewer_token": SecretStr(REVIEWER_TOKEN),
        **extra,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        message = f"Chromium not found at {CHROMIUM} (apt-get install chromium)"
        if REQUIRE_BROWSER:
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def live(tmp_path: Path, model_server: ModelServer) -> Iterator[LiveServer]:
    with LiveServer(using_model_server(console_settings(tmp_path), model_server)) as server:
        yield server


def api(live: LiveServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=live.url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30
    )


async def shot(page: Page, name: str, tmp_path: Path) -> None:
    """A full-page screenshot: into docs/console with RALPH_UPDATE_SCREENSHOTS=1."""
    folder = SCREENSHOTS if os.environ.get("RALPH_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    await page.set_viewport_size({"width": 1200, "height": 800})
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


async def log_in(page: Page, live: LiveServer, token: str, path: str = "/console") -> None:
    await page.goto(live.url + path)
    await expect(page).to_have_url(f"{live.url}/console/login?next={quote(path, safe='/')}")
    await page.fill("input[name=token]", "wrong")
    await page.click("button[type=submit]")
    await expect(page.locator(".error")).to_have_text("That token is not valid.")
    await page.fill("input[name=token]", token)
    await page.click("button[type=submit]")


NIGHTLY = notes_task()


async def test_a_reviewer_approves_from_the_keyboard_and_the_queue_updates_itself(
    browser: Browser, live: LiveServer, model_server: ModelServer, tmp_path: Path
) -> None:
    async with api(live) as client:
        assert (await client.post("/background/tasks", json=NIGHTLY)).status_code == 201
        await client.put("/users/u1/blocks/notes", json={"title": "Notes", "body": "likes art"})
        model_server.responder = scripted(
            call(
                "edit_memory_block",
                label="notes",
                old_text="likes art",
                new_text="likes art and maths",
                reason="said so on Monday",
            ),
            text("done"),
        )
        run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
        assert run["status"] == "success", run

        page = await browser.new_page()
        await shot_login(page, live, tmp_path)
        await log_in(page, live, REVIEWER_TOKEN)
        await expect(page).to_have_url(f"{live.url}/console")
        item = page.locator(".proposal")
        await expect(item).to_have_count(1)
        await expect(item.locator(".reason")).to_have_text("said so on Monday")
        await expect(item.locator(".diff ins")).to_contain_text("and maths")
        await expect(item.locator(".author")).to_have_text("agent:nightly")
        await shot(page, "queue", tmp_path)

        await page.keyboard.press("j")
        await expect(item).to_be_focused()
        await page.keyboard.press("c")
        await page.keyboard.type("checked with the transcript")
        await page.keyboard.press("Enter")
        await page.keyboard.press("a")
        await expect(page.locator(".proposal")).to_have_count(0)
        block = (await client.get("/users/u1/blocks/notes")).json()
        assert (block["body"], block["version"]) == ("likes art and maths", 2)
        [decided] = (await client.get(f"/proposals?run_id={run['id']}")).json()
        assert (decided["status"], decided["comment"]) == (
            "approved",
            "checked with the transcript",
        )

        # the queue updates without a reload: a new proposal appears by itself
        await page.evaluate("window.notReloaded = true")
        proposed = await client.post(
            "/users/u2/proposals",
            json={"label": "goals", "append": "run a marathon", "reason": "new goal"},
        )
        assert proposed.status_code == 201, proposed.text
        await expect(page.locator(".proposal .reason")).to_have_text("new goal", timeout=10_000)
        assert await page.evaluate("window.notReloaded") is True

        # a reviewer may not operate: the tasks page offers no buttons, the API says 403
        await page.goto(live.url + "/console/tasks")
        await expect(page.locator("tr[data-task=nightly]")).to_be_visible()
        await expect(page.locator("[data-action=run]")).to_have_count(0)

        await page.goto(live.url + "/console/users/u1?label=notes&a=1&b=2")
        await expect(page.locator(".compare .diff ins")).to_have_text("and maths")
        await expect(page.locator("#block-notes pre")).to_have_text("likes art and maths")
        await shot(page, "user", tmp_path)
        await page.goto(f"{live.url}/console/runs/{run['id']}")
        await expect(page.locator("td.status")).to_have_text("success")
        await shot(page, "run", tmp_path)
        await page.goto(f"{live.url}/console/runs/{run['id']}/users/u1")
        await expect(page.locator(".transcript .msg").first).to_be_visible()
        await shot(page, "transcript", tmp_path)


async def shot_login(page: Page, live: LiveServer, tmp_path: Path) -> None:
    await page.goto(live.url + "/console/login")
    await shot(page, "login", tmp_path)


async def test_an_operator_bulk_rejects_a_runs_proposals(
    browser: Browser, live: LiveServer, model_server: ModelServer, tmp_path: Path
) -> None:
    users = ["ada", "bo", "cy"]
    async with api(live) as client:
        task = {**NIGHTLY, "user_ids": users, "batch_size": 1}
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        edit = call("edit_memory_block", label="notes", append="a guess", reason="unsure")
        model_server.responder = scripted(*[edit, text("done")] * len(users))
        run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
        assert run["counts"] == {"success": 3}, run
        other, _ = (await client.post("/users/zed/proposals", json=_append("keep"))).json(), None

        page = await browser.new_page()
        await log_in(page, live, API_TOKEN, f"/console?run_id={run['id']}")
        await expect(page.locator(".proposal")).to_have_count(3)
        await page.click("[data-action=reject-run]")
        await expect(page.locator(".empty")).to_have_text("Nothing waits for review.")
        made = (await client.get(f"/proposals?run_id={run['id']}")).json()
        assert sorted((p["user_id"], p["status"], p["decided_by"]) for p in made) == [
            (user, "rejected", "api") for user in users
        ]
        assert (await client.get(f"/proposals/{other['id']}")).json()["status"] == "pending"

        await page.goto(live.url + "/console/tasks")
        await expect(page.locator("[data-action=run]")).to_have_count(1)
        await page.uncheck("tr[data-task=nightly] [data-action=enable]")
        await expect(page.locator("tr[data-task=nightly] .switch")).to_have_text("off")
        assert (await client.get("/background/tasks/nightly")).json()["enabled"] is False
        await shot(page, "tasks", tmp_path)
        await page.goto(live.url + "/console/runs")
        await shot(page, "runs", tmp_path)


def _append(text: str) -> dict[str, str]:
    return {"label": "notes", "append": text, "reason": "r"}


async def test_who_may_do_what(tmp_path: Path) -> None:
    """Over HTTP: the reviewer token reads, approves and rejects, nothing else; a session
    cookie needs its CSRF header to change anything; another site's request is refused."""
    async with harness_for(console_settings(tmp_path)) as harness:
        client = harness.client
        full = {"Authorization": f"Bearer {API_TOKEN}"}
        reviewer = {"Authorization": f"Bearer {REVIEWER_TOKEN}"}
        made = await client.post("/users/u1/proposals", json=_append("x"), headers=full)
        proposal = made.json()["id"]
        assert (await client.get("/proposals", headers=reviewer)).status_code == 200
        denied = await client.put(
            "/users/u1/blocks/notes", json={"title": "t", "body": "b"}, headers=reviewer
        )
        assert denied.status_code == 403
        assert "only read, approve and reject" in denied.json()["detail"]
        assert (await client.get("/console")).status_code == 303  # to the login
        # the server's own address opens the console, with a token configured too
        root = await client.get("/")
        assert (root.status_code, root.headers["location"]) == (307, "/console")

        login = await client.post(
            "/console/login",
            content=f"token={REVIEWER_TOKEN}&next=/console",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert login.status_code == 303
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie, cookie
        assert "SameSite=strict" in cookie, cookie
        session = login.cookies[COOKIE]
        client.cookies.set(COOKIE, session)
        page = await client.get("/console")
        assert page.status_code == 200
        csrf = page.text.split('name="ralph-csrf" content="', 1)[1].split('"', 1)[0]
        assert len(csrf) == 64
        without = await client.post(f"/proposals/{proposal}/approve", json={})
        assert without.status_code == 403
        assert "X-Ralph-CSRF" in without.json()["detail"]
        cross = await client.post(
            f"/proposals/{proposal}/approve",
            json={},
            headers={"X-Ralph-CSRF": csrf, "Origin": "https://evil.example"},
        )
        assert (cross.status_code, cross.json()["detail"]) == (403, "cross-site request refused")
        approved = await client.post(
            f"/proposals/{proposal}/approve", json={}, headers={"X-Ralph-CSRF": csrf}
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["decided_by"] == "reviewer"  # not "api": who decided is kept
        # the reviewer's session may not run tasks either
        task = await client.post("/background/tasks/x/run", headers={"X-Ralph-CSRF": csrf})
        assert task.status_code == 403
        client.cookies.set(COOKIE, session[:-1] + ("0" if session[-1] != "0" else "1"))
        assert (await client.get("/proposals")).status_code == 401

    # without a token (loopback only) the console opens directly
    open_settings = console_settings(tmp_path, api_token=None, reviewer_token=None)
    async with harness_for(open_settings) as harness:
        assert (await harness.client.get("/console")).status_code == 200
        assert (await harness.client.get("/console/login")).status_code == 303


async def test_named_reviewers_are_recorded_by_name(tmp_path: Path) -> None:
    """RALPH_REVIEWERS: each reviewer's token (or console session) has the reviewer's rights,
    and their decisions name them."""
    settings = console_settings(
        tmp_path,
        reviewers={
            "alice": SecretStr("alices-token-123456"),
            "bob": SecretStr("bobs-token-654321"),
        },
    )
    async with harness_for(settings) as harness:
        client = harness.client
        full = {"Authorization": f"Bearer {API_TOKEN}"}
        made = [
            (await client.post("/users/u1/proposals", json=_append(t), headers=full)).json()["id"]
            for t in ("x", "y")
        ]
        alice = {"Authorization": "Bearer alices-token-123456"}
        approved = await client.post(f"/proposals/{made[0]}/approve", json={}, headers=alice)
        assert approved.json()["decided_by"] == "reviewer:alice", approved.text
        denied = await client.put(
            "/users/u1/blocks/notes", json={"title": "t", "body": "b"}, headers=alice
        )
        assert denied.status_code == 403

        login = await client.post(
            "/console/login",
            content="token=bobs-token-654321&next=/console",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        client.cookies.set(COOKIE, login.cookies[COOKIE])
        page = (await client.get("/console")).text
        assert "reviewer:bob" in page
        csrf = page.split('name="ralph-csrf" content="', 1)[1].split('"', 1)[0]
        rejected = await client.post(
            f"/proposals/{made[1]}/reject", json={}, headers={"X-Ralph-CSRF": csrf}
        )
        assert rejected.json()["decided_by"] == "reviewer:bob", rejected.text
        task = await client.post("/background/tasks/x/run", headers={"X-Ralph-CSRF": csrf})
        assert task.status_code == 403


async def test_the_public_origin_is_not_another_site(tmp_path: Path) -> None:
    """Behind a proxy that rewrites Host, the page's Origin is RALPH_PUBLIC_URL's: accepted;
    any other site still is not."""
    settings = console_settings(tmp_path, public_url="https://ralph.example")
    async with harness_for(settings) as harness:
        client = harness.client
        full = {"Authorization": f"Bearer {API_TOKEN}"}
        body = {"title": "t", "body": "b"}
        ours = {**full, "Origin": "https://ralph.example", "Sec-Fetch-Site": "same-origin"}
        assert (await client.put("/users/u1/blocks/a", json=body, headers=ours)).status_code == 200
        theirs = {**full, "Origin": "https://ralph.example.evil.test"}
        refused = await client.put("/users/u1/blocks/a", json=body, headers=theirs)
        assert refused.status_code == 403


async def test_wrong_tokens_are_slowed_down_per_client(tmp_path: Path) -> None:
    """Ten wrong tokens in a minute, then 429 with Retry-After, even for the right token (a
    client tried 386 a second at the login and 1,093 as bearer tokens); the login form too."""
    async with harness_for(console_settings(tmp_path)) as harness:
        client = harness.client
        for _ in range(10):
            wrong = await client.get("/proposals", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        refused = await client.get("/proposals", headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        login = await client.post(
            "/console/login",
            content=f"token={API_TOKEN}&next=/console",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert login.status_code == 429
        assert "Too many wrong tokens" in login.text


async def test_an_https_origin_is_another_site_of_an_http_server(tmp_path: Path) -> None:
    """The scheme is part of an origin: https://host:port is not this http://host:port."""
    async with harness_for(console_settings(tmp_path)) as harness:
        client = harness.client
        full = {"Authorization": f"Bearer {API_TOKEN}"}
        body = {"title": "t", "body": "b"}
        for origin, status in (("https://ralph.test", 403), ("http://ralph.test", 200)):
            answer = await client.put(
                "/users/u1/blocks/a", json=body, headers={**full, "Origin": origin}
            )
            assert answer.status_code == status, (origin, answer.text)


async def test_direction_controls_are_shown_in_the_console(tmp_path: Path) -> None:
    """U+202E in a proposal's text reversed what a reviewer saw; it is shown as a mark."""
    async with harness_for(console_settings(tmp_path)) as harness:
        client = harness.client
        full = {"Authorization": f"Bearer {API_TOKEN}"}
        made = await client.post(
            "/users/u1/proposals", json=_append("pay \u202eevil"), headers=full
        )
        assert made.status_code == 201, made.text
        page = await client.get("/console", headers=full)
        assert page.status_code == 200
        assert "\u202e" not in page.text
        assert "[U+202E]" in page.text


async def test_logging_out_revokes_the_session(tmp_path: Path) -> None:
    """A copy of the cookie kept after logging out no longer works (it did for 12 hours)."""
    async with harness_for(console_settings(tmp_path)) as harness:
        client = harness.client
        login = await client.post(
            "/console/login",
            content=f"token={REVIEWER_TOKEN}&next=/console",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        session = login.cookies[COOKIE]
        client.cookies.set(COOKIE, session)
        page = await client.get("/console")
        assert page.status_code == 200
        csrf = page.text.split('name="ralph-csrf" content="', 1)[1].split('"', 1)[0]
        out = await client.post("/console/logout", headers={"X-Ralph-CSRF": csrf})
        assert out.status_code == 303
        client.cookies.set(COOKIE, session)  # the copy
        assert (await client.get("/proposals")).status_code == 401
        assert (await client.get("/console")).status_code == 303  # to the login


async def test_an_operator_retries_a_runs_failed_users(
    browser: Browser, live: LiveServer, model_server: ModelServer, tmp_path: Path
) -> None:
    """A run whose users failed: its page and its review show them, one click runs them again
    in a new run, and a user's page shows each attempt."""
    async with api(live) as client:
        task = {**NIGHTLY, "user_ids": ["ada", "bo"], "retry": {"max_attempts": 1}}
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        model_server.responder = scripted(Fail(500, "provider down"))
        run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
        assert run["counts"] == {"failed": 2}, run

        page = await browser.new_page()
        await log_in(page, live, API_TOKEN, f"/console?run_id={run['id']}")
        await expect(page.locator(".failures")).to_contain_text("2 users of this run failed")
        await expect(page.locator(".failures")).to_contain_text("ada (provider_error)")
        await page.goto(f"{live.url}/console/runs/{run['id']}")
        model_server.responder = scripted(text("done"))
        await page.click("[data-action=retry-run]")
        await expect(page.locator("h1")).not_to_contain_text(run["id"][:8])
        await expect(page.locator(".facts")).to_contain_text(f"retry of run {run['id'][:8]}")
        retry_id = page.url.rsplit("/", 1)[1]
        retried = (await client.get(f"/background/runs/{retry_id}")).json()
        assert (retried["trigger_type"], retried["retry_of"]) == ("retry", run["id"])
        await page.reload()
        await expect(page.locator("td.status.success")).to_have_count(2)
        await shot(page, "run", tmp_path)

        await page.goto(f"{live.url}/console/runs/{run['id']}/users/ada")
        await expect(page.locator("details.attempt")).to_have_count(1)
        await expect(page.locator("details.attempt .error")).to_contain_text("provider down")


async def test_a_reviewer_edits_a_proposal_then_approves_it(
    browser: Browser, live: LiveServer, tmp_path: Path
) -> None:
    async with api(live) as client:
        put = await client.put("/users/eve/blocks/notes", json={"body": "likes art"})
        assert put.status_code == 200, put.text
        proposed = (await client.post("/users/eve/proposals", json=_append("likes chess"))).json()

        page = await browser.new_page()
        await log_in(page, live, API_TOKEN)
        await expect(page.locator(".proposal")).to_have_count(1)
        await page.keyboard.press("j")
        await page.keyboard.press("e")
        area = page.locator(".proposal .edit")
        await expect(area).to_be_focused()
        await expect(area).to_have_value("likes chess")
        await area.fill("plays chess on Sundays")
        await shot(page, "edit", tmp_path)
        await page.keyboard.press("Enter")
        await expect(page.locator(".empty")).to_have_text("Nothing waits for review.")

        block = (await client.get("/users/eve/blocks/notes")).json()
        assert block["body"] == "likes art\nplays chess on Sundays"
        decided = (await client.get(f"/proposals/{proposed['id']}")).json()
        assert (decided["status"], decided["edited"]) == ("approved", True)
        assert (decided["new_text"], decided["applied_text"]) == (
            "likes chess",
            "plays chess on Sundays",
        )


async def test_a_tasks_charts_render_in_a_browser(
    browser: Browser, live: LiveServer, model_server: ModelServer, tmp_path: Path
) -> None:
    users = ["ada", "bo", "cy", "di"]
    async with api(live) as client:
        task = {**NIGHTLY, "user_ids": users, "batch_size": 4}
        assert (await client.post("/background/tasks", json=task)).status_code == 201
        edit = call("edit_memory_block", label="notes", append="likes chess", reason="said so")
        model_server.responder = scripted(*[edit, text("done")] * len(users))
        run = (await client.post("/background/tasks/nightly/run?wait=true")).json()
        made = (await client.get(f"/proposals?run_id={run['id']}")).json()
        decide = ["approve", "approve", "reject"]
        for proposal, verb in zip(made, decide, strict=False):
            assert (await client.post(f"/proposals/{proposal['id']}/{verb}")).status_code == 200

        page = await browser.new_page()
        await log_in(page, live, API_TOKEN, "/console/tasks")
        await expect(page.locator("tr[data-task=nightly] td.rate")).to_contain_text("67%")
        await page.click("tr[data-task=nightly] a[href='/console/tasks/nightly']")
        charts = page.locator("svg.chart")
        await expect(charts).to_have_count(2)
        await expect(charts.first).to_be_visible()
        box = await charts.first.bounding_box()
        assert box is not None
        assert box["width"] > 300
        assert await page.locator("svg.chart rect").count() >= 3  # outcomes and tokens
        await shot(page, "task", tmp_path)
