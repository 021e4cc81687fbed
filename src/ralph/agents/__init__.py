"""One Agno agent working for one user: model factory, user-bound tools, a runner with limits."""
