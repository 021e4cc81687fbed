"""FastAPI dependencies as `Annotated` aliases: routers reach app state only through these.

They are `async def`: FastAPI runs a plain `def` dependency in its thread pool, two thread
hops per request for work that never blocks (they made a one-row read 1.5x slower)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ralph.composition import Services
from ralph.console.sessions import FULL, is_reviewer

_bearer = HTTPBearer(auto_error=False, description="RALPH_API_TOKEN, when one is set")


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Declares the bearer token in the OpenAPI document; `TokenMiddleware` checks it, before
    routing, so that no route can be reached without it."""


def request_role(request: Request) -> str:
    """What the request's credential may do (`AccessMiddleware` put it there): FULL, REVIEWER
    or a named reviewer's `reviewer:<name>`; FULL without a token configured."""
    role: str = request.scope.get("state", {}).get("role", FULL)
    return role


async def decider(request: Request) -> str:
    """Who a decision is recorded as made by (`decided_by`): "reviewer" for the reviewer token,
    "reviewer:<name>" for a named reviewer's (or their console sessions), "api" for the API
    token or an open API."""
    role = request_role(request)
    return role if is_reviewer(role) else "api"


DeciderDep = Annotated[str, Depends(decider)]
