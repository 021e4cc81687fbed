"""Health, authentication, error shapes and app isolation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from httpx import ASGITransport, AsyncClient

from ralph.app import create_app
from ralph.config import Settings
from ralph.db import migrate
from tests.helpers import AppHarness


async def test_health_reports_database_and_schema(client: AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["schema_version"] == migrate.head_revision()
    assert response.headers["x-request-id"]


async def test_health_logs_no_migration_lines(
    client: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A load balancer asks every few seconds: two Alembic lines each time filled the log."""
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert (await client.get("/health")).status_code == 200
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []


async def test_health_is_503_when_the_schema_is_behind(harness: AppHarness) -> None:
    engine = harness.services.engine
    await migrate.downgrade(engine, "-1")
    try:
        response = await harness.client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "degraded"
        assert body["database"] == "ok"
        assert body["schema_version"] != body["schema_head"] == migrate.head_revision()
    finally:
        await migrate.upgrade(engine)
    assert (await harness.client.get("/health")).status_code == 200


async def test_request_id_is_echoed(client: AsyncClient) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "abc123"})
    assert response.headers["x-request-id"] == "abc123"


async def test_unknown_route_is_json_404(client: AsyncClient) -> None:
    response = await client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


async def test_openapi_is_served(client: AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.json()["info"]["title"] == "Ralph"


@pytest.fixture
def token_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_token": "tok-123"})


async def test_token_required_when_configured(token_settings: Settings) -> None:
    from pydantic import SecretStr

    token_settings = token_settings.model_copy(update={"api_token": SecretStr("tok-123")})
    app = create_app(token_settings)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://ralph.test") as client,
    ):
        # health stays open for probes
        assert (await client.get("/health")).status_code == 200
        url = "/users/u1/blocks"
        missing = await client.get(url)
        assert missing.status_code == 401
        assert missing.json()["detail"] == "missing or wrong bearer token"
        wrong = await client.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = await client.get(url, headers={"Authorization": "Bearer tok-123"})
        assert right.status_code == 200


async def test_two_apps_do_not_share_state(settings: Settings, tmp_path: Path) -> None:
    other = settings.model_copy(
        update={"database_url": f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"}
    )
    first, second = create_app(settings), create_app(other)
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        assert first.state.services is not second.state.services
        assert first.state.services.engine is not second.state.services.engine
        async with (
            AsyncClient(transport=ASGITransport(app=first), base_url="http://a") as a,
            AsyncClient(transport=ASGITransport(app=second), base_url="http://b") as b,
        ):
            created = await a.put("/users/u1/blocks/student", json={"title": "S", "body": "x"})
            assert created.status_code == 200
            assert (await a.get("/users/u1/blocks/student")).status_code == 200
            assert (await b.get("/users/u1/blocks/student")).status_code == 404


async def test_malformed_json_is_422(harness: AppHarness) -> None:
    response = await harness.client.put(
        "/users/u1/blocks/student",
        content=b'{"title": "x", "body": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


async def test_wrong_types_are_422_with_readable_message(client: AsyncClient) -> None:
    response = await client.put("/users/u1/blocks/student", json={"title": 5, "body": ["x"]})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "title" in detail
    assert "body" in detail


async def test_one_megabyte_body_is_a_4xx(client: AsyncClient) -> None:
    big = "x" * 1_000_000
    response = await client.put("/users/u1/blocks/student", json={"title": "t", "body": big})
    assert 400 <= response.status_code < 500
    assert "detail" in response.json()


async def test_body_over_request_cap_is_413(client: AsyncClient) -> None:
    response = await client.post(
        "/users/u1/messages",
        content=b"x" * (3 * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]


async def test_chunked_body_over_cap_is_413(client: AsyncClient) -> None:
    async def chunks():  # no content-length: the middleware must count
        for _ in range(40):
            yield b"x" * (100 * 1024)

    response = await client.post(
        "/users/u1/messages", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_each_request_is_logged_with_its_id(client: AsyncClient) -> None:
    from structlog.contextvars import merge_contextvars
    from structlog.testing import capture_logs

    with capture_logs(processors=[merge_contextvars]) as logs:
        await client.get("/users/u1/blocks", headers={"X-Request-ID": "req-42"})
    lines = [e for e in logs if e["event"] == "request"]
    assert len(lines) == 1
    assert lines[0]["path"] == "/users/u1/blocks"
    assert lines[0]["status"] == 200
    assert lines[0]["method"] == "GET"
    assert lines[0]["ms"] >= 0
    assert lines[0]["request_id"] == "req-42"
