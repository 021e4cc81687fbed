"""FastAPI dependencies as `Annotated` aliases: routers reach app state only through these."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ralph.services import Services

_bearer = HTTPBearer(auto_error=False, description="RALPH_API_TOKEN, when one is set")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require_token(
    services: ServicesDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Require `Authorization: Bearer <RALPH_API_TOKEN>` when a token is configured."""
    token = services.settings.api_token
    if token is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(supplied.encode(), token.get_secret_value().encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
