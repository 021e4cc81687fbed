"""Validated path parameters shared by routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator

from ralph.validation import LABEL_PATTERN, TASK_NAME_PATTERN, USER_ID_PATTERN, check_user_id

UserIdPath = Annotated[
    str,
    Path(pattern=USER_ID_PATTERN, description="A-Z a-z 0-9 . _ @ -, 1-128 chars, no '..'"),
    AfterValidator(check_user_id),
]
LabelPath = Annotated[str, Path(pattern=LABEL_PATTERN, description="a-z 0-9 _ -, 1-64 chars")]
TaskNamePath = Annotated[str, Path(pattern=TASK_NAME_PATTERN)]

# the same, as optional query filters
UserIdQuery = Annotated[
    str | None,
    Query(pattern=USER_ID_PATTERN, description="Only this user's."),
]
LabelQuery = Annotated[str | None, Query(pattern=LABEL_PATTERN, description="Only this block's.")]
TaskQuery = Annotated[
    str | None,
    Query(
        pattern=TASK_NAME_PATTERN,
        description="Only what this task's agents proposed (`chat`: the chat agent).",
    ),
]
