"""User profiles as the API and the CLI use them."""

from __future__ import annotations

from collections.abc import Callable

from ralph.clock import Clock
from ralph.users.models import ProfileIn, UserProfile
from ralph.users.store import ProfileStore


class UserService:
    def __init__(self, store: ProfileStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after each profile written through this service (a user who
        moves to another timezone may be due before the scheduler's planned wake)."""
        self._listeners.append(listener)

    async def get(self, user_id: str) -> UserProfile:
        """The user's profile; an empty one if none was ever written (users exist without
        one: they are named by the tasks and messages that mention them)."""
        return await self._store.get(user_id) or UserProfile(user_id)

    async def put(self, user_id: str, profile: ProfileIn) -> UserProfile:
        """Replace the user's profile."""
        stored = await self._store.put(
            user_id, profile.timezone, profile.metadata, self._clock.now()
        )
        for listener in self._listeners:
            listener()
        return stored
