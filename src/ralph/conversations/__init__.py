"""Messages per user and the activity timestamps idle triggers read."""
