"""`GET /health`: is the database reachable, and which schema version is it at."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ralph import __version__
from ralph.api.deps import ServicesDep

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str
    version: str
    database: str
    schema_version: str | None
    schema_head: str


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(services: ServicesDep) -> JSONResponse:
    """200 when the database answers and its schema is current; 503 otherwise."""
    database, current, head = await services.schema_status()
    ok = database == "ok" and current == head
    body = Health(
        status="ok" if ok else "degraded",
        version=__version__,
        database=database,
        schema_version=current,
        schema_head=head,
    )
    return JSONResponse(status_code=200 if ok else 503, content=body.model_dump())
