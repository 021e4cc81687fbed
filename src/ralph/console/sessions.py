"""Console sessions: a signed cookie that stands for a token, and its CSRF token.

A person logs in once with the API token or a reviewer's token; the console then keeps
`ralph_session` = "<role>.<issued>.<signature>", an HMAC-SHA256 under a key derived from that
role's token (so changing the token ends its sessions), HttpOnly and SameSite=Strict. A
request that changes something with that cookie must also carry `X-Ralph-CSRF`, an HMAC of
the session that only pages of this origin can read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

COOKIE = "ralph_session"
CSRF_HEADER = "X-Ralph-CSRF"
FULL = "full"  # the API token: everything
REVIEWER = "reviewer"  # RALPH_REVIEWER_TOKEN: read, approve, reject
# RALPH_REVIEWERS: "reviewer:<name>", each the reviewer's rights under a name of their own
LIFETIME = timedelta(hours=12)

# what the reviewer token may do besides reading
_REVIEWER_WRITES = re.compile(r"^/proposals/(?:[^/]+/)?(?:approve|reject)$|^/console/logout$")


def named_reviewer(name: str) -> str:
    return f"{REVIEWER}:{name}"


def is_reviewer(role: str) -> bool:
    """The shared reviewer token's role, or a named reviewer's."""
    return role == REVIEWER or role.startswith(f"{REVIEWER}:")


def reviewer_may(method: str, path: str) -> bool:
    return method in ("GET", "HEAD") or (method == "POST" and bool(_REVIEWER_WRITES.match(path)))


class Sessions:
    def __init__(
        self,
        tokens: dict[str, str],
        now: Callable[[], datetime],
        failures_per_minute: int = 10,
    ) -> None:
        """`tokens`: role -> token, for the roles configured; `failures_per_minute`: wrong
        tokens a client may send in a minute (0: any number)."""
        self._tokens = tokens
        self._keys = {
            role: hashlib.sha256(b"ralph-console-session:" + token.encode()).digest()
            for role, token in tokens.items()
        }
        self._now = now
        # wrong tokens (bearer, session cookies, the login form) by client
        self.failures = FailedAttempts(failures_per_minute)

    def role_of_token(self, supplied: str) -> str | None:
        for role, token in self._tokens.items():
            if hmac.compare_digest(supplied.encode(), token.encode()):
                return role
        return None

    def issue(self, role: str) -> str:
        payload = f"{role}.{int(self._now().timestamp())}"
        return f"{payload}.{self._sign(role, payload)}"

    def role(self, session: str) -> str | None:
        """The role a session cookie stands for, if it is genuine and not expired."""
        role, _, rest = session.partition(".")
        issued, _, signature = rest.partition(".")
        if role not in self._keys or not issued.isdigit():
            return None
        if not hmac.compare_digest(signature, self._sign(role, f"{role}.{issued}")):
            return None
        age = self._now().timestamp() - int(issued)
        return role if 0 <= age < LIFETIME.total_seconds() else None

    def expires_at(self, session: str) -> datetime | None:
        """When a genuine session cookie expires (None for anything else)."""
        if self.role(session) is None:
            return None
        issued = int(session.split(".")[1])
        return datetime.fromtimestamp(issued, UTC) + LIFETIME

    def csrf(self, session: str) -> str:
        role = session.partition(".")[0]
        return self._sign(role, f"csrf.{session}") if role in self._keys else ""

    def _sign(self, role: str, payload: str) -> str:
        return hmac.new(self._keys[role], payload.encode(), hashlib.sha256).hexdigest()


class FailedAttempts:
    """Wrong tokens by client (address): past `per_minute` in a moving minute, the client is
    refused before its token is even compared, until the oldest of those failures is a
    minute old. Slows guessing (a client tried 386 tokens a second) without locking out the
    right token's owner for long. Per process: each replica counts its own."""

    def __init__(self, per_minute: int = 10) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._item = RateLimitItemPerMinute(max(per_minute, 1))
        self._off = per_minute == 0

    def wait_seconds(self, client: str) -> float | None:
        """How long `client` must wait before its next try, or None if it may try now."""
        if self._off or self._limiter.test(self._item, client):
            return None
        reset, _ = self._limiter.get_window_stats(self._item, client)
        return max(1.0, reset - time.time())

    def failed(self, client: str) -> None:
        if not self._off:
            self._limiter.hit(self._item, client)


def signature_of(session: str) -> str:
    """The part of a session cookie that names it (a revocation records it)."""
    return session.rpartition(".")[2]
