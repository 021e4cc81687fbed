"""Schemathesis over the OpenAPI document, against the server on a real port: every
operation, with the token, positive and negative data, must answer no 5xx and exactly what the
document describes; without the token, every route but /health answers 401.

Bounded: `RALPH_FUZZ_EXAMPLES` cases per operation and phase (default 20), a fixed seed
(`RALPH_FUZZ_SEED` picks another); the README gives the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from ralph.config import Settings
from tests.helpers import LiveServer

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = os.environ.get("RALPH_FUZZ_EXAMPLES", "20")
SEED = os.environ.get("RALPH_FUZZ_SEED", "20261127")
# What the document promises. Left out: `positive_data_acceptance` (the API checks more than a
# JSON schema can say: a cron expression's fields, a time at most 5 minutes ahead, one of
# `body` or `old_text`) and the stateful checks (the runs of a deleted task stay readable).
CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "ignored_auth",
        "unsupported_method",
    )
)


@pytest.fixture
def live(settings: Settings) -> Iterator[LiveServer]:
    # the wait is bounded so that a generated `?wait=true` cannot hold a case for minutes
    token_settings = settings.model_copy(
        # schemathesis sends wrong tokens on purpose (ignored_auth): no per-client throttle
        update={
            "api_token": SecretStr(TOKEN),
            "wait_max_seconds": 2.0,
            "auth_failures_per_minute": 0,
        }
    )
    with LiveServer(token_settings) as server:
        yield server


@pytest.mark.slow
def test_every_operation_conforms(live: LiveServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{live.url}/openapi.json",
            "--header",
            f"Authorization: {AUTH['Authorization']}",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            EXAMPLES,
            "--seed",
            SEED,
            # one worker: CPython 3.11 can fail parsing source in two threads at once
            # ("AST constructor recursion depth mismatch"), which schemathesis does
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        cwd=tmp_path,
    )
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    # every operation of the document was tested
    document = httpx.get(f"{live.url}/openapi.json", headers=AUTH).json()
    operations = sum(len(methods) for methods in document["paths"].values())
    assert re.search(rf"Tested: {operations}\b", result.stdout), summary


def test_every_route_but_health_needs_the_token(live: LiveServer) -> None:
    document = httpx.get(f"{live.url}/openapi.json", headers=AUTH).json()
    checked = 0
    for path, operations in document["paths"].items():
        url = live.url + re.sub(r"\{[^}]+\}", "x", path)
        for method in operations:
            answer = httpx.request(method.upper(), url, json={})
            expected = 200 if path == "/health" else 401
            assert answer.status_code == expected, (method, path, answer.text)
            if expected == 401:
                assert answer.json() == {"detail": "missing or wrong bearer token"}
            checked += 1
    assert checked == sum(len(ops) for ops in document["paths"].values()) > 30
    for public in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(live.url + public).status_code == 401
