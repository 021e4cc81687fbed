"""User profiles: each user's timezone (for cron in local time) and free-form metadata."""
