"""Webhooks: events about runs and proposals, POSTed to `RALPH_WEBHOOK_URL`."""
