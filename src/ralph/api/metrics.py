"""`/metrics`: Prometheus' text format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ralph.api.deps import ServicesDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Runs, users, tokens, proposals and scheduler figures for Prometheus (README: metrics).
    Needs the token unless RALPH_METRICS_PUBLIC=true."""
    return Response(await services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
