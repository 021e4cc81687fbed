"""A user's profile, and what a client may set in it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ConfigDict, Field, field_validator

from ralph.validation import StrictInput, check_timezone

# a profile's metadata, as JSON text, is at most this long
MAX_METADATA_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class UserProfile:
    user_id: str
    timezone: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict[str, Any])
    # when `timezone` last changed (None: never set): the cron rule for a user who moves
    timezone_changed_at: datetime | None = None
    updated_at: datetime | None = None


class ProfileIn(StrictInput):
    """A profile as a client writes it (a PUT replaces both fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timezone: str | None = Field(
        default=None,
        examples=["Europe/Berlin"],
        description=(
            'IANA timezone name: cron tasks with `"timezone": "user"` fire at the user\'s '
            "local time. None: the task's `default_timezone`."
        ),
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict[str, Any],
        description=f"Any JSON object, at most {MAX_METADATA_BYTES} bytes as JSON.",
    )

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str | None) -> str | None:
        return None if value is None else check_timezone(value)

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
        return value
