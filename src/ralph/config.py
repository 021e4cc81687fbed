"""Settings: one object, read from `RALPH_*` environment variables and an optional `.env` file."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ralph.db.dialects import URL_SCHEMES

ModelProvider = Literal["dev", "openai", "openrouter", "local"]
ENV_PREFIX = "RALPH_"


WorkerMode = Literal["subprocess", "inprocess", "arq"]


_REVIEWER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Settings(BaseSettings):
    """Everything that varies between deployments. Field `x` is read from `RALPH_X`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # Storage
    data_dir: Path = Path("./data")
    # a TOML file of tasks applied at start (created, updated, unchanged; none deleted)
    tasks_file: Path | None = None
    database_url: str | None = None

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8200, ge=1, le=65535)
    api_token: SecretStr | None = None
    # may read, approve and reject (the console's reviewers), nothing else
    reviewer_token: SecretStr | None = None
    # reviewers by name, "name:token,name:token": each may what the reviewer token may, and
    # their decisions are recorded as made by `reviewer:<name>`
    reviewers: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict[str, SecretStr]
    )
    # with a token: whether /docs, /redoc and /openapi.json answer without it
    api_docs_public: bool = False
    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = None  # None: JSON when stderr is not a TTY

    # Model (see the agent runtime)
    model_provider: ModelProvider | None = None
    model_id: str | None = None
    model_base_url: str | None = None
    model_api_key: SecretStr | None = None
    model_timeout_seconds: float = Field(default=120.0, gt=0)
    model_max_retries: int = Field(default=3, ge=0, le=10)
    # a provider asking to wait longer than this (Retry-After) fails the call: "rate limited"
    model_max_retry_after_seconds: float = Field(default=60.0, ge=0)
    # Connections to the provider open at once; agents beyond it wait for a free one.
    model_max_connections: int = Field(default=1000, ge=1)
    # One limit for every model call of the process (of every process, in worker mode)
    model_requests_per_minute: int | None = Field(default=None, ge=1)
    model_tokens_per_minute: int | None = Field(default=None, ge=1)
    # sent as `max_tokens` with every call
    model_max_output_tokens: int | None = Field(default=None, ge=1)
    # sent as `temperature` with every call; None: the provider's default
    model_temperature: float | None = Field(default=None, ge=0, le=2)
    # the `local` provider: a GGUF file served by llama.cpp's server in a child process
    model_path: Path | None = None
    # a Jinja chat template that replaces the GGUF's own (see README: local models)
    model_chat_template: Path | None = None
    model_threads: int | None = Field(default=None, ge=1, le=1024)  # None: every core
    model_context_size: int = Field(default=8192, ge=512, le=1_048_576)
    # requests the local server decodes at once (each gets context_size / parallel tokens)
    model_parallel: int = Field(default=2, ge=1, le=64)

    # Agents
    allow_shell_tools: bool = False
    agent_transcript_max_chars: int = Field(default=200_000, ge=1000)
    chat_max_turns: int = Field(default=8, ge=1, le=100)

    # Memory
    memory_max_body_bytes: int = Field(default=64 * 1024, ge=1)
    # /metrics without the token (a scraper on a private network)
    metrics_public: bool = False
    # pending proposals older than this end `expired` (None: they wait for a person forever)
    proposal_ttl_days: float | None = Field(default=None, gt=0, le=3650)
    # an agent of a task is shown the changes reviewers rejected of its proposals for the user
    # in this many days (and may not propose one of them again); 0: none
    rejections_remembered_days: float = Field(default=30, ge=0, le=3650)
    # `ralph worker` serves its own /metrics (its agents' figures) on this port, at RALPH_HOST
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # "dolt": every change that lands in a memory block is also a Dolt commit (doltlite on
    # SQLite, preloaded by `ralph` itself; or a Dolt sql-server as the MySQL database)
    memory_versioning: Literal["none", "dolt"] = "none"
    # "honcho": messages live in Honcho (RALPH_HONCHO_URL); "ralph": in Ralph's own table
    messages_backend: Literal["ralph", "honcho"] = "ralph"
    honcho_url: str | None = None
    honcho_workspace: str = Field(default="ralph", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    honcho_api_key: SecretStr | None = None
    # a Honcho call slower than this counts as Honcho being unavailable
    honcho_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # the peer that speaks for Ralph's assistant in every user's session
    honcho_assistant_peer: str = Field(default="ralph_assistant", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    # how often a server sends Honcho the messages it kept while Honcho was away
    honcho_sync_seconds: float = Field(default=15.0, gt=0)
    # Webhooks: events POSTed here (run.finished, proposals.pending, proposal.decided)
    webhook_url: str | None = None
    # signs each body: X-Ralph-Signature: sha256=<hex HMAC-SHA256>
    webhook_secret: SecretStr | None = None
    # the first retry's wait; each next one doubles, up to 10 minutes
    webhook_retry_seconds: float = Field(default=2.0, gt=0, le=600)
    # how often a server looks for events other processes recorded (the CLI, other replicas)
    webhook_poll_seconds: float = Field(default=5.0, gt=0)
    # where people reach this server (links in webhooks); None: links are relative paths
    public_url: str | None = None
    # a connection whose request headers have not all arrived this long after it opened (or
    # after its last response) is closed: a client sending half a request holds nothing long
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    # connections open at once; more are closed as they come. None: the process's file
    # descriptor limit less 128 (the database, the agent process, logs), at most 10,000
    http_max_connections: int | None = Field(default=None, ge=1, le=1_000_000)
    # wrong tokens one client may send in a moving minute before it is refused (429) until
    # the oldest is a minute old; 0: no limit
    auth_failures_per_minute: int = Field(default=10, ge=0, le=100_000)

    # Background
    scheduler_enabled: bool = True
    idle_check_seconds: float = Field(default=30.0, gt=0)
    run_lease_seconds: float = Field(default=60.0, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # reruns in a row of users a crash or shutdown interrupted (bounds a crash loop)
    rerun_interrupted_users: int = Field(default=3, ge=0, le=100)
    wait_max_seconds: float = Field(default=600.0, gt=0)

    # Where a server's background agents run: "subprocess" in one child process of the server
    # (its requests never wait behind agents), "inprocess" in the server's own event loop,
    # "arq" in `ralph worker` processes fed through Redis.
    worker_mode: WorkerMode = "subprocess"
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = Field(default="ralph", min_length=1, max_length=100)
    worker_max_jobs: int = Field(default=100, ge=1, le=10_000)
    worker_cancel_poll_seconds: float = Field(default=2.0, gt=0)
    # a worker refreshes each running unit's liveness key this often; the server fails a unit
    # whose key has been gone for three times as long ("worker lost")
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)

    @field_validator("api_token", "reviewer_token", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: object) -> object:
        # `RALPH_API_TOKEN=` (or spaces) in a deployment file must not open the API.
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("reviewers", mode="before")
    @classmethod
    def _named_reviewers(cls, value: object) -> object:
        """Read RALPH_REVIEWERS' "name:token,name:token" (an error never repeats a token)."""
        if not isinstance(value, str):
            return value
        named: dict[str, str] = {}
        for number, item in enumerate((i.strip() for i in value.split(",")), start=1):
            if not item:
                continue
            name, colon, token = (part.strip() for part in item.partition(":"))
            if not colon or not token or not _REVIEWER_NAME.fullmatch(name):
                raise ValueError(
                    f"entry {number}: expected name:token, the name of 1-64 letters, digits, "
                    "'_' or '-'"
                )
            if name in named:
                raise ValueError(f"reviewer '{name}' is named twice")
            named[name] = token
        return named

    @model_validator(mode="after")
    def _reviewer_needs_api_token(self) -> Settings:
        for name, given in (
            ("RALPH_REVIEWER_TOKEN", self.reviewer_token is not None),
            ("RALPH_REVIEWERS", bool(self.reviewers)),
        ):
            if given and self.api_token is None:
                raise ValueError(
                    f"{name} needs RALPH_API_TOKEN (without it the API is open to all)"
                )
        tokens = [t.get_secret_value() for t in (self.api_token, self.reviewer_token) if t]
        tokens += [t.get_secret_value() for t in self.reviewers.values()]
        if len(set(tokens)) < len(tokens):
            raise ValueError(
                "RALPH_API_TOKEN, RALPH_REVIEWER_TOKEN and each of RALPH_REVIEWERS need tokens "
                "of their own (one token would be two people)"
            )
        return self

    @model_validator(mode="after")
    def _honcho_needs_its_url(self) -> Settings:
        if self.messages_backend == "honcho" and self.honcho_url is None:
            raise ValueError("RALPH_MESSAGES_BACKEND=honcho needs RALPH_HONCHO_URL")
        return self

    @field_validator("webhook_url", "public_url", "honcho_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(URL_SCHEMES):
            raise ValueError(
                f"must start with {', '.join(URL_SCHEMES)} (got {value.split('://', 1)[0]}://...)"
            )
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or a SQLite file inside the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'ralph.db').resolve()}"


class SettingsError(ValueError):
    """Settings could not be loaded; the message names the offending variable."""


MIN_PUBLIC_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serve_settings(settings: Settings) -> None:
    """Refuse to serve beyond this machine without a token that is hard to guess.

    Raises SettingsError with one line naming the variable.
    """
    if is_loopback(settings.host):
        return
    if settings.reviewer_token is not None and (
        len(settings.reviewer_token.get_secret_value()) < MIN_PUBLIC_TOKEN_CHARS
    ):
        raise SettingsError(
            f"RALPH_REVIEWER_TOKEN: must be at least {MIN_PUBLIC_TOKEN_CHARS} characters to "
            f"listen on {settings.host}"
        )
    for name, token in settings.reviewers.items():
        if len(token.get_secret_value()) < MIN_PUBLIC_TOKEN_CHARS:
            raise SettingsError(
                f"RALPH_REVIEWERS: {name}'s token must be at least {MIN_PUBLIC_TOKEN_CHARS} "
                f"characters to listen on {settings.host}"
            )
    if settings.api_token is None:
        raise SettingsError(
            f"RALPH_API_TOKEN: refusing to listen on {settings.host} without a token; "
            "set one or bind to 127.0.0.1"
        )
    if len(settings.api_token.get_secret_value()) < MIN_PUBLIC_TOKEN_CHARS:
        raise SettingsError(
            f"RALPH_API_TOKEN: must be at least {MIN_PUBLIC_TOKEN_CHARS} characters to listen "
            f"on {settings.host}"
        )


def describe_validation_error(error: ValidationError) -> str:
    """One readable line per invalid field, naming the environment variable."""
    lines: list[str] = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        lines.append(f"{ENV_PREFIX}{field.upper()}: {item['msg']}")
    return "; ".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Load settings from the environment; raise SettingsError with a one-line message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None


def max_connections(settings: Settings) -> int:
    """`settings.http_max_connections`, or one that the process's descriptors allow."""
    if settings.http_max_connections is not None:
        return settings.http_max_connections
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, min(10_000, soft - 128))
