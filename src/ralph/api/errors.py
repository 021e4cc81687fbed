"""One place that turns exceptions into JSON error responses."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ralph.conversations.honcho import HistoryUnavailable
from ralph.errors import Conflict, InvalidInput, NotFound

log = structlog.get_logger(__name__)


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every 4xx answer: `detail` says what is wrong in words. A 422 for a malformed request
    also lists each problem in `errors`; a 409 may add the state it conflicted with."""

    model_config = ConfigDict(extra="allow")
    detail: str
    errors: list[ErrorItem] | None = Field(default=None)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in {
        400: "The body could not be read (not JSON text in UTF-8)",
        401: "Missing or wrong bearer token",
        404: "Not found",
        409: "Conflicts with the current state",
        413: "Request body too large",
        422: "Invalid request",
        429: "Too many wrong tokens from this client (see Retry-After)",
    }.items()
}


def _readable(errors: list[dict[str, Any]]) -> str:
    parts: list[str] = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        message = str(error.get("msg", "invalid"))
        parts.append(f"{location}: {message}")
    return "; ".join(parts)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods some route serves at the request's path."""
    app: FastAPI = request.app
    scope = {**request.scope, "root_path": ""}
    return [
        method
        for method in _METHODS
        if any(r.matches({**scope, "method": method})[0] is Match.FULL for r in app.router.routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {k: v for k, v in dict(e).items() if k in ("loc", "msg", "type")} for e in exc.errors()
        ]
        return JSONResponse(
            status_code=422, content={"detail": _readable(errors), "errors": errors}
        )

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(Conflict)
    async def _conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), **exc.details})

    @app.exception_handler(HistoryUnavailable)
    async def _history(_: Request, exc: HistoryUnavailable) -> JSONResponse:
        detail = f"conversation history is unavailable ({exc})"
        return JSONResponse(status_code=503, content={"detail": detail})

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; one path
            # (GET and POST /background/tasks) is served by several routes
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return JSONResponse(
            status_code=exc.status_code, content={"detail": exc.detail}, headers=headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled_error", path=request.url.path)
        return JSONResponse(status_code=500, content={"detail": "internal server error"})
