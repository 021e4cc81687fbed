"""Chat with a user's agent."""
