"""Delivering the outbox's events to `RALPH_WEBHOOK_URL`: at least once, oldest first, with
backoff, never in a run's way (a run only writes a row).

Each replica's sender claims an event before posting it (its `next_attempt_at` moved a lease
ahead, conditionally on the value it read), so two replicas do not post one event at once; a
sender that dies mid-post leaves the event to be claimed again when the lease ends. A
receiver therefore sees an event twice only after such a crash or a lost response, always
under the same id: deduplicate on `X-Ralph-Event-Id`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import datetime, timedelta

import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from ralph import __version__
from ralph.aio import cancel_and_wait
from ralph.clock import Clock, sleep_until_or
from ralph.webhooks.store import OutboxStore

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Ralph-Signature"
# an event undelivered for this long ends `failed` (kept, with its last error)
GIVE_UP_AFTER = timedelta(days=3)
# delivered events are deleted after this long
KEEP_DELIVERED = timedelta(days=7)
FORGET_EVERY = timedelta(hours=1)
MAX_BACKOFF_SECONDS = 600.0
BATCH = 100


def signature(secret: str, body: bytes) -> str:
    """The `X-Ralph-Signature` value of `body`: "sha256=" + hex HMAC-SHA256 under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_seconds(attempts: int, base: float) -> float:
    """The wait after the `attempts`-th failed attempt: base, 2 base, 4 base ... up to 10 min."""
    return min(base * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)


class WebhookSender:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        url: str,
        *,
        secret: str | None = None,
        retry_base_seconds: float = 2.0,
        poll_seconds: float = 5.0,
        timeout_seconds: float = 10.0,
    ) -> None:
        self._store = OutboxStore(engine)
        self._clock = clock
        self._url = url
        self._secret = secret
        self._retry_base = retry_base_seconds
        self._poll = poll_seconds
        self._forgot_at: datetime | None = None  # when delivered events were last deleted
        # a claim outlives the slowest post: nobody else posts the event meanwhile
        self._lease = timedelta(seconds=timeout_seconds * 3)
        self._client = httpx.AsyncClient(timeout=timeout_seconds)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="webhook-sender")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.deliver_due()
                due = await self.next_due()
            except Exception:  # the database away: try again at the next poll
                log.exception("webhook_pass_failed")
                due = None
            now = self._clock.now()
            until = now + timedelta(seconds=self._poll)
            if due is not None:
                until = min(until, max(due, now))
            await sleep_until_or(self._clock, until, self._wake)

    async def next_due(self) -> datetime | None:
        return await self._store.next_due()

    async def deliver_due(self) -> int:
        """Post every event due now, oldest first; returns how many were delivered."""
        now = self._clock.now()
        delivered = 0
        for event in await self._store.due(now, BATCH):
            if not await self._store.claim(event.id, event.next_attempt_at, now + self._lease):
                continue  # another replica has it
            attempt = event.attempts + 1
            error = await self._post(event.id, event.event_type, event.body, attempt)
            done = self._clock.now()
            if error is None:
                await self._store.delivered(event.id, attempt, done)
                log.info("webhook_delivered", event_id=event.id, attempt=attempt)
                delivered += 1
                continue
            log.warning("webhook_failed", event_id=event.id, attempt=attempt, error=error)
            retry_at = done + timedelta(seconds=backoff_seconds(attempt, self._retry_base))
            give_up = done - event.created_at >= GIVE_UP_AFTER
            await self._store.failed(event.id, attempt, error, retry_at, give_up)
        # a write, so not every pass: delivered events are kept 7 days, give or take an hour
        if self._forgot_at is None or now - self._forgot_at >= FORGET_EVERY:
            await self._store.forget_delivered(now - KEEP_DELIVERED)
            self._forgot_at = now
        return delivered

    async def _post(self, event_id: str, event_type: str, body: str, attempt: int) -> str | None:
        """Post one event: None when the receiver took it (2xx), else what went wrong."""
        content = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"Ralph/{__version__}",
            "X-Ralph-Event": event_type,
            "X-Ralph-Event-Id": event_id,
            "X-Ralph-Delivery-Attempt": str(attempt),
        }
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, content)
        try:
            response = await self._client.post(self._url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"
