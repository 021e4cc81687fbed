"""User profiles: `/users/{user_id}`."""

from __future__ import annotations

from fastapi import APIRouter

from ralph.api.deps import ServicesDep
from ralph.api.params import UserIdPath
from ralph.api.schema import response_model
from ralph.users.models import ProfileIn, UserProfile

router = APIRouter(prefix="/users/{user_id}", tags=["users"])

ProfileOut = response_model(
    UserProfile,
    "ProfileOut",
    descriptions={
        "timezone": "IANA name; null: tasks in users' local time use their default_timezone",
        "timezone_changed_at": "When the timezone last changed (null: never set)",
        "updated_at": "null: no profile was written for this user",
    },
)


@router.get("", response_model=ProfileOut)
async def get_profile(user_id: UserIdPath, services: ServicesDep) -> UserProfile:
    """The user's profile (empty if none was written)."""
    return await services.users.get(user_id)


@router.put("", response_model=ProfileOut)
async def put_profile(
    user_id: UserIdPath, profile: ProfileIn, services: ServicesDep
) -> UserProfile:
    """Replace the user's profile: `timezone` (422 for an unknown name) and `metadata`. A
    changed timezone takes effect at the user's next local slot (README: cron in users'
    local time)."""
    return await services.users.put(user_id, profile)
