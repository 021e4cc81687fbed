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
from collections.abc import Callable
from datetime import datetime, timedelta

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
    def __init__(self, tokens: dict[str, str], now: Callable[[], datetime]) -> None:
        """`tokens`: role -> token, for the roles configured."""
        self._tokens = tokens
        self._keys = {
            role: hashlib.sha256(b"ralph-console-session:" + token.encode()).digest()
            for role, token in tokens.items()
        }
        self._now = now

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

    def csrf(self, session: str) -> str:
        role = session.partition(".")[0]
        return self._sign(role, f"csrf.{session}") if role in self._keys else ""

    def _sign(self, role: str, payload: str) -> str:
        return hmac.new(self._keys[role], payload.encode(), hashlib.sha256).hexdigest()
