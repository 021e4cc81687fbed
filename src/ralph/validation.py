"""Identifiers that flow into SQL, file paths and logs, and the patterns that keep them safe."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

USER_ID_PATTERN = r"^[A-Za-z0-9._@-]{1,128}$"
LABEL_PATTERN = r"^[a-z0-9_-]{1,64}$"
TASK_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

_USER_ID_RE = re.compile(USER_ID_PATTERN)


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


UserId = Annotated[str, AfterValidator(check_user_id)]
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
TaskName = Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]
