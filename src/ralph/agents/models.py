"""Build Agno models from settings: `openrouter`, `openai` (any compatible server), `local` (a
GGUF served by llama.cpp's server, started by `ralph.agents.local`) or `dev`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx
import structlog
from agno.models.base import Model

from ralph.agents.dev_model import DEV_MODEL_ID, dev_http_client
from ralph.agents.direct import DirectOpenAI, DirectOpenRouter
from ralph.agents.ratelimit import ModelRateLimiter, RateLimit
from ralph.agents.transport import AiohttpTransport, HttpxTransport, Transport
from ralph.config import Settings, SettingsError

log = structlog.get_logger(__name__)

DEFAULT_OPENROUTER_MODEL = "openai/gpt-4o-mini"


def check_model_settings(settings: Settings) -> None:
    """Raise SettingsError (naming the variable) if the chosen provider lacks what it needs."""
    provider = settings.model_provider or "dev"
    if provider == "local" and not settings.model_base_url:
        from ralph.agents.local import check_local_settings

        check_local_settings(settings)
    if provider == "openai":
        if not settings.model_base_url:
            raise SettingsError("RALPH_MODEL_BASE_URL: required when RALPH_MODEL_PROVIDER=openai")
        if not settings.model_id:
            raise SettingsError("RALPH_MODEL_ID: required when RALPH_MODEL_PROVIDER=openai")
    if provider == "openrouter" and not (
        settings.model_api_key or os.environ.get("OPENROUTER_API_KEY")
    ):
        raise SettingsError(
            "RALPH_MODEL_API_KEY: required when RALPH_MODEL_PROVIDER=openrouter "
            "(or set OPENROUTER_API_KEY)"
        )


class ModelFactory:
    """Makes a fresh Agno model per agent run; the models share the factory's connections.

    Provider failures (timeouts, 429, 5xx, dropped connections) are retried with exponential
    backoff, `RALPH_MODEL_MAX_RETRIES` times, honouring Retry-After (by `DirectOpenAI` on its
    aiohttp pool, or by the OpenAI client on the SDK path); a malformed reply is retried once
    by Agno.
    """

    def __init__(
        self, settings: Settings, *, shared_limit: bool = False, limit: RateLimit | None = None
    ) -> None:
        """`shared_limit`: the rate limit is kept in Redis (`RALPH_REDIS_URL`, per queue), for
        every server and worker of the worker mode; otherwise it is this process's, or
        `limit` (an agent process's: its server's)."""
        check_model_settings(settings)
        self.provider = settings.model_provider or "dev"
        self._settings = settings
        # the SDK's client (streaming, structured outputs, OpenRouter)
        self._http: httpx.AsyncClient
        # DirectOpenAI's own requests
        self._transport: Transport | None = None
        self._make: Callable[[], Model]
        api_key = settings.model_api_key.get_secret_value() if settings.model_api_key else None
        self.limiter: RateLimit = limit or ModelRateLimiter(
            requests_per_minute=settings.model_requests_per_minute,
            tokens_per_minute=settings.model_tokens_per_minute,
            redis_url=settings.redis_url if shared_limit else None,
            namespace=settings.queue_name,
        )
        common: dict[str, Any] = {
            "timeout": settings.model_timeout_seconds,
            "max_retries": settings.model_max_retries,
            "max_retry_after": settings.model_max_retry_after_seconds,
            "limiter": self.limiter,
            **(
                {"max_tokens": settings.model_max_output_tokens}
                if settings.model_max_output_tokens is not None
                else {}
            ),
            **(
                {"temperature": settings.model_temperature}
                if settings.model_temperature is not None
                else {}
            ),
            # A reply the client cannot parse is not retried by it; Agno then tries once more
            # after a second. (A status error has used up the client's retries by then, so it
            # gets one last round too: bounded at 2 x (RALPH_MODEL_MAX_RETRIES + 1) requests.)
            "retries": 1 if settings.model_max_retries > 0 else 0,
            "delay_between_retries": 1,
        }
        if self.provider == "dev":
            self._http = dev_http_client()
            dev_transport = HttpxTransport(self._http)
            self.model_id = DEV_MODEL_ID
            self._make = lambda: DirectOpenAI(
                id=DEV_MODEL_ID,
                base_url="http://dev-model.invalid/v1",
                api_key="dev",
                http_client=self._http,
                transport=dev_transport,
                max_retries=0,
            )
            return
        self._http = httpx.AsyncClient(timeout=settings.model_timeout_seconds)
        self._transport = transport = AiohttpTransport(settings.model_max_connections)
        if self.provider in ("openai", "local"):
            # `local`: the URL of the server `ralph.agents.local.local_model` started
            if settings.model_base_url is None:
                raise SettingsError("the local model's server is not running (no base URL)")
            assert settings.model_id
            self.model_id = settings.model_id
            base_url = settings.model_base_url
            self._make = lambda: DirectOpenAI(
                id=self.model_id,
                base_url=base_url,
                api_key=api_key or "not-needed",
                http_client=self._http,
                transport=transport,
                **common,  # type: ignore[arg-type]
            )
        else:
            key = api_key or os.environ.get("OPENROUTER_API_KEY")
            self.model_id = settings.model_id or DEFAULT_OPENROUTER_MODEL
            base = settings.model_base_url
            extra = {"base_url": base} if base else {}
            self._make = lambda: DirectOpenRouter(
                id=self.model_id,
                api_key=key,
                http_client=self._http,
                transport=transport,
                **common,  # type: ignore[arg-type]
                **extra,  # type: ignore[arg-type]
            )

    def __call__(self) -> Model:
        return self._make()

    def warn_if_dev(self) -> None:
        if self.provider == "dev":
            log.warning(
                "dev_model_in_use",
                message=(
                    "No model provider configured: using the offline dev model, which is not "
                    "an LLM. Set RALPH_MODEL_PROVIDER=openrouter with RALPH_MODEL_API_KEY, or "
                    "RALPH_MODEL_PROVIDER=openai with RALPH_MODEL_BASE_URL and RALPH_MODEL_ID."
                ),
            )

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
        await self._http.aclose()
