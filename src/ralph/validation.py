"""Identifiers that flow into SQL, file paths and logs, and the patterns that keep them safe."""

from __future__ import annotations

import re
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)

USER_ID_PATTERN = r"^[A-Za-z0-9._@-]{1,128}$"
LABEL_PATTERN = r"^[a-z0-9_-]{1,64}$"
TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

_USER_ID_RE = re.compile(USER_ID_PATTERN)

# Integers a client sends are bounded by what the columns they are compared with hold
# (SQLite and MariaDB refuse larger ones with an error, not an empty answer).
MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1


def check_user_id(value: str) -> str:
    """Return `value` if it is a valid user id, else raise ValueError.

    A user id names a directory under the data dir, so besides the pattern it may not be
    `.`/`..` or contain `..` anywhere.
    """
    if not _USER_ID_RE.fullmatch(value) or ".." in value or value == ".":
        raise ValueError(
            "user id must be 1-128 characters of A-Z a-z 0-9 . _ @ - and must not contain '..'"
        )
    return value


def check_timezone(value: str) -> str:
    """Return `value` if it names an IANA timezone, else raise ValueError."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r} (use an IANA name)") from None
    return value


def _no_parent_reference(value: str) -> str:
    if ".." in value or value == ".":
        raise ValueError("user id must not be '.' or contain '..'")
    return value


# the pattern as a constraint (checked in pydantic's core, and stated in the OpenAPI document),
# then what a pattern cannot say
UserId = Annotated[
    str, StringConstraints(pattern=USER_ID_PATTERN), AfterValidator(_no_parent_reference)
]
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
# words that are not task names: `apply` is a route beside the tasks' own
# (`/background/tasks/apply`), `chat` names the chat agent's proposals' author (`agent:chat`)
RESERVED_TASK_NAMES = frozenset({"apply", "chat"})


def _not_reserved(value: str) -> str:
    if value in RESERVED_TASK_NAMES:
        raise ValueError(
            f"{value!r} is reserved (not a task name: {', '.join(sorted(RESERVED_TASK_NAMES))})"
        )
    return value


TaskName = Annotated[
    str, StringConstraints(pattern=TASK_NAME_PATTERN), AfterValidator(_not_reserved)
]


class StrictInput(BaseModel):
    """A request body: JSON types are taken as they are (`false` is not a version, `"5"` not
    a number) and unknown keys are refused (a webhook's event posted to the run endpoint
    started a run per event, in a loop), so a client's mistake is a 422, not a guess. Enum
    and time fields, which JSON carries as strings, say `strict=False` (times as
    `JsonTime`)."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _time_as_text(value: object) -> object:
    if isinstance(value, int | float):
        raise ValueError("a time is an ISO 8601 string, e.g. 2026-01-01T09:00:00Z")
    return value


# a time in a JSON body: an ISO 8601 string with its offset (a number is not taken as epoch)
JsonTime = Annotated[AwareDatetime, BeforeValidator(_time_as_text), Field(strict=False)]


def unique_user_ids(value: list[str]) -> list[str]:
    """`value` if no user id appears twice, else ValueError naming the repeated ones."""
    seen: set[str] = set()
    duplicates = sorted({u for u in value if u in seen or seen.add(u)})
    if duplicates:
        raise ValueError(f"duplicate user ids: {', '.join(duplicates[:5])}")
    return value
